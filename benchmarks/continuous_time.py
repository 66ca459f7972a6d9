"""Cost of a continuous-time training step (sCD, MeanFlow) against discrete consistency distillation.

One process, one thread, the bundled flow-matching digits teacher (16 x 16, 1.1M-parameter UNet with
attention at 8 x 8). Per method, the time of ``loss = method.compute_loss(batch).loss; loss.backward()``
(no optimiser step: the same for all), interleaved round-robin over ``--repeats`` rounds so that load
drift hits every method alike; medians. Also the building blocks on the same batch: one student forward,
a forward + backward, and the time derivative d/dt of the student by ``torch.func.jvp`` (math attention
kernel) and by central differences. Quote the ratios (measured in one run), not the absolute times.

    python benchmarks/continuous_time.py --batch 32 --repeats 5 --out benchmarks/results/continuous_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="bundled:digits-flow")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/continuous_time.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    from lightning_distill.methods import ConsistencyDistillation, MeanFlowDistillation, SCMDistillation
    from lightning_distill.methods.scm import trigflow_jvp, trigflow_output
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(args.teacher)
    methods = {
        "consistency (Heun, N = 40)": ConsistencyDistillation(teacher, original_inference_steps=40, solver="heun"),
        "sCD, forward JVP": SCMDistillation(teacher, jvp="forward"),
        "sCD, finite differences": SCMDistillation(teacher, jvp="finite_difference"),
        "MeanFlow, forward JVP": MeanFlowDistillation(teacher, jvp="forward"),
        "MeanFlow, finite differences": MeanFlowDistillation(teacher, jvp="finite_difference"),
    }
    size = teacher.unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(args.batch, 1, size, size, generator=gen) * 2 - 1, "label": torch.zeros(args.batch).long()}

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m.compute_loss(batch).loss.backward()
        return run

    student = methods["sCD, forward JVP"].student
    x = torch.randn(args.batch, 1, size, size, generator=gen)
    t = torch.rand(args.batch, generator=gen) * 1.4 + 0.1
    dx = torch.randn(args.batch, 1, size, size, generator=gen)
    F = lambda a, b: trigflow_output(student, a, b, 0.5)  # noqa: E731

    def fwd_bwd():
        student.zero_grad(set_to_none=True)
        F(x, t).pow(2).mean().backward()

    blocks = {
        "student forward": lambda: torch.no_grad()(F)(x, t),
        "student forward + backward": fwd_bwd,
        "d/dt by torch.func.jvp (math attention)": lambda: torch.no_grad()(trigflow_jvp)(F, x, t, dx, "forward"),
        "d/dt by central differences (3 forwards)": lambda: torch.no_grad()(trigflow_jvp)(F, x, t, dx, "finite_difference"),
    }
    jobs = {**{k: step(m) for k, m in methods.items()}, **blocks}
    for fn in jobs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    load_start = os.getloadavg()
    for _ in range(args.repeats):
        for k, fn in jobs.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    base, fwd = med["consistency (Heun, N = 40)"], med["student forward"]
    result = {
        "command": f"python benchmarks/continuous_time.py --batch {args.batch} --repeats {args.repeats}",
        "teacher": args.teacher, "batch": args.batch, "repeats": args.repeats, "threads": 1,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "median_s": med, "vs_consistency_step": {k: med[k] / base for k in methods},
        "vs_student_forward": {k: med[k] / fwd for k in blocks},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [
        "# Cost of a continuous-time training step (CPU, 1 thread)", "",
        f"Command: `{result['command']}` (torch {torch.__version__}; load average "
        f"{load_start[0]:.1f} at the start, {result['load_avg_end'][0]:.1f} at the end, on 2 cores).", "",
        "| training step (compute_loss + backward) | median s | x consistency step |", "|---|---|---|",
        *[f"| {k} | {med[k]:.3f} | {med[k] / base:.2f} |" for k in methods], "",
        "| building block (same batch) | median s | x one student forward |", "|---|---|---|",
        *[f"| {k} | {med[k]:.3f} | {med[k] / fwd:.2f} |" for k in blocks], "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
