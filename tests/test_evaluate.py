"""FIDCallback hook behaviour on tiny runs; the report command end to end on a tiny teacher and student."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from lightning_distill.callbacks.ema import EMA
from lightning_distill.callbacks.fid import FIDCallback, resolve_steps
from lightning_distill.data import TeacherDataModule
from lightning_distill.feature_net import DigitsFeatureNet, save_feature_net
from lightning_distill.methods.diffusion import DiffusionTraining

from conftest import make_tiny_unet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class MemoryLogger(Logger):
    """Keeps every logged (step, metrics) pair."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


def tiny_net():
    torch.manual_seed(0)
    return DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8)


def _fit(tmp_path, fid: FIDCallback, max_steps=2, teacher=None, ckpt_path=None):
    model = DiffusionTraining(unet=make_tiny_unet(8), sample_steps=2)
    if teacher is not None:
        model.teacher = teacher  # a frozen teacher attached for the callback's teacher FD
    logger = MemoryLogger()
    trainer = L.Trainer(
        max_steps=max_steps, logger=logger, callbacks=[EMA(decay=0.9), fid], enable_checkpointing=ckpt_path is None,
        default_root_dir=tmp_path, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu",
    )
    dm = TeacherDataModule(teacher=None, image_size=8, batch_size=8)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, model, logger


