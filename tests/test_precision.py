"""``precision=bf16-mixed`` on CPU for every debug preset, with the teacher held in bf16.

Lightning's bf16-mixed keeps float32 master weights and runs the forward passes under
``torch.autocast(dtype=bfloat16)``; no GradScaler is needed (bf16 has float32's exponent range).
``data.teacher_dtype=bfloat16`` additionally stores the frozen teacher in bf16 (half its memory).
fp16 (``16-mixed``, GPU only, with a GradScaler) is documented in docs/scaling.md.
"""

from __future__ import annotations

import pytest
import torch

import _ddp_worker
from _method_configs import all_debug_presets, has_teacher, load_records, preset_args, write_fixtures

PRESETS = all_debug_presets()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("bf16_fixtures"))


@pytest.mark.parametrize("name", PRESETS)
def test_bf16_mixed_trains_and_exports(name, fixtures, tmp_path, monkeypatch):
    root = tmp_path / "run"
    args = preset_args(name, root, fixtures)
    teacher = has_teacher(args, name)
    args += ["--trainer.precision", "bf16-mixed"]
    if teacher:
        args += ["--data.teacher_dtype", "bfloat16"]
    monkeypatch.setenv("LD_TEST_OUT", str(tmp_path / "out"))
    _ddp_worker.main(["fit", *args])
    (rec,) = load_records(tmp_path / "out")
    assert rec["precision"].startswith("bf16"), rec["precision"]
    assert rec["global_step"] > 0
    if teacher:
        assert rec["teacher_dtype"] == "torch.bfloat16"
        assert rec["teacher_requires_grad"] == 0 and rec["teacher_in_optimizer"] == 0
    # Master weights stay float32 and finite; optimiser moments too.
    params = {k: v for k, v in rec["trained"].items() if v.is_floating_point()}
    assert params
    not_fp32 = [k for k, v in params.items() if v.dtype != torch.float32]
    assert not not_fp32, f"{name}: trained tensors not float32 under bf16-mixed: {not_fp32[:5]}"
    bad = [k for k, v in params.items() if not bool(torch.isfinite(v).all())]
    assert not bad, f"{name}: non-finite trained tensors: {bad[:5]}"
    for opt in rec["optimizers"]:
        for state in opt["state"].values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1:
                    assert v.dtype == torch.float32 and bool(torch.isfinite(v).all())
    exported = sorted(p.parent for p in root.rglob("model_index.json"))
    assert exported, f"{name}: no pipeline exported"
    from safetensors.torch import load_file

    # the student network is exported in float32 whatever the training precision
    weights = sorted((exported[0] / "unet").glob("*.safetensors"))
    assert weights and all(t.dtype == torch.float32 for f in weights for t in load_file(f).values())
