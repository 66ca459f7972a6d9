"""Multi-process training on CPU with gloo, through Lightning's own strategies (no home-made launcher).

* ``--trainer.strategy ddp --trainer.devices 2``: the real CLI in a subprocess; Lightning's launcher
  starts rank 1 by re-running the same command line. Teacher training, progressive, consistency and the
  adversarial methods, as their debug presets exist (``configs/<name>/debug.yaml``).
* A simulated 2-node job: two processes with ``--trainer.num_nodes 2 --trainer.devices 1``,
  ``NODE_RANK`` 0 / 1, ``MASTER_ADDR=127.0.0.1``, each node with its own (node-local) output folder.

After training every rank records its state (tests/_ddp_worker.py); the tests check that all ranks
hold identical trained networks, optimiser and callback states, that the frozen teacher is neither
trainable, nor in an optimiser, nor among the parameters DDP all-reduces, and that checkpoints and the
export were written once, by rank 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _method_configs import (
    REPO,
    WORKER,
    debug_config,
    free_port,
    has_teacher,
    load_records,
    max_abs_diff,
    preset_args,
    skip_reason,
    subprocess_env,
    write_fixtures,
)

# The set (teacher, progressive, consistency, one adversarial method) plus DMD2; APT shares
# ADD's AdversarialMethod machinery and is left out to keep the suite's wall time down.
DDP_PRESETS = ["teacher", "progressive", "consistency", "add", "dmd2"]
# Manual-optimisation methods update one network per optimiser step, so the others' parameters take no
# part in that backward: DDP must be told (docs/scaling.md).
STRATEGY = {"add": "ddp_find_unused_parameters_true", "dmd2": "ddp_find_unused_parameters_true"}
TIMEOUT = 300


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("ddp_fixtures"))


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}"


def check_ranks_agree(records: list[dict], name: str, teacher: bool) -> None:
    assert sorted(r["rank"] for r in records) == [0, 1], f"{name}: records of ranks {[r['rank'] for r in records]}"
    r0, r1 = sorted(records, key=lambda r: r["rank"])
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] > 0
    for part in ("trained", "optimizers", "callbacks"):
        diff, where = max_abs_diff(r0[part], r1[part], part)
        assert diff == 0.0, f"{name}: ranks disagree after training: {where} differs by {diff}"
    for r in (r0, r1):
        assert r["ddp"], f"{name}: the model was not wrapped in DistributedDataParallel"
        assert r["ddp_reduced"] > 0
        if teacher:
            assert r["teacher_params"] > 0
            assert r["teacher_requires_grad"] == 0, f"{name}: teacher parameters require grad"
            assert r["teacher_in_optimizer"] == 0, f"{name}: teacher parameters are in an optimiser"
            assert r["teacher_reduced_by_ddp"] == 0, f"{name}: DDP all-reduces teacher parameters"


def checkpoints(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.ckpt")) if root.exists() else []


def exports(root: Path) -> list[str]:
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("model_index.json")) if root.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("name", DDP_PRESETS)
def test_ddp_two_processes(name, fixtures, tmp_path):
    if not debug_config(name).is_file():
        pytest.skip(skip_reason(name))
    root, out = tmp_path / "run", tmp_path / "records"
    args = preset_args(name, root, fixtures)
    cmd = [sys.executable, str(WORKER), "fit", *args,
           "--trainer.strategy", STRATEGY.get(name, "ddp"), "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    env = subprocess_env(LD_TEST_OUT=out, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)
    _check(proc, f"{name} with ddp x2")
    check_ranks_agree(load_records(out), name, has_teacher(args, name))
    assert "last.ckpt" in {Path(c).name for c in checkpoints(root)}
    assert len(exports(root)) == 1, f"{name}: exports {exports(root)}"


@pytest.mark.slow
def test_simulated_two_node_job(fixtures, tmp_path):
    """Two 'nodes' of one process each; node-local output folders show who wrote what."""
    port, out = free_port(), tmp_path / "records"
    procs = []
    for node in (0, 1):
        root = tmp_path / f"node{node}"
        cmd = [sys.executable, str(WORKER), "fit", *preset_args("teacher", root, fixtures),
               "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1",
               "--trainer.accelerator", "cpu"]
        env = subprocess_env(LD_TEST_OUT=out, NODE_RANK=node, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=2)
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            proc.wait(TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    for node, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"node{node}.log").read_text()[-4000:]
    check_ranks_agree(load_records(out), "teacher (2 nodes)", teacher=False)
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    ckpts = checkpoints(node0)
    assert sum(Path(c).name == "last.ckpt" for c in ckpts) == 1
    assert len([c for c in ckpts if Path(c).name != "last.ckpt"]) == 1, ckpts  # top-1 of the preset
    assert exports(node0) == ["teacher"]
    # rank 1 wrote no checkpoint and no export into its node-local folder
    assert checkpoints(node1) == [] and exports(node1) == []


def test_fid_callback_under_ddp_gathers_and_logs_once(tmp_path):
    """FIDCallback under 2-process DDP: samples are split across ranks and gathered, rank 0 alone logs."""
    root = tmp_path / "run"
    import shutil

    exe = shutil.which("lightning-distill") or pytest.skip("lightning-distill console script not on PATH")
    cmd = [exe, "fit", "--config", str(REPO / "configs/evaluation/fid_debug.yaml"),
           "--trainer.default_root_dir", str(root), "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu"]
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)
    _check(proc, "fid_debug with ddp x2")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FIDCallback step")]
    steps = [ln.split(":")[0] for ln in lines]
    assert steps and len(steps) == len(set(steps)), f"each evaluation must be reported once (rank 0): {lines}"
    assert all("/n8=" in ln for ln in lines), lines  # the full sample count, gathered from both ranks
    events = list(root.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
