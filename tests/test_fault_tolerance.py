"""Fault tolerance: SIGKILL + resume equals an uninterrupted run; NaN stops training cleanly; atomic writes.

Crash-then-resume, for every debug preset under configs/ (a method extends this test by landing its
``configs/<method>/debug.yaml``): a forked child runs the CLI with a checkpoint every optimiser step and
is SIGKILLed in the middle of a step drawn from ``random.Random(f"{LD_TEST_KILL_SEED}:{preset}")``
(``LD_TEST_KILL_SEED`` defaults to 0; set it to explore other steps; failures name the seed and the step)
(after backward, before the update); the parent
resumes from ``last.ckpt`` in place and compares with an uninterrupted run of the same seed: every
tensor of the LightningModule except the frozen teacher (student, target networks, discriminators),
every optimiser state, and every callback state (EMA copies, teacher swaps, random states).

Exactness: on one machine with a fixed thread count the resumed run is bit-identical (the tolerance
below is 0 plus float noise we have never observed); lightning_distill/resume.py says what makes it so
and docs/scaling.md where it cannot be (other world size, other device or thread count).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch

import _ddp_worker
from _method_configs import all_debug_presets, load_records, max_abs_diff, preset_args, write_fixtures

PRESETS = all_debug_presets()
ATOL = 1e-6  # observed: 0.0 (bit-identical) for every preset on CPU
KILL_SEED = int(os.environ.get("LD_TEST_KILL_SEED", "0"))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("ft_fixtures"))


def _child(args: list[str], env: dict) -> None:
    os.environ.update(env)
    try:
        _ddp_worker.main(args)
    except SystemExit as err:  # the CLI's error exit: keep its code
        os._exit(err.code if isinstance(err.code, int) else 1)
    os._exit(0)


def run_forked(args: list[str], env: dict, timeout: float = 240) -> int:
    """Run the CLI in a forked child (a real process: a real SIGKILL); returns its exit code (-9: killed)."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(args, env))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"training child did not finish within {timeout} s: {args}")
    return proc.exitcode