def _callback(tmp_path, **kw):
    args = dict(every_n_steps=1, num_samples=6, steps=[1, "current"], feature_net=tiny_net(), kid_subsets=3,
                kid_subset_size=4, chunk_size=4, cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    return FIDCallback(**args)


def test_fid_callback_logs_protocol_names_every_n_steps(tmp_path):
    fid = _callback(tmp_path)
    trainer, model, logger = _fit(tmp_path, fid, max_steps=2)
    steps_logged = [s for s, m in logger.logged if any(k.startswith("fid/") for k in m)]
    assert steps_logged == [1, 2]  # every step, and no duplicate at train end (step 2 was just done)
    names = set(logger.logged[-1][1])
    assert names == {f"{m}/digits-feat/{s}step/n6" for m in ("fid", "kid") for s in (1, 2)}  # "current" = 2
    assert all(v >= 0 for v in logger.logged[-1][1].values())
    assert fid.state_dict()["last_eval_step"] == 2
    assert "fid/digits-feat/2step/n6" in trainer.callback_metrics
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # reference stats written once


def test_fid_callback_uses_ema_weights(tmp_path):
    """The logged FD is that of the EMA copy's samples (which differ from the raw student's after 2 steps)."""
    from lightning_distill import metrics as M

    fid = _callback(tmp_path, steps=[1], every_n_steps=0)  # evaluated once, at the end of training
    trainer, model, logger = _fit(tmp_path, fid, max_steps=2)
    ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
    reference = M.extract_features(fid.feature_net, trainer.datamodule.train_images())

    def fd_of(denoiser) -> float:
        sample = lambda n, g, labels: model.sample(n, 1, g, labels=labels, denoiser=denoiser)  # noqa: E731
        fake = M.generated_features(sample, fid.feature_net, fid.num_samples, fid.seed, fid.chunk_size)
        return M.fd_from_features(reference, fake)

    (logged,) = [m["fid/digits-feat/1step/n6"] for _, m in logger.logged if "fid/digits-feat/1step/n6" in m]
    ema_fd, raw_fd = fd_of(ema.sampling_module(model)), fd_of(model.student)
    assert abs(ema_fd - raw_fd) > 1e-4 * raw_fd, (ema_fd, raw_fd)  # the check below can tell them apart
    assert logged == pytest.approx(ema_fd, rel=1e-9)


def test_fid_callback_teacher_once_per_run_and_state_resumes(tmp_path, tiny_teacher_dir, monkeypatch):
    from lightning_distill.callbacks import fid as cb_module
    from lightning_distill.teacher import load_teacher

    calls = []
    orig = cb_module.sample_teacher
    monkeypatch.setattr(cb_module, "sample_teacher", lambda *a, **k: calls.append(1) or orig(*a, **k))
    fid = _callback(tmp_path, steps=[1], every_n_steps=2, log_teacher=True)
    _, _, logger = _fit(tmp_path, fid, max_steps=3, teacher=load_teacher(tiny_teacher_dir))
    evals = [(s, m) for s, m in logger.logged if any(k.startswith("fid/") for k in m)]
    assert [s for s, _ in evals] == [2, 3]  # every 2 steps, then at train end
    teacher_tag = "fid/digits-feat/1step/n6/teacher"
    assert all(teacher_tag in m for _, m in evals)
    assert evals[0][1][teacher_tag] == evals[1][1][teacher_tag]
    assert len(calls) == 2  # 6 samples in chunks of 4: one teacher evaluation, once per run
    # Resume: state restores the last evaluated step and the teacher numbers (not recomputed).
    state = fid.state_dict()
    fresh = _callback(tmp_path, steps=[1], log_teacher=True)
    fresh.load_state_dict(state)
    assert fresh.last_eval_step == 3 and fresh.teacher_metrics == fid.teacher_metrics
    assert not fresh.should_evaluate(3) and fresh.should_evaluate(4)
    # the stored teacher numbers are reused only for the teacher, data and protocol they were computed for
    for key, new_calls in ((fid.teacher_key, 0), ('["another teacher"]', 2)):
        again = _callback(tmp_path, steps=[1], every_n_steps=2, log_teacher=True)
        again.load_state_dict({**state, "last_eval_step": -1, "teacher_key": key})
        before = len(calls)
        _fit(tmp_path, again, max_steps=2, teacher=load_teacher(tiny_teacher_dir))
        assert len(calls) - before == new_calls and again.teacher_key == fid.teacher_key
        assert again.teacher_metrics == fid.teacher_metrics  # the same teacher, recomputed: the same numbers


def test_resolve_steps_and_validation():
    class M:
        hparams = {"sample_steps": 4}

    m = M()
    assert resolve_steps([1, "current", 4], m) == [1, 4]
    m.current_steps = 2
    assert resolve_steps(["current", 8], m) == [2, 8]
    with pytest.raises(ValueError, match="steps must be positive"):
        FIDCallback(steps=[0])
    with pytest.raises(ValueError, match="reference"):
        FIDCallback(reference="test")


def test_report_end_to_end_checkpoint_pipeline_and_teacher(tmp_path, tiny_teacher_dir):
    from lightning_distill.cli import cli_main
    from lightning_distill.evaluate import main

    run = tmp_path / "run"
    cli_main(["fit", "--config", str(CONFIGS / "teacher" / "debug.yaml"), "--trainer.default_root_dir", str(run),
              "--trainer.max_steps", "2", "--model.init_args.sample_every_n_steps", "0"])
    ckpt, exported = run / "checkpoints" / "last.ckpt", run / "teacher"
    assert ckpt.is_file() and (exported / "model_index.json").is_file()
    feat_dir = save_feature_net(tiny_net(), tmp_path / "feat")
    out = tmp_path / "report"
    rows = main([
        "--teacher", str(tiny_teacher_dir), "--student", f"ckpt={ckpt}", "--student", f"pipe={exported}",
        "--steps", "1", "2", "--teacher-steps", "1", "3", "--num-samples", "6", "--seed", "5", "--out", str(out),
        "--feature-net", str(feat_dir), "--kid-subsets", "3", "--kid-subset-size", "4", "--chunk-size", "4",
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
    ])
    for f in ("results.md", "results.csv", "fd_vs_steps.png", "samples_teacher.png", "samples_ckpt.png", "samples_pipe.png"):
        assert (out / f).is_file(), f
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    got = {(r["model"], int(r["steps"])) for r in table}
    assert got == {("real held-out (val split)", 0), ("teacher", 1), ("teacher", 3), ("ckpt", 1), ("ckpt", 2),
                   ("pipe", 1), ("pipe", 2)}
    assert all(r["num_samples"] == "6" and r["seed"] == "5" for r in table if r["kind"] != "data")
    # The checkpoint (EMA weights, sample()) and its export (the same weights, DDPMPipeline's loop) draw
    # the same images from the same noise: identical numbers.
    by = {(r["model"], int(r["steps"])): r for r in rows}
    assert by[("ckpt", 1)]["fd"] == pytest.approx(by[("pipe", 1)]["fd"], rel=1e-5)
    assert by[("ckpt", 2)]["fd"] == pytest.approx(by[("pipe", 2)]["fd"], rel=1e-5)
    md = (out / "results.md").read_text()
    assert "Generated samples per cell: 6, seed 5" in md and "EMA weights: yes" in md
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["kid_subsets"] == 3 and protocol["kid_subset_size"] == 4 and protocol["num_samples"] == 6
    # no text-to-image model: no prompt or guidance entries (the text protocol is tests/test_evaluate_sd.py's)
    assert not {"prompts", "guidance_scale", "student_guidance"} & set(protocol) and "- Prompts:" not in md
    # the KID settings used, here and in protocol.json: 4 per set (the held-out row, fewer images: its own)
    heldout = next(int(r["num_samples"]) for r in table if r["kind"] == "data")
    assert protocol["kid_subset_size_used"] == 4 and protocol["kid_subset_size_used_heldout"] == min(4, heldout)
    assert "mean over 3 subsets of 4 samples per set" in md

    # a requested size above the sets' is recorded with the size used (the smaller set: the 6 samples)
    main(["--teacher", str(tiny_teacher_dir), "--teacher-steps", "1", "--num-samples", "6", "--seed", "5",
          "--out", str(tmp_path / "big"), "--feature-net", str(feat_dir), "--kid-subsets", "2", "--kid-subset-size",
          "50", "--chunk-size", "6", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-real-baseline"])
    big = json.loads((tmp_path / "big" / "protocol.json").read_text())
    assert big["kid_subset_size"] == 50 and big["kid_subset_size_used"] == 6 and "kid_subset_size_used_heldout" not in big
    assert "subsets of 6 samples per set (requested 50, capped at the smaller set)" in (tmp_path / "big" / "results.md").read_text()


def test_report_rejects_bad_student_spec(tmp_path, capsys):
    from lightning_distill.evaluate import build_parser, main

    for bad in ("no-equals-sign", "=path/only", "name-only="):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["--out", str(tmp_path), "--student", bad])
        assert exc.value.code == 2
        assert f"--student takes NAME=PATH, got {bad!r}" in capsys.readouterr().err
    a = build_parser().parse_args(["--out", str(tmp_path), "--student", "pd=runs/a=b/student", "--student", "cd=x"])
    assert a.student == [("pd", "runs/a=b/student"), ("cd", "x")]  # split at the first "=" only
    with pytest.raises(SystemExit, match=r"duplicate student names \['s', 's'\]"):
        main(["--out", str(tmp_path), "--student", "s=a", "--student", "s=b"])


def test_evaluate_entry_point_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    from lightning_distill import evaluate

    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["evaluate", "--teacher", "none", "--student", f"a={tmp_path / 'nothing'}",
                                     "--steps", "1", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        evaluate._entry()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: error: ValueError: image_size is needed")


def test_missing_student_fails_before_reference_features(tmp_path, monkeypatch):
    """A wrong student path is reported before the (slow) reference statistics are computed."""
    from lightning_distill import evaluate

    def must_not_run(*args, **kwargs):
        raise AssertionError("reference statistics computed before the students were loaded")

    monkeypatch.setattr(evaluate, "reference_stats", must_not_run)
    monkeypatch.setattr(evaluate, "get_feature_net", must_not_run)
    with pytest.raises(FileNotFoundError, match="student 'gone'"):
        evaluate.evaluate_models(None, {"gone": tmp_path / "nothing"}, steps=[1], image_size=8, out_dir=tmp_path / "out")


def test_step_counts_beyond_an_lcm_students_grid_are_skipped_or_rejected(tmp_path, tiny_teacher_dir):
    """An LCMScheduler student (CD / ADD / DMD2 export) samples with at most original_inference_steps."""
    from conftest import write_lcm_student
    from lightning_distill import evaluate

    folder = write_lcm_student(tiny_teacher_dir, tmp_path / "lcm_student", original_inference_steps=2)

    logs: list[str] = []
    common = dict(image_size=8, num_samples=6, feature_net=save_feature_net(tiny_net(), tmp_path / "feat"),
                  kid_subsets=2, kid_subset_size=4, chunk_size=6, cache_dir=tmp_path / "cache", device="cpu",
                  real_baseline=False, log=logs.append)
    rows = evaluate.evaluate_models(None, {"s": folder}, steps=[1, 2, 4], **common)
    assert sorted(r["steps"] for r in rows) == [1, 2]
    assert any("skipping steps [4]" in line for line in logs)
    with pytest.raises(ValueError, match="at most 2 steps"):
        evaluate.evaluate_models(None, {"s": folder}, steps=[4, 8], **common)


def test_fid_callback_rejects_steps_the_sampler_cannot_take_at_fit_start():
    class TwoStepStudent(L.LightningModule):
        def check_sample_steps(self, steps):
            if steps > 2:
                raise ValueError(f"samples with 1..2 steps, got {steps}")

    FIDCallback(steps=[1, 2], feature_net=tiny_net()).on_fit_start(None, TwoStepStudent())
    with pytest.raises(ValueError, match=r"FIDCallback steps \[1, 4\]: samples with 1\.\.2 steps, got 4"):
        FIDCallback(steps=[1, 4], feature_net=tiny_net()).on_fit_start(None, TwoStepStudent())


def test_fid_debug_config_runs_through_the_cli(tmp_path):
    from lightning_distill.callbacks.fid import FIDCallback
    from lightning_distill.cli import cli_main

    cli = cli_main(["fit", "--config", str(CONFIGS / "evaluation" / "fid_debug.yaml"),
                    "--trainer.default_root_dir", str(tmp_path)])
    fid = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FIDCallback))
    assert fid.last_eval_step == 2
    assert set(fid.last_metrics) == {f"{m}/digits-feat/{s}step/n8" for m in ("fid", "kid") for s in (1, 2)}
    assert list((tmp_path / "fd_cache").glob("digits-feat-n*.pt"))
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))


