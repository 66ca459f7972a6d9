"""Every debug preset on a DiT teacher (#23): configs/<method>/debug.yaml with ``--data.teacher`` a tiny
class-conditional pixel DiTTransformer2DModel folder (tests/test_backbones.py), two training steps, then the
exported folder, read back as a user would (evaluate.load_pipeline_folder) and sampled by the pipelines' loop
(metrics.scheduler_sample), gives method.sample's images for the same generator and labels.

Per method (the table below): most presets run unchanged; KD's UNet student with mid-block feature KD gets a
smaller DiT student and no feature KD (its preset as it is: a one-line error naming the DiT's blocks); teacher
training takes no teacher, so its DiT variant trains a DiT from scratch; LCM (text-to-image) and MeanFlow (the
class input carries the interval) refuse a class-conditional DiT with a one-line error.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from _method_configs import all_debug_presets, debug_config
from lightning_distill.cli import cli_main
from test_backbones import H, write_tiny_dit_teacher

TEACHER = object()  # placeholder for the DiT teacher folder in the table's arguments
SMALL_DIT = json.dumps({"class_path": "diffusers.DiTTransformer2DModel", "init_args": {
    "num_attention_heads": 2, "attention_head_dim": 2, "in_channels": 1, "out_channels": 2, "num_layers": 1,
    "sample_size": H, "patch_size": 2, "num_embeds_ada_norm": 10}})

#: method -> (extra CLI arguments, expected one-line error or None)
CASES = {
    "knowledge": (["--model.init_args.feature_weights", "null", "--model.init_args.student", SMALL_DIT], None),
    "teacher": (["--model.init_args.unet", SMALL_DIT], None),
    "lcm": (["--data.data", "digits"], "LatentConsistencyDistillation needs a text-conditional teacher"),
    "meanflow": ([], "MeanFlowDistillation supports .* only"),
}
ERRORS = {  # presets as they are, where the table changes them
    "knowledge": "no block named \\['mid_block'\\] in DiTTransformer2DModel; blocks: \\[.*'transformer_blocks.0'",
    "teacher": "DiffusionTraining trains from scratch and takes no teacher",
}


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "dit"
    folder.mkdir()
    return write_tiny_dit_teacher(folder)


def _args(name: str, root, teacher, extra=()) -> list[str]:
    args = ["fit", "--config", str(debug_config(name)), "--data.image_size", str(H), "--data.class_conditional", "true",
            "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false"]
    if name != "progressive":  # its TeacherSwap ends the run after its rounds (4 steps)
        args += ["--trainer.max_steps", "2"]
    if teacher is not None:
        args += ["--data.teacher", str(teacher)]
    return args + list(extra)


def _refused(args, match: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err
    assert re.search(match, err[-1]), err[-1]


@pytest.mark.parametrize("name", all_debug_presets())
def test_debug_preset_on_a_dit_teacher(name, dit_teacher, tmp_path, capsys):
    from lightning_distill.evaluate import load_pipeline_folder
    from lightning_distill.metrics import scheduler_sample

    extra, error = CASES.get(name, ([], None))
    if name in ERRORS:
        _refused(_args(name, tmp_path / "as_is", dit_teacher), ERRORS[name], capsys)
    if error is not None:
        _refused(_args(name, tmp_path / "run", dit_teacher, extra), error, capsys)
        return
    # teacher training takes none: its DiT variant trains the DiT of the table from scratch
    cli = cli_main(_args(name, tmp_path / "run", None if name == "teacher" else dit_teacher, extra))
    method = cli.model
    assert type(method.student.unet).__name__ == "DiTTransformer2DModel" and method.num_classes == 10
    assert cli.trainer.global_step >= 2
    if name in ("add", "apt"):  # the discriminator reads the DiT's blocks (tokens as maps)
        from lightning_distill.gan import TransformerFeatures

        assert isinstance(method.discriminator.backbone, TransformerFeatures)
    if name == "knowledge":  # the smaller DiT of the table
        assert sum(p.numel() for p in method.student.unet.parameters()) < sum(p.numel() for p in method.teacher.unet.parameters())
    if name == "dmd2":
        assert method.discriminator_head is not None and torch.isfinite(cli.trainer.callback_metrics["train/d_gan"])
    # a distillation method trains and reads nothing in train mode that drops labels (the DiT's classifier-free-
    # guidance dropout): student, DMD2's fake score, a trainable discriminator backbone (the frozen teacher stays
    # in eval); teacher training keeps it, as that is how a DiT learns its unconditional prediction
    method.train()
    dropping = [k for k, m in method.named_modules() if type(m).__name__ == "LabelEmbedding" and m.training and m.dropout_prob > 0]
    assert (dropping == ["student.unet.transformer_blocks.0.norm1.emb.class_embedder"]) if name == "teacher" else not dropping, dropping
    export = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "PipelineExport")
    net, scheduler, vae = load_pipeline_folder(export.dirpath)
    assert type(net).__name__ == "DiTTransformer2DModel" and vae is None
    steps, labels = int(method.hparams.sample_steps or 1), torch.tensor([1, 4, 9])
    ours = method.sample(3, steps, torch.Generator().manual_seed(0), labels=labels)
    theirs = scheduler_sample(net, scheduler, 3, steps, torch.Generator().manual_seed(0), labels=labels)
    assert ours.shape == (3, 1, H, H) and torch.isfinite(ours).all()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
