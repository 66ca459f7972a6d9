"""Metrics maths against torchmetrics and closed forms; feature networks; the reference cache; samplers."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_distill import metrics as M
from lightning_distill.feature_net import BUNDLED_CLASSIFIER, DigitsFeatureNet, load_digits_feature_net, save_feature_net


class Flat(nn.Module):
    """'Images' that already are features: lets torchmetrics and our functions see the same vectors."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.flatten(1)


def _features(n=300, d=6, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ a + shift


def test_fd_identical_sets_is_zero_and_closed_form():
    f = _features()
    assert M.fd_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # Two Gaussians with equal covariance: FD = ||mu1 - mu2||^2 exactly.
    mu, sigma = M.gaussian_stats(f)
    assert M.frechet_distance(mu, sigma, mu + 2.0, sigma) == pytest.approx(4.0 * mu.numel(), rel=1e-9)
    # Diagonal covariances: FD = sum (s1 - s2)^2 in standard deviations.
    s1, s2 = torch.tensor([1.0, 4.0]), torch.tensor([9.0, 1.0])
    fd = M.frechet_distance(torch.zeros(2), torch.diag(s1), torch.zeros(2), torch.diag(s2))
    assert fd == pytest.approx(float(((s1.sqrt() - s2.sqrt()) ** 2).sum()), rel=1e-9)


def test_fd_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _features(seed=0), _features(seed=1, shift=0.5)
    tm = FrechetInceptionDistance(feature=Flat(real.shape[1]), normalize=True)
    tm.update(real.float(), real=True)
    tm.update(fake.float(), real=False)
    ours = M.fd_from_features(real.float(), fake.float())
    assert ours > 1.0
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)


def test_kid_matches_torchmetrics_with_same_seed():
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _features(seed=0), _features(seed=2, shift=0.3)
    tm = KernelInceptionDistance(feature=Flat(real.shape[1]), subsets=7, subset_size=50, normalize=True)
    tm.update(real.float(), real=True)
    tm.update(fake.float(), real=False)
    torch.manual_seed(123)
    tm_mean, tm_std = tm.compute()
    mean, std = M.kernel_distance(real.float(), fake.float(), 7, 50, generator=torch.Generator().manual_seed(123))
    assert mean == pytest.approx(float(tm_mean), rel=1e-5)
    assert std == pytest.approx(float(tm_std), rel=1e-5)


def _real_digits(size=8):
    from lightning_distill.data import load_digits_tensor

    return load_digits_tensor(size)[0]


def test_reference_stats_are_cached_and_reused(tmp_path):
    torch.manual_seed(0)
    net = DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8).eval()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    images = _real_digits()[:64]
    first = M.reference_stats(images, net, tmp_path, batch_size=32)
    n_calls = len(calls)
    assert n_calls == 2 and not first.from_cache
    second = M.reference_stats(images, net, tmp_path, batch_size=32)
    assert len(calls) == n_calls, "the second call recomputed the features"
    assert second.from_cache and second.key == first.key
    torch.testing.assert_close(second.sigma, first.sigma)
    # Other images, or other weights: another entry.
    assert M.reference_key(images[:32], net) != first.key
    # the same weights with another feature scale (features x 2, FD x 4): another entry
    net.set_feature_scale(2.0)
    scaled = M.reference_stats(images, net, tmp_path, batch_size=32)
    assert not scaled.from_cache and scaled.key != first.key
    torch.testing.assert_close(scaled.sigma, 4 * first.sigma)
    net.set_feature_scale(1.0)
    assert M.reference_key(images, net) == first.key
    with torch.no_grad():
        net.head[-1].weight.add_(1.0)  # even a layer FD does not use changes the fingerprint
    assert M.reference_key(images, net) != first.key


