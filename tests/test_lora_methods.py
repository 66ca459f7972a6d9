"""LoRA students in the methods (``student_lora`` on every DistillationMethod): only the adapters train,
checkpoints hold the adapters and not the frozen base, a resumed run continues exactly, and the export is
the fused network (a stock folder reproducing ``sample()``) plus the adapter file that reproduces it on
the base. The building blocks themselves are tested in test_lora.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from _method_configs import preset_args
from test_export import assert_pipeline_reproduces_samples

LORA = ["--model.init_args.student_lora", '{"rank": 4, "alpha": 4}']


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from _method_configs import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("lora_fixtures"))


def _fit(name, root, fixtures, *extra, flow=False):
    from lightning_distill.cli import cli_main

    return cli_main(["fit", *preset_args(name, root, fixtures, flow=flow), *LORA, *extra])


@pytest.mark.parametrize("name,flow", [("consistency", False), ("scm", True)], ids=["consistency-vp", "scm-flow"])
def test_lora_student_trains_adapters_only_and_exports_fused_and_adapter(name, flow, fixtures, tmp_path):
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
