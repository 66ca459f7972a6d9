"""The redesign guard: what every debug preset computes, recorded so a refactor can prove it changed nothing.

For each debug preset (``configs/<name>/debug.yaml`` on the tiny test teachers) a run records the
``train/*`` loss terms logged in every training batch and fingerprints of the final student and of its
sampling-EMA copy: a SHA-256 of the exact bytes and a few float64 projections (sums and fixed random
directions) that tolerate the last-bit differences another CPU's kernels may give.

``python tests/_guard.py --write`` re-records ``tests/fixtures/guard.json`` (only when a change is
meant to alter what a method computes: say so in the commit); tests/test_guard.py compares against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "guard.json"
NUM_PROJECTIONS = 3


def fingerprint(state: dict[str, torch.Tensor]) -> dict:
    """SHA-256 of the tensors' bytes (sorted by name) and float64 projections of their concatenation."""
    digest = hashlib.sha256()
    flat = []
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        if t.is_floating_point():
            flat.append(t.double().flatten())
    v = torch.cat(flat) if flat else torch.zeros(1, dtype=torch.float64)
    proj = [float(v.sum()), float(v.abs().sum()), float(v.pow(2).sum())]
    for k in range(NUM_PROJECTIONS):
        w = torch.randn(v.numel(), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        proj.append(float(v @ w))
    return {"sha256": digest.hexdigest(), "projections": proj, "numel": int(v.numel())}


def run_preset(name: str, root: Path, fixtures: dict) -> dict:
    """Train debug preset ``name`` in-process; returns its per-batch logs and weight fingerprints."""
    import _ddp_worker
    from _method_configs import load_records, preset_args

    root = Path(root)
    out, logs = root / f"{name}_out", root / f"{name}_logs.json"
    env = {"LD_TEST_OUT": str(out), "LD_TEST_LOGS": str(logs)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _ddp_worker.main(["fit", *preset_args(name, root / name, fixtures)])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    (record,) = load_records(out)
    student = {k: v for k, v in record["trained"].items() if k.startswith("student.")}
    ema = (record["callbacks"].get("EMA") or {}).get("averaged")
    return {
        "batches": json.loads(logs.read_text()),
        "student": fingerprint(student),
        "ema": fingerprint(ema) if ema else None,
    }


def main(argv: list[str]) -> None:
    import tempfile

    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from _method_configs import all_debug_presets, write_fixtures

    names = [a for a in argv if not a.startswith("--")] or all_debug_presets()
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = write_fixtures(Path(tmp) / "fixtures")
        records = {name: run_preset(name, Path(tmp) / "runs", fixtures) for name in names}
    if "--write" in argv:
        old = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
        old.update(records)
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE} ({', '.join(names)})")
        return
    expected = json.loads(FIXTURE.read_text())
    for name, rec in records.items():
        exp = expected[name]
        same_logs = rec["batches"] == exp["batches"]
        print(
            f"{name}: logs {'identical' if same_logs else 'DIFFER'}; student sha256 "
            f"{'identical' if rec['student']['sha256'] == exp['student']['sha256'] else 'DIFFERS'}; ema sha256 "
            f"{'identical' if (rec['ema'] or {}).get('sha256') == (exp['ema'] or {}).get('sha256') else 'DIFFERS'}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
