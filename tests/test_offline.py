"""Security and offline use: safe weight loading only, no remote code, no network unless given a hub id.

* Static: every ``torch.load`` in the package passes ``weights_only=True`` (checkpoints and caches are
  plain tensors and containers, which ``weights_only`` loads; a pickle from a stranger could run code),
  nothing passes ``trust_remote_code=True``, nothing calls ``pickle.load``.
* Dynamic: the main paths (teacher debug fit, export, reload as teacher and as a diffusers pipeline,
  a distillation debug fit from that export, reload) run in a subprocess with ``HF_HUB_OFFLINE=1`` and
  sockets disabled; no connection may even be attempted, and a hub id fails fast with a clear error.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from _method_configs import REPO, present, subprocess_env

SOURCES = sorted([*(REPO / "lightning_distill").rglob("*.py"), *(REPO / "callbacks").rglob("*.py")])


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def unsafe_calls(path: Path) -> list[str]:
    """``file:line: what`` for each unsafe deserialisation / remote-code call in one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{node.lineno}"
        if func.endswith("torch.load"):
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if func in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load"):
            found.append(f"{where}: {func}")
        trc = _kw(node, "trust_remote_code")
        if trc is not None and not (isinstance(trc, ast.Constant) and trc.value is False):
            found.append(f"{where}: trust_remote_code={ast.unparse(trc)}")
    return found


def test_unsafe_call_scanner_finds_what_it_should(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import torch, pickle\ntorch.load('a')\ntorch.load('a', weights_only=False)\n"
                   "torch.load('a', weights_only=True)\npickle.load(f)\nM.from_pretrained('x', trust_remote_code=True)\n")
    found = unsafe_calls(bad)
    assert [f.split(": ", 1)[1] for f in found] == [
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "pickle.load",
        "trust_remote_code=True",
    ]


def test_weights_load_safely_and_no_remote_code():
    offenders = [f for path in SOURCES for f in unsafe_calls(path)]
    assert not offenders, "unsafe loading (use safetensors or torch.load(..., weights_only=True)):\n" + "\n".join(offenders)


@pytest.mark.slow
def test_main_paths_with_network_disabled(tmp_path):
    method = (present(["progressive", "consistency", "knowledge"]) or [""])[0]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_offline_main_paths.py"), str(tmp_path), method],
        cwd=REPO, env=subprocess_env(HF_HUB_OFFLINE=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "OK" in proc.stdout.splitlines()
    assert "BLOCKED: []" in proc.stdout, [line for line in proc.stdout.splitlines() if line.startswith("BLOCKED")]
    assert "hub id offline:" in proc.stdout


def test_a_cached_hub_teacher_loads_offline(tmp_path):
    """A hub id whose files are in the local Hugging Face cache loads with ``HF_HUB_OFFLINE=1`` (before, the
    repo listing asked the hub and failed), equal to the folder it came from; an id not in the cache is still
    a one-line TeacherError naming the cache. The cache is laid out as huggingface_hub writes it
    (``models--org--name/refs/main`` -> ``snapshots/<commit>/``), made here from the bundled teacher."""
    import shutil

    folder = REPO / "lightning_distill" / "assets" / "teacher_digits"
    repo = tmp_path / "hub" / "models--some-org--digits"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("eval_cache", "README.md"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = f"""
import torch
from lightning_distill.teacher import TeacherError, load_teacher
hub, local = load_teacher("some-org/digits"), load_teacher({str(folder)!r})
a, b = hub.unet.state_dict(), local.unet.state_dict()
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
assert dict(hub.scheduler_config) == dict(local.scheduler_config) and hub.source == "some-org/digits"
try:
    load_teacher("some-org/not-cached")
except TeacherError as err:
    print("missing:", err)
print("OK")
"""
    env = subprocess_env(HF_HUB_OFFLINE=1, HF_HUB_CACHE=str(tmp_path / "hub"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout.splitlines(), proc.stdout[-3000:]
    missing = next(line for line in proc.stdout.splitlines() if line.startswith("missing:"))
    assert "'some-org/not-cached' is not a local folder" in missing and "not in the local Hugging Face cache" in missing
