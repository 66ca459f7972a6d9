"""The teacher-features cache of evaluation reports: read back exactly, keyed by content, and the
bundled teacher's shipped entries equal a fresh computation."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_distill import evaluate
from lightning_distill import teacher_features as tf
from lightning_distill.feature_net import DigitsFeatureNet
from lightning_distill.metrics import get_feature_net
from lightning_distill.teacher import load_teacher

from conftest import write_tiny_teacher


def tiny_net():
    torch.manual_seed(0)
    return DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8)


def _report(teacher, tmp_path, name, **kw):
    logs: list[str] = []
    rows = evaluate.evaluate_models(
        teacher, {}, steps=[1], teacher_steps=[1, 3], num_samples=12, seed=1, feature_net=tiny_net(), kid_subsets=3,
        kid_subset_size=6, chunk_size=5, cache_dir=tmp_path / "cache", out_dir=tmp_path / name, device="cpu",
        log=logs.append, **kw,
    )
    return {r["steps"]: r for r in rows if r["kind"] == "teacher"}, logs


def test_second_report_reads_the_teacher_cells_back_exactly(tmp_path, monkeypatch):
    teacher = load_teacher(str(write_tiny_teacher(tmp_path / "teacher")))
    first, logs = _report(teacher, tmp_path, "a")
    assert not any("read from" in m for m in logs)
    assert len(list((tmp_path / "cache").glob("teacher-*step-n12-s1-*.pt"))) == 2

    calls = []
    real = evaluate.sample_cell
    monkeypatch.setattr(evaluate, "sample_cell", lambda *a, **k: calls.append(1) or real(*a, **k))
    second, logs = _report(teacher, tmp_path, "b")
    assert calls == []  # nothing sampled
    assert {s: (r["fd"], r["kid"]) for s, r in second.items()} == {s: (r["fd"], r["kid"]) for s, r in first.items()}
    assert sum("read from" in m for m in logs) == 2
    assert "generated features read from the cache entry" in (tmp_path / "b" / "results.md").read_text()
    # the sample grids come back too
    assert (tmp_path / "a" / "samples_teacher.png").read_bytes() == (tmp_path / "b" / "samples_teacher.png").read_bytes()

    third, _ = _report(teacher, tmp_path, "c", teacher_cache=False)
    assert len(calls) == 2  # sampled again on request ...
    assert third[3]["fd"] == first[3]["fd"]  # ... to the same numbers (deterministic sampling)


def test_key_follows_weights_protocol_and_feature_net(tmp_path):
    teacher = load_teacher(str(write_tiny_teacher(tmp_path / "teacher")))
    net = tiny_net()
    key = tf.teacher_features_key(teacher, 4, 100, 0, 25, net, "cpu")
    assert key.startswith("teacher-4step-n100-s0-")
    assert key == tf.teacher_features_key(teacher, 4, 100, 0, 25, net, "cpu")
    others = {
        tf.teacher_features_key(teacher, 2, 100, 0, 25, net, "cpu"),
        tf.teacher_features_key(teacher, 4, 100, 1, 25, net, "cpu"),
        tf.teacher_features_key(teacher, 4, 100, 0, 50, net, "cpu"),
        tf.teacher_features_key(teacher, 4, 100, 0, 25, net, "cuda"),
    }
    torch.manual_seed(1)
    others.add(tf.teacher_features_key(teacher, 4, 100, 0, 25, DigitsFeatureNet(image_size=8, widths=(4, 8), num_features=8), "cpu"))
    with torch.no_grad():
        next(teacher.unet.parameters()).view(-1)[0] += 1e-6
    others.add(tf.teacher_features_key(teacher, 4, 100, 0, 25, net, "cpu"))
    assert key not in others and len(others) == 6


def test_entries_shipped_in_the_teacher_folder_are_found(tmp_path):
    folder = write_tiny_teacher(tmp_path / "teacher")
    teacher = load_teacher(str(folder))
    _report(teacher, tmp_path, "a", teacher_cache_out=folder / tf.SHIPPED_DIR)
    shipped = sorted(p.name for p in (folder / tf.SHIPPED_DIR).glob("*.pt"))
    assert len(shipped) == 2
    for p in (tmp_path / "cache").glob("teacher-*.pt"):
        p.unlink()  # a fresh machine: empty user cache
    _, logs = _report(load_teacher(str(folder)), tmp_path, "b")
    assert sum(tf.SHIPPED_DIR in m for m in logs) == 2


def test_bundled_teacher_entries_equal_a_fresh_computation(tmp_path):
    """The bundled digits teacher ships the README protocol's cells (2000 samples, seed 0, chunks of 250,
    digits features). Its 1-step entry is recomputed here; the 50-step one has the same provenance."""
    teacher = load_teacher("bundled:digits")
    net = get_feature_net("digits")
    shipped = tf.search_dirs(teacher, tmp_path)[-1]
    assert sorted(p.name.split("-")[1] for p in shipped.glob("teacher-*-n2000-s0-*.pt")) == ["1step", "2step", "4step", "50step"]
    key = tf.teacher_features_key(teacher, 1, 2000, 0, 250, net, "cpu")
    entry = tf.load_entry(key, [shipped])
    if entry is None:  # another torch / diffusers release: the key differs by design and the report samples
        import pytest

        pytest.skip(f"no shipped entry for this environment's key {key}")
    feats, grid, _ = entry
    sampler = evaluate.teacher_sampler(teacher)
    fresh = evaluate.generated_features(lambda n, g, labels: sampler.sample(n, 1, g, labels), net, 2000, 0, 250,
                                        sampler.num_classes, device="cpu")
    torch.testing.assert_close(fresh, feats, atol=1e-4, rtol=1e-4)
    assert grid.shape[0] == 16


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _count_sampling(monkeypatch):
    calls = []
    real = evaluate.sample_cell
    monkeypatch.setattr(evaluate, "sample_cell", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    return calls


def test_a_damaged_user_cache_entry_is_sampled_again_and_replaced(tmp_path, monkeypatch):
    """A cell entry cut short made torch.load raise an error naming no file and aborted the report. Now: a warning
    naming it, the cell sampled again (to the same numbers) and the entry replaced; the next report reads it back."""
    teacher = load_teacher(str(write_tiny_teacher(tmp_path / "teacher")))
    first, _ = _report(teacher, tmp_path, "a")
    (damaged,) = (tmp_path / "cache").glob("teacher-3step-*.pt")
    _truncate(damaged)
    calls = _count_sampling(monkeypatch)
    with pytest.warns(UserWarning, match=f"cache entry {damaged} cannot be used"):
        second, logs = _report(teacher, tmp_path, "b")
    assert calls == [3]  # only the damaged cell is sampled
    assert {s: (r["fd"], r["kid"]) for s, r in second.items()} == {s: (r["fd"], r["kid"]) for s, r in first.items()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _report(teacher, tmp_path, "c")
    assert calls == [3] and not [w for w in record if "cache entry" in str(w.message)]  # replaced: read back
    assert tf.load_entry(damaged.stem, [tmp_path / "cache"], 12) is not None


def test_a_damaged_entry_shipped_in_a_teacher_folder_is_sampled_without_writing_there(tmp_path, monkeypatch):
    """A shipped entry cut short (a read-only teacher folder, or a checkout's tracked file): the cell is sampled and
    written to the user cache only; the teacher folder is left as it was. An entry with features of another sample
    count is refused the same way."""
    folder = write_tiny_teacher(tmp_path / "teacher")
    first, _ = _report(load_teacher(str(folder)), tmp_path, "a", teacher_cache_out=folder / tf.SHIPPED_DIR)
    for p in (tmp_path / "cache").glob("teacher-*.pt"):
        p.unlink()  # a fresh machine: empty user cache
    shipped = folder / tf.SHIPPED_DIR
    (damaged,) = shipped.glob("teacher-3step-*.pt")
    _truncate(damaged)
    (short,) = shipped.glob("teacher-1step-*.pt")
    e = torch.load(short, weights_only=True)
    torch.save({"features": e["features"][:5], "grid": e["grid"]}, short)
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    mode = shipped.stat().st_mode
    shipped.chmod(0o555)
    try:
        calls = _count_sampling(monkeypatch)
        with pytest.warns(UserWarning) as record:
            second, logs = _report(load_teacher(str(folder)), tmp_path, "b")
    finally:
        shipped.chmod(mode)
    named = " ".join(str(w.message) for w in record)
    assert f"cache entry {damaged} cannot be used" in named and f"cache entry {short} cannot be used" in named
    assert "(5, any)" not in named and "expected (12, any)" in named
    assert sorted(calls) == [1, 3]
    assert {s: (r["fd"], r["kid"]) for s, r in second.items()} == {s: (r["fd"], r["kid"]) for s, r in first.items()}
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before  # nothing written in the teacher folder
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 2  # the user cache holds the cells now


def test_a_cell_whose_cache_cannot_be_written_is_used_uncached(tmp_path, monkeypatch):
    """A read-only cache: the computed cell is returned, with a warning naming the entry, instead of an error."""
    teacher = load_teacher(str(write_tiny_teacher(tmp_path / "teacher")))

    def read_only(obj, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tf, "atomic_torch_save", read_only)
    feats, grid = torch.ones(4, 8, dtype=torch.float64), torch.zeros(2, 1, 8, 8)
    with pytest.warns(UserWarning, match="cannot write the teacher cell's cache entry .*Permission denied"):
        got = tf.cached_cell(teacher, "d", 1, 4, 0, 2, lambda: (feats, grid), tmp_path / "cache")
    assert torch.equal(got[0], feats) and got[2] is None
