"""LoRA students on SD3 teachers (#23 item 3): ``student_lora`` on the text-to-image methods' debug_sd3 presets.

The use case of the whole item: a transformer too big to copy, distilled as a LoRA. On the tiny SD3 stack of
tests/_sd3.py each preset trains with ``--model.init_args.student_lora '{rank: 4, alpha: 4}'``; only the
adapters change (every base weight still equals the teacher's transformer read from disk), the checkpoint and
the EMA state hold adapters only, and the export (methods/text.py, methods/lcm.py -> export.write_student_pipeline)
is a stock StableDiffusion3Pipeline folder with the fused transformer plus ``pytorch_lora_weights.safetensors``.
Both reproduce ``sample()``: the folder itself, and the *teacher's* pipeline + ``load_lora_weights(folder)`` +
the folder's scheduler. The UNet path is tested in test_lora_methods.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _sd3 import IMAGE_SIZE
from test_sd3 import sd3_captioned, tiny_sd3_dir  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog"]
# lr 1e-2 (presets: 1e-4) so that three steps move the adapters far enough for the samples to differ from the
# teacher's by much more than the 1e-4 tolerance: a LoRA file that failed to load would then fail the test.
LR = ["--model.init_args.optimizer.init_args.lr", "1e-2"]


def pipeline_latents(pipe, steps: int, seed: int, shape) -> torch.Tensor:
    """``pipe``'s latents for PROMPTS, guidance_scale=1, under the protocol of test_sd3.assert_export_reproduces:
    a multi-step FlowMatchLCMScheduler draws its fresh noise from torch's global generator, which is given the
    state our generator has after the initial latents (as ``sample()`` draws it)."""
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator().manual_seed(seed)
    randn_tensor(shape, generator=g)
    with torch.random.fork_rng(devices=[]):  # leave the global state as the other tests expect it
        torch.set_rng_state(g.get_state())
        return pipe(PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(seed), output_type="latent").images


@pytest.mark.parametrize("preset", ["consistency", "dmd2", "lcm"])
def test_sd3_lora_student_trains_adapters_only_and_exports_a_load_lora_weights_file(
        preset, tiny_sd3_dir, sd3_captioned, tmp_path):  # noqa: F811
    from diffusers import FlowMatchLCMScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors import safe_open

    from lightning_distill import lora
    from lightning_distill.cli import cli_main

    root = tmp_path / preset
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / preset / "debug_sd3.yaml"), "--data.teacher",
                    str(tiny_sd3_dir), "--data.data", str(sd3_captioned), "--trainer.default_root_dir", str(root),
                    "--model.init_args.student_lora", "{rank: 4, alpha: 4}", *LR])
    method = cli.model
    assert method.text_conditional and cli.trainer.global_step > 0

    # only the adapters train and moved; the base is bit-equal to the teacher's transformer as stored on disk
    student = method.student.unet
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_lora_key(n) for n in trainable)
    assert any(v.abs().max() > 1e-3 for k, v in student.state_dict().items() if ".lora_B." in k)  # B starts at 0
    on_disk = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer").state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in student.state_dict().items() if not lora.is_lora_key(k)}
    assert base.keys() == on_disk.keys()
    assert all(torch.equal(base[k], v) for k, v in on_disk.items())

    # the checkpoint: adapters of the student (and CD's theta_minus), EMA of the adapters, no base or teacher weights
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    stored = [k for k in ckpt["state_dict"] if k.startswith(("student.", "theta_minus."))]
    assert stored and all(lora.is_lora_key(k) for k in stored), [k for k in stored if not lora.is_lora_key(k)][:5]
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert ckpt["teacher_source"]["source"] == str(tiny_sd3_dir)
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["averaged"]
    assert len(ema) > 1 and all(lora.is_lora_key(k) or k == "n_averaged" for k in ema)

    # the export (PipelineExport at fit end, EMA weights): a stock folder with the fused transformer ...
    folder = root / "student"
    steps = method.hparams.sample_steps
    ours = method.sample(len(PROMPTS), steps, torch.Generator().manual_seed(5), prompts=PROMPTS)
    fused = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(fused.scheduler, FlowMatchLCMScheduler) and not lora.has_lora(fused.transformer)
    with safe_open(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert f.keys() and not any("lora_" in k or "base_layer" in k for k in f.keys())
    torch.testing.assert_close(pipeline_latents(fused, steps, 5, ours.shape), ours, rtol=0, atol=1e-4)

    # ... and the adapters in diffusers' SD3 layout, which the teacher's own pipeline loads
    with safe_open(str(folder / lora.LORA_WEIGHT_NAME), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert any(k.startswith("transformer.transformer_blocks.0.attn.add_q_proj.lora_A") for k in keys)
    teacher = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None,
                                                       scheduler=FlowMatchLCMScheduler.from_pretrained(folder / "scheduler"))
    plain = pipeline_latents(teacher, steps, 5, ours.shape)
    assert (plain - ours).abs().max() > 1e-2  # the adapters matter: without them the samples differ
    teacher.load_lora_weights(folder)
    torch.testing.assert_close(pipeline_latents(teacher, steps, 5, ours.shape), ours, rtol=0, atol=1e-4)


def test_from_best_exports_the_best_checkpoints_lora_student_through_the_methods_export(
        tiny_sd3_dir, sd3_captioned, tmp_path):  # noqa: F811
    """PipelineExport(from_best=True) with a LoRA student of an SD3 teacher: the best checkpoint holds adapters
    only; the export goes through the method's own export with the base restored as on resume, so it is a
    StableDiffusion3Pipeline folder whose fused transformer is the teacher's + (alpha / r) B A of the best
    checkpoint's EMA adapters (by hand), with those adapters in the adapter file, not the final ones."""
    import json

    import lightning as L
    from diffusers import SD3Transformer2DModel
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import load_file

    from lightning_distill import lora
    from lightning_distill.callbacks import EMA, PipelineExport
    from lightning_distill.cli import cli_main

    class Score(L.Callback):  # a metric that is best (lowest) after step 2 of 4
        def on_train_batch_end(self, trainer, pl_module, *args):
            pl_module.log("score", abs(trainer.global_step - 2.0))

    cli = cli_main(["--config", str(ROOT / "configs" / "consistency" / "debug_sd3.yaml"), "--data.teacher", str(tiny_sd3_dir),
                    "--data.data", str(sd3_captioned), "--model.init_args.student_lora", "{rank: 4, alpha: 4}", *LR], run=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_top_k=1, every_n_train_steps=1)
    export = PipelineExport(str(tmp_path / "student"), from_best=True)
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, accelerator="cpu", callbacks=[Score(), EMA(decay=0.5, warmup=False), ckpt, export])
    trainer.fit(cli.model, cli.datamodule)
    assert export.exported_from == ckpt.best_model_path and "step=2" in ckpt.best_model_path

    saved = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
    assert all(lora.is_lora_key(k) for k in saved["state_dict"] if k.startswith("student."))  # adapters only
    averaged = next(s["averaged"] for s in saved["callbacks"].values() if isinstance(s, dict) and "averaged" in s)
    folder = tmp_path / "student"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer").state_dict()
    fused = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    adapters = load_file(folder / lora.LORA_WEIGHT_NAME)
    layers = {k.rsplit(".lora_A.", 1)[0] for k in averaged if ".lora_A." in k}
    assert layers and fused.keys() == base.keys()
    for layer in layers:  # module.unet.<layer>.lora_A.default.weight -> W + (alpha / r) B A, alpha = r
        name = layer.removeprefix("module.unet.")
        a, b = averaged[f"{layer}.lora_A.default.weight"], averaged[f"{layer}.lora_B.default.weight"]
        torch.testing.assert_close(fused[f"{name}.weight"], base[f"{name}.weight"] + b @ a, rtol=0, atol=1e-6)
        assert torch.equal(adapters[f"transformer.{name}.lora_A.weight"], a)
    untouched = [k for k in base if k.rsplit(".", 1)[0] not in {n.removeprefix("module.unet.") for n in layers}]
    assert all(torch.equal(fused[k], base[k]) for k in untouched)
    final = lora.lora_state_dict(cli.model.sampling_denoiser().unet)
    assert any(not torch.equal(adapters[f"transformer.{k}"], v) for k, v in final.items())  # not the final EMA
