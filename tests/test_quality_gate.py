"""benchmarks/quality_gate.py: both bars on fake results, the README's stated time, and a debug-sized run
through the real command path (the consistency debug preset with a tiny teacher and an appended report)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_distill.feature_net import DigitsFeatureNet, save_feature_net

from _method_configs import write_fixtures

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality_gate as gate  # noqa: E402


@pytest.mark.parametrize(
    "student, teacher, wall_s, failed",
    [
        (0.18, 0.139, 400.0, []),  # 1.29x, 6.7 min of 8.1 x 1.5 = 12.15 min
        (0.139 * 1.3, 0.139, 60 * 8.1 * 1.5, []),  # exactly at both bars passes
        (0.20, 0.139, 400.0, ["quality"]),  # 1.44x
        (0.18, 0.139, 60 * 12.2, ["time"]),  # 1.506x the stated time
        (0.30, 0.139, 60 * 20.0, ["quality", "time"]),
        (math.nan, 0.139, 400.0, ["quality"]),  # a NaN FD never passes
    ],
)
def test_judge_bars_on_fake_results(student, teacher, wall_s, failed):
    r = gate.judge(student, teacher, wall_s, budget_min=8.1)
    assert [line.split(":")[0] for line in r.failures] == failed
    assert r.passed == (not failed)
    assert r.time_limit_s == pytest.approx(60 * 8.1 * 1.5)
    if not math.isnan(student):
        assert r.fd_ratio == pytest.approx(student / teacher)


def test_judge_rejects_meaningless_inputs():
    with pytest.raises(gate.GateError, match="teacher FD must be positive"):
        gate.judge(0.1, 0.0, 1.0, 8.0)
    with pytest.raises(gate.GateError, match="stated wall time must be positive"):
        gate.judge(0.1, 0.1, 1.0, 0.0)


def test_readme_minutes_reads_the_main_job_row():
    assert gate.readme_minutes((REPO / "README.md").read_text()) > 0
    table = ("| model | 1 step |\n|---|---|\n| teacher (`teacher/digits`, 48 min) | 1 |\n"
             "| main job (`consistency/main`, 600 steps, 5.4 min wall on an idle 2-core machine) | 0.2 |\n")
    assert gate.readme_minutes(table) == 5.4
    with pytest.raises(gate.GateError, match="no results-table row naming `consistency/main`"):
        gate.readme_minutes("The main job (`consistency/main`) takes 8 min.")


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "kind", "steps", "fd"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_report_fds_picks_student_2_and_teacher_50(tmp_path):
    rows = [dict(model="real held-out (val split)", kind="data", steps=0, fd=0.5),
            dict(model="teacher", kind="teacher", steps=2, fd=28.0), dict(model="teacher", kind="teacher", steps=50, fd=0.139),
            dict(model="student", kind="pipeline", steps=1, fd=0.26), dict(model="student", kind="pipeline", steps=2, fd=0.2)]
    assert gate.report_fds(_write_csv(tmp_path / "a.csv", rows)) == (0.2, 0.139)
    with pytest.raises(gate.GateError, match="no row for the teacher at 50 steps"):
        gate.report_fds(_write_csv(tmp_path / "b.csv", rows[:2] + rows[3:]))


@pytest.mark.slow  # subprocess training runs
def test_gate_on_a_debug_sized_run(tmp_path, monkeypatch, capsys):
    """The whole command path: train, time, read the job's own report, judge, write the record."""
    teacher = write_fixtures(tmp_path / "fixtures")["tiny_teacher"]
    torch.manual_seed(0)
    feat = save_feature_net(DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8), tmp_path / "feat")
    out = tmp_path / "run"
    report = ["--trainer.callbacks+=lightning_distill.callbacks.DistillationReport",
              "--trainer.callbacks.out_dir", str(out / "report"), "--trainer.callbacks.num_samples", "8",
              "--trainer.callbacks.feature_net", str(feat), "--trainer.callbacks.steps", "[2]",
              "--trainer.callbacks.teacher_steps", "[50]"]
    # a stated time of 0.06 s: the quality bar (made loose here: a random tiny teacher) passes, time fails
    monkeypatch.setattr("sys.argv", [
        "quality_gate.py", "--config", str(REPO / "configs" / "consistency" / "debug.yaml"), "--out", str(out),
        "--budget-min", "0.001", "--max-ratio", "1e6", "--eval-seeds", "0", "3", "--cache-dir", str(tmp_path / "cache"), "--",
        "--data.teacher", str(teacher), "--data.image_size", "8", *report,
    ])
    with pytest.raises(SystemExit) as exc:
        gate.main()
    assert exc.value.code == 1
    printed = capsys.readouterr().out
    assert "FAIL time:" in printed and "FAIL quality" not in printed and "quality gate FAILED" in printed
    record = json.loads((out / "quality_gate.json").read_text())
    assert record["passed"] is False and [f.split(":")[0] for f in record["failures"]] == ["time"]
    # --eval-seeds 0 3: the export scored again per seed; seed 0 is the job's own report, the judged FDs the means
    assert record["eval_seeds"] == [0, 3] and "mean over evaluation seeds 0 3" in printed
    seed0 = gate.report_fds(out / "gate_eval" / "seed0" / "results.csv")
    seed3 = gate.report_fds(out / "gate_eval" / "seed3" / "results.csv")
    assert seed0 == pytest.approx(gate.report_fds(out / "report" / "results.csv"), rel=1e-4)
    assert seed3[0] != pytest.approx(seed0[0], rel=1e-3)
    student, teacher_fd = (seed0[0] + seed3[0]) / 2, (seed0[1] + seed3[1]) / 2
    # results.csv holds 6 significant digits (the record, full floats): each mean agrees to about 5e-7 relative
    assert (record["student_fd"], record["teacher_fd"]) == (pytest.approx(student, rel=1e-5), pytest.approx(teacher_fd, rel=1e-5))
    assert record["fd_ratio"] == pytest.approx(student / teacher_fd, rel=1e-5)
    assert record["wall_s"] == record["timing"]["median_wall_s"] > 0.06 and record["timing"]["exit_codes"] == [0]


def test_gate_missing_config_is_exit_2_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["quality_gate.py", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit) as exc:
        gate.main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"quality_gate: error: config {str(tmp_path / 'missing.yaml')!r} not found"


def test_gate_repeated_eval_seed_is_exit_2_before_any_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["quality_gate.py", "--out", str(tmp_path / "run"), "--eval-seeds", "0", "0"])
    with pytest.raises(SystemExit) as exc:
        gate.main()
    assert exc.value.code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err.strip() == "quality_gate: error: --eval-seeds must be distinct noise seeds, got [0, 0]"