@pytest.mark.parametrize("damage", ["truncated", "other keys", "other shape"])
def test_a_damaged_reference_cache_entry_is_recomputed_and_replaced(tmp_path, damage):
    """A reference-statistics entry cut short (a copy, a disk error) made torch.load raise an error naming no file,
    aborting the evaluation; one without the expected tensors raised KeyError. Now: a warning naming the file,
    the statistics computed again, and the entry replaced (atomically) by a good one."""
    torch.manual_seed(0)
    net = DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8).eval()
    images = _real_digits()[:40]
    first = M.reference_stats(images, net, tmp_path)
    path = tmp_path / f"{first.key}.pt"
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "other keys":
        torch.save({"mu": first.mu}, path)
    else:
        torch.save({"mu": first.mu, "sigma": first.sigma, "features": first.features[:10]}, path)
    with pytest.warns(UserWarning, match=f"cache entry {path} cannot be used") as record:
        again = M.reference_stats(images, net, tmp_path)
    assert len(record) == 1 and "computing it again" in str(record[0].message)
    assert not again.from_cache
    torch.testing.assert_close(again.features, first.features)
    torch.testing.assert_close(again.sigma, first.sigma)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        third = M.reference_stats(images, net, tmp_path)  # the entry was replaced: read back, no warning
    assert third.from_cache and not record
    torch.testing.assert_close(third.features, first.features)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_reference_stats_are_used_uncached_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    """A read-only or full cache directory (simulated: the atomic write raises PermissionError, as it does for a
    user without write access) aborted the evaluation with a traceback; teacher cells already fell back to
    uncached. Now the statistics are computed, returned and not cached, with a warning naming the file."""
    torch.manual_seed(0)
    net = DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8).eval()
    images = _real_digits()[:40]
    want = M.reference_stats(images, net, tmp_path / "writable")

    def read_only(obj, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(M, "atomic_torch_save", read_only)
    with pytest.warns(UserWarning, match=r"cannot write the reference statistics' cache entry .*Permission denied"):
        got = M.reference_stats(images, net, tmp_path / "read_only")
    assert not got.from_cache and not (tmp_path / "read_only" / f"{got.key}.pt").exists()
    torch.testing.assert_close(got.sigma, want.sigma)
    torch.testing.assert_close(got.mu, want.mu)


def test_fd_grows_monotonically_with_gaussian_noise():
    torch.manual_seed(0)
    net = DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8).eval()
    real = _real_digits()
    a, b = real[::2], real[1::2]
    fa = M.extract_features(net, a)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(b.shape, generator=g)
    fds = [M.fd_from_features(fa, M.extract_features(net, b + s * noise)) for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert all(x < y for x, y in zip(fds, fds[1:])), fds


def _random_inception_file(tmp_path, monkeypatch):
    """Save a randomly initialised state dict with torch-fidelity's Inception layout (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    sd = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    path = tmp_path / M.INCEPTION_FILE
    torch.save(sd, path)
    return path, sd


def test_inception_loads_offline_from_file_and_hub_cache(tmp_path, monkeypatch):
    path, sd = _random_inception_file(tmp_path, monkeypatch)
    net = M.InceptionFeatures(feature_extractor_weights_path=path)
    key = "Conv2d_1a_3x3.conv.weight"
    torch.testing.assert_close(net.inception.state_dict()[key], sd[key])  # the file's weights, not fresh ones
    assert M.get_feature_net(net) is net and net.num_features == 2048
    feats = net(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    # torch-fidelity's resize (antialias False) gives other features from the same weights: another cache key
    tf1 = M.InceptionFeatures(feature_extractor_weights_path=path, antialias=False)
    assert M.fingerprint(tf1) != M.fingerprint(net) == M.fingerprint(M.InceptionFeatures(feature_extractor_weights_path=path))
    # The default location is torch hub's cache, where torch-fidelity would put its download.
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(FileNotFoundError) as err:
        M.InceptionFeatures()
    assert str(hub / "checkpoints" / M.INCEPTION_FILE) in str(err.value)
    path.rename(hub / "checkpoints" / M.INCEPTION_FILE)
    assert M.inception_weights_path() == hub / "checkpoints" / M.INCEPTION_FILE


def test_inception_features_of_non_finite_images_are_nan(tmp_path, monkeypatch):
    """A diverged model's NaN images: the uint8 quantisation cast NaN to 0, so they got the features of an all-black
    image and a finite FD / KID, where score_features promises NaN (the digits network's NaN already propagated)."""
    path, _ = _random_inception_file(tmp_path, monkeypatch)
    net = M.InceptionFeatures(feature_extractor_weights_path=path)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    x[1] = float("nan")
    x[2, 0, 3, 5] = float("inf")  # one non-finite pixel is enough
    with torch.no_grad():
        feats = net(x)
        alone = net(x[[0, 3]])
    assert torch.isnan(feats[1]).all() and torch.isnan(feats[2]).all()
    torch.testing.assert_close(feats[[0, 3]], alone)  # the finite rows are untouched
    real = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        fr = net(real).double()
        black = net(torch.full((2, 3, 16, 16), -1.0))
    assert torch.isfinite(fr).all() and torch.isfinite(black).all()
    ref = M.ReferenceStats(*M.gaussian_stats(fr), fr, "k", "inception")
    s = M.score_features(feats.double(), ref, kid=True, kid_subsets=2, kid_subset_size=4)
    assert math.isnan(s.fd) and math.isnan(s.kid)


def test_inception_missing_explicit_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/inception.pth") as err:
        M.get_feature_net("inception", feature_extractor_weights_path=missing)
    assert M.INCEPTION_FILE in str(err.value)


def test_any_module_with_num_features_plugs_in(tmp_path):
    with pytest.raises(TypeError, match="num_features"):
        M.get_feature_net(nn.Flatten())
    with pytest.raises(ValueError, match="choose one of"):
        M.get_feature_net("vgg")
    net = M.get_feature_net(Flat(64))
    ref = M.reference_stats(_real_digits()[:40], net, tmp_path)
    assert ref.mu.shape == (64,) and ref.feature_net == "Flat"


def test_bundled_classifier_meets_accuracy_and_roundtrips(tmp_path):
    meta = json.loads((BUNDLED_CLASSIFIER / "config.json").read_text())
    assert meta["test_accuracy"] >= 0.97 and "val split" in meta["test_split"]
    net = load_digits_feature_net()
    assert net.num_features == 64 and M.feature_net_name(net) == "digits-feat"
    assert not any(p.requires_grad for p in net.parameters())
    # Works at 8x8 too: the 16x16 digits are the 8x8 ones upsampled the same way.
    x8, x16 = _real_digits(8)[:50], _real_digits(16)[:50]
    torch.testing.assert_close(net(x8), net(x16), atol=1e-4, rtol=1e-4)
    save_feature_net(net, tmp_path / "copy", {"test_accuracy": meta["test_accuracy"]})
    torch.testing.assert_close(load_digits_feature_net(tmp_path / "copy")(x16), net(x16))
    with pytest.raises(FileNotFoundError, match="digits_classifier.yaml"):
        load_digits_feature_net(tmp_path / "empty")


def test_generated_features_same_seed_same_set_for_any_rank_split():
    torch.manual_seed(0)
    net = DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8).eval()

    def sample(n, g, labels):
        return torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1) + labels.view(-1, 1, 1, 1) * 0.1

    one = M.generated_features(sample, net, 10, seed=3, chunk_size=4, num_classes=10)
    again = M.generated_features(sample, net, 10, seed=3, chunk_size=4, num_classes=10)
    torch.testing.assert_close(one, again)
    r0 = M.generated_features(sample, net, 10, seed=3, chunk_size=4, num_classes=10, rank=0, world_size=2)
    r1 = M.generated_features(sample, net, 10, seed=3, chunk_size=4, num_classes=10, rank=1, world_size=2)
    assert r0.shape[0] == 6 and r1.shape[0] == 4  # chunks 0, 2 (4 + 2 images) and chunk 1
    torch.testing.assert_close(torch.cat([r0[:4], r1, r0[4:]]), one)
    # the gathered ranks' rows go back into chunk order: KID draws its subsets by row index
    torch.testing.assert_close(M.merge_rank_features([r0, r1], 10, 4), one)
    calls = {r: [] for r in range(3)}

    def counted(rank):
        def fn(n, g, labels):
            calls[rank].append(n)
            return sample(n, g, labels)
        return fn

    three = [M.generated_features(counted(r), net, 10, seed=3, chunk_size=3, num_classes=10, rank=r, world_size=3)
             for r in range(3)]
    assert [f.shape[0] for f in three] == [4, 3, 3]  # chunks (0, 3), (1,), (2,): 3 + 1, 3, 3 images
    # every rank samples twice (ranks 1 and 2 draw a dropped 1-image batch in round 2): under FSDP2 a forward
    # is a collective, and a rank that stopped early would leave the others waiting
    assert calls == {0: [3, 1], 1: [3, 1], 2: [3, 1]}
    single = M.generated_features(sample, net, 10, seed=3, chunk_size=3, num_classes=10)
    torch.testing.assert_close(M.merge_rank_features(three, 10, 3), single)
    with pytest.raises(ValueError, match=r"rank row counts \[6, 3\]"):
        M.merge_rank_features([r0, r1[:3]], 10, 4)
    other = M.generated_features(sample, net, 10, seed=4, chunk_size=4, num_classes=10)
    assert not torch.allclose(other, one)


def test_sample_teacher_one_step_is_the_clipped_x0_prediction(tiny_teacher_dir):
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(tiny_teacher_dir)
    x = M.sample_teacher(teacher, 3, 1, torch.Generator().manual_seed(0))
    noise = randn_tensor((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    t_max = teacher.schedule.num_train_timesteps - 1  # trailing spacing starts at the last timestep
    expected = teacher.denoiser(noise, torch.tensor(t_max)).x0
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    assert x.abs().max() <= 1.0


def test_decode_latents_inverts_the_teachers_encoding_with_an_sd3_shift():
    """Evaluation's decode is the inverse of DiffusionTeacher.encode_images: z / scaling_factor + shift_factor
    (an SD3 VAE has a shift; without it FID of SD3 students was computed on colour-shifted images)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, scaling_factor=1.5,
                        shift_factor=0.3).eval()
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        expected = vae.decode(z / 1.5 + 0.3).sample
        torch.testing.assert_close(M.decode_latents(z, vae), expected)
        assert (M.decode_latents(z, vae) - vae.decode(z / 1.5).sample).abs().max() > 1e-3
