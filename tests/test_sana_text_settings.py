"""A SANA teacher's text settings as run options: ``data.teacher_max_sequence_length`` is its Gemma2 prompt length
(SanaPipeline's ``max_sequence_length``, 300 by default), ``data.teacher_complex_human_instruction`` its
``complex_human_instruction`` (default: the pipeline's; null: none; a list of lines). Both reach the teacher the run
loads (data.load_run_teacher, as seeds / compare / evaluate re-load it), the text cache key through that teacher, and
every teacher progressive distillation promotes; another teacher refuses the instruction in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_distill.data import TeacherDataModule, load_run_teacher
from lightning_distill.errors import ConfigError
from lightning_distill.teacher import SANA_COMPLEX_HUMAN_INSTRUCTION
from lightning_distill.text_cache import encoder_key
from test_sana import captioned, encode, sana_pipe, tiny_sana_dir  # noqa: F401 - fixtures: the tiny SANA stack

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "A Photo of a Blue dog digit 7  "]


def test_gemma2_length_and_instruction_reach_the_run_teacher(tiny_sana_dir, sana_pipe):  # noqa: F811
    """The teacher load_run_teacher builds from the data settings encodes prompts as SanaPipeline.encode_prompt with
    the same max_sequence_length / complex_human_instruction (max difference 0), and keys its text cache on them."""
    base = {"teacher": str(tiny_sana_dir)}
    settings = [
        ({}, {}),  # the defaults: 300, the pipeline's instruction
        ({"teacher_max_sequence_length": 7}, {"max_sequence_length": 7}),
        ({"teacher_complex_human_instruction": None}, {"complex_human_instruction": None}),
        ({"teacher_complex_human_instruction": ["Draw:", "a picture of"]},
         {"complex_human_instruction": ["Draw:", "a picture of"]}),
        ({"teacher_max_sequence_length": 5, "teacher_complex_human_instruction": None},
         {"max_sequence_length": 5, "complex_human_instruction": None}),
    ]
    keys = []
    for data, pipeline in settings:
        teacher = load_run_teacher({**base, **data})
        assert teacher.max_sequence_length == pipeline.get("max_sequence_length", 300)
        want = pipeline.get("complex_human_instruction", SANA_COMPLEX_HUMAN_INSTRUCTION)
        assert teacher.complex_human_instruction == (tuple(want) if want else None)
        ours = teacher.encode_prompts(PROMPTS)
        ref, mask, _, _ = encode(sana_pipe, PROMPTS, **pipeline)
        assert torch.equal(ours["encoder_hidden_states"], ref) and torch.equal(ours["encoder_attention_mask"], mask)
        keys.append(encoder_key(teacher)["settings"])
    assert len(set(keys)) == len(settings)  # each setting keys its own text cache
    # the default list, given explicitly (a saved config), is the default teacher
    same = load_run_teacher({**base, "teacher_complex_human_instruction": list(SANA_COMPLEX_HUMAN_INSTRUCTION)})
    assert encoder_key(same)["settings"] == keys[0]


def test_sana_settings_are_refused_where_they_do_not_apply(tiny_sana_dir):  # noqa: F811
    with pytest.raises(ConfigError, match=r"^data.teacher_complex_human_instruction is the instruction SanaPipeline puts "
                                          r"before every prompt, but teacher 'bundled:digits' is a UNet2DModel \(SANA "
                                          r"teachers: SanaTransformer2DModel\): unset it$"):
        TeacherDataModule(teacher="bundled:digits", data="digits", image_size=16,
                          teacher_complex_human_instruction=None)
    with pytest.raises(ConfigError, match="teacher_complex_human_instruction set a teacher's text conditioning, but "
                                          "data.teacher is null: unset them"):
        TeacherDataModule(teacher=None, data="digits", image_size=8, teacher_complex_human_instruction=["Draw:"])
    with pytest.raises(ConfigError, match="takes 'default' .*, null .* or a list of lines, not the string 'Draw:'"):
        TeacherDataModule(teacher=None, data="digits", image_size=8, teacher_complex_human_instruction="Draw:")
    with pytest.raises(ConfigError, match=r"a SANA teacher's Gemma2 prompt length\) must be at least 1, got 0"):
        load_run_teacher({"teacher": str(tiny_sana_dir), "teacher_max_sequence_length": 0})
    # the default instruction is no setting: every other teacher keeps loading with it in its data settings
    dm = TeacherDataModule(teacher="bundled:digits", data="digits", image_size=16)
    assert dm.hparams.teacher_complex_human_instruction == "default"  # named: saved configs do not carry its lines
    assert dm.teacher.complex_human_instruction is None


def test_progressive_promoted_sana_teachers_keep_the_length_and_instruction(  # noqa: F811
        tiny_sana_dir, captioned, tmp_path):  # noqa: F811
    """Progressive distillation 4 -> 2 -> 1 on the SANA stack with --data.teacher_max_sequence_length 7 and
    --data.teacher_complex_human_instruction null: every promoted teacher encodes prompts as the configured one."""
    from lightning_distill.cli import cli_main

    cli = cli_main(["fit", "--config", str(ROOT / "configs/progressive/debug_sd3.yaml"), "--data.teacher",
                    str(tiny_sana_dir), "--data.data", str(captioned), "--data.image_size", "32",
                    "--trainer.default_root_dir", str(tmp_path / "pd_sana"), "--model.init_args.num_student_steps", "4",
                    "--data.teacher_max_sequence_length", "7", "--data.teacher_complex_human_instruction", "null"])
    method, configured = cli.model, cli.datamodule.teacher
    assert method.round_index == 2 and method.num_student_steps == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert configured.max_sequence_length == 7 and configured.complex_human_instruction is None
    promoted = method.teacher
    assert promoted is not configured and promoted.max_sequence_length == 7
    assert promoted.complex_human_instruction is None
    assert encoder_key(promoted)["settings"] == encoder_key(configured)["settings"]
    ours, theirs = promoted.encode_prompts(PROMPTS), configured.encode_prompts(PROMPTS)
    assert ours["encoder_hidden_states"].shape[1] == 7
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())


def test_evaluate_takes_the_instruction_as_data_does(tiny_sana_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """evaluate --teacher-complex-human-instruction: none, or a file of lines (blank lines kept), loads the teacher
    as data.teacher_complex_human_instruction does; without a teacher, on another family or with no file: one line."""
    from lightning_distill import evaluate

    from conftest import one_line_error

    class Loaded(Exception):
        pass

    def capture(teacher, **kw):
        raise Loaded(teacher)

    monkeypatch.setattr(evaluate, "evaluate_models", capture)
    lines = ["Draw this:", "", "- in colour"]
    (tmp_path / "instruction.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for value, want in (("none", None), (str(tmp_path / "instruction.txt"), tuple(lines))):
        with pytest.raises(Loaded) as got:
            evaluate.main(["--teacher", str(tiny_sana_dir), "--teacher-complex-human-instruction", value,
                           "--out", str(tmp_path / "out")])
        teacher = got.value.args[0]
        assert teacher.complex_human_instruction == want
        run = load_run_teacher({"teacher": str(tiny_sana_dir), "teacher_complex_human_instruction": want})
        assert encoder_key(teacher) == encoder_key(run)

    monkeypatch.undo()
    capsys.readouterr()  # the loads above wrote their progress bars
    out = tmp_path / "bad"
    for argv, words in (
        (["--teacher", "none", "--student", f"s={tiny_sana_dir}", "--teacher-complex-human-instruction", "none"],
         "ConfigError: --teacher-complex-human-instruction sets a SANA teacher's instruction, but --teacher is none"),
        (["--teacher", "bundled:digits", "--teacher-complex-human-instruction", "none"],
         "ConfigError: data.teacher_complex_human_instruction is the instruction SanaPipeline puts before every prompt"),
        (["--teacher", str(tiny_sana_dir), "--teacher-complex-human-instruction", str(tmp_path / "missing.txt")],
         "ConfigError: --teacher-complex-human-instruction"),
    ):
        line = one_line_error(evaluate._entry, "evaluate", argv + ["--out", str(out)], monkeypatch, capsys)
        assert line.startswith(f"evaluate: error: {words}"), line
    assert not out.exists()