@pytest.mark.parametrize("kwargs,words", [
    ({"teacher_steps": [0]}, r"step counts and chunk_size must be >= 1, got steps \[0\]"),
    ({"chunk_size": 0}, r"chunk_size 0"),
    ({"kid_subsets": 0}, r"kid_subsets >= 1 and kid_subset_size >= 2, got 0 and 1000"),
    ({"kid_subset_size": 1}, r"got 100 and 1"),
    ({"students": {"teacher": "some/student"}}, r"a student is named 'teacher', the teacher's own row"),
])
def test_bad_protocol_settings_fail_before_any_work(kwargs, words):
    """One-line errors naming the value, raised before the teacher loads (a missing folder would say so)."""
    from lightning_distill.errors import ConfigError
    from lightning_distill.evaluate import evaluate_models

    with pytest.raises(ConfigError, match=words):
        evaluate_models("no/such/teacher", **{"students": {}, **kwargs})


def test_fid_callback_refuses_a_kid_protocol_it_cannot_compute():
    from lightning_distill.callbacks.fid import FIDCallback
    from lightning_distill.errors import ConfigError

    with pytest.raises(ConfigError, match="kid_subset_size >= 2, got 100 and 1"):
        FIDCallback(kid_subset_size=1)


def test_the_chunk_size_is_recorded_in_the_protocol(tmp_path, tiny_teacher_dir):
    """Each chunk of samples has its own generator, so --chunk-size changes the noise, hence the values: two reports
    stating the same protocol (8 samples, seed 0) disagreed. protocol.json and results.md now record it."""
    from lightning_distill.evaluate import main

    feat = save_feature_net(tiny_net(), tmp_path / "feat")
    fds = {}
    for cs in (4, 8):
        out = tmp_path / f"chunk{cs}"
        rows = main(["--teacher", str(tiny_teacher_dir), "--teacher-steps", "2", "--num-samples", "8", "--seed", "0",
                     "--chunk-size", str(cs), "--out", str(out), "--feature-net", str(feat), "--kid-subsets", "2",
                     "--kid-subset-size", "4", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                     "--no-real-baseline"])
        fds[cs] = rows[0]["fd"]
        assert json.loads((out / "protocol.json").read_text())["chunk_size"] == cs
        assert f"- Noise chunks: {cs} images each (`--chunk-size`)" in (out / "results.md").read_text()
    assert fds[4] != fds[8]  # what makes it part of the protocol


