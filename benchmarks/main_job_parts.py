"""Where the README main job's time goes: training steps, the closing FD report, start-up (issue 21 item 1).

Reads the preset (default ``configs/consistency/main.yaml``) and times, in one process on the threads given:

* ``startup_s``: importing the framework and loading the bundled teacher;
* ``step_s``: one consistency-distillation step (``compute_loss`` + backward + AdamW) with the preset's solver,
  substeps, grid and batch size, median over ``--steps`` steps after one warm-up; also at twice the batch,
  with the other solver, with another substep count and under bf16 autocast, so the cost of each recipe
  knob is a measured ratio, not a guess;
* ``report``: the ``DistillationReport`` cells, each timed on one chunk of ``--chunk`` samples and scaled to
  ``num_samples`` (the teacher's 50-step cell alone is most of it), plus the digits feature extraction;
  and the same without the teacher cells whose features the teacher folder ships (read, not sampled).

The estimate ``startup + max_steps x step + report`` is printed beside its parts; benchmarks/main_job.py
measures the real end-to-end wall time.

    OMP_NUM_THREADS=2 python benchmarks/main_job_parts.py --out benchmarks/results/main_job_parts.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "consistency" / "main.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per setting")
    ap.add_argument("--chunk", type=int, default=250, help="samples per timed report chunk")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load_avg_start = os.getloadavg()
    t0 = time.perf_counter()
    from lightning_distill.evaluate import teacher_sampler
    from lightning_distill.metrics import extract_features, get_feature_net
    from lightning_distill.methods.consistency import ConsistencyDistillation
    from lightning_distill.teacher import load_teacher

    cfg = yaml.safe_load(Path(args.config).read_text())
    data, model_args = cfg["data"], dict(cfg["model"]["init_args"])
    teacher = load_teacher(data["teacher"])
    startup = time.perf_counter() - t0

    report_cb = next(c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("DistillationReport"))
    batch_size, size = int(data["batch_size"]), int(data["image_size"])
    grid, solver = int(model_args.get("original_inference_steps", 50)), model_args.get("solver", "ddim")
    substeps = int(model_args.get("solver_substeps", 1))

    def step_time(bs: int, solver_: str, substeps_: int = substeps, bf16: bool = False) -> float:
        torch.manual_seed(0)
        method = ConsistencyDistillation(teacher, original_inference_steps=grid, solver=solver_, solver_substeps=substeps_)
        opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
        batch = {"x": torch.rand(bs, teacher.in_channels, size, size) * 2 - 1, "label": torch.zeros(bs, dtype=torch.long)}

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # what precision: bf16-mixed does
                loss = method.compute_loss(batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

        return _median_time(step, args.steps)

    other = "ddim" if solver == "heun" else "heun"
    preset = f"{solver} x{substeps} batch {batch_size} (preset)"
    steps = {
        preset: step_time(batch_size, solver),
        f"{solver} x{substeps} batch {batch_size * 2}": step_time(batch_size * 2, solver),
        f"{other} x{substeps} batch {batch_size}": step_time(batch_size, other),
        f"{solver} x{substeps + 1 if substeps == 1 else 1} batch {batch_size}": step_time(batch_size, solver, 2 if substeps == 1 else 1),
        f"{solver} x{substeps} batch {batch_size}, bf16 autocast": step_time(batch_size, solver, bf16=True),
    }
    step_s = steps[preset]

    n = int(report_cb.get("num_samples", 2000))
    sampler = teacher_sampler(teacher)
    g = torch.Generator().manual_seed(0)
    net = get_feature_net(report_cb.get("feature_net", "digits"))
    cells = {}
    with torch.no_grad():
        # the student samples with the teacher's network, one evaluation per step, as the exported LCM folder does
        for kind, counts in (("teacher", report_cb.get("teacher_steps", [1, 2, 4, 50])), ("student", report_cb.get("steps", [1, 2, 4]))):
            for k in counts:
                sec = _median_time(lambda k=k: sampler.sample(args.chunk, k, g, None), 1)
                cells[f"{kind} {k} steps"] = sec * n / args.chunk
        x = torch.rand(args.chunk, teacher.in_channels, size, size) * 2 - 1
        feat = _median_time(lambda: extract_features(net, x), 1) * n / args.chunk
    report_s = sum(cells.values()) + feat * len(cells)
    # the teacher's cells are read from the teacher folder's shipped feature cache when their key matches
    # (lightning_distill/teacher_features.py), so a first run pays only the students' cells
    from lightning_distill import teacher_features as tf

    digest, shipped_dir = tf.teacher_digest(teacher, net, "cpu"), tf.search_dirs(teacher, None)[1:]
    shipped = [k for k in report_cb.get("teacher_steps", [1, 2, 4, 50]) if tf.load_entry(
        tf.cell_key(digest, k, n, int(report_cb.get("seed", 0)), 250), shipped_dir) is not None]
    report_cached_s = report_s - sum(cells[f"teacher {k} steps"] for k in shipped) - feat * len(shipped)
    max_steps = int(cfg["trainer"]["max_steps"])
    result = {
        "config": os.path.relpath(args.config, REPO),
        "threads": args.threads,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_avg_start": load_avg_start,
        "load_avg_end": os.getloadavg(),
        "startup_s": startup,
        "step_s": steps,
        "max_steps": max_steps,
        "train_s": max_steps * step_s,
        "report_cells_s": cells,
        "report_features_s": feat * len(cells),
        "report_s": report_s,
        "teacher_cells_shipped": shipped,
        "report_with_shipped_teacher_cells_s": report_cached_s,
        "estimate_total_s": startup + max_steps * step_s + report_cached_s,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
