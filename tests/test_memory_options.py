"""Memory options for three networks (#23 item 4, lightning_distill/memory.py) and DMD2's LoRA fake score (item 3):

* gradient checkpointing gives the gradients of the plain network and holds fewer bytes for the backward pass;
* an offloaded teacher stays on the CPU between calls, moves to its input's device for a call (checked with the
  meta device, the one other device a CPU-only machine has), and gives the same outputs;
* a LoRA fake score shares the teacher's weights, trains its adapters only, checkpoints them alone, reloads, and
  holds fewer parameter + optimiser bytes than a full copy. (SIGKILL-and-resume with it, bit-identical, was run
  once with test_fault_tolerance.kill_and_resume("dmd2", ..., FAKE_LORA): ~50 s, over this file's time budget.)
"""

from __future__ import annotations

import pytest
import torch

from _method_configs import preset_args
from lightning_distill import lora, memory
from lightning_distill.errors import ConfigError

FAKE_LORA = ["--model.init_args.fake_score_lora", '{"rank": 4, "alpha": 8}']


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from _method_configs import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("mem_fixtures"))


def _grads_and_saved(network, checkpointing: bool, x, t, **cond):
    from lightning_distill import backbones

    if checkpointing:
        memory.enable_gradient_checkpointing(network)
    network.zero_grad(set_to_none=True)
    with memory.saved_tensor_bytes() as saved:
        out = backbones.call(network, x, t, **cond)
    (out.float() ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in network.named_parameters()}, saved.bytes


def test_gradient_checkpointing_same_gradients_fewer_saved_bytes():
    import copy

    from _sd3 import tiny_sd3_transformer
    from conftest import make_tiny_unet
    from lightning_distill.methods.dmd2 import DMD2
    from lightning_distill.teacher import DiffusionTeacher

    torch.manual_seed(0)
    unet = make_tiny_unet(sample_size=16)
    sd3 = tiny_sd3_transformer()
    sd3_cond = {"encoder_hidden_states": torch.randn(2, 5, 48), "pooled_projections": torch.randn(2, 20)}
    for net, x, t, cond in ((unet, torch.randn(4, 1, 16, 16), torch.tensor([10, 200, 500, 900]), {}),
                            (sd3, torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0]), sd3_cond)):
        plain, plain_bytes = _grads_and_saved(copy.deepcopy(net), False, x, t, **cond)
        ckpt, ckpt_bytes = _grads_and_saved(copy.deepcopy(net), True, x, t, **cond)
        assert plain.keys() == ckpt.keys()
        for name in plain:  # recomputation repeats the same kernels: equal up to float noise
            torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
        # the blocks keep their inputs only (observed: UNet 16x16 batch 4 about 0.4x, SD3 about 0.6x)
        assert ckpt_bytes < 0.8 * plain_bytes, (type(net).__name__, ckpt_bytes, plain_bytes)

    with pytest.raises(ConfigError, match="student is a Conv2d.*enable_gradient_checkpointing"):
        memory.enable_gradient_checkpointing(torch.nn.Conv2d(1, 1, 1), "student")
    # the option on a method: the student and DMD2's fake score (the teacher is left as it is)
    from diffusers import DDIMScheduler

    teacher = DiffusionTeacher(make_tiny_unet(), DDIMScheduler(prediction_type="v_prediction"))
    method = DMD2(teacher=teacher, gradient_checkpointing=True, gan=False)
    assert memory.gradient_checkpointing_enabled(method.student.unet)
    assert memory.gradient_checkpointing_enabled(method.fake_score.unet)
    assert not memory.gradient_checkpointing_enabled(teacher.unet)


def test_teacher_offload_moves_for_calls_only(fixtures, tmp_path):
    import copy

    from lightning_distill.cli import cli_main

    cli = cli_main(["fit", *preset_args("consistency", tmp_path / "run", fixtures),
                    "--model.init_args.teacher_offload", "true", "--trainer.max_steps", "2"])
    method = cli.model
    teacher = method.teacher
    assert cli.trainer.global_step == 2 and memory.is_offloaded(teacher.unet)  # a CPU run: trains unchanged
    reference = copy.deepcopy(teacher.unet)  # the copy carries no offload hooks; it is the plain network
    memory.remove_offload(reference)
    x, t = torch.randn(3, *method.sample_shape), torch.tensor([5, 400, 999])
    with torch.no_grad():
        torch.testing.assert_close(teacher.denoiser(x, t).x0, method.teacher.denoiser.__class__(
            reference, teacher.schedule, teacher.prediction_type, teacher.denoiser.clip_x0)(x, t).x0, rtol=0, atol=0)

    # Another device: Lightning's move (LightningModule.to) leaves the teacher network on the CPU ...
    pointers = {n: p.data_ptr() for n, p in teacher.unet.named_parameters()}
    method.to("meta")
    assert all(p.device.type == "meta" for p in method.student.parameters())
    assert all(p.device.type == "cpu" for p in teacher.unet.parameters())
    # ... and a call on that device finds the weights there, then they are back on the CPU, same memory
    seen = []
    inner = teacher.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(m.weight.device.type))
    with torch.no_grad():  # the network itself (the schedule's bounds check reads values, which meta has none of)
        out = teacher.unet(torch.randn(3, *method.sample_shape, device="meta"), t.to("meta")).sample
    inner.remove()
    assert seen == ["meta"] and out.device.type == "meta"
    assert {n: p.data_ptr() for n, p in teacher.unet.named_parameters()} == pointers
    assert all(p.device.type == "cpu" for p in teacher.unet.buffers())
    # a call whose gradient would flow through the teacher is refused (its device weights are dropped)
    with pytest.raises(ConfigError, match="teacher_offload.*gradients flowing through"):
        teacher.unet(torch.randn(3, *method.sample_shape, device="meta", requires_grad=True), t.to("meta"))
    assert all(p.device.type == "cpu" for p in teacher.unet.parameters())
    with pytest.raises(ConfigError, match="teacher_offload needs a teacher"):
        from lightning_distill.methods.base import DistillationMethod

        DistillationMethod(teacher=None, teacher_offload=True)


