"""FSDP (issue #23 item 5): what runs on CPU, and the checkpoint path a sharded run takes.

FSDP does not run on CPU with the installed torch / Lightning, and the first test pins the two errors:

* Lightning's ``FSDPStrategy`` refuses any accelerator but CUDA when the Trainer is built
  (``accelerator_connector._check_strategy_and_fallback``);
* torch's ``FullyShardedDataParallel`` itself (FSDP1, what ``FSDPStrategy`` wraps the LightningModule in)
  refuses to wrap a CPU module when no accelerator exists, and Lightning passes it ``device_id=None`` on CPU.

(FSDP2 ``fully_shard`` through Lightning's ``ModelParallelStrategy`` does run on CPU / gloo: the methods'
``configure_model`` shards their networks there (lightning_distill/sharding.py; tests/test_fsdp2.py.)

The same test builds the strategy of ``configs/strategies/fsdp.yaml`` through jsonargparse, as the CLI
does, and checks which blocks its wrap policy shards in a UNet, SD3, Flux and DiT network.

The second test covers what a sharded run does differently in the framework's own code: the checkpoint
load order. ``FSDPStrategy`` (``state_dict_type: full``) and ``ModelParallelStrategy`` load the module
state inside ``Strategy.load_checkpoint``, strictly and *before* ``LightningModule.on_load_checkpoint``,
popping ``state_dict`` from the checkpoint, and their ``load_model_state_dict`` does nothing. This
project's checkpoints leave out the reloadable teacher and a LoRA student's frozen base, so that order
broke resuming (missing keys) until ``DistillationMethod`` restored them in a ``load_state_dict``
pre-hook. :class:`FSDPLoadOrder` is a one-process CPU strategy with exactly that order; the
fault-tolerance harness (SIGKILL mid-step, resume from ``last.ckpt``, compare every trained tensor,
optimiser and callback state with an uninterrupted run) runs consistency distillation with a LoRA
student under it, and the resumed run's export must equal the uninterrupted run's file for file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import SingleDeviceStrategy

from _method_configs import REPO, write_fixtures

SNIPPET = REPO / "configs" / "strategies" / "fsdp.yaml"
LIGHTNING_ERROR = (
    "The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`. Please set "
    "`accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` instance to use FSDP."
)
TORCH_ERROR = "FSDP needs a non-CPU accelerator device, but no accelerator device is detected."


class FSDPLoadOrder(SingleDeviceStrategy):
    """One CPU process, checkpoints restored in FSDPStrategy's order (``state_dict_type: full``): the
    module state is loaded strictly inside ``load_checkpoint`` and popped from the checkpoint before the
    LightningModule's ``on_load_checkpoint`` sees it; ``load_model_state_dict`` does nothing."""

    def __init__(self) -> None:
        super().__init__(device="cpu")

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        module = self.lightning_module
        module.load_state_dict(checkpoint.pop("state_dict"), strict=module.strict_loading)
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass


def _snippet_strategy():
    """The strategy of configs/strategies/fsdp.yaml, parsed and instantiated by jsonargparse as the CLI does."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    cfg = parser.parse_object({"strategy": yaml.safe_load(SNIPPET.read_text())["trainer"]["strategy"]})
    return parser.instantiate_classes(cfg).strategy


def _wrapped(policy, network: torch.nn.Module) -> list[str]:
    """Names of the submodules a ModuleWrapPolicy makes FSDP units of (its public call, ``recurse=False``)."""
    return [name for name, m in network.named_modules() if name and policy(m, recurse=False, nonwrapped_numel=0)]


def test_fsdp_refuses_cpu_and_the_strategy_snippet_builds(tmp_path):
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    from conftest import make_tiny_unet
    from test_backbones import tiny_dit, tiny_flux, tiny_sd3

    strategy = _snippet_strategy()
    assert type(strategy) is FSDPStrategy and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.kwargs["use_orig_params"] is True and strategy.kwargs["forward_prefetch"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert _wrapped(policy, make_tiny_unet()) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"]
    assert _wrapped(policy, tiny_sd3()) == [f"transformer_blocks.{i}" for i in range(len(tiny_sd3().transformer_blocks))]
    assert _wrapped(policy, tiny_flux()) == ["transformer_blocks.0", "single_transformer_blocks.0"]
    dit = tiny_dit()
    assert _wrapped(policy, dit) == [f"transformer_blocks.{i}" for i in range(len(dit.transformer_blocks))]

    for flag in ("fsdp", strategy):
        with pytest.raises(ValueError) as err:
            L.Trainer(strategy=flag, accelerator="cpu", devices=2, logger=False, default_root_dir=tmp_path)
        assert str(err.value) == LIGHTNING_ERROR

    # torch's own refusal (what Lightning would hit next: it passes device_id=None on CPU), in a 1-rank group
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError) as err:
            FullyShardedDataParallel(torch.nn.Linear(2, 2), device_id=None)
        assert str(err.value) == TORCH_ERROR
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_resume_in_fsdp_load_order_equals_uninterrupted(tmp_path, monkeypatch):
    """Consistency distillation with a LoRA student (teacher and frozen base both left out of checkpoints)
    under :class:`FSDPLoadOrder`: SIGKILL mid-step, resume, every state equals an uninterrupted run's; the
    export after the resume is the uninterrupted run's, file for file."""
    import json

    from safetensors.torch import load_file

    from test_fault_tolerance import kill_and_resume
    from test_lora_methods import LORA

    fixtures = write_fixtures(tmp_path / "fixtures")
    strategy = ["--trainer.strategy", json.dumps({"class_path": f"{__name__}.FSDPLoadOrder"})]
    kill_and_resume("consistency", fixtures, tmp_path, monkeypatch, (*strategy, *LORA))

    ref, res = tmp_path / "ref" / "student", tmp_path / "crash" / "student"
    files = sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file())
    assert "unet/diffusion_pytorch_model.safetensors" in files and "pytorch_lora_weights.safetensors" in files
    assert files == sorted(p.relative_to(res).as_posix() for p in res.rglob("*") if p.is_file())
    for name in files:
        a, b = ref / name, res / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{name}: the resumed export differs"
        else:
            assert a.read_text() == b.read_text(), name