def _run(monkeypatch, args: list[str], **env) -> None:
    for key in ("LD_TEST_OUT", "LD_TEST_CKPT_EVERY", "LD_TEST_CKPT_DIR", "LD_TEST_KILL_AT", "LD_TEST_NAN_AT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    _ddp_worker.main(args)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_sigkill_then_resume_equals_uninterrupted(name, fixtures, tmp_path, monkeypatch):
    kill_and_resume(name, fixtures, tmp_path, monkeypatch)


def kill_and_resume(name, fixtures, tmp_path, monkeypatch, extra: tuple[str, ...] = ()) -> None:
    """SIGKILL preset ``name`` (plus CLI ``extra`` arguments) mid-run, resume, compare with a straight run."""
    # Uninterrupted reference (same callbacks, including the every-step checkpoint).
    ref_args = ["fit", *preset_args(name, tmp_path / "ref", fixtures), *extra]
    _run(monkeypatch, ref_args, LD_TEST_OUT=tmp_path / "ref_out", LD_TEST_CKPT_EVERY=1,
         LD_TEST_CKPT_DIR=tmp_path / "ref" / "every")
    (ref,) = load_records(tmp_path / "ref_out")
    total = ref["global_step"]
    assert total >= 2, f"{name}: debug preset too short to kill mid-run ({total} steps)"

    # A random step among those that end a training batch (with manual optimisation one batch may take
    # several optimiser steps, e.g. D then G): killing during the next batch leaves last.ckpt at k.
    ends = sorted(torch.load(p, map_location="cpu", weights_only=True)["global_step"]
                  for p in (tmp_path / "ref" / "every").glob("step=*.ckpt"))
    ends = [s for s in ends if 0 < s < total]
    assert ends, f"{name}: no checkpoint between the first and the last step"
    # A str seed is hashed (sha512), not hash()-ed: the same step on every run and machine.
    k = random.Random(f"{KILL_SEED}:{name}").choice(ends)
    what = f"{name}, killed after step {k} of {ends} (LD_TEST_KILL_SEED={KILL_SEED})"
    root, every = tmp_path / "crash", tmp_path / "crash" / "every"
    args = ["fit", *preset_args(name, root, fixtures), *extra]
    code = run_forked(args, {"LD_TEST_CKPT_EVERY": "1", "LD_TEST_CKPT_DIR": str(every), "LD_TEST_KILL_AT": str(k)})
    assert code == -signal.SIGKILL, f"{what}: the child was not SIGKILLed, exit code {code}"
    last = every / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == k, f"{what}: last.ckpt at step {ckpt['global_step']}"

    _run(monkeypatch, [*args, "--ckpt_path", str(last)], LD_TEST_OUT=tmp_path / "res_out",
         LD_TEST_CKPT_EVERY=1, LD_TEST_CKPT_DIR=every)
    (res,) = load_records(tmp_path / "res_out")
    assert res["global_step"] == total, f"{what}: the resumed run ended at step {res['global_step']}, not {total}"
    for part in ("trained", "optimizers", "callbacks"):
        diff, where = max_abs_diff(ref[part], res[part], part)
        assert diff <= ATOL, f"{what}, resumed: {where} differs by {diff}"


NAN_MESSAGE = re.compile(r"non-finite value in loss term '([^']+)' at global step (\d+)")


@pytest.mark.parametrize("name", PRESETS)
def test_nan_stops_with_step_and_term_and_keeps_last_good_checkpoint(name, fixtures, tmp_path, monkeypatch, capsys):
    import yaml

    from _method_configs import debug_config

    max_steps = (yaml.safe_load(debug_config(name).read_text()).get("trainer") or {}).get("max_steps", -1)
    k = 1 if 0 < max_steps <= 2 else 2
    every = tmp_path / "every"
    args = ["fit", *preset_args(name, tmp_path / "run", fixtures)]
    with pytest.raises(SystemExit) as exc:
        _run(monkeypatch, args, LD_TEST_CKPT_EVERY=1, LD_TEST_CKPT_DIR=every, LD_TEST_NAN_AT=k)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    match = NAN_MESSAGE.search(err)
    assert match, f"{name}: no step/term in the error message: {err[-500:]!r}"
    step = int(match.group(2))
    assert step >= k
    # The last good checkpoint: written before the NaN step, loads safely, entirely finite.
    ckpt = torch.load(every / "last.ckpt", map_location="cpu", weights_only=True)
    # (with several optimiser steps per batch the NaN may strike mid-batch, after the last checkpoint)
    assert 1 <= ckpt["global_step"] <= step
    bad = [key for key, v in ckpt["state_dict"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    assert not bad, f"{name}: non-finite tensors in the last good checkpoint: {bad[:5]}"
    # and training resumes from it (the NaN came from the injected hook, which is gone now)
    monkeypatch.delenv("LD_TEST_NAN_AT")
    _run(monkeypatch, [*args, "--ckpt_path", str(every / "last.ckpt")], LD_TEST_OUT=tmp_path / "out",
         LD_TEST_CKPT_EVERY=1, LD_TEST_CKPT_DIR=every)
    (rec,) = load_records(tmp_path / "out")
    assert rec["global_step"] > ckpt["global_step"]


# --- atomic writes ---------------------------------------------------------------------------------


def _kill_during_checkpoint_write(path: str) -> None:
    from lightning_distill.checkpoint_io import AtomicCheckpointIO

    real_save = torch.save

    def save_half_then_die(obj, f, *a, **k):
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((1000,), 2.0)}, "global_step": 2}, path)


