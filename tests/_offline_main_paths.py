"""Run the main paths with the network disabled (socket connects and name lookups raise).

Teacher debug fit -> export -> reload the export as a teacher and as a diffusers pipeline -> distil it
with a method's debug preset -> reload that export. Prints ``BLOCKED: [...]``, the connections that
were attempted before the hub-id check (the test wants none), and ``OK`` at the end. Usage:
``python tests/_offline_main_paths.py <workdir> <method preset name or ''>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import _ddp_worker

work, method = Path(sys.argv[1]), sys.argv[2]
_ddp_worker.disable_network()
torch.set_num_threads(1)

from lightning_distill.cli import cli_main  # noqa: E402
from lightning_distill.teacher import TeacherError, load_teacher  # noqa: E402

repo = Path(__file__).resolve().parents[1]
quiet = ["--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false"]
cli_main(["fit", "--config", str(repo / "configs/teacher/debug.yaml"), "--trainer.default_root_dir",
          str(work / "teacher_run"), *quiet])
export = work / "teacher_run" / "teacher"
teacher = load_teacher(export)
assert not any(p.requires_grad for p in teacher.parameters())

from diffusers import DDPMPipeline  # noqa: E402

pipe = DDPMPipeline.from_pretrained(export)
images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
assert images.shape == (2, 8, 8, 1), images.shape

if method:
    root = work / f"{method}_run"
    cli_main(["fit", "--config", str(repo / f"configs/{method}/debug.yaml"), "--trainer.default_root_dir", str(root),
              "--data.teacher", str(export), "--data.image_size", "8", *quiet])
    student = sorted(p.parent for p in root.rglob("model_index.json"))
    assert student, "the distilled student was not exported"
    DDPMPipeline.from_pretrained(student[0])

print("BLOCKED:", list(_ddp_worker.BLOCKED))  # everything above must not even try to connect
# A hub id is the one case that needs a network: it must fail fast with a clear error, not hang.
try:
    load_teacher("some-org/some-teacher")
except TeacherError as err:
    print("hub id offline:", str(err)[:200])
else:
    raise AssertionError("a hub id loaded with the network disabled")
print("OK")
