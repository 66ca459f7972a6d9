"""DistillationReport: the main job's closing FD table, from the exported pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_tiny_teacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_main_job_prints_student_vs_teacher_table(tmp_path, capsys):
    from lightning_distill.cli import cli_main

    teacher = write_tiny_teacher(tmp_path / "teacher")
    root = tmp_path / "run"
    cli_main([
        "fit", "--config", str(CONFIGS / "consistency" / "main.yaml"),
        "--data.teacher", str(teacher), "--data.image_size", "8", "--data.batch_size", "8",
        "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root), "--data.split_seed", "3",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.num_samples", "24",  # applies to the last callback (the report)
        "--trainer.callbacks.init_args.teacher_steps", "[1, 2]",
        "--trainer.callbacks.init_args.steps", "[1]",
    ])
    out = capsys.readouterr().out
    # The table names both models, carries its protocol, and points at the export that was scored.
    assert "| teacher (teacher) |" in out and "| student (pipeline) |" in out
    assert "Generated samples per cell: 24" in out
    assert f"Exported student pipeline: {root / 'student'}" in out
    report = root / "report"
    rows = (report / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 2 + 1  # header, real held-out baseline, teacher x2, student x1
    assert (report / "fd_vs_steps.png").stat().st_size > 0
    assert (root / "student" / "model_index.json").exists()
    # the reference is the run's own data and split (before: always the digits default split)
    protocol = json.loads((report / "protocol.json").read_text())
    assert protocol["reference"].startswith("digits train split (split_seed=3, val_fraction=0.1, 1617 images, 8x8)")
