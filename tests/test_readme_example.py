"""The README's "Writing a new method" example, run exactly as written (so the extension point cannot rot).

The python block becomes a module in a temporary folder and the yaml block a config whose
``class_path`` is pointed at that module; the run swaps in a tiny teacher, 8x8 images and 2 steps.
"""

from __future__ import annotations

import importlib
import re
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from lightning_distill.cli import cli_main
from lightning_distill.data import TeacherDataModule

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Writing a new method"


def readme_blocks() -> dict[str, str]:
    text = README.read_text()
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]  # up to the next level-2 heading
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    langs = [lang for lang, _ in blocks]
    assert langs.count("python") == 1 and langs.count("yaml") == 1, f"expected one python and one yaml block: {langs}"
    return {lang: body for lang, body in blocks}


@pytest.fixture
def readme_module(tmp_path, monkeypatch):
    blocks = readme_blocks()
    name = f"readme_method_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(blocks["python"])
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    yield name, module, blocks["yaml"]
    sys.modules.pop(name, None)


def _method_class(module):
    from lightning_distill.methods.base import DistillationMethod

    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, DistillationMethod) and v is not DistillationMethod]
    assert len(classes) == 1, classes
    return classes[0]


def test_readme_loss_is_zero_for_a_copy_of_the_teacher(readme_module, tiny_teacher_dir):
    """The student starts as a copy of the teacher, so x0 regression onto the teacher starts at exactly 0."""
    _, module, _ = readme_module
    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), data="digits", image_size=8, batch_size=4)
    method = _method_class(module)(teacher=dm.teacher)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    out = method.compute_loss(batch)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():  # perturb the student: the loss becomes positive
        for p in method.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    assert method.compute_loss(batch).loss.item() > 1e-6


def test_readme_example_trains_via_cli(readme_module, tiny_teacher_dir, tmp_path):
    name, module, config_text = readme_module
    cfg = yaml.safe_load(config_text)
    cls = _method_class(module)
    module_of_path, _, cls_name = cfg["model"]["class_path"].rpartition(".")
    assert cls_name == cls.__name__, "the README's YAML names a different class than its python block"
    cfg["model"]["class_path"] = f"{name}.{cls_name}"
    config = tmp_path / "readme.yaml"
    config.write_text(yaml.safe_dump(cfg))

    root = tmp_path / "run"
    cli = cli_main([
        "fit", "--config", str(config),
        "--data.teacher", str(tiny_teacher_dir), "--data.image_size", "8", "--data.batch_size", "4",
        "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
    ])
    assert isinstance(cli.model, cls)
    assert cli.model.teacher is cli.datamodule.teacher
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # the README config's callbacks did their jobs: checkpoint and exported pipeline
    assert (root / "checkpoints" / "last.ckpt").is_file()
    exported = [p for p in root.iterdir() if (p / "model_index.json").is_file()]
    assert len(exported) == 1