def test_teacher_dtype_loads_the_teacher_as_data_teacher_dtype_does(tmp_path, tiny_teacher_dir, monkeypatch, capsys):
    """--teacher-dtype: the teacher a run with data.teacher_dtype holds (load_run_teacher), scored in that dtype;
    a bad value is one line naming the choices (exit 2) before anything is written."""
    from lightning_distill import evaluate
    from lightning_distill.data import load_run_teacher

    from conftest import one_line_error

    seen = []
    real = evaluate.evaluate_models
    monkeypatch.setattr(evaluate, "evaluate_models", lambda teacher, **kw: seen.append(teacher) or real(teacher, **kw))
    feat = save_feature_net(tiny_net(), tmp_path / "feat")
    common = ["--teacher", str(tiny_teacher_dir), "--teacher-steps", "1", "--num-samples", "6", "--chunk-size", "6",
              "--feature-net", str(feat), "--kid-subsets", "2", "--kid-subset-size", "4", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache"), "--no-real-baseline"]
    rows = {}
    for dtype in ("bfloat16", None):
        rows[dtype] = evaluate.main(common + ["--out", str(tmp_path / f"out-{dtype}")]
                                    + (["--teacher-dtype", dtype] if dtype else []))
    bf16, default = seen
    assert next(bf16.unet.parameters()).dtype == torch.bfloat16
    assert evaluate._run_settings_match(bf16, {"teacher_dtype": "bfloat16"})
    run = load_run_teacher({"teacher": str(tiny_teacher_dir), "teacher_dtype": "bfloat16"})
    assert all(torch.equal(a, b) for a, b in zip(bf16.unet.state_dict().values(), run.unet.state_dict().values()))
    assert default == str(tiny_teacher_dir)  # without the option: loaded by evaluate_models, float32 as before
    fd16, fd32 = rows["bfloat16"][0]["fd"], rows[None][0]["fd"]
    assert math.isfinite(fd16) and fd16 != fd32  # the bfloat16 teacher draws (slightly) other images
    # so the reports say which: protocol.json and results.md record the teacher's dtype
    for dtype, held in (("bfloat16", "bfloat16"), (None, "float32")):
        out = tmp_path / f"out-{dtype}"
        assert json.loads((out / "protocol.json").read_text())["teacher_dtype"] == held
        assert f"- Teacher precision: {held} (`--teacher-dtype`" in (out / "results.md").read_text()

    capsys.readouterr()
    out = tmp_path / "bad"
    for argv, words in (
        (common + ["--teacher-dtype", "fp16", "--out", str(out)],
         "ConfigError: --teacher-dtype 'fp16' is not one of float32, bfloat16, float16"),
        (["--teacher", "none", "--student", f"s={tiny_teacher_dir}", "--teacher-dtype", "float16", "--out", str(out)],
         "ConfigError: --teacher-dtype float16 sets the teacher's precision, but --teacher is none: unset it"),
    ):
        line = one_line_error(evaluate._entry, "evaluate", argv, monkeypatch, capsys)
        assert line == f"evaluate: error: {words}", line
    assert not out.exists()
