"""``python -m lightning_distill.compare``: several methods' seeds in one evaluate run, checked against separate
evaluations of the same exports, and its one-line errors."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

from lightning_distill import compare
from lightning_distill.evaluate import evaluate_models
from lightning_distill.feature_net import DigitsFeatureNet, save_feature_net

from _method_configs import write_fixtures
from conftest import one_line_error, write_lcm_student


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _seeds_report(folder: Path, teacher: Path, exports: dict[int, Path]) -> Path:
    """A seeds report folder as ``python -m lightning_distill.seeds`` leaves it (only what compare reads)."""
    folder.mkdir(parents=True)
    protocol = dict(config="configs/x/y.yaml", teacher=str(teacher), exports={str(s): str(p) for s, p in exports.items()},
                    saved_configs={str(s): None for s in exports})
    (folder / "protocol.json").write_text(json.dumps(protocol))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    fx = write_fixtures(root / "fixtures")
    torch.manual_seed(0)
    feat = save_feature_net(DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8), root / "feat")
    # method "a": two seeds (two different tiny models); method "b": one pipeline folder, the same model as a's seed 0
    a = _seeds_report(root / "a", fx["tiny_teacher"], {0: fx["tiny_teacher"], 1: fx["tiny_eps_teacher"]})
    eval_kw = dict(num_samples=8, eval_seed=3, feature_net=str(feat), device="cpu", cache_dir=str(root / "cache"))
    out = root / "out"
    argv = ["--run", f"a={a}", "--run", f"b={fx['tiny_teacher']}", "--out", str(out), "--steps", "1", "2",
            "--teacher-steps", "1", "3", "--num-samples", "8", "--eval-seed", "3", "--feature-net", str(feat),
            "--device", "cpu", "--cache-dir", str(root / "cache")]
    summary = compare.main(argv)
    return dict(root=root, fx=fx, feat=feat, a=a, out=out, summary=summary, eval_kw=eval_kw)


def test_one_run_matches_separate_evaluations_and_summarises_per_method(setup):
    out, fx, feat = setup["out"], setup["fx"], setup["feat"]
    for f in ("results.md", "results.csv", "per_seed.csv", "fd_vs_steps.png", "protocol.json", "evaluate/results.csv"):
        assert (out / f).is_file(), f
    per_seed = _read(out / "per_seed.csv")
    fd = {(r["model"], r["seed"], int(r["steps"])): float(r["fd"]) for r in per_seed}
    # an independent evaluation of a's seed 1 alone, same protocol: the same numbers
    alone = evaluate_models(teacher=str(fx["tiny_teacher"]), students={"x": str(fx["tiny_eps_teacher"])}, steps=[1, 2],
                            teacher_steps=[3], num_samples=8, seed=3, feature_net=str(feat), device="cpu",
                            cache_dir=str(setup["root"] / "cache"), real_baseline=False)
    for row in alone:
        key = ("a", "1", row["steps"]) if row["model"] == "x" else ("teacher", "", row["steps"])
        assert fd[key] == pytest.approx(row["fd"], rel=1e-5), key
    # one noise for all: b is a's seed-0 model, so their values are equal
    for s in (1, 2):
        assert fd[("b", "", s)] == pytest.approx(fd[("a", "0", s)], rel=1e-6)
    summary = {(r["model"], int(r["steps"])): r for r in _read(out / "results.csv")}
    teacher_ref = fd[("teacher", "", 3)]  # the largest teacher step count is the yardstick
    for s in (1, 2):
        vals = [fd[("a", "0", s)], fd[("a", "1", s)]]
        row = summary[("a", s)]
        assert float(row["fd_median"]) == pytest.approx(statistics.median(vals), rel=1e-5)
        assert float(row["fd_min"]) == pytest.approx(min(vals), rel=1e-5)
        assert float(row["fd_max"]) == pytest.approx(max(vals), rel=1e-5)
        assert row["num_seeds"] == "2" and row["seeds"] == "0 1"
        assert float(row["ratio_to_teacher"]) == pytest.approx(statistics.median(vals) / teacher_ref, rel=1e-4)
        assert summary[("b", s)]["num_seeds"] == "1"
    assert float(summary[("teacher", 3)]["ratio_to_teacher"]) == pytest.approx(1.0)


def test_markdown_bolds_the_best_median_per_step_count(setup):
    text = (setup["out"] / "results.md").read_text()
    summary = [r for r in setup["summary"] if r["kind"] != "teacher"]
    for s in (1, 2):
        best = min(r["fd_median"] for r in summary if r["steps"] == s)
        assert f"**{best:.4g}**" in text
    assert "| b | 1 run |" in text and "| a | 0 1 |" in text
    assert "evaluation seed 3" in text and f"a: `{setup['a']}`" in text


def test_several_evaluation_seeds_average_fd_and_give_the_ratio_range(setup):
    """--eval-seeds 3 4: per training seed the mean of the two evaluations (seed 3's equal to the one-seed run's),
    median over training seeds, ratio to the teacher's mean FD, and the ratio's range over the two seeds."""
    root, feat, fx = setup["root"], setup["feat"], setup["fx"]
    out = root / "out_eval_seeds"
    compare.main(["--run", f"a={setup['a']}", "--out", str(out), "--steps", "1", "--teacher-steps", "3",
                  "--num-samples", "8", "--eval-seeds", "3", "4", "--feature-net", str(feat), "--device", "cpu",
                  "--cache-dir", str(root / "cache")])
    assert (out / "evaluate" / "seed3" / "results.csv").is_file() and (out / "evaluate" / "seed4" / "results.csv").is_file()
    fd = {(r["model"], r["seed"], r["eval_seed"]): float(r["fd"]) for r in _read(out / "per_seed.csv") if r["steps"] == "1" or r["model"] == "teacher"}
    one_seed = {(r["model"], r["seed"], int(r["steps"])): float(r["fd"]) for r in _read(setup["out"] / "per_seed.csv")}
    assert fd[("a", "1", "3")] == pytest.approx(one_seed[("a", "1", 1)], rel=1e-6)
    assert fd[("teacher", "", "3")] == pytest.approx(one_seed[("teacher", "", 3)], rel=1e-6)
    assert fd[("a", "1", "4")] != pytest.approx(fd[("a", "1", "3")], rel=1e-3)  # another noise, another draw
    mean = {t: statistics.fmean(fd[("a", t, e)] for e in ("3", "4")) for t in ("0", "1")}
    teacher = statistics.fmean(fd[("teacher", "", e)] for e in ("3", "4"))
    row = {(r["model"], int(r["steps"])): r for r in _read(out / "results.csv")}[("a", 1)]
    assert float(row["fd_median"]) == pytest.approx(statistics.median(mean.values()), rel=1e-5)
    assert float(row["fd_min"]) == pytest.approx(min(mean.values()), rel=1e-5)
    assert float(row["ratio_to_teacher"]) == pytest.approx(statistics.median(mean.values()) / teacher, rel=1e-4)
    per_e = [statistics.median([fd[("a", "0", e)], fd[("a", "1", e)]]) / fd[("teacher", "", e)] for e in ("3", "4")]
    assert float(row["ratio_eval_min"]) == pytest.approx(min(per_e), rel=1e-4)
    assert float(row["ratio_eval_max"]) == pytest.approx(max(per_e), rel=1e-4)
    assert row["eval_seed"] == "3 4"
    text = (out / "results.md").read_text()
    assert "## Per evaluation seed" in text and "evaluation seeds 3 4" in text
    assert f"{min(per_e):.2f}-{max(per_e):.2f}x" in text


def test_run_steps_scores_one_run_at_its_own_step_counts(setup):
    """--run-steps b=2: b (a's seed-0 model) only at 2 steps, with the value the shared --steps run gave it."""
    root, feat = setup["root"], setup["feat"]
    out = root / "out_run_steps"
    compare.main(["--run", f"a={setup['a']}", "--run", f"b={setup['fx']['tiny_teacher']}", "--run-steps", "b=2",
                  "--out", str(out), "--steps", "1", "2", "--teacher-steps", "3", "--num-samples", "8",
                  "--eval-seed", "3", "--feature-net", str(feat), "--device", "cpu", "--cache-dir", str(root / "cache")])
    rows = _read(out / "per_seed.csv")
    assert sorted(int(r["steps"]) for r in rows if r["model"] == "b") == [2]
    assert sorted(int(r["steps"]) for r in rows if r["model"] == "a") == [1, 1, 2, 2]
    before = {(r["model"], r["seed"], r["steps"]): float(r["fd"]) for r in _read(setup["out"] / "per_seed.csv")}
    assert all(float(r["fd"]) == pytest.approx(before[(r["model"], r["seed"], r["steps"])], rel=1e-6) for r in rows)
    assert "scored at 2 step(s) only" in (out / "results.md").read_text()


def _one_line_error(argv, monkeypatch, capsys) -> str:
    return one_line_error(compare._entry, "compare", argv, monkeypatch, capsys)


def test_errors_are_one_line_and_nothing_is_written(setup, tmp_path, monkeypatch, capsys):
    fx, out = setup["fx"], tmp_path / "out"
    other = _seeds_report(tmp_path / "other", fx["tiny_flow_teacher"], {0: fx["tiny_flow_teacher"]})
    line = _one_line_error(["--run", f"a={setup['a']}", "--run", f"o={other}", "--out", str(out)], monkeypatch, capsys)
    assert "different teachers" in line and str(fx["tiny_flow_teacher"]) in line
    line = _one_line_error(["--run", f"a/b={setup['a']}", "--out", str(out)], monkeypatch, capsys)
    assert "NAME must be" in line
    line = _one_line_error(["--run", f"a={setup['a']}", "--run", f"a={setup['a']}", "--out", str(out)], monkeypatch, capsys)
    assert "distinct" in line
    line = _one_line_error(["--run", f"z={tmp_path}", "--out", str(out)], monkeypatch, capsys)
    assert "neither a seeds report" in line
    line = _one_line_error(["--run", f"b={fx['tiny_teacher']}", "--out", str(out)], monkeypatch, capsys)
    assert "pass --teacher" in line
    line = _one_line_error(["--run", f"a={setup['a']}", "--eval-seeds", "1", "1", "--out", str(out)], monkeypatch, capsys)
    assert "--eval-seeds must be distinct" in line
    line = _one_line_error(["--run", f"a={setup['a']}", "--run-steps", "z=1", "--out", str(out)], monkeypatch, capsys)
    assert "'z' is not a --run name (runs: a)" in line
    line = _one_line_error(["--run", f"a={setup['a']}", "--run-steps", "a=one", "--out", str(out)], monkeypatch, capsys)
    assert "expected NAME=S[,S...]" in line
    line = _one_line_error(["--run", f"a={setup['a']}", "--run-steps", "a=1", "--run-steps", "a=2", "--out", str(out)],
                           monkeypatch, capsys)
    assert "'a' is given twice" in line
    line = _one_line_error(["--run", f"a={setup['a']}", "--run-steps", "a=0", "--out", str(out)], monkeypatch, capsys)
    assert "step counts must be positive" in line
    assert not out.exists()


def test_a_run_that_cannot_take_the_step_counts_is_named_by_run_and_seed(setup, tmp_path, monkeypatch, capsys):
    """An LCM export with a 2-point grid asked for 4 steps: the error names the --run and seed and a --run-steps
    that fits, not the evaluate run's internal student key."""
    teacher = setup["fx"]["tiny_teacher"]
    folder = write_lcm_student(teacher, tmp_path / "lcm_student", original_inference_steps=2)
    report = _seeds_report(tmp_path / "cd", teacher, {5: folder})
    # the export is loaded (diffusers' loading bar on stderr) before its grid is known: the error is the last line
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["compare", "--run", f"cd={report}", "--steps", "4", "--out", str(tmp_path / "out"),
                                     "--feature-net", str(setup["feat"]), "--device", "cpu"])
    with pytest.raises(SystemExit) as exc:
        compare._entry()
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("compare: error: ValueError: ")
    assert "--run cd seed 5 samples with at most 2 steps; none of [4] fit (e.g. --run-steps cd=1,2)" in line
    assert "cd_seed" not in line


