"""The seeds runner (``python -m lightning_distill.seeds``): end to end on the consistency debug preset with a
tiny teacher, its summary statistics against hand values, and its one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from lightning_distill import seeds
from lightning_distill.feature_net import DigitsFeatureNet, save_feature_net

from _method_configs import write_fixtures
from conftest import one_line_error

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "consistency" / "debug.yaml"


def _tiny_feature_net(folder: Path) -> Path:
    """An 8x8 feature network (as in tests/test_evaluate.py): the bundled one takes 16x16 digits."""
    torch.manual_seed(0)
    return save_feature_net(DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8), folder)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Seeds 0 and 1 trained in parallel (3 steps each) and evaluated with 8 samples per cell."""
    root = tmp_path_factory.mktemp("seeds")
    teacher = write_fixtures(root / "fixtures")["tiny_teacher"]
    feat = _tiny_feature_net(root / "feat")
    out = root / "out"
    eval_args = ["--num-samples", "8", "--steps", "1", "2", "--teacher-steps", "2", "--feature-net", str(feat),
                 "--device", "cpu", "--cache-dir", str(root / "cache")]
    overrides = ["--data.teacher", str(teacher), "--data.image_size", "8"]
    summary = seeds.main(["--config", str(CONFIG), "--seeds", "0", "1", "--jobs", "2", "--out", str(out),
                          *eval_args, "--", *overrides])
    return dict(out=out, summary=summary, eval_args=eval_args, overrides=overrides)


@pytest.mark.slow  # subprocess training runs
def test_seeds_runner_end_to_end_median_min_max_match_per_seed_values(two_seeds):
    out = two_seeds["out"]
    for f in ("results.md", "results.csv", "per_seed.csv", "fd_vs_steps.png", "protocol.json",
              "evaluate/results.csv", "seed_0/student/model_index.json", "seed_1/student/model_index.json"):
        assert (out / f).is_file(), f
    # each run was trained with its own seed, in both the global RNG and the method's own generators
    for s in (0, 1):
        cfg = yaml.safe_load(seeds.saved_run_config(out / f"seed_{s}").read_text())
        assert cfg["seed_everything"] == s and cfg["model"]["init_args"]["seed"] == s
    per_seed, summary = _read(out / "per_seed.csv"), _read(out / "results.csv")
    students = [r for r in per_seed if r["kind"] != "teacher"]
    assert sorted((r["seed"], r["steps"]) for r in students) == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    assert {r["model"] for r in students} == {"consistency/debug"}
    # two seeds give two different students (the seed reached the training)
    fd = {(r["seed"], r["steps"]): float(r["fd"]) for r in students}
    assert fd[("0", "2")] != fd[("1", "2")]
    # the per-seed values are exactly evaluate's numbers for the same exports
    evaluated = {(r["model"], r["steps"]): float(r["fd"]) for r in _read(out / "evaluate" / "results.csv")}
    assert all(evaluated[(f"seed_{s}", st)] == pytest.approx(v, rel=1e-5) for (s, st), v in fd.items())
    rows = {(r["model"], r["steps"]): r for r in summary}
    assert set(rows) == {("consistency/debug", "1"), ("consistency/debug", "2"), ("teacher", "2")}
    for st in ("1", "2"):
        vals = [fd[("0", st)], fd[("1", st)]]
        r = rows[("consistency/debug", st)]
        assert float(r["fd_median"]) == pytest.approx(statistics.median(vals), rel=1e-5)
        assert float(r["fd_min"]) == pytest.approx(min(vals), rel=1e-5)
        assert float(r["fd_max"]) == pytest.approx(max(vals), rel=1e-5)
        assert r["num_seeds"] == "2" and r["seeds"] == "0 1" and r["num_samples"] == "8" and r["eval_seed"] == "0"
    teacher = rows[("teacher", "2")]
    assert teacher["num_seeds"] == "1" and teacher["fd_min"] == teacher["fd_max"] == teacher["fd_median"]
    md = (out / "results.md").read_text()
    r2 = rows[("consistency/debug", "2")]
    assert f"{float(r2['fd_median']):.4g} [{float(r2['fd_min']):.4g}, {float(r2['fd_max']):.4g}]" in md
    for text in ("Generated samples per cell: 8, evaluation seed 0", "Training seeds: 0, 1", "--data.image_size 8",
                 "--seed_everything S --model.init_args.seed S", "Reference set: digits train split"):
        assert text in md, text


