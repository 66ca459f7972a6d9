"""The debug presets (``configs/<name>/debug.yaml``) and the arguments that make each one tiny and offline.

Used by the scale-out tests (distributed, precision, fault tolerance, offline) so they extend to every
method as soon as its debug preset lands. Overrides come from the config's own ``# test-overrides:``
line (the convention of tests/test_cli.py); a preset without one that names the bundled digits
teacher gets the 8x8 tiny teacher; LCM gets the tiny Stable-Diffusion stand-in of tests/test_lcm.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_ddp_worker.py"


def debug_config(name: str, flow: bool = False) -> Path:
    """configs/<name>/debug.yaml, or debug_flow.yaml (the same method on a flow-matching teacher)."""
    return REPO / "configs" / name / ("debug_flow.yaml" if flow else "debug.yaml")


def flow_debug_presets() -> list[str]:
    return sorted(p.parent.name for p in (REPO / "configs").glob("*/debug_flow.yaml"))


def present(names) -> list[str]:
    """The names among ``names`` whose debug preset exists (a new method extends the tests by landing)."""
    return [n for n in names if debug_config(n).is_file()]


def all_debug_presets() -> list[str]:
    return sorted(p.parent.name for p in (REPO / "configs").glob("*/debug.yaml"))


def skip_reason(name: str) -> str:
    return f"configs/{name}/debug.yaml is absent (method not landed yet)"


def write_fixtures(root: Path) -> dict[str, Path]:
    """Tiny teachers (pixel v- and eps-prediction, latent SD-like) and a captioned image folder."""
    from conftest import write_tiny_flow_teacher, write_tiny_teacher

    root = Path(root)
    out = {
        "tiny_teacher": write_tiny_teacher(root / "v"),
        "tiny_flow_teacher": write_tiny_flow_teacher(root / "flow"),
        "tiny_eps_teacher": write_tiny_teacher(root / "eps", prediction_type="epsilon"),
        "tmp": root,
    }
    return out


def _lcm_fixtures(fixtures: dict) -> tuple[Path, Path]:
    root = Path(fixtures["tmp"])
    sd, images = root / "tiny-sd", root / "captioned"
    if not sd.is_dir():
        from test_lcm import write_tiny_sd

        write_tiny_sd(sd)
    if not images.is_dir():
        from conftest import write_captions, write_image_folder

        write_captions(write_image_folder(images))
    return sd, images


def preset_args(name: str, root_dir: Path, fixtures: dict, flow: bool = False) -> list[str]:
    """``--config`` plus the overrides that keep preset ``name`` tiny, offline and writing under ``root_dir``
    (``flow``: its debug_flow.yaml, on the tiny flow-matching teacher)."""
    from test_cli import test_overrides

    path = debug_config(name, flow)
    args = ["--config", str(path), "--trainer.default_root_dir", str(root_dir)]
    overrides = test_overrides(path, Path(fixtures["tmp"]), {k: v for k, v in fixtures.items() if k != "tmp"})
    cfg = yaml.safe_load(path.read_text()) or {}
    teacher = (cfg.get("data") or {}).get("teacher")
    if name == "lcm" and not overrides:
        sd, images = _lcm_fixtures(fixtures)
        overrides = ["--data.teacher", str(sd), "--data.data", str(images)]
    elif not overrides and isinstance(teacher, str) and teacher.startswith("bundled:"):
        key = "tiny_flow_teacher" if flow else "tiny_teacher"
        overrides = ["--data.teacher", str(fixtures[key]), "--data.image_size", "8"]
    # Quiet and cheap: no model summary, no progress bar.
    return args + overrides + ["--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false"]


def has_teacher(args: list[str], name: str) -> bool:
    if "--data.teacher" in args:
        return args[args.index("--data.teacher") + 1] not in ("null", "None")
    cfg = yaml.safe_load(debug_config(name).read_text()) or {}
    return (cfg.get("data") or {}).get("teacher") is not None


def subprocess_env(**extra) -> dict:
    """Environment of a worker subprocess: offline, one thread per process, tests/ importable."""
    import os

    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]),
        PYTHONWARNINGS="ignore",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_records(out: Path) -> list[dict]:
    import torch

    files = sorted(Path(out).glob("rank*.pt"))
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


def max_abs_diff(a, b, path: str = "") -> tuple[float, str]:
    """Largest absolute difference between two nested structures of tensors / numbers, and where."""
    import torch

    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf"), f"{path} (shape/dtype {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype})"
        if not a.is_floating_point():
            return (0.0 if torch.equal(a, b) else float("inf")), path
        if a.numel() == 0:
            return 0.0, path
        d = (a.double() - b.double()).abs()
        d = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(d), d)
        return float(d.max()), path
    if isinstance(a, dict):
        if set(a) != set(b):
            return float("inf"), f"{path} (keys differ: {sorted(set(a) ^ set(b))[:5]})"
        pairs = [(a[k], b[k], f"{path}.{k}") for k in a]
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return float("inf"), f"{path} (length {len(a)} vs {len(b)})"
        pairs = [(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    else:
        if isinstance(a, float) and isinstance(b, float):
            return abs(a - b), path
        return (0.0 if a == b else float("inf")), path
    worst = (0.0, path)
    for x, y, p in pairs:
        d = max_abs_diff(x, y, p)
        if d[0] > worst[0]:
            worst = d
    return worst