@pytest.mark.parametrize("order", [["diverged", "good", "ok"], ["good", "diverged", "ok"]])
def test_a_diverged_method_is_never_best_and_leaves_the_ratio_range_alone(order):
    """A NaN median (a diverged method) listed first made min() NaN, so no student was bolded; a NaN ratio in one
    evaluation seed made the range depend on the order of the rows."""
    from lightning_distill.compare import add_eval_ranges, add_ratios, markdown

    def row(model, kind, fd):
        return dict(model=model, kind=kind, steps=2, num_seeds=3, seeds="" if kind == "teacher" else "0 1 2",
                    fd_median=fd, fd_min=fd, fd_max=fd, kid_median=None, kid_min=None, kid_max=None, num_samples=2000,
                    eval_seed="0", feature_net="digits-feat", reference="r")

    fds = {"diverged": float("nan"), "good": 0.20, "ok": 0.30}
    summary = [row("teacher", "teacher", 0.15)] + [row(m, "checkpoint", fds[m]) for m in order]
    add_ratios(summary)
    protocol = dict(eval_seeds=[0], teacher="t", feature_net="digits-feat", reference="r", num_samples=2000,
                    command="c", runs={})
    lines = markdown(summary, [], protocol).splitlines()
    assert any(line.startswith("| good |") and "**0.2**" in line for line in lines)
    assert not any("**" in line for line in lines if line.startswith(("| ok |", "| diverged |")))
    by_seed = {0: [dict(model="good", steps=2, ratio_to_teacher=r) for r in (float("nan"), 1.2, 1.4)[::1 if order[0] == "good" else -1]]}
    add_eval_ranges(summary, by_seed)
    good = next(r for r in summary if r["model"] == "good")
    assert (good["ratio_eval_min"], good["ratio_eval_max"]) == (1.2, 1.4)


def test_the_noise_chunk_size_is_recorded_in_the_protocol(setup):
    """Each chunk of samples has its own generator, so the chunk size changes the values: compare's protocol.json
    and results.md record the one its evaluation used (evaluate_models' default here)."""
    protocol = json.loads((setup["out"] / "protocol.json").read_text())
    assert protocol["chunk_size"] == 250 == json.loads((setup["out"] / "evaluate" / "protocol.json").read_text())["chunk_size"]
    assert "- Noise chunks: 250 images each (`--chunk-size`)" in (setup["out"] / "results.md").read_text()