@pytest.mark.slow  # subprocess training runs
def test_skip_train_reevaluates_the_existing_exports(two_seeds, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("--skip-train trained")

    monkeypatch.setattr(seeds, "train_seeds", no_training)
    out = two_seeds["out"]
    before = _read(out / "per_seed.csv")
    seeds.main(["--config", str(CONFIG), "--seeds", "0", "1", "--skip-train", "--out", str(out),
                *two_seeds["eval_args"], "--", *two_seeds["overrides"]])
    after = _read(out / "per_seed.csv")
    assert [(r["seed"], r["steps"], r["fd"]) for r in after] == [(r["seed"], r["steps"], r["fd"]) for r in before]
    assert "evaluated with `--skip-train`" in (out / "results.md").read_text()


@pytest.mark.slow  # subprocess training runs (the module fixture)
def test_several_eval_seeds_average_each_training_seed(two_seeds, tmp_path):
    """--skip-train --eval-seeds 0 5 on a copy of the runs: seed 0's rows equal the one-seed report's, and the
    summary is the median over training seeds of each seed's mean over the two evaluations."""
    out = tmp_path / "out"
    shutil.copytree(two_seeds["out"], out)
    args = [a for a in two_seeds["eval_args"]]
    seeds.main(["--config", str(CONFIG), "--seeds", "0", "1", "--skip-train", "--out", str(out), *args,
                "--eval-seeds", "0", "5", "--", *two_seeds["overrides"]])
    one = {(r["model"], r["seed"], r["steps"]): float(r["fd"]) for r in _read(two_seeds["out"] / "per_seed.csv")}
    fd = {(r["model"], r["seed"], r["steps"], r["eval_seed"]): float(r["fd"]) for r in _read(out / "per_seed.csv")}
    assert all(fd[(*k, "0")] == pytest.approx(v, rel=1e-6) for k, v in one.items())
    assert fd[("consistency/debug", "1", "2", "5")] != pytest.approx(fd[("consistency/debug", "1", "2", "0")], rel=1e-3)
    assert (out / "evaluate" / "seed5" / "results.csv").is_file()
    row = {(r["model"], r["steps"]): r for r in _read(out / "results.csv")}[("consistency/debug", "2")]
    means = [statistics.fmean(fd[("consistency/debug", t, "2", e)] for e in ("0", "5")) for t in ("0", "1")]
    assert float(row["fd_median"]) == pytest.approx(statistics.median(means), rel=1e-5)
    assert float(row["fd_max"]) == pytest.approx(max(means), rel=1e-5) and row["eval_seed"] == "0 5"
    assert "evaluation seeds 0 5" in (out / "results.md").read_text()


def test_mean_over_eval_seeds_hand_values():
    def row(seed, e, fd, kid=None):
        return dict(model="m", kind="pipeline", seed=seed, steps=1, fd=fd, kid=kid, kid_std=None, eval_seed=e)

    got = seeds.mean_over_eval_seeds([row(0, 0, 0.2, 0.01), row(1, 0, 0.5, 0.05), row(0, 3, 0.4, 0.03), row(1, 3, 0.9)])
    assert [(r["seed"], r["fd"], r["eval_seed"]) for r in got] == [(0, pytest.approx(0.3), "0 3"),
                                                                  (1, pytest.approx(0.7), "0 3")]
    # a KID missing at one evaluation seed leaves that training seed's mean KID unknown, not half-averaged
    assert got[0]["kid"] == pytest.approx(0.02) and got[1]["kid"] is None


def _one_line_error(argv, monkeypatch, capsys) -> str:
    return one_line_error(seeds._entry, "seeds", argv, monkeypatch, capsys)


@pytest.mark.slow  # subprocess training runs (the module fixture)
def test_seeds_trained_from_different_teachers_need_the_teacher_named(two_seeds, tmp_path, monkeypatch, capsys):
    """A chained job (each seed's teacher its own earlier export) has no one teacher: the runner must not score
    the teacher rows with seed 0's; named after --, the named teacher is used."""
    out = tmp_path / "out"
    shutil.copytree(two_seeds["out"], out)
    saved = seeds.saved_run_config(out / "seed_1")
    cfg = yaml.safe_load(saved.read_text())
    teacher = cfg["data"]["teacher"]
    cfg["data"]["teacher"] = str(tmp_path / "seed_0_export")
    saved.write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(CONFIG), "--seeds", "0", "1", "--skip-train", "--out", str(out), *two_seeds["eval_args"]]
    line = _one_line_error([*argv, "--", "--data.image_size", "8"], monkeypatch, capsys)
    assert "trained from different teachers" in line and f"seed 0: {teacher}" in line
    assert f"seed 1: {tmp_path / 'seed_0_export'}" in line and "-- --data.teacher" in line
    seeds.main([*argv, "--", *two_seeds["overrides"]])
    assert json.loads((out / "protocol.json").read_text())["teacher"] == teacher


