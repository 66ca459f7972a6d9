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
    # ... and so is the same teacher held in another dtype, or with other weights (a moved hub revision, a
    # rewritten folder): the checkpoint records the base's dtype and a digest of its weights (both resumed silently)
    from lightning_distill.nn_utils import content_digest

    assert ckpt["teacher_source"]["dtype"] == "torch.float32"
    assert ckpt["teacher_source"]["weights"] == content_digest(model.teacher.unet)
    with pytest.raises(ConfigError, match=r"held in torch.float32, not torch.bfloat16"):
        type(model).load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt",
                                         teacher=load_teacher(model.teacher.source, dtype="bfloat16"))
    changed = load_teacher(model.teacher.source)
    with torch.no_grad():
        next(changed.unet.parameters()).add_(1e-3)
    with pytest.raises(ConfigError, match=r"trained on other weights of teacher"):
        type(model).load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", teacher=changed)
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
    # the student was rebuilt with the new input (a copy), then its frozen base tied to the teacher's tensors
    assert lora.shared_tensors(student, method.teacher.unet) == len(list(method.teacher.unet.parameters()))

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


def test_a_shared_base_trains_as_a_copy_without_holding_one(fixtures, tmp_path):
    """``student_lora.base: shared`` (the default): the student's frozen base, its sampling EMA's and consistency
    distillation's theta_minus's are the teacher's own tensors, so a LoRA run holds one copy of the network
    (the teacher's) plus adapters; ``base: copy`` holds three more. On a float32 teacher both train the same
    adapters bit for bit, and the teacher's weights are left untouched."""
    from lightning_distill import lora, memory
    from lightning_distill.teacher import load_teacher

    runs = {}
    for base in ("shared", "copy"):
        spec = json.dumps({"rank": 4, "alpha": 4, "base": base})
        runs[base] = _fit("consistency", tmp_path / base, fixtures, "--model.init_args.student_lora", spec)
    shared, copied = runs["shared"].model, runs["copy"].model
    assert shared.trainer.global_step == copied.trainer.global_step > 0
    teacher = list(shared.teacher.unet.parameters())
    ema = {k: next(c for c in run.trainer.callbacks if type(c).__name__ == "EMA").averaged for k, run in runs.items()}
    for network in (shared.student.unet, shared.theta_minus.unet, ema["shared"].module.unet):
        assert lora.shared_tensors(network, shared.teacher.unet) == len(teacher)
        assert all(not p.requires_grad for p in teacher)
    for network in (copied.student.unet, copied.theta_minus.unet, ema["copy"].module.unet):
        assert lora.shared_tensors(network, copied.teacher.unet) == 0
    # the copy run's EMA shares the copied base with its student instead of holding a third copy
    frozen = [p for p in copied.student.unet.parameters() if not p.requires_grad]
    assert lora.shared_tensors(ema["copy"].module.unet, copied.student.unet) == len(frozen)

    # same adapters, EMA and theta_minus, bit for bit; the teacher still equals its source
    for a, b in [(shared.student, copied.student), (shared.theta_minus, copied.theta_minus), (ema["shared"], ema["copy"])]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    source = load_teacher(str(fixtures["tiny_teacher"])).unet.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in shared.teacher.unet.state_dict().items())
    assert any(not torch.equal(v, source[k.replace(".base_layer", "")]) for k, v in lora.fuse_lora(shared.student.unet).state_dict().items())

    # what the module holds: frozen, the teacher's bytes and theta_minus's adapters (+ the student's base copy)
    held = {k: memory.state_bytes(run.model) for k, run in runs.items()}
    teacher_bytes, adapters = memory.nbytes(teacher), held["shared"]["trainable"]
    assert held["shared"]["frozen"] == teacher_bytes + adapters
    assert held["copy"]["frozen"] == 2 * teacher_bytes + adapters  # theta_minus shares the student's copy
    assert held["copy"]["trainable"] == adapters