def _fit_dmd2(root, fixtures, *extra):
    from lightning_distill.cli import cli_main

    return cli_main(["fit", *preset_args("dmd2", root, fixtures), *extra])


def test_dmd2_lora_fake_score_trains_checkpoints_reloads_and_is_smaller(fixtures, tmp_path):
    from lightning_distill.methods.dmd2 import DMD2
    from lightning_distill.teacher import load_teacher

    cli = _fit_dmd2(tmp_path / "run", fixtures, *FAKE_LORA, "--model.init_args.gradient_checkpointing", "true")
    method, trainer = cli.model, cli.trainer
    assert trainer.global_step == 4
    teacher, fake = method.teacher, method.fake_score.unet
    assert lora.has_lora(fake) and not lora.has_lora(teacher.unet)
    # the base *is* the teacher's weights (shared tensors), still equal to the teacher as loaded
    tsd = teacher.unet.state_dict()
    for key, value in fake.state_dict().items():
        if not lora.is_lora_key(key):
            assert value.data_ptr() == tsd[key.replace(".base_layer", "")].data_ptr(), key
    for key, value in load_teacher(teacher.source).unet.state_dict().items():
        torch.testing.assert_close(tsd[key], value, rtol=0, atol=0, msg=key)
    # only the adapters trained, and they moved (B starts at 0)
    trainable = [n for n, p in fake.named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_lora_key(n) for n in trainable)
    assert any(v.abs().sum() > 0 for k, v in lora.lora_state_dict(fake).items() if "lora_B" in k)
    # optimiser of the fake score: adapters only
    fake_opt = trainer.optimizers[1]
    assert {id(p) for g in fake_opt.param_groups for p in g["params"]} == {id(p) for p in fake.parameters() if p.requires_grad}

    # the checkpoint holds the adapters, not the base; a reload restores them onto the teacher's weights
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    stored = [k for k in ckpt["state_dict"] if k.startswith("fake_score.")]
    assert stored and all(lora.is_lora_key(k) for k in stored)
    assert ckpt["hyper_parameters"]["fake_score_lora"] == {"rank": 4, "alpha": 8, "target_modules": None, "init": "gaussian", "base": "shared"}
    reloaded = DMD2.load_from_checkpoint(ckpt_path, teacher=cli.datamodule.teacher)
    for key, value in lora.lora_state_dict(fake).items():
        torch.testing.assert_close(lora.lora_state_dict(reloaded.fake_score.unet)[key], value, rtol=0, atol=0)
    assert reloaded.fake_score.unet.conv_in.weight is reloaded.teacher.unet.conv_in.weight
    # the fake score's base is re-read from the teacher too: another teacher is refused, as for a LoRA student
    # (it resumed silently on other weights)
    import shutil

    from lightning_distill.errors import ConfigError

    other = load_teacher(str(shutil.copytree(teacher.source, tmp_path / "other_teacher")))
    with pytest.raises(ConfigError, match="trained on teacher"):
        DMD2.load_from_checkpoint(ckpt_path, teacher=other)

    # memory: parameters + optimiser state of the whole method, each tensor once, against the full-copy run
    full = _fit_dmd2(tmp_path / "full", fixtures, "--trainer.max_steps", "1")
    lora_state = memory.state_bytes(method, trainer.optimizers)
    full_state = memory.state_bytes(full.model, full.trainer.optimizers)
    fake_full = sum(p.numel() * 4 for p in full.model.fake_score.parameters())
    # the full copy adds its weights + Adam's two moments: 3x its bytes; the LoRA fake score adds 3x its adapters
    adapters = sum(p.numel() * 4 for p in fake.parameters() if p.requires_grad)
    params = lambda s: s["trainable"] + s["frozen"]  # noqa: E731
    assert params(full_state) - params(lora_state) == fake_full - adapters  # the shared base costs nothing
    fake_opt_bytes = lambda opt: memory.nbytes(v for s in opt.state.values() for v in s.values() if v.ndim)  # noqa: E731
    assert fake_opt_bytes(fake_opt) == 2 * adapters  # Adam's two moments of the adapters only
    assert fake_opt_bytes(full.trainer.optimizers[1]) == 2 * fake_full
    assert params(lora_state) + lora_state["optimizer"] < params(full_state) + full_state["optimizer"]

    with pytest.raises(ConfigError, match="fake_score_lora.rank must be a positive integer"):
        DMD2(teacher=teacher, fake_score_lora={"rank": 0})
    with pytest.raises(ConfigError, match="cannot be combined"):
        DMD2(teacher=teacher, fake_score_lora={"rank": 2}, teacher_offload=True)
    # a LoRA fake score on a float16 teacher's base under 32-true (no loss scaling through the float16 base) is
    # refused like a LoRA student on it; it passed before (only the student was checked)
    half = load_teacher(teacher.source, dtype="float16")
    fp16 = DMD2(teacher=half, fake_score_lora={"rank": 2})

    def run(precision):
        return type("Trainer", (), {"precision": precision, "strategy": type("SingleDeviceStrategy", (), {})()})()

    with pytest.raises(ConfigError, match="LoRA fake_score shares the float16 teacher's base.*16-mixed.*own network"):
        lora.check_shared_base(fp16, run("32-true"))
    lora.check_shared_base(fp16, run("16-mixed"))