def test_checkpoint_kill_during_write_keeps_previous(tmp_path):
    from lightning_distill.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((1000,), 1.0)}, "global_step": 1}, path)
    proc = multiprocessing.get_context("fork").Process(target=_kill_during_checkpoint_write, args=(str(path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    # a partial temporary file was written next to it, and the target is untouched
    partial = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert partial and all(p.name.startswith(".last.ckpt.") for p in partial)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.full((1000,), 1.0))
    # the next complete save replaces it
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 3}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3


def test_atomic_checkpoint_io_in_a_fit(tmp_path, monkeypatch):
    """The plugin is a drop-in: every checkpoint of a CLI fit is written through its atomic save, and the
    last one holds the trained weights."""
    from lightning_distill import checkpoint_io
    from lightning_distill.cli import cli_main

    from _method_configs import debug_config

    written = []
    real = checkpoint_io.atomic_torch_save
    monkeypatch.setattr(checkpoint_io, "atomic_torch_save", lambda obj, path: written.append(Path(path)) or real(obj, path))
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", str(debug_config("teacher")), "--trainer.default_root_dir", str(root),
                    "--trainer.plugins", "lightning_distill.checkpoint_io.AtomicCheckpointIO",
                    "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, checkpoint_io.AtomicCheckpointIO)
    folder = root / "checkpoints"
    on_disk = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" in on_disk and not [n for n in on_disk if n.startswith(".")], on_disk  # no temp file left
    assert {p.resolve() for p in written} == {p.resolve() for p in folder.iterdir()}, (written, on_disk)
    ckpt = torch.load(folder / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == cli.trainer.global_step > 0
    trained = cli.model.state_dict()
    assert set(ckpt["state_dict"]) == set(trained)
    for key, value in trained.items():
        assert torch.equal(ckpt["state_dict"][key], value), key


def _kill_during_export(target: str) -> None:
    import lightning_distill.export as export
    from conftest import make_tiny_unet
    from diffusers import DDIMScheduler

    class Dying:
        def __init__(self, pipe):
            self.pipe = pipe

        def save_pretrained(self, folder, **kw):
            self.pipe.unet.save_pretrained(Path(folder) / "unet")  # half of the pipeline is on disk
            os.kill(os.getpid(), signal.SIGKILL)

    real = export.make_pipeline
    export.make_pipeline = lambda unet, sched, *args, **kwargs: Dying(real(unet, sched, *args, **kwargs))
    export.export_pipeline(make_tiny_unet(seed=1), DDIMScheduler(num_train_timesteps=1024), target)


def test_export_kill_during_write_keeps_previous(tmp_path):
    from conftest import make_tiny_unet
    from diffusers import DDIMScheduler, DDPMPipeline

    from lightning_distill.export import export_pipeline

    target = tmp_path / "student"
    first = make_tiny_unet(seed=0)
    export_pipeline(first, DDIMScheduler(num_train_timesteps=1024), target)
    proc = multiprocessing.get_context("fork").Process(target=_kill_during_export, args=(str(target),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    pipe = DDPMPipeline.from_pretrained(target)
    for (name, a), b in zip(first.state_dict().items(), pipe.unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_atomic_torch_save_is_durable_and_keeps_the_umask_mode(tmp_path, monkeypatch):
    """The file and its folder are fsynced before / after the rename, the temporary name is mkstemp's (no
    PID: ranks of two nodes sharing a cache never share it) and the file gets a plain open's mode under the
    umask (mkstemp's 0600 made shared checkpoints and caches unreadable to the group)."""
    import stat

    from lightning_distill import checkpoint_io

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_mode) or real_fsync(fd))
    monkeypatch.setattr(os, "getpid", lambda: 7)  # two nodes' ranks may share a PID
    (tmp_path / "x.pt.7.tmp").write_text("the other node's half-written file")
    umask = os.umask(0o022)
    try:
        checkpoint_io.atomic_torch_save({"w": torch.ones(3)}, tmp_path / "x.pt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.pt").stat().st_mode) == 0o644
    assert [stat.S_ISREG(m) for m in synced] == [True, False]  # the file, then its folder
    assert (tmp_path / "x.pt.7.tmp").read_text() == "the other node's half-written file"
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], torch.ones(3))



def test_the_reference_cache_is_written_durably(tmp_path, monkeypatch):
    """The feature cache goes through atomic_torch_save, as the text and latent caches do: fsynced."""
    from lightning_distill import metrics
    from lightning_distill.feature_net import DigitsFeatureNet

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    net = DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8).eval()
    stats = metrics.reference_stats(torch.rand(16, 1, 8, 8) * 2 - 1, net, tmp_path, batch_size=16)
    assert len(synced) == 2 and [p.name for p in tmp_path.iterdir()] == [f"{stats.key}.pt"]


def test_streams_of_neighbouring_seeds_do_not_alias():
    """Seed s at epoch e + 1 shuffled as seed s + 1 at epoch e (seed + epoch), rank r of seed s reseeded as
    rank 0 of seed s + r, and a DDP predict's ranks drew the same noise: the derived seeds are offset_seed's
    now, whose low 32 bits (all a CPU generator keeps) differ for every small (base, index) pair. Seed 0's
    data order is unchanged (the measured runs' and the guard's)."""
    from types import SimpleNamespace

    from lightning_distill.methods.base import DistillationMethod
    from lightning_distill.resume import EpochSeededRandomSampler, offset_seed

    low = {offset_seed(b, i) % 2**32 for b in range(200) for i in range(200)}
    assert len(low) == 200 * 200

    def order(seed, epoch):
        sampler = EpochSeededRandomSampler(range(50), seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) != order(0, 1) and order(2, 3) != order(3, 2)
    assert order(0, 4) == torch.randperm(50, generator=torch.Generator().manual_seed(4)).tolist()

    noise = []
    for rank in (0, 1):
        module = SimpleNamespace(hparams=SimpleNamespace(seed=0), global_rank=rank,
                                 _trainer=SimpleNamespace(world_size=2))
        gens = [DistillationMethod.predict_generator(module, b) for b in (0, 1)]
        noise += [torch.randn(4, generator=g) for g in gens]
    assert all(not torch.equal(a, b) for i, a in enumerate(noise) for b in noise[i + 1:])
