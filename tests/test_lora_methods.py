"""LoRA students in the methods (``student_lora`` on every DistillationMethod): only the adapters train,
checkpoints hold the adapters and not the frozen base, a resumed run continues exactly, and the export is
the fused network (a stock folder reproducing ``sample()``) plus the adapter file that reproduces it on
the base, both written in one atomic write. LCM-LoRA on a UNet teacher also trains the student's new
guidance input in full. The building blocks themselves are tested in test_lora.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from _method_configs import preset_args
from test_export import assert_pipeline_reproduces_samples, _snapshot
from test_lcm import captioned_folder, tiny_sd  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]

LORA = ["--model.init_args.student_lora", '{"rank": 4, "alpha": 4}']


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from _method_configs import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("lora_fixtures"))


def _fit(name, root, fixtures, *extra, flow=False):
    from lightning_distill.cli import cli_main

    return cli_main(["fit", *preset_args(name, root, fixtures, flow=flow), *LORA, *extra])


@pytest.mark.parametrize("name,flow", [("consistency", False), ("scm", True)], ids=["consistency-vp", "scm-flow"])
def test_lora_student_trains_adapters_only_and_exports_fused_and_adapter(name, flow, fixtures, tmp_path, monkeypatch):
    from lightning_distill import lora

    cli = _fit(name, tmp_path / "run", fixtures, flow=flow)
    model = cli.model
    assert cli.trainer.global_step > 0
    teacher_sd = model.teacher.unet.state_dict()
    student = model.student.unet
    assert lora.has_lora(student)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_lora_key(n) for n in trainable)
    # the base is untouched: every base weight still equals the teacher's
    fused_before = lora.fuse_lora(student)
    base = {k.replace(".base_layer", ""): v for k, v in student.state_dict().items() if not lora.is_lora_key(k)}
    for key, value in teacher_sd.items():
        torch.testing.assert_close(base[key], value.float(), rtol=0, atol=0, msg=key)
    # ... while the adapters moved: the fused network differs from the teacher
    assert any(not torch.equal(v, teacher_sd[k].float()) for k, v in fused_before.state_dict().items())

    # the checkpoint holds adapters, not the base: student, EMA (and CD's theta_minus)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    stored = [k for k in ckpt["state_dict"] if k.startswith(("student.", "theta_minus."))]
    assert stored and all(lora.is_lora_key(k) for k in stored), [k for k in stored if not lora.is_lora_key(k)][:5]
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["averaged"]
    assert all(lora.is_lora_key(k) or k == "n_averaged" for k in ema), [k for k in ema if not lora.is_lora_key(k)][:5]
    assert ckpt["hyper_parameters"]["student_lora"]["rank"] == 4
    # evaluate reads the checkpoint's EMA adapters onto the teacher's base (a strict load of the adapters alone failed)
    from lightning_distill.evaluate import load_checkpoint_model

    loaded, used_ema = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "last.ckpt", model.teacher)
    assert used_ema
    got = loaded.student.state_dict()
    assert all(torch.equal(got[k.removeprefix("module.")], v) for k, v in ema.items() if k != "n_averaged")
    assert all(torch.equal(got[k], v.float()) for k, v in _base_keys(loaded.student, {
        f"unet.{k}": v for k, v in teacher_sd.items()}).items())
    # resuming the adapters on another teacher (whose base they were not trained on) is a one-line error
    import shutil

    from lightning_distill.errors import ConfigError
    from lightning_distill.teacher import load_teacher

    other = shutil.copytree(model.teacher.source, tmp_path / "other_teacher")
    with pytest.raises(ConfigError, match=r"LoRA adapters were trained on teacher .*, not on .*other_teacher"):
        type(model).load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", teacher=load_teacher(str(other)))
    # ... and so is resuming with other adapter settings (before: torch's per-layer size-mismatch dump)
    from lightning_distill.checkpoint_content import check_lora_spec

    check_lora_spec(ckpt, {"rank": 4, "alpha": 4})  # the same settings, as a mapping: accepted
    with pytest.raises(ConfigError, match=r"checkpoint's student_lora is \{'rank': 4.*\}, this run's is \{'rank': 8"):
        check_lora_spec(ckpt, {"rank": 8, "alpha": 4})
    with pytest.raises(ConfigError, match=r"this run's is None"):
        check_lora_spec(ckpt, None)

    folder = model.export(tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert not lora.has_lora(pipe.unet) and not any(".base_layer" in k for k in pipe.unet.state_dict())
    assert_pipeline_reproduces_samples(model, pipe, model.hparams.sample_steps)
    # the adapter file on the base (the teacher's network) gives the fused network's output
    on_base = lora.load_lora(type(model.teacher.unet).from_config(model.teacher.unet.config), folder)
    on_base.load_state_dict({**on_base.state_dict(), **{
        k: v for k, v in _base_keys(on_base, teacher_sd).items()}})
    x, t = torch.randn(2, *model.sample_shape), torch.tensor([500, 900])
    with torch.no_grad():
        torch.testing.assert_close(on_base(x, t).sample, pipe.unet(x, t).sample, atol=1e-5, rtol=1e-5)

    # fused network and adapter file are one atomic write: a failure writing the adapters keeps the previous export
    before = _snapshot(folder)
    assert lora.LORA_WEIGHT_NAME in before

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora, "save_lora", fail)
    with pytest.raises(OSError, match="disk full"):
        model.export(folder)
    assert _snapshot(folder) == before


def _base_keys(lora_model, plain_sd: dict) -> dict:
    """The plain network's weights under a LoRA model's key names (``.base_layer.`` inserted)."""
    out = {}
    for key in lora_model.state_dict():
        plain = key.replace(".base_layer", "")
        if plain in plain_sd and "lora_" not in key:
            out[key] = plain_sd[plain]
    return out


@pytest.mark.slow
def test_lora_sigkill_then_resume_equals_uninterrupted(fixtures, tmp_path, monkeypatch):
    """The adapter-only checkpoint (base rebuilt from the teacher) resumes bit-identically: the
    fault-tolerance harness (SIGKILL mid-step, resume, compare every trained tensor, optimiser and
    callback state) on the consistency preset with a LoRA student."""
    from test_fault_tolerance import kill_and_resume

    kill_and_resume("consistency", fixtures, tmp_path, monkeypatch, tuple(LORA))


def test_bad_lora_spec_is_a_config_error(fixtures, tmp_path):
    from lightning_distill.cli import cli_main

    args = [*preset_args("consistency", tmp_path / "run", fixtures)]
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *args, "--model.init_args.student_lora", '{"rank": 0}'])
    assert exc.value.code == 2


def test_lcm_lora_unet_trains_its_new_guidance_input_in_full(tiny_sd, captioned_folder, tmp_path):  # noqa: F811
    """LCM-LoRA on a UNet teacher: the student's guidance input ``time_embedding.cond_proj`` (which the teacher
    lacks; zero at init) trains in full beside the adapters, the checkpoint holds both and not the frozen
    base, and the export reproduces the student: the fused folder, and the teacher's pipeline with the UNet
    built from ``full_layers.safetensors``'s config + that file + ``load_lora_weights``. The adapter file alone
    cannot carry the guidance input (diffusers' loader refuses non-LoRA keys and the teacher's UNet has no
    such layer, so LatentConsistencyModelPipeline cannot even run it): without that file's weights (the
    input at its zero init) the samples differ."""
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lightning_distill import lora
    from lightning_distill.cli import cli_main
    from lightning_distill.methods.lcm import LatentConsistencyDistillation

    root = tmp_path / "lcm"
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "lcm" / "debug.yaml"), "--data.teacher", str(tiny_sd),
                    "--data.data", str(captioned_folder), "--trainer.default_root_dir", str(root), *LORA,
                    "--model.init_args.optimizer.init_args.lr", "1e-2"])
    method, student = cli.model, cli.model.student.unet
    new = "time_embedding.cond_proj.modules_to_save.default.weight"
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert new in trainable and all(lora.is_lora_key(n) for n in trainable)
    assert student.get_parameter(new).abs().max() > 1e-4  # moved off its zero init: the student now sees w
    teacher_sd = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in student.state_dict().items() if not lora.is_lora_key(k)}
    assert all(torch.equal(base[k], v) for k, v in teacher_sd.items())

    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    stored = [k for k in ckpt["state_dict"] if k.startswith(("student.", "theta_minus."))]
    assert f"student.unet.{new}" in stored and f"theta_minus.unet.{new}" in stored
    assert all(lora.is_lora_key(k) for k in stored), [k for k in stored if not lora.is_lora_key(k)][:5]
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["averaged"]
    assert f"module.unet.{new}" in ema and all(lora.is_lora_key(k) or k == "n_averaged" for k in ema)
    resumed = LatentConsistencyDistillation.load_from_checkpoint(root / "checkpoints" / "last.ckpt", teacher=method.teacher)
    for key, value in method.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[key], value), key

    folder, prompts = root / "student", ["a red cat", "a blue dog"]
    fused = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    with safe_open(str(folder / lora.FULL_LAYERS_NAME), framework="pt") as f:
        assert list(f.keys()) == ["unet.time_embedding.cond_proj.weight"]
        config = json.loads(f.metadata()[lora.NETWORK_CONFIG_KEY])
    unet = UNet2DConditionModel.from_config(config)  # the teacher's UNet + the guidance input, then the adapters
    unet.load_state_dict({**teacher_sd, **{k.removeprefix("unet."): v for k, v in load_file(folder / lora.FULL_LAYERS_NAME).items()}})
    on_teacher = LatentConsistencyModelPipeline(**{**fused.components, "unet": unet})
    on_teacher.load_lora_weights(folder)
    without = UNet2DConditionModel.from_config(config)
    without.load_state_dict({**teacher_sd, "time_embedding.cond_proj.weight": torch.zeros_like(unet.time_embedding.cond_proj.weight)})
    adapters_only = LatentConsistencyModelPipeline(**{**fused.components, "unet": without})
    adapters_only.load_lora_weights(folder)
    for steps, g in ((1, 2.0), (2, 6.5)):
        ours = method.sample(2, steps, torch.Generator().manual_seed(steps), prompts=prompts, guidance_scale=g)

        def latents(pipe):
            return pipe(prompts, height=8, width=8, num_inference_steps=steps, guidance_scale=g,
                        generator=torch.Generator().manual_seed(steps), output_type="latent").images

        torch.testing.assert_close(latents(fused), ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(latents(on_teacher), ours, rtol=0, atol=1e-5)
        assert (latents(adapters_only) - ours).abs().max() > 1e-4
