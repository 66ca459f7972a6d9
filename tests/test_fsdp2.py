"""FSDP2 (``fully_shard`` through Lightning's ``ModelParallelStrategy``) on 2 CPU processes with gloo (#23 item 5).

``configs/strategies/fsdp2.yaml`` added to consistency distillation's debug preset (EMA, sample grids every 2
steps, PipelineExport, checkpoints), on the tiny teacher, 3 steps, 2 processes:

* the networks really are sharded: student, theta_minus and the EMA copy hold ``DTensor`` shards (each rank
  about half of each parameter's rows), the teacher stays whole;
* it computes what DDP computes: both strategies give every rank the same data shard and the same noise
  (ResumeRNG), and both average the gradients, so the full weights gathered into the checkpoint (student,
  theta_minus), the EMA state and the optimiser state equal a 2-process DDP run's within float32 rounding,
  and the exported pipelines agree;
* the sample grid at step 2 is drawn (every rank runs the sharded forward; rank 0 logs it);
* the export holds the complete EMA weights (equal to the checkpoint's EMA state);
* resuming the FSDP2 run from its step-2 checkpoint (full file: teacher keys left out) ends where the
  uninterrupted run ends: checkpoint and export identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from _method_configs import REPO, WORKER, free_port, max_abs_diff, preset_args, subprocess_env, write_fixtures

FSDP2 = REPO / "configs" / "strategies" / "fsdp2.yaml"
TIMEOUT = 300


class ShardReport(L.Callback):
    """Each rank writes ``<out>/rank<r>.json``: which parameters are DTensors and how much of them it holds."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        ema = next(cb for cb in trainer.callbacks if type(cb).__name__ == "EMA").averaged.module

        def summary(module) -> dict:
            params = list(module.parameters())
            sharded = [p for p in params if isinstance(p, DTensor)]
            return {"params": len(params), "sharded": len(sharded),
                    "local": sum(p.to_local().numel() for p in sharded), "full": sum(p.numel() for p in sharded)}

        report = {name: summary(m) for name, m in
                  [("student", pl_module.student), ("theta_minus", pl_module.theta_minus), ("ema", ema),
                   ("teacher", pl_module.teacher)]}
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _run(args: list[str], root: Path, extra: list[str], **env) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), "fit", *args, *extra, "--trainer.default_root_dir", str(root),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    log = open(root.parent / f"{root.name}.log", "w")
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), **env)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, root: Path) -> None:
    try:
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (root.parent / f"{root.name}.log").read_text()[-4000:]


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _optimizer_state(ckpt: dict) -> list:
    """Per-parameter AdamW states in parameter order (the two strategies number the parameters differently:
    FSDP2's full optimiser state by position among all the module's parameters, teacher's first)."""
    state = ckpt["optimizer_states"][0]
    return [state["state"][k] for k in sorted(state["state"])]


def _export(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "student" / "unet" / "diffusion_pytorch_model.safetensors")


