"""Teacher pairs (grids, shards, resume, corruption) and the one-step data-distillation student."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lightning_distill.methods.data_distillation import DataDistillation, one_step_sample, pair_regression_loss
from lightning_distill.teacher import load_teacher
from lightning_distill.teacher_pairs import (
    PairsConfig,
    PairsError,
    ddim_sample,
    ensure_pairs,
    generate_pairs,
    load_pairs,
    quadratic_timesteps,
    sampling_grid,
    shard_name,
    verify_pairs,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)


def _cfg(folder, **kw):
    base = dict(dir=str(folder), num_pairs=40, num_steps=3, time_grid="quadratic", shard_size=8, batch_size=5,
                seed=7, progress=False)
    return PairsConfig(**{**base, **kw})


@pytest.fixture
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


# --- grids and the sampler -----------------------------------------------------------------------


def test_quadratic_grid_by_hand():
    # (linspace(0, sqrt(16), 5))^2 = 0, 1, 4, 9, 16
    assert quadratic_timesteps(1024, 5, t_max=16).tolist() == [16, 9, 4, 1, 0, -1]
    # (linspace(0, 2, 10))^2 rounds to 0,0,0,0,1,1,2,2,3,4: duplicates removed
    assert quadratic_timesteps(1024, 10, t_max=4).tolist() == [4, 3, 2, 1, 0, -1]
    g = quadratic_timesteps(1024, 32)
    assert g[0] == 1023 and g[-1] == -1 and bool((g[:-1] > g[1:]).all())
    with pytest.raises(ValueError, match="t_max"):
        quadratic_timesteps(1024, 5, t_max=1024)


def test_trailing_grid_and_one_step_ddim_is_the_x0_estimate(teacher):
    den = teacher.denoiser
    assert sampling_grid(den.schedule, 4, "trailing").tolist() == [1023, 767, 511, 255, -1]
    noise = torch.randn(3, *SHAPE)
    t = torch.full((3,), 1023)
    x = ddim_sample(den, noise, torch.tensor([1023, -1]))
    assert torch.allclose(x, den(noise, t).x0, atol=1e-6)
    with pytest.raises(ValueError, match="time_grid"):
        sampling_grid(den.schedule, 4, "cosine")


# --- generation, resume and corruption -----------------------------------------------------------


def test_pairs_do_not_depend_on_world_size_or_batch_size(teacher, tmp_path):
    one = load_pairs(generate_pairs(teacher.denoiser, _cfg(tmp_path / "a"), SHAPE))
    # Two ranks, run one after the other (rank 1 first: rank 0 writes the manifest once all shards exist).
    cfg2 = _cfg(tmp_path / "b", batch_size=3)
    for rank in (1, 0):
        generate_pairs(teacher.denoiser, cfg2, SHAPE, rank=rank, world_size=2, barrier=lambda: None)
    two = load_pairs(tmp_path / "b")
    assert one["noise"].shape == (40, *SHAPE) and "label" not in one
    assert torch.equal(one["noise"], two["noise"])
    assert torch.allclose(one["sample"], two["sample"], atol=1e-5)
    # The stored sample is the teacher's deterministic DDIM sample of the stored noise.
    grid = sampling_grid(teacher.schedule, 3, "quadratic")
    assert torch.allclose(one["sample"][:5], ddim_sample(teacher.denoiser, one["noise"][:5], grid), atol=1e-5)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [8] * 5
    assert manifest["settings"]["timesteps"] == grid.tolist() and len(manifest["shards"][0]["sha256"]) == 64


def test_killed_generation_resumes_without_duplicates_or_gaps(teacher, tmp_path):
    fresh = load_pairs(generate_pairs(teacher.denoiser, _cfg(tmp_path / "fresh", num_pairs=37), SHAPE))
    cfg = _cfg(tmp_path / "killed", num_pairs=37)
    generate_pairs(teacher.denoiser, cfg, SHAPE, stop_after=2)  # "killed" after 2 complete shards
    folder = tmp_path / "killed"
    assert sorted(p.name for p in folder.iterdir()) == [shard_name(0), shard_name(1)]
    with pytest.raises(PairsError, match="incomplete"):
        load_pairs(folder)
    # The kill also left a half-written temporary file and a truncated final-named shard.
    (folder / f".{shard_name(2)}.tmp").write_bytes(b"\x00" * 100)
    good = (folder / shard_name(1)).read_bytes()
    (folder / shard_name(3)).write_bytes(good[: len(good) // 2])
    mtime0 = (folder / shard_name(0)).stat().st_mtime_ns
    generate_pairs(teacher.denoiser, cfg, SHAPE)
    assert (folder / shard_name(0)).stat().st_mtime_ns == mtime0  # complete shards are skipped
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    resumed = load_pairs(folder)
    assert resumed["noise"].shape[0] == 37
    assert torch.equal(resumed["noise"], fresh["noise"])  # every pair in place: no duplicate, no gap
    assert torch.allclose(resumed["sample"], fresh["sample"], atol=1e-6)
    assert torch.unique(resumed["noise"].flatten(1), dim=0).shape[0] == 37


def test_truncated_shard_is_detected_and_regenerated(teacher, tmp_path):
    cfg = _cfg(tmp_path / "p")
    original = load_pairs(generate_pairs(teacher.denoiser, cfg, SHAPE))
    path = tmp_path / "p" / shard_name(2)
    data = path.read_bytes()
    path.write_bytes(data[:-16])
    assert verify_pairs(tmp_path / "p") == [shard_name(2)]
    with pytest.raises(PairsError, match=r"shard-00002.*truncated or corrupt"):
        load_pairs(tmp_path / "p")
    # Same length, flipped byte: the sha256 catches it.
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(PairsError, match="shard-00002"):
        load_pairs(tmp_path / "p")
    with pytest.warns(UserWarning, match="regenerating"):
        again = ensure_pairs(teacher.denoiser, cfg, SHAPE)
    assert torch.equal(again["noise"], original["noise"]) and torch.allclose(again["sample"], original["sample"])
    assert verify_pairs(tmp_path / "p") == []


def test_cache_made_with_other_settings_is_refused(teacher, tmp_path):
    generate_pairs(teacher.denoiser, _cfg(tmp_path / "p"), SHAPE)
    with pytest.raises(PairsError, match="other settings"):
        generate_pairs(teacher.denoiser, _cfg(tmp_path / "p", num_steps=5), SHAPE)
    with pytest.raises(PairsError, match="other settings"):  # a complete cache is not reused either
        ensure_pairs(teacher.denoiser, _cfg(tmp_path / "p", time_grid="trailing"), SHAPE)
    with pytest.raises(PairsError, match="other settings"):  # nor one made by another teacher
        ensure_pairs(teacher.denoiser, _cfg(tmp_path / "p"), SHAPE, teacher_source="elsewhere")
    assert ensure_pairs(teacher.denoiser, _cfg(tmp_path / "p", batch_size=2), SHAPE)["noise"].shape[0] == 40
    with torch.no_grad():  # the same teacher source, retrained: its weight fingerprint differs
        next(teacher.unet.parameters()).add_(0.5)
    with pytest.raises(PairsError, match="other settings"):
        ensure_pairs(teacher.denoiser, _cfg(tmp_path / "p"), SHAPE)
    with pytest.raises(ValueError, match="time_grid"):
        _cfg(tmp_path / "q", time_grid="uniform")


def test_cache_of_the_same_weights_read_as_another_sampler_is_refused(teacher, tmp_path):
    """The key holds the sampler, not only the weights: the same network read with another prediction type, x0
    clamp or noise schedule gives other pairs (before, each silently reused the old cache)."""
    from diffusers import DDIMScheduler

    from lightning_distill.teacher import DiffusionTeacher

    generate_pairs(teacher.denoiser, _cfg(tmp_path / "p"), SHAPE)
    config = dict(teacher.scheduler_config)
    variants = {
        "prediction": DiffusionTeacher(teacher.unet, DDIMScheduler.from_config(config), prediction_type="epsilon", source=None),
        "clip": DiffusionTeacher(teacher.unet, DDIMScheduler.from_config(config), clip_x0=None, source=None),
        "schedule": DiffusionTeacher(teacher.unet, DDIMScheduler.from_config(config, beta_schedule="linear"), source=None),
    }
    for name, other in variants.items():
        with pytest.raises(PairsError, match="other settings"):
            ensure_pairs(other.denoiser, _cfg(tmp_path / "p"), SHAPE)


def test_pairs_are_the_stock_ddim_samples_of_noise_no_evaluation_draws(teacher, tmp_path):
    """The pairs are what the teacher's stock sampler (DDIMScheduler: x0 clamped, the network's own eps, as the
    evaluation's teacher row samples) draws from their noise, and that noise is none of the evaluation's: at
    seed 0 the pairs used the evaluation chunks' seeds, so a data-distilled student was scored on its training
    inputs."""
    from diffusers import DDIMScheduler

    from lightning_distill.metrics import chunk_seed

    den = teacher.denoiser
    assert den.clip_x0 == 1.0  # the tiny teacher's scheduler clips: where the two DDIM forms differ
    pairs = load_pairs(generate_pairs(den, _cfg(tmp_path / "a", time_grid="trailing", num_steps=4, seed=0), SHAPE))
    stock = DDIMScheduler.from_config(teacher.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                      clip_sample=True, clip_sample_range=1.0)
    stock.set_timesteps(4)
    x = pairs["noise"][:6].clone()
    with torch.no_grad():
        for t in stock.timesteps:
            out = teacher.unet(x, t.expand(6)).sample
            x = stock.step(out, t, x).prev_sample
    torch.testing.assert_close(pairs["sample"][:6], x, atol=1e-5, rtol=1e-5)
    for c in range(8):
        eval_noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(chunk_seed(0, c)))
        assert not any(torch.equal(eval_noise[0], n) for n in pairs["noise"])


def test_class_conditional_pairs_carry_labels(tmp_path):
    from conftest import write_tiny_teacher

    t = load_teacher(write_tiny_teacher(tmp_path / "cond", num_class_embeds=3))
    pairs = load_pairs(generate_pairs(t.denoiser, _cfg(tmp_path / "p", num_pairs=10), SHAPE, num_classes=3))
    assert pairs["label"].shape == (10,) and int(pairs["label"].max()) < 3


# --- the data module hook and the method ---------------------------------------------------------


def test_data_module_pairs_mode(tiny_teacher_dir, tmp_path):
    from lightning_distill.data import TeacherDataModule

    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), image_size=8, batch_size=4,
                           pairs=_cfg(tmp_path / "p", val_fraction=0.25))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"noise", "x", "label"} and batch["noise"].shape == (4, *SHAPE)
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10
    assert dm.train_images().shape[1:] == SHAPE and dm.train_images().shape[0] > 1000  # still the real digits


def test_one_step_student_loss_sample_and_export_agree(teacher, tmp_path):
    model = DataDistillation(teacher=teacher, distance="l1")
    assert model.hparams.sample_steps == 1
    noise, target = torch.randn(4, *SHAPE), torch.rand(4, *SHAPE) * 2 - 1
    t = torch.full((4,), 1023)
    raw = model.student.unet(noise, t).sample
    a, s = teacher.schedule.alpha(t).view(-1, 1, 1, 1), teacher.schedule.sigma(t).view(-1, 1, 1, 1)
    x0 = a * noise - s * raw  # v-prediction: x0 = alpha x_t - sigma v
    assert pair_regression_loss(model.student, noise, target, "l1").item() == pytest.approx(
        (x0 - target).abs().mean().item(), rel=1e-5
    )
    out = model.compute_loss({"noise": noise, "x": target, "label": torch.zeros(4, dtype=torch.long)})
    assert out.loss.item() == pytest.approx((x0 - target).abs().mean().item(), rel=1e-5)
    with pytest.raises(KeyError, match="data.pairs"):
        model.compute_loss({"x": target, "label": torch.zeros(4, dtype=torch.long)})
    # sample(1 step) through the stock DDIM scheduler == the clipped x0 estimate from the same noise.
    from diffusers.utils.torch_utils import randn_tensor

    sampled = model.sample(4, 1, torch.Generator().manual_seed(5))
    z = randn_tensor((4, *SHAPE), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(sampled, one_step_sample(model.student, z), atol=1e-5)
    # ... and the exported pipeline gives the same images.
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(model.export(tmp_path / "export"))
    images = pipe(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert torch.allclose(torch.from_numpy(images).permute(0, 3, 1, 2), (sampled / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_data_distillation_debug_preset_runs_through_cli(tiny_teacher_dir, tmp_path):
    from lightning_distill.cli import cli_main

    root = tmp_path / "run"
    cli_main([
        "fit", "--config", str(ROOT / "configs/data_distillation/debug.yaml"), "--data.teacher", str(tiny_teacher_dir),
        "--data.image_size", "8", "--trainer.default_root_dir", str(root),
    ])
    assert verify_pairs(root / "pairs") == [] and len(json.loads((root / "pairs/manifest.json").read_text())["shards"]) == 4
    assert (root / "checkpoints" / "last.ckpt").exists() and (root / "student" / "unet").is_dir()


def test_digits_config_parses():
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/data_distillation/digits.yaml").read_text())
    pairs = PairsConfig(**cfg["data"]["pairs"])
    assert pairs.num_shards == 10 and pairs.num_steps == 32
    assert len(quadratic_timesteps(1024, pairs.num_steps)) - 1 == 32  # 32 teacher calls per sample


def test_two_ranks_with_barriers_generate_and_repair_together(teacher, tmp_path):
    """Two ranks as threads sharing a barrier: split generation, then a joint repair of a damaged shard."""
    import threading

    cfg = _cfg(tmp_path / "p")
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def rank_main(rank):
        try:
            results[rank] = ensure_pairs(teacher.denoiser, cfg, SHAPE, rank=rank, world_size=2, barrier=barrier.wait)
        except BaseException as err:  # surfaced below; a silent thread failure would pass the test
            errors.append(err)
            barrier.abort()

    def run_both():
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors

    run_both()
    reference = load_pairs(generate_pairs(teacher.denoiser, _cfg(tmp_path / "ref"), SHAPE))
    assert torch.equal(results[0]["noise"], reference["noise"]) and torch.equal(results[1]["noise"], reference["noise"])
    path = tmp_path / "p" / shard_name(3)  # rank 1's shard
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(UserWarning, match="regenerating"):
        run_both()
    assert verify_pairs(tmp_path / "p") == []
    assert torch.allclose(results[1]["sample"], reference["sample"], atol=1e-6)


def test_standalone_generation_command_matches_and_is_reused(tiny_teacher_dir, teacher, tmp_path):
    from lightning_distill.teacher_pairs import main

    main(["--teacher", str(tiny_teacher_dir), "--dir", str(tmp_path / "cli"), "--num-pairs", "20", "--num-steps", "3",
          "--shard-size", "8", "--seed", "7"])
    cfg = _cfg(tmp_path / "cli", num_pairs=20)
    mtime = (tmp_path / "cli" / shard_name(0)).stat().st_mtime_ns
    pairs = ensure_pairs(teacher.denoiser, cfg, SHAPE, teacher_source=str(tiny_teacher_dir))  # same settings: reused
    assert (tmp_path / "cli" / shard_name(0)).stat().st_mtime_ns == mtime
    direct = load_pairs(generate_pairs(teacher.denoiser, _cfg(tmp_path / "direct", num_pairs=20), SHAPE))
    assert torch.equal(pairs["noise"], direct["noise"]) and torch.allclose(pairs["sample"], direct["sample"], atol=1e-6)


# --- flow-matching teachers (METHODS.md section 7) -----------------------------------------------


def test_flow_pairs_are_euler_samples_from_pure_noise(tiny_flow_teacher_dir):
    """A flow teacher's pairs start at s = 1 (x_1 = eps) and follow x <- x + (s' - s) u(x, s) to s = 0."""
    teacher = load_teacher(tiny_flow_teacher_dir)
    sched = teacher.schedule
    for time_grid in ("trailing", "quadratic"):
        assert float(sched.sigma(sampling_grid(sched, 4, time_grid)[0])) == 1.0
    grid = sampling_grid(sched, 4, "trailing")
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    x, levels = noise, [1.0, 0.75, 0.5, 0.25, 0.0]
    with torch.no_grad():
        for s, s_next in zip(levels[:-1], levels[1:]):
            x = x + (s_next - s) * teacher.unet(x, torch.full((3,), s * 1000)).sample
    torch.testing.assert_close(ddim_sample(teacher.denoiser, noise, grid), x, atol=1e-5, rtol=1e-5)


def test_flow_one_step_student_is_the_euler_step_from_pure_noise(tiny_flow_teacher_dir):
    """Trained at t = T - 1 (s = 1): x0 = x_1 - u, which the one-step stock Euler sampler returns too."""
    from diffusers.utils.torch_utils import randn_tensor

    model = DataDistillation(teacher=load_teacher(tiny_flow_teacher_dir), distance="l1")
    assert model.student.path == "flow" and model.student.prediction_type == "flow_prediction"
    noise, target = torch.randn(4, *SHAPE), torch.rand(4, *SHAPE) * 2 - 1
    with torch.no_grad():
        x0 = noise - model.student.unet(noise, torch.full((4,), 1000.0)).sample
    assert pair_regression_loss(model.student, noise, target, "l1").item() == pytest.approx(
        (x0 - target).abs().mean().item(), rel=1e-5
    )
    out = model.compute_loss({"noise": noise, "x": target, "label": torch.zeros(4, dtype=torch.long)})
    assert out.loss.item() == pytest.approx((x0 - target).abs().mean().item(), rel=1e-5)
    assert type(model.sampling_scheduler(1)).__name__ == "FlowMatchEulerDiscreteScheduler"
    sampled = model.sample(4, 1, torch.Generator().manual_seed(5))
    z = randn_tensor((4, *SHAPE), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        by_hand = z - model.student.unet(z, torch.full((4,), 1000.0)).sample
    torch.testing.assert_close(sampled, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(one_step_sample(model.student, z), by_hand, atol=1e-6, rtol=0)