def test_missing_config_is_one_line(tmp_path, monkeypatch, capsys):
    line = _one_line_error(["--config", str(tmp_path / "nope.yaml"), "--seeds", "0", "--out", str(tmp_path)],
                           monkeypatch, capsys)
    assert line.startswith("seeds: error: FileNotFoundError: config ") and "nope.yaml" in line


def test_missing_export_is_one_line_naming_the_seed(tmp_path, monkeypatch, capsys):
    (tmp_path / "seed_3").mkdir()
    line = _one_line_error(["--config", str(CONFIG), "--seeds", "3", "--skip-train", "--out", str(tmp_path)],
                           monkeypatch, capsys)
    assert line.startswith("seeds: error: FileNotFoundError: seed 3: no exported student at ")
    assert str(tmp_path / "seed_3" / "student") in line


def test_reserved_override_and_repeated_seed_are_rejected(tmp_path, monkeypatch, capsys):
    line = _one_line_error(["--config", str(CONFIG), "--seeds", "0", "--out", str(tmp_path), "--",
                            "--trainer.default_root_dir=/elsewhere"], monkeypatch, capsys)
    assert "'--trainer.default_root_dir=/elsewhere' is set per seed by the runner" in line
    line = _one_line_error(["--config", str(CONFIG), "--seeds", "0", "0", "--out", str(tmp_path)], monkeypatch, capsys)
    assert "distinct" in line and "[0, 0]" in line


def test_summarise_hand_values():
    def row(seed, steps, fd):
        return dict(model="m", kind="pipeline", seed=seed, steps=steps, fd=fd, kid=fd / 10, num_samples=8,
                    eval_seed=0, feature_net="f", reference="r")

    per_seed = [row(0, 1, 0.3), row(1, 1, 0.1), row(2, 1, 0.2), row(0, 2, 0.4), row(1, 2, 0.1)]
    got = {r["steps"]: r for r in seeds.summarise(per_seed)}
    assert (got[1]["fd_median"], got[1]["fd_min"], got[1]["fd_max"]) == (0.2, 0.1, 0.3)
    assert got[1]["seeds"] == "0 1 2" and got[1]["num_seeds"] == 3
    assert got[2]["fd_median"] == pytest.approx(0.25)  # even count: the mean of the middle two
    assert got[1]["kid_median"] == pytest.approx(0.02)