def test_blocks_match_the_fsdp_wrap_policy_and_unsharded_trainables_are_refused():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_distill import sharding
    from lightning_distill.errors import ConfigError

    cfg = yaml.safe_load((REPO / "configs" / "strategies" / "fsdp.yaml").read_text())
    assert list(sharding.BLOCKS) == cfg["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]
    sharding.block_classes()  # every path imports

    class Method(torch.nn.Module):  # what configure_model reads: the strategy's mesh and the children
        def __init__(self, mesh) -> None:
            super().__init__()
            self.device_mesh = mesh
            self.teacher = torch.nn.Linear(2, 2)  # left whole, even if it had trainable weights
            self.discriminator = torch.nn.Linear(2, 2)

    assert sharding.configure_model(Method(None)) is None  # no mesh (any other strategy): nothing happens
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        with pytest.raises(ConfigError, match=r"Method\.discriminator \(Linear\) trains but is not a Denoiser"):
            sharding.configure_model(Method(mesh))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_equal_ddp_and_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fixtures = write_fixtures(tmp_path / "fixtures")
    args = preset_args("consistency", tmp_path, fixtures)
    fsdp2 = ["--config", str(FSDP2), "--trainer.strategy.init_args.data_parallel_size", "2"]
    report = {"class_path": "test_fsdp2.ShardReport", "init_args": {"out": str(tmp_path / "shards")}}
    sharded_root, ddp_root, resumed_root = tmp_path / "fsdp2", tmp_path / "ddp", tmp_path / "resumed"
    # the two reference runs side by side (each 2 processes), then the resume from the FSDP2 run's step 2
    runs = [
        (_run(args, sharded_root, [*fsdp2, f"--trainer.callbacks+={json.dumps(report)}"],
              LD_TEST_CKPT_EVERY=1, LD_TEST_CKPT_DIR=sharded_root / "steps"), sharded_root),
        (_run(args, ddp_root, ["--trainer.strategy", "ddp"]), ddp_root),
    ]
    for proc, root in runs:
        _wait(proc, root)
    resumed = _run(args, resumed_root, [*fsdp2, "--ckpt_path", str(sharded_root / "steps" / "step=2.ckpt")])

    # sharded: student, theta_minus and the EMA copy hold half of each parameter per rank; the teacher is whole
    for rank in (0, 1):
        shards = json.loads((tmp_path / "shards" / f"rank{rank}.json").read_text())
        for name in ("student", "theta_minus", "ema"):
            s = shards[name]
            assert s["sharded"] == s["params"] > 0 and s["local"] < 0.6 * s["full"], (rank, name, s)
        assert shards["teacher"]["sharded"] == 0 and shards["teacher"]["params"] > 0

    # equal to DDP: full weights in the checkpoint, EMA, optimiser, export (float32 reduction order aside)
    ours, ddp = _ckpt(sharded_root / "checkpoints" / "last.ckpt"), _ckpt(ddp_root / "checkpoints" / "last.ckpt")
    assert ours["global_step"] == ddp["global_step"] == 3
    assert not any(k.startswith("teacher.") for k in ours["state_dict"]) and "teacher_source" in ours
    for what, a, b in [("weights", ours["state_dict"], ddp["state_dict"]),
                       ("EMA", ours["callbacks"]["EMA"], ddp["callbacks"]["EMA"]),
                       ("optimiser", _optimizer_state(ours), _optimizer_state(ddp)),
                       ("export", _export(sharded_root), _export(ddp_root))]:
        diff, where = max_abs_diff(a, b, what)
        assert diff < 1e-5, f"FSDP2 and DDP differ: {where} by {diff}"
    moved, _ = max_abs_diff(_ckpt(sharded_root / "steps" / "step=1.ckpt")["state_dict"], ours["state_dict"])
    assert moved > 1e-4  # the comparison above is not between untrained networks

    # the export holds the complete EMA weights
    ema = {k.removeprefix("module.unet."): v for k, v in ours["callbacks"]["EMA"]["averaged"].items()
           if k.startswith("module.unet.")}
    assert max_abs_diff(_export(sharded_root), ema) == (0.0, "")

    # the step-2 grid was drawn (with rank 1 taking part in every sharded forward) and logged once
    (events,) = sharded_root.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples/2step")] == [2]

    # resumed from step 2: ends where the uninterrupted run ends
    _wait(resumed, resumed_root)
    again = _ckpt(resumed_root / "checkpoints" / "last.ckpt")
    for what, a, b in [("weights", again["state_dict"], ours["state_dict"]),
                       ("EMA", again["callbacks"]["EMA"], ours["callbacks"]["EMA"]),
                       ("optimiser", _optimizer_state(again), _optimizer_state(ours)),
                       ("export", _export(resumed_root), _export(sharded_root))]:
        diff, where = max_abs_diff(a, b, what)
        assert diff == 0.0, f"the resumed FSDP2 run differs from the uninterrupted one: {where} by {diff}"
