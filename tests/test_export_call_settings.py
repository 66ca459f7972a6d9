"""A text-to-image export records the keywords of the stock pipeline call that samples as ``sample()``
(``distillation_call.json`` beside ``model_index.json``: the teacher's text settings, which the folder's components do
not hold), ``evaluate`` reads them for a folder it scores without a teacher of its family, and re-loads a run's SANA
teacher with the run's ``complex_human_instruction``; its reports record the teacher's dtype (``--teacher-dtype``).

The tiny Flux and SANA stacks (tests/_flux.py, tests/_sana.py), with non-default settings: T5 / Gemma2 length 8,
Flux embedded guidance 2.0, SANA without an instruction. A plain pipeline call uses the pipeline's defaults (512 /
300 tokens, guidance 3.5, the default instruction) and samples something else."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from _flux import IMAGE_SIZE as FLUX_SIZE, write_tiny_flux
from _sana import IMAGE_SIZE as SANA_SIZE
from lightning_distill import backbones, evaluate
from lightning_distill.export import CALL_SETTINGS_NAME
from lightning_distill.teacher import load_teacher
from test_evaluate_sd import common
from test_sana import captioned, run_preset, tiny_sana_dir  # noqa: F401 - fixtures: the tiny SANA stack, captions

PROMPTS = ["a red cat", "a photo of a blue dog digit 7"]
FLUX = {"max_sequence_length": 8, "embedded_guidance": 2.0}
SANA = {"max_sequence_length": 8, "complex_human_instruction": None}


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


def export_student(teacher, folder):
    """A consistency student of ``teacher`` (its initial copy: the export's call is what is checked) and its export."""
    from lightning_distill.methods.consistency import ConsistencyDistillation

    method = ConsistencyDistillation(teacher, original_inference_steps=4, sample_steps=1)
    return method, method.export(folder)


@pytest.fixture(scope="module")
def flux_export(tiny_flux_dir, tmp_path_factory):
    return export_student(load_teacher(str(tiny_flux_dir), **FLUX), tmp_path_factory.mktemp("flux-export") / "student")


@pytest.fixture(scope="module")
def sana_export(tiny_sana_dir, tmp_path_factory):  # noqa: F811
    return export_student(load_teacher(str(tiny_sana_dir), **SANA), tmp_path_factory.mktemp("sana-export") / "student")


def recorded(folder) -> dict:
    return json.loads((folder / CALL_SETTINGS_NAME).read_text())


def test_flux_export_records_the_call_that_samples_as_sample(flux_export):
    """FluxPipeline called with the recorded keywords draws sample()'s latents (max difference 0); without the
    text settings (guidance 3.5, T5 512) it draws others (0.27 here)."""
    from diffusers import FluxPipeline

    method, folder = flux_export
    call = recorded(folder)
    assert call == {"height": FLUX_SIZE, "width": FLUX_SIZE, "guidance_scale": 2.0, "max_sequence_length": 8}
    ours = method.sample(2, 1, torch.Generator().manual_seed(0), prompts=PROMPTS)
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def latents(**kw):
        packed = pipe(prompt=PROMPTS, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                      output_type="latent", **kw).images
        return backbones.unpack_latents(packed, *ours.shape[-2:])

    torch.testing.assert_close(latents(**call), ours, rtol=0, atol=1e-5)
    assert (latents(height=FLUX_SIZE, width=FLUX_SIZE) - ours).abs().max() > 1e-2


def test_sana_export_records_the_call_that_samples_as_sample(sana_export):
    """SanaPipeline called with the recorded keywords (no instruction, Gemma2 length 8, unguided, no resolution bins)
    draws sample()'s latents; with only the size and guidance 1 (the default instruction and length) others (0.45)."""
    from diffusers import SanaPipeline

    method, folder = sana_export
    call = recorded(folder)
    assert call == {"height": SANA_SIZE, "width": SANA_SIZE, "guidance_scale": 1.0, "max_sequence_length": 8,
                    "complex_human_instruction": None, "use_resolution_binning": False}
    ours = method.sample(2, 1, torch.Generator().manual_seed(0), prompts=PROMPTS)
    pipe = SanaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def latents(**kw):
        return pipe(prompt=PROMPTS, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                    output_type="latent", **kw).images

    torch.testing.assert_close(latents(**call), ours, rtol=0, atol=1e-5)
    plain = latents(height=SANA_SIZE, width=SANA_SIZE, guidance_scale=1.0, use_resolution_binning=False)
    assert (plain - ours).abs().max() > 1e-2


def test_a_failed_export_leaves_the_previous_folder(flux_export, monkeypatch):
    """The file is written inside the export's atomic write: a failure while writing it leaves the previous export
    as it was, and no temporary folder behind."""
    from lightning_distill import export

    method, folder = flux_export
    before = sorted(p.name for p in folder.parent.iterdir())
    monkeypatch.setattr(export, "pipeline_call_settings", lambda pipe, teacher: {"bad": object()})  # not JSON
    with pytest.raises(TypeError):
        method.export(folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == before
    assert recorded(folder)["guidance_scale"] == 2.0


def scored(tmp_path, folder, data, size, teacher=None, name="run"):
    """The folder's FD as evaluate scores it (teacher rows skipped: ``teacher`` only sets the folder's settings)."""
    rows = evaluate.evaluate_models(teacher=teacher, students={"s": str(folder)}, steps=[1], teacher_steps=[],
                                    prompts=PROMPTS, real_baseline=False, out_dir=tmp_path / name,
                                    **common(tmp_path, data, size))
    (fd,) = [r["fd"] for r in rows if r["model"] == "s"]
    assert math.isfinite(fd)
    return fd


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_evaluate_scores_a_folder_with_its_recorded_settings(family, flux_export, sana_export, tiny_flux_dir,
                                                             tiny_sana_dir, captioned, tmp_path):  # noqa: F811
    """Without a teacher of its family, a folder is called with the settings its export recorded: its FD is the one
    with those settings given explicitly (a teacher loaded with them) and not the defaults' (the file removed). A
    teacher of its family still sets them (its options win over the file: here the defaults)."""
    (_, folder), source, settings, size = {
        "flux": (flux_export, tiny_flux_dir, FLUX, FLUX_SIZE), "sana": (sana_export, tiny_sana_dir, SANA, SANA_SIZE),
    }[family]
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / CALL_SETTINGS_NAME).unlink()

    fd_recorded = scored(tmp_path, folder, captioned, size, name="recorded")
    fd_explicit = scored(tmp_path, bare, captioned, size, load_teacher(str(source), **settings), name="explicit")
    fd_default = scored(tmp_path, bare, captioned, size, name="default")
    assert fd_recorded == fd_explicit and fd_recorded != fd_default
    # each setting, not only their joint effect on the FD: from the file, and from a teacher of the family
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    want = (2.0, {"max_sequence_length": 8}) if family == "flux" else (
        None, {"max_sequence_length": 8, "complex_human_instruction": None})
    assert evaluate.folder_text_settings(pipe, pipe.transformer, None, folder) == want
    assert evaluate.folder_text_settings(pipe, pipe.transformer, load_teacher(str(source), **settings)) == want
    with pytest.warns(UserWarning, match="its export recorded .*max_sequence_length=8"):
        fd_teacher = scored(tmp_path, folder, captioned, size, load_teacher(str(source)), name="teacher")
    assert fd_teacher == fd_default


def test_evaluate_refuses_a_damaged_record_in_one_line(flux_export, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(flux_export[1], folder)
    (folder / CALL_SETTINGS_NAME).write_text('{"guidance_scale": 2.0,')  # truncated
    with pytest.raises(evaluate.ConfigError, match=f"{CALL_SETTINGS_NAME} cannot be read as JSON"):
        evaluate.load_sampler("s", folder, None, torch.device("cpu"))


def test_a_sana_runs_instruction_reaches_its_reloaded_teacher(tiny_sana_dir, captioned, tmp_path):  # noqa: F811
    """A run trained with data.teacher_complex_human_instruction null is re-loaded (evaluate's checkpoint loading)
    with no instruction, whether or not a default teacher of the same source is given (it was re-used as it was); its
    export, scored without a teacher, is called so too."""
    from lightning_distill.evaluate import _run_settings_match, load_checkpoint_model
    from lightning_distill.teacher import SANA_COMPLEX_HUMAN_INSTRUCTION

    root = tmp_path / "run"
    cli = run_preset(tiny_sana_dir, captioned, root, "--trainer.max_steps", "1",
                     "--data.teacher_complex_human_instruction", "null")
    assert cli.model.teacher.complex_human_instruction is None
    ckpt = root / "checkpoints" / "last.ckpt"
    default = load_teacher(str(tiny_sana_dir))
    for given in (default, None):
        model, _ = load_checkpoint_model(ckpt, teacher=given)
        assert model.teacher.complex_human_instruction is None
    assert not _run_settings_match(default, {"teacher_complex_human_instruction": None})
    assert _run_settings_match(default, {})
    assert _run_settings_match(default, {"teacher_complex_human_instruction": "default"})
    assert _run_settings_match(default, {"teacher_complex_human_instruction": list(SANA_COMPLEX_HUMAN_INSTRUCTION)})
    assert _run_settings_match(model.teacher, {"teacher_complex_human_instruction": None})
    assert recorded(root / "student")["complex_human_instruction"] is None
