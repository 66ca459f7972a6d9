"""FIDCallback's logged FD / KID against an independent computation (numpy, not lightning_distill.metrics).

The recomputation samples the same images (the callback's protocol: chunk c drawn from
``chunk_seed(seed, c)``, the EMA weights), takes features with the feature network directly, and computes

    FD  = ||mu_r - mu_g||^2 + Tr(S_r) + Tr(S_g) - 2 sum_i sqrt(lambda_i(S_r S_g))    (eigenvalues of the product)
    KID = mean over subsets of the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3

in numpy, with KID's subsets drawn as the callback documents (per subset one ``randperm`` of the reference
rows, then one of the generated rows, from a generator seeded with ``seed``). The 2-process version of
this check is tests/test_distributed.py::test_fid_callback_under_ddp_matches_single_process.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from lightning_distill.callbacks.ema import EMA
from lightning_distill.callbacks.fid import FIDCallback
from lightning_distill.data import TeacherDataModule
from lightning_distill.feature_net import DigitsFeatureNet
from lightning_distill.methods.diffusion import DiffusionTraining
from lightning_distill.metrics import chunk_bounds, chunk_seed

from conftest import make_tiny_unet
from test_evaluate import MemoryLogger, tiny_net


def np_fd(real: np.ndarray, fake: np.ndarray) -> float:
    mu_r, mu_g = real.mean(0), fake.mean(0)
    s_r, s_g = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    # S_r S_g is similar to a PSD matrix: real, non-negative eigenvalues up to round-off
    eig = np.linalg.eigvals(s_r @ s_g).real.clip(min=0)
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(s_r) + np.trace(s_g) - 2 * np.sqrt(eig).sum())


def np_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731 - unbiased: no diagonal terms
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def np_kid(real: np.ndarray, fake: np.ndarray, subsets: int, subset_size: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    m = min(subset_size, len(real), len(fake))
    scores = []
    for _ in range(subsets):
        r = torch.randperm(len(real), generator=g)[:m].numpy()
        f = torch.randperm(len(fake), generator=g)[:m].numpy()
        scores.append(np_mmd2(real[r], fake[f]))
    return float(np.mean(scores))


@torch.no_grad()
def independent_scores(model, denoiser, net, reference_images, fid: FIDCallback, steps: int, seed: int | None = None) -> dict[str, float]:
    """FD and KID of ``denoiser``'s samples at ``steps`` steps with evaluation noise ``seed`` (default: the
    callback's first), recomputed outside the library's metric code."""
    seed = fid.seed if seed is None else seed
    net = net.eval()
    fake = []
    for c, (a, b) in enumerate(chunk_bounds(fid.num_samples, fid.chunk_size)):
        x = model.sample(b - a, steps, torch.Generator().manual_seed(chunk_seed(seed, c)), denoiser=denoiser)
        fake.append(net(x).double().numpy())
    fake = np.concatenate(fake)
    real = net(reference_images).double().numpy()
    return {"fid": np_fd(real, fake), "kid": np_kid(real, fake, fid.kid_subsets, fid.kid_subset_size, seed)}


def test_logged_fd_and_kid_equal_an_independent_computation(tmp_path):
    """Several chunks (4, 4, 4, 2 images), KID subsets smaller than the set, the EMA copy sampled."""
    fid = FIDCallback(every_n_steps=2, num_samples=14, steps=[1, 2], feature_net=tiny_net(), kid_subsets=4,
                      kid_subset_size=5, chunk_size=4, seed=3, cache_dir=str(tmp_path / "cache"))
    ema = EMA(decay=0.9)
    logger = MemoryLogger()
    L.seed_everything(0)
    model = DiffusionTraining(unet=make_tiny_unet(8), sample_steps=2,
                              optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dm = TeacherDataModule(teacher=None, image_size=8, batch_size=8)
    trainer = L.Trainer(max_steps=2, logger=logger, callbacks=[ema, fid], enable_checkpointing=False,
                        default_root_dir=tmp_path, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, dm)
    (step, logged), = [(s, m) for s, m in logger.logged if any(k.startswith("fid/") for k in m)]
    assert step == 2
    averaged = ema.sampling_module(model)
    # after two updates the EMA copy is (2/11) w1 + (9/11) w2: not the raw student, so the check below can
    # tell which of the two the callback sampled
    assert any(not torch.equal(p, q) for p, q in zip(averaged.parameters(), model.student.parameters()))
    for s in (1, 2):
        want = independent_scores(model, averaged, fid.feature_net, dm.train_images(), fid, s)
        for metric in ("fid", "kid"):
            got = logged[f"{metric}/digits-feat/{s}step/n14"]
            assert got == pytest.approx(want[metric], rel=1e-6, abs=1e-9), f"{metric} at {s} steps"
        raw = independent_scores(model, model.student, fid.feature_net, dm.train_images(), fid, s)
        assert logged[f"fid/digits-feat/{s}step/n14"] != pytest.approx(raw["fid"], rel=1e-6), \
            "the logged FD is the raw student's, not the EMA copy's"


def test_several_seeds_log_the_mean_over_them(tmp_path):
    """seed=[3, 5]: each logged metric is the mean of the two single-seed computations, and differs from
    either alone (so the check can tell the mean from one seed's value)."""
    fid = FIDCallback(every_n_steps=0, num_samples=10, steps=[2], feature_net=tiny_net(), kid_subsets=3,
                      kid_subset_size=4, chunk_size=4, seed=[3, 5], cache_dir=str(tmp_path / "cache"))
    logger = MemoryLogger()
    L.seed_everything(0)
    model = DiffusionTraining(unet=make_tiny_unet(8), sample_steps=2, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dm = TeacherDataModule(teacher=None, image_size=8, batch_size=8)
    trainer = L.Trainer(max_steps=1, logger=logger, callbacks=[fid], enable_checkpointing=False,
                        default_root_dir=tmp_path, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, dm)
    (logged,) = [m for _, m in logger.logged if any(k.startswith("fid/") for k in m)]
    each = [independent_scores(model, model.student, fid.feature_net, dm.train_images(), fid, 2, seed) for seed in (3, 5)]
    for metric in ("fid", "kid"):
        got = logged[f"{metric}/digits-feat/2step/n10"]
        assert got == pytest.approx((each[0][metric] + each[1][metric]) / 2, rel=1e-6, abs=1e-9), metric
        assert all(got != pytest.approx(e[metric], rel=1e-3) for e in each), f"{metric} is one seed's value"


@pytest.mark.parametrize("seed", [[], [1, 1]])
def test_seed_list_must_be_distinct_and_non_empty(seed):
    with pytest.raises(ValueError, match="distinct"):
        FIDCallback(seed=seed)


def test_evaluations_leave_training_random_stream_untouched(tmp_path, monkeypatch):
    """A run with FIDCallback evaluating every step trains exactly as one without it: building the feature
    network (random initial weights, here drawn from the global RNG) and sampling happen in an RNG fork."""
    from lightning_distill.callbacks import fid as fid_module

    def fresh_net(spec, **kwargs):
        return DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8)  # consumes the global RNG

    monkeypatch.setattr(fid_module, "get_feature_net", fresh_net)

    def fit(callbacks):
        torch.manual_seed(0)
        model = DiffusionTraining(unet=make_tiny_unet(8), sample_steps=2)
        trainer = L.Trainer(max_steps=3, logger=False, callbacks=[EMA(decay=0.9), *callbacks], enable_checkpointing=False,
                            default_root_dir=tmp_path, limit_val_batches=0, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu")
        trainer.fit(model, TeacherDataModule(teacher=None, image_size=8, batch_size=8))
        return model.student.state_dict()

    plain = fit([])
    fid = FIDCallback(every_n_steps=1, num_samples=6, steps=[1], feature_net="digits", kid=False, chunk_size=4,
                      cache_dir=str(tmp_path / "cache"))
    with_fid = fit([fid])
    assert fid.last_eval_step == 3
    for k in plain:
        torch.testing.assert_close(with_fid[k], plain[k], rtol=0, atol=0, msg=k)


def test_the_stored_teacher_line_is_keyed_by_sample_count_and_feature_network_content():
    """A resumed run reuses the checkpoint's teacher numbers only under the same protocol: another sample count,
    or the same feature network name with other weights / feature scale (FD x 4 at scale 2), is another key."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"teacher": "t", "data": "digits", "image_size": 8}))
    module = SimpleNamespace(teacher=None)

    def key(num_samples=64, scale=1.0, shift=0.0):
        fid = FIDCallback(every_n_steps=1, num_samples=num_samples, feature_net="digits")
        torch.manual_seed(0)
        fid.feature_net = DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8)
        fid.feature_net.set_feature_scale(scale)
        with torch.no_grad():
            fid.feature_net.head[-1].bias.add_(shift)
        return fid._teacher_key(trainer, module)

    assert key() == key()
    assert len({key(), key(num_samples=32), key(scale=2.0), key(shift=1.0)}) == 4


def test_progressive_teacher_line_scores_the_configured_teacher_after_promotions(tiny_teacher_dir, tmp_path):
    """steps=["current"] on a progressive run: the 1-step teacher line is first sampled in round 1, after the
    2-step student was promoted to teacher; it must be the configured teacher's 1-step FD (the line's key says
    so), not the promoted student's."""
    from lightning_distill.callbacks.progressive import TeacherSwap
    from lightning_distill.methods.progressive import ProgressiveDistillation
    from lightning_distill.metrics import sample_teacher

    fid = FIDCallback(every_n_steps=2, num_samples=8, steps=["current"], feature_net=tiny_net(), kid=False,
                      log_teacher=True, chunk_size=4, seed=1, cache_dir=str(tmp_path / "cache"))
    logger = MemoryLogger()
    L.seed_everything(0)
    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), image_size=8, batch_size=8)
    model = ProgressiveDistillation(dm.teacher, num_student_steps=2, num_log_samples=0,
                                    optimizer=lambda p: torch.optim.Adam(p, lr=5e-2))
    configured = dm.teacher
    swap = TeacherSwap(steps_per_round=2, final_steps=1)
    trainer = L.Trainer(max_steps=-1, max_epochs=-1, logger=logger, callbacks=[fid, swap], enable_checkpointing=False,
                        default_root_dir=tmp_path, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, dm)
    assert model.num_student_steps == 1 and model.teacher is not configured  # promoted once
    logged = {k: v for _, m in logger.logged for k, v in m.items() if k.endswith("/teacher")}
    net = fid.feature_net.eval()
    real = net(dm.train_images()).double().numpy()

    def fd_of(teacher, steps):
        chunks = enumerate(chunk_bounds(fid.num_samples, fid.chunk_size))
        fake = [net(sample_teacher(teacher, b - a, steps, torch.Generator().manual_seed(chunk_seed(1, c)))).double()
                for c, (a, b) in chunks]
        return np_fd(real, torch.cat(fake).numpy())

    for steps in (2, 1):
        assert logged[f"fid/digits-feat/{steps}step/n8/teacher"] == pytest.approx(fd_of(configured, steps), rel=1e-6)
    assert logged["fid/digits-feat/1step/n8/teacher"] != pytest.approx(fd_of(model.teacher, 1), rel=1e-3), \
        "the promoted teacher scores the same: the check cannot tell them apart"
