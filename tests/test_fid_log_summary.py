"""benchmarks/fid_log_summary.py: in-run FD lines of training logs -> per-run best and per-group medians."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fid_log_summary.py"


@pytest.fixture(scope="module")
def summary_module():
    spec = importlib.util.spec_from_file_location("fid_log_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(path: Path, values: dict[int, float], metric: str = "fid/digits-feat/1step/n2000") -> Path:
    lines = ["Seed set to 0", "some other line"]
    lines += [f"[rank: 0] FIDCallback step {s}: {metric}={v:.4g}, kid/x=0.5" for s, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_best_per_run_and_group_medians(tmp_path, summary_module):
    logs = [
        _log(tmp_path / "preset_seed0.log", {500: 1.0, 1000: 0.3, 1500: 0.4}),
        _log(tmp_path / "preset_seed1.log", {500: 2.0, 1000: 0.6}),
        _log(tmp_path / "preset_seed2.log", {500: 0.9, 1000: 0.5, 1500: 0.2}),
        _log(tmp_path / "b256_seed0.log", {}),
    ]
    out = summary_module.summarise(logs, "fid/digits-feat/1step/n2000")
    runs = out["runs"]
    assert runs["preset_seed0"]["best"] == pytest.approx(0.3) and runs["preset_seed0"]["best_step"] == 1000
    assert runs["preset_seed2"]["best"] == pytest.approx(0.2) and runs["preset_seed2"]["last_step"] == 1500
    assert "best" not in runs["b256_seed0"]  # a run that never evaluated has no best
    preset = out["groups"]["preset"]
    assert sorted(preset["best_per_run"]) == pytest.approx([0.2, 0.3, 0.6])
    assert preset["median_best"] == pytest.approx(0.3)
    # only the steps every run of the group reached
    assert preset["median_by_step"] == pytest.approx({500: 1.0, 1000: 0.5})
    assert out["groups"]["b256"]["median_best"] is None


def test_other_metrics_are_ignored(tmp_path, summary_module):
    log = _log(tmp_path / "x_seed0.log", {500: 0.7}, metric="fid/digits-feat/2step/n2000")
    out = summary_module.summarise([log], "fid/digits-feat/1step/n2000")
    assert out["runs"]["x_seed0"]["evaluations"] == {}