def test_a_shared_base_takes_the_teachers_precision_and_refuses_what_would_break_it(fixtures, tmp_path):
    """A bf16 teacher: the shared base is bf16 (no float32 copy), the adapters float32, and a 32-true step runs.
    teacher_offload (it moves the shared weights off the device between calls) is refused before training,
    naming ``base: copy``, which then runs; so are (unit-checked on a module pair) a 32-true run whose layers
    trained in full would get bf16 activations (LCM's guidance input), an fp16 base under 32-true, FSDP1 with
    shared tensors, and sCD on a bf16 shared base."""
    from lightning_distill import lora
    from lightning_distill.cli import cli_main
    from lightning_distill.errors import ConfigError

    cli = _fit("consistency", tmp_path / "bf16", fixtures, "--data.teacher_dtype", "bfloat16")
    student, teacher = cli.model.student.unet, cli.model.teacher.unet
    assert cli.trainer.global_step > 0 and lora.shared_tensors(student, teacher) == len(list(teacher.parameters()))
    assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in student.parameters() if not p.requires_grad} == {torch.bfloat16}

    offload = ["--model.init_args.teacher_offload", "true"]
    with pytest.raises(SystemExit) as exc:
        _fit("consistency", tmp_path / "offload", fixtures, *offload)
    assert exc.value.code == 2 and not (tmp_path / "offload" / "checkpoints").exists()
    spec = json.dumps({"rank": 4, "alpha": 4, "base": "copy"})
    assert _fit("consistency", tmp_path / "copy", fixtures, *offload, "--model.init_args.student_lora", spec).trainer.global_step > 0

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16).requires_grad_(False)
    with_full = lora.add_lora(lora.shared_copy(net), {"rank": 2, "target_modules": ["0"]}, train_in_full=["1"])
    method = torch.nn.Module()
    method.student, method.teacher, method.hparams = with_full, net, {}

    def run(precision="32-true", strategy="SingleDeviceStrategy"):
        return type("Trainer", (), {"precision": precision, "strategy": type(strategy, (), {})()})()

    lora.check_shared_base(method, run("bf16-mixed"))
    with pytest.raises(ConfigError, match=r"trains \['1'\] in float32.*bf16-mixed.*base: copy"):
        lora.check_shared_base(method, run())
    with pytest.raises(ConfigError, match="FSDPStrategy .* student and teacher share"):
        lora.check_shared_base(method, run("bf16-mixed", "FSDPStrategy"))
    method.student = lora.add_lora(lora.shared_copy(net.half()), {"rank": 2, "target_modules": ["0"]})
    with pytest.raises(ConfigError, match="float16 teacher's base: under precision '32-true' nothing scales"):
        lora.check_shared_base(method, run())
    lora.check_shared_base(method, run("16-mixed"))
    method.hparams = {"teacher_offload": True}
    with pytest.raises(ConfigError, match="teacher_offload.*base: copy"):
        lora.check_shared_base(method, run("16-mixed"))
    # sCD / MeanFlow differentiate the student in float32: a bf16 shared base is refused when built
    with pytest.raises(SystemExit) as exc:
        _fit("scm", tmp_path / "scm", fixtures, "--data.teacher_dtype", "bfloat16", flow=True)
    assert exc.value.code == 2


def test_meanflow_lora_student_holds_the_teachers_base_and_trains_its_interval_input(fixtures, tmp_path):
    """MeanFlow rebuilds the teacher's UNet with an interval input; with a LoRA student on the shared base the
    rebuilt network's frozen tensors are the teacher's own (no copy), the new input trains in full in float32
    beside the adapters, and a resume from the adapter-only checkpoint rebuilds the same student."""
    from lightning_distill import lora
    from lightning_distill.methods.meanflow import MeanFlowDistillation

    cli = _fit("meanflow", tmp_path / "mf", fixtures, flow=True)
    method, student = cli.model, cli.model.student.unet
    assert cli.trainer.global_step > 0
    assert lora.shared_tensors(student, method.teacher.unet) == len(list(method.teacher.unet.parameters()))
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert any(n.startswith("class_embedding.") for n in trainable) and all(lora.is_lora_key(n) for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert student.get_parameter("class_embedding.linear_2.modules_to_save.default.weight").abs().max() > 0
    resumed = MeanFlowDistillation.load_from_checkpoint(tmp_path / "mf" / "checkpoints" / "last.ckpt", teacher=method.teacher)
    for key, value in method.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[key], value), key


def test_lcm_lora_without_a_guidance_input_is_a_drop_in_adapter_file(tiny_sd, captioned_folder, tmp_path):  # noqa: F811
    """guidance_embedding: false (the diffusers LCM-LoRA script's recipe): the student keeps the teacher's UNet
    (no time_cond_proj_dim, w ~ U[w_min, w_max] folded in), only adapters train, no full_layers file is written,
    and, as LCM-LoRA is used, the teacher's StableDiffusionPipeline with LCMScheduler, load_lora_weights and
    guidance_scale=1 reproduces sample(); the fused export is that pipeline too (LatentConsistencyModelPipeline
    embeds w unconditionally). A guidance scale outside the folded range is refused."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from lightning_distill import lora
    from lightning_distill.cli import cli_main
    from lightning_distill.errors import ConfigError

    root = tmp_path / "lcm"
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "lcm" / "debug.yaml"), "--data.teacher", str(tiny_sd),
                    "--data.data", str(captioned_folder), "--trainer.default_root_dir", str(root), *LORA,
                    "--model.init_args.guidance_embedding", "false", "--model.init_args.optimizer.init_args.lr", "1e-2"])
    method, student = cli.model, cli.model.student.unet
    assert student.config.time_cond_proj_dim is None and not method.guidance_embedding
    assert all(lora.is_lora_key(n) and "lora_" in n for n, p in student.named_parameters() if p.requires_grad)
    folder = root / "student"
    assert (folder / lora.LORA_WEIGHT_NAME).is_file() and not (folder / lora.FULL_LAYERS_NAME).exists()
    teacher_unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    fused = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    # the teacher's components (its own UNet) with the LCMScheduler, as LCM-LoRA is used
    teacher_pipe = StableDiffusionPipeline(**{**fused.components, "unet": teacher_unet,
                                              "scheduler": LCMScheduler.from_pretrained(folder, subfolder="scheduler")})
    teacher_pipe.load_lora_weights(folder)
    prompts = ["a red cat", "a blue dog"]
    for steps in (1, 2):
        ours = method.sample(2, steps, torch.Generator().manual_seed(steps), prompts=prompts)
        for pipe in (fused, teacher_pipe):
            theirs = pipe(prompts, height=8, width=8, num_inference_steps=steps, guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(steps), output_type="latent").images
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="no guidance input"):
        method.sample(1, 1, torch.Generator().manual_seed(0), prompts=["a cat"], guidance_scale=50.0)