def test_preset_config_overrides_and_export_dir(tmp_path):
    cfg = seeds.preset_config(CONFIG, ["--data.teacher", "/t", "--data.image_size=8", "--trainer.enable_progress_bar", "false"])
    assert cfg["data"]["teacher"] == "/t" and cfg["data"]["image_size"] == 8
    assert seeds.export_dir(cfg, tmp_path / "seed_4") == tmp_path / "seed_4" / "student"
    assert seeds.model_accepts_seed(cfg)
    # a saved config trained on another machine: its resolved export path is re-rooted at the local run folder
    saved = {"trainer": {"default_root_dir": "/elsewhere/runs/seed_0", "callbacks": [
        {"class_path": "lightning_distill.callbacks.PipelineExport", "init_args": {"dirpath": "/elsewhere/runs/seed_0/student"}}]}}
    assert seeds.export_dir(saved, tmp_path / "seed_0") == tmp_path / "seed_0" / "student"
    with pytest.raises(ValueError, match="no lightning_distill.callbacks.PipelineExport"):
        seeds.export_dir({"trainer": {"callbacks": []}}, tmp_path)


@pytest.mark.slow  # subprocess training runs
def test_resume_keeps_finished_seeds_and_continues_interrupted_ones_exactly(tmp_path, monkeypatch, capsys):
    """``--resume``: a seed with an export is kept untouched; a seed with a last.ckpt at step 2 and no export (a
    run killed after its step-2 checkpoint) continues to step 4 and ends where an uninterrupted run ends."""
    from safetensors.torch import load_file

    teacher = write_fixtures(tmp_path / "fixtures")["tiny_teacher"]
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["trainer"]["max_steps"] = 4
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1  # ModelCheckpoint: last.ckpt every step
    config = tmp_path / "debug_4.yaml"
    config.write_text(yaml.safe_dump(cfg))
    overrides = ["--data.teacher", str(teacher), "--data.image_size", "8"]
    weights = "student/unet/diffusion_pytorch_model.safetensors"
    quiet = lambda msg: None  # noqa: E731

    whole, out = tmp_path / "whole", tmp_path / "out"
    assert seeds.train_seeds(config, [1], whole, overrides, log=quiet) == {1: "trained"}
    seeds.train_seeds(config, [1], out, [*overrides, "--trainer.max_steps", "2"], log=quiet)
    shutil.rmtree(out / "seed_1" / "student")  # interrupted: a step-2 checkpoint, no export
    at_2 = torch.load(out / "seed_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert at_2["global_step"] == 2

    # finished: nothing runs, nothing is rewritten
    kept = {p: p.stat().st_mtime_ns for p in [whole / "seed_1" / weights, whole / "seed_1" / "train.log"]}
    assert seeds.train_seeds(config, [1], whole, overrides, log=quiet, resume=True) == {1: "kept (export exists)"}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept

    # interrupted: continues from its last.ckpt, appends to its log, ends equal to the uninterrupted run
    done = seeds.train_seeds(config, [1], out, overrides, log=quiet, resume=True)
    assert done[1] == f"resumed from {out / 'seed_1' / 'checkpoints' / 'last.ckpt'}"
    at_4 = torch.load(out / "seed_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert at_4["global_step"] == 4  # it went on from step 2, and moved the weights
    assert any(not torch.equal(v, at_4["state_dict"][k]) for k, v in at_2["state_dict"].items() if k.startswith("student."))
    log = (out / "seed_1" / "train.log").read_text()
    assert "--- resumed by the seeds runner" in log
    assert f"Restoring states from the checkpoint path at {out / 'seed_1' / 'checkpoints' / 'last.ckpt'}" in log.split("--- resumed")[1]
    resumed, reference = load_file(out / "seed_1" / weights), load_file(whole / "seed_1" / weights)
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)

    line = one_line_error(seeds._entry, "seeds", ["--config", str(config), "--seeds", "1", "--out", str(out),
                                                   "--resume", "--skip-train"], monkeypatch, capsys)
    assert "--resume" in line and "--skip-train" in line


def _fake_run(run_dir: Path, data: dict | None = None, stale: bool = False, seed: int = 0) -> None:
    """A seed folder as a finished run leaves it: LightningCLI's saved config, then the export; ``stale``: the
    export older than the config (an earlier run's export, then a restarted fit that was killed)."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["trainer"]["default_root_dir"], cfg["seed_everything"] = str(run_dir), seed
    cfg["data"] = {**cfg.get("data", {}), **(data or {})}
    (run_dir / "student").mkdir(parents=True)
    index, saved = run_dir / "student" / "model_index.json", run_dir / "config.yaml"
    index.write_text("{}")
    saved.write_text(yaml.safe_dump(cfg))
    os.utime(index if stale else saved, (1_000_000, 1_000_000))


def test_a_fresh_start_refuses_an_out_holding_earlier_runs_and_resume_skips_a_stale_export(tmp_path, monkeypatch):
    """A fresh start over an earlier run's export would later be --resume'd as "kept" (PipelineExport writes only
    at the end of a fit): it is refused, nothing deleted. With --resume, an export older than the run's saved
    config (a restarted fit that was killed) is not kept: the seed trains."""
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    quiet = lambda msg: None  # noqa: E731
    _fake_run(tmp_path / "out" / "seed_0")
    with pytest.raises(FileExistsError, match=r"holds earlier runs \(seed 0: .*student.*pass --resume"):
        seeds.train_seeds(CONFIG, [0], tmp_path / "out", log=quiet)
    assert not calls and (tmp_path / "out" / "seed_0" / "student" / "model_index.json").is_file()
    assert seeds.train_seeds(CONFIG, [0], tmp_path / "out", log=quiet, resume=True) == {0: "kept (export exists)"}
    _fake_run(tmp_path / "stale" / "seed_0", stale=True)
    assert seeds.train_seeds(CONFIG, [0], tmp_path / "stale", log=quiet, resume=True) == {0: "trained"}
    assert len(calls) == 1


def test_runners_evaluate_with_the_runs_split_and_teacher_settings(tmp_path, monkeypatch):
    """seeds (--skip-train), compare and the quality gate score against the train split the run used and load
    its teacher as it did (they used split 0 / 10% and the teacher's defaults whatever the run set)."""
    import importlib

    from lightning_distill import compare, teacher as teacher_module

    data = {"teacher": "some/teacher", "split_seed": 3, "val_fraction": 0.2, "teacher_dtype": "bfloat16",
            "teacher_prediction_type": "v_prediction", "teacher_revision": "abc"}
    for s in (0, 1):
        _fake_run(tmp_path / "out" / f"seed_{s}", data, seed=s)
    loaded, evaluated = [], []
    monkeypatch.setattr(teacher_module, "load_teacher", lambda *a, **kw: loaded.append((a, kw)) or "TEACHER")

    class Stop(Exception):
        pass

    def fake_eval(eval_seeds, out_dir, teacher, **kw):
        evaluated.append((teacher, kw))
        raise Stop

    monkeypatch.setattr(seeds, "evaluate_eval_seeds", fake_eval)
    monkeypatch.setattr(compare, "evaluate_eval_seeds", fake_eval)
    with pytest.raises(Stop):
        seeds.run_seeds(CONFIG, [0, 1], tmp_path / "out", skip_train=True, log=lambda m: None)
    (tmp_path / "out" / "protocol.json").write_text(json.dumps({
        "teacher": "some/teacher", "exports": {str(s): str(tmp_path / "out" / f"seed_{s}" / "student") for s in (0, 1)},
        "saved_configs": {"0": str(tmp_path / "out" / "seed_0" / "config.yaml")}}))
    with pytest.raises(Stop):
        compare.compare_methods([("cd", tmp_path / "out")], out=tmp_path / "cmp", log=lambda m: None)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    gate = importlib.import_module("quality_gate")
    with pytest.raises(Stop):
        gate.averaged_fds(tmp_path / "out" / "seed_0", [0])
    assert len(evaluated) == 3
    for teacher, kw in evaluated:
        assert teacher == "TEACHER" and (kw["split_seed"], kw["val_fraction"]) == (3, 0.2)
    for args, kw in loaded:
        assert args == ("some/teacher",)
        assert kw == {"revision": "abc", "dtype": "bfloat16", "prediction_type": "v_prediction"}


def test_compare_refuses_two_runs_whose_students_share_a_name(tmp_path):
    """--run cd=<seeds report> and --run cd_seed0=<pipeline>: both students were named cd_seed0, and one dropped out."""
    from lightning_distill import compare

    for s in (0, 1):
        _fake_run(tmp_path / "report" / f"seed_{s}", seed=s)
    (tmp_path / "report" / "protocol.json").write_text(json.dumps(
        {"teacher": "t", "exports": {str(s): str(tmp_path / "report" / f"seed_{s}" / "student") for s in (0, 1)}}))
    with pytest.raises(ValueError, match=r"the same name \['cd_seed0'\]"):
        compare.compare_methods([("cd", tmp_path / "report"), ("cd_seed0", tmp_path / "report" / "seed_0" / "student")],
                                out=tmp_path / "cmp", log=lambda m: None)


def test_a_diverged_seed_is_the_worst_value_in_any_order_and_does_not_abort_the_evaluation():
    """A NaN FD sorted arbitrarily inside statistics.median / min / max (the median of (nan, 0.2, 0.1) was 0.2 or
    nan by row order); and NaN features raised in the matrix square root, aborting every model's evaluation."""
    import itertools

    from lightning_distill import metrics

    def row(seed, fd):
        return dict(model="m", kind="pipeline", seed=seed, steps=1, fd=fd, kid=fd, num_samples=8, eval_seed=0,
                    feature_net="f", reference="r")

    nan = float("nan")
    for order in itertools.permutations([(0, nan), (1, 0.2), (2, 0.1)]):
        (got,) = seeds.summarise([row(*r) for r in order])
        assert (got["fd_median"], got["fd_min"]) == (0.2, 0.1) and got["fd_max"] != got["fd_max"]  # max: NaN
    (two_nan,) = seeds.summarise([row(0, nan), row(1, 0.1), row(2, nan)])
    assert two_nan["fd_median"] != two_nan["fd_median"]
    ref = metrics.ReferenceStats(*metrics.gaussian_stats(torch.randn(16, 4)), torch.randn(16, 4), "k", "f")
    fake = torch.randn(16, 4)
    fake[3, 1] = nan
    score = metrics.score_features(fake, ref, kid=True, kid_subsets=2, kid_subset_size=8)
    assert score.fd != score.fd and score.kid != score.kid


def test_the_noise_chunk_size_is_recorded_in_the_protocol(tmp_path):
    """Each chunk of samples has its own generator, so the chunk size changes the values: the seeds report's
    protocol.json and results.md record the one its evaluation used (evaluate_models' default), with several
    evaluation seeds too (read from the first seed's evaluation)."""
    fx = write_fixtures(tmp_path / "fixtures")
    feat = _tiny_feature_net(tmp_path / "feat")
    for s in (0, 1):
        _fake_run(tmp_path / "out" / f"seed_{s}", {"teacher": str(fx["tiny_teacher"]), "image_size": 8}, seed=s)
        student = tmp_path / "out" / f"seed_{s}" / "student"
        shutil.rmtree(student)
        shutil.copytree(fx["tiny_teacher"] if s == 0 else fx["tiny_eps_teacher"], student)
    for eval_seeds in ([0], [0, 1]):
        seeds.run_seeds(CONFIG, [0, 1], tmp_path / "out", skip_train=True, steps=[1], num_samples=8,
                        eval_seeds=eval_seeds, feature_net=str(feat), cache_dir=tmp_path / "cache", device="cpu",
                        log=lambda m: None)
        assert json.loads((tmp_path / "out" / "protocol.json").read_text())["chunk_size"] == 250
        assert "- Noise chunks: 250 images each (`--chunk-size`)" in (tmp_path / "out" / "results.md").read_text()
