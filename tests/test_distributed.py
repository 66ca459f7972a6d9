"""Multi-process training on CPU with gloo, through Lightning's own strategies (no home-made launcher).

* ``--trainer.strategy ddp --trainer.devices 2``: the real CLI in a subprocess; Lightning's launcher
  starts rank 1 by re-running the same command line. Teacher training, progressive, consistency and the
  adversarial methods, as their debug presets exist (``configs/<name>/debug.yaml``).
* A simulated 2-node job: two processes with ``--trainer.num_nodes 2 --trainer.devices 1``,
  ``NODE_RANK`` 0 / 1, ``MASTER_ADDR=127.0.0.1``, each node with its own (node-local) output folder.

After training every rank records its state (tests/_ddp_worker.py); the tests check that all ranks
hold identical trained networks, optimiser and callback states, that the frozen teacher is neither
trainable, nor in an optimiser, nor among the parameters DDP all-reduces, that checkpoints and the
export were written once, by rank 0, and that ranks given the same batch draw different noise. The
FIDCallback's 2-process FD / KID equal a 1-process run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _ddp_worker import RecordLogs
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
# Logged terms that are functions of the batch alone, so equal on ranks given the same batch: ADD's R1
# penalty, taken at the clean real images (its discriminator sees no noise unless ADD's LADD option is on).
DATA_ONLY_TERMS = {"add": {"train/r1"}}


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


class RankLogs(RecordLogs):
    """Every rank writes ``<out>/rank<r>.json``: the ``train/*`` values it logged in each batch (its own,
    before any reduction across ranks) and a fingerprint of each batch it was given."""

    def __init__(self, out: str) -> None:
        super().__init__(out)
        self.data: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.data.append({k: float(v.double().sum()) for k, v in batch.items() if hasattr(v, "double")})

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        with open(Path(self.out) / f"rank{trainer.global_rank}.json", "w") as f:
            json.dump({"batches": self.batches, "data": self.data}, f)


@pytest.mark.slow
@pytest.mark.parametrize("name", DDP_PRESETS)
def test_ddp_two_processes(name, fixtures, tmp_path):
    """Ranks agree after training, and they drew different noise.

    Both ranks get the same batches (no distributed sampler: the data order is a function of the seed;
    sharding is run by the FID and two-node tests below), so their first-batch loss terms differ only if
    their noise, timesteps or fake batches do. The presets cover each way methods draw: the global RNG
    that ResumeRNG reseeds per rank (teacher training, CD), progressive distillation's (seed, draw, rank)
    generator, and the (seed, step, rank) iteration generator that ADD and DMD2 each call with their rank.
    """
    if not debug_config(name).is_file():
        pytest.skip(skip_reason(name))
    root, out, logs = tmp_path / "run", tmp_path / "records", tmp_path / "logs"
    args = preset_args(name, root, fixtures)
    recorder = {"class_path": "test_distributed.RankLogs", "init_args": {"out": str(logs)}}
    cmd = [sys.executable, str(WORKER), "fit", *args,
           "--trainer.strategy", STRATEGY.get(name, "ddp"), "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.use_distributed_sampler", "false", f"--trainer.callbacks+={json.dumps(recorder)}"]
    env = subprocess_env(LD_TEST_OUT=out, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)
    _check(proc, f"{name} with ddp x2")
    check_ranks_agree(load_records(out), name, has_teacher(args, name))
    assert "last.ckpt" in {Path(c).name for c in checkpoints(root)}
    assert len(exports(root)) == 1, f"{name}: exports {exports(root)}"

    r0, r1 = (json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["data"][0] == r1["data"][0], f"{name}: the ranks were meant to get the same first batch"
    first0, first1 = r0["batches"][0], r1["batches"][0]
    assert first0 and set(first0) == set(first1), f"{name}: first-batch train/* terms {first0} / {first1}"
    same = {k for k in first0 if first0[k] == first1[k]}
    assert not same - DATA_ONLY_TERMS.get(name, set()), \
        f"{name}: given the same batch both ranks logged the same {sorted(same)}: they drew the same noise"


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



def _fid_config(tmp_path: Path) -> Path:
    """configs/evaluation/fid_debug.yaml with 6 chunks of 4 images (3 per rank), KID subsets of 6 of the 24
    images (so KID depends on which rows it draws), and lr 0: the weights stay at their (seeded)
    initialisation, so a 2-process and a 1-process run evaluate the same network."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs/evaluation/fid_debug.yaml").read_text())
    (fid,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("FIDCallback")]
    fid["init_args"].update(num_samples=24, chunk_size=4, kid_subsets=4, kid_subset_size=6)
    cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.0
    path = tmp_path / "fid_ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _logged_scalars(root: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(root.rglob("events.out.tfevents.*"))
    assert len(events) == 1, f"one TensorBoard file (rank 0 alone logs): {events}"
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_fid_callback_under_ddp_matches_single_process(tmp_path):
    """FIDCallback under 2-process DDP: each rank samples its chunks, rank 0 alone logs, and the logged FD
    and KID equal a 1-process run's and an independent numpy computation (tests/test_fid_callback.py)."""
    import shutil

    from lightning_distill.callbacks.ema import EMA
    from lightning_distill.callbacks.fid import FIDCallback
    from lightning_distill.cli import cli_main
    from test_fid_callback import independent_scores

    config, root = _fid_config(tmp_path), tmp_path / "ddp"
    exe = shutil.which("lightning-distill") or pytest.skip("lightning-distill console script not on PATH")
    cmd = [exe, "fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--trainer.strategy", "ddp",
           "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)
    _check(proc, "fid_debug with ddp x2")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FIDCallback step")]
    assert [ln.split(":")[0] for ln in lines] == ["FIDCallback step 1", "FIDCallback step 2"], \
        f"each evaluation must be reported once (rank 0): {lines}"
    ddp = _logged_scalars(root)

    single = cli_main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "single")])
    fid = next(cb for cb in single.trainer.callbacks if isinstance(cb, FIDCallback))
    ema = next(cb for cb in single.trainer.callbacks if isinstance(cb, EMA))
    tags = {f"{m}/digits-feat/{s}step/n24" for m in ("fid", "kid") for s in (1, 2)}
    assert set(fid.last_metrics) == tags and tags <= set(ddp)
    for tag in sorted(tags):
        # TensorBoard stores float32
        assert ddp[tag][2] == pytest.approx(fid.last_metrics[tag], rel=1e-6), f"{tag}: 2 processes vs 1"
    for s in (1, 2):
        want = independent_scores(single.model, ema.sampling_module(single.model), fid.feature_net,
                                  single.datamodule.train_images(), fid, s)
        for m in ("fid", "kid"):
            tag = f"{m}/digits-feat/{s}step/n24"
            assert fid.last_metrics[tag] == pytest.approx(want[m], rel=1e-6, abs=1e-9), f"{tag}: vs numpy"
