"""Framework overhead and sampling overhead, measured side by side in one process.

Training step: for each debug preset, the LightningModule trained by ``L.Trainer`` (per-step time taken
inside Lightning by a callback, between consecutive ``on_train_batch_start`` calls, so it includes the
loop, hooks, logging and data fetching but not start-up) against a hand-written PyTorch loop over the
same data loader that does the same maths on the same networks and batch size:
``loss = method.compute_loss(batch).loss; opt.zero_grad(); loss.backward(); opt.step()``.
For DiffusionTraining the hand loop is also written out fully (UNet forward + MSE on the v target), so
``compute_loss`` itself is checked for overhead. Runs alternate (framework, hand, framework, hand, ...)
so machine-load drift hits both; medians over all steps of all repeats, first ``--warmup`` steps of
each run dropped. Methods with manual optimisation (ADD, APT, DMD2: several optimisers per iteration)
are compared per iteration against a hand loop that calls the method's loss functions
(``critic_loss`` / ``generator_loss`` of the adversarial loop) with plain
``backward``, ``clip_grad_norm_`` and ``optimizer.step`` in the same D:G plan.

Sampling: ``method.sample(n, k)`` wall time vs k bare forward passes of the same network on the same
batch: one untimed call, then ``--sample-repeats`` timed calls of each, interleaved; medians.

    nice -n 10 python benchmarks/overhead.py --steps 30 --repeats 5 --out benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import lightning as L  # noqa: E402
import torch  # noqa: E402


class StepTimer(L.Callback):
    """Per-iteration wall times."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def build(name: str, fixtures: dict, extra: list[str], tmp: Path):
    from _method_configs import preset_args

    from lightning_distill.cli import cli_main

    args = preset_args(name, tmp / f"{name}_run", fixtures) + extra
    cli = cli_main(args, run=False)
    return cli.model, cli.datamodule


def framework_steps(name, fixtures, extra, tmp, steps: int) -> list[float]:
    model, dm = build(name, fixtures, extra, tmp)
    # Every method's global_step counts iterations (the adversarial loop counts one step per batch).
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer],
    )
    model.hparams.sample_every_n_steps = 0  # image grids are not part of a training step
    trainer.fit(model, datamodule=dm)
    return timer.steps()


def hand_steps(name, fixtures, extra, tmp, steps: int, fully_hand: bool = False) -> list[float]:
    import torch.nn.functional as F

    from lightning_distill.parametrisation import target_for

    model, dm = build(name, fixtures, extra, tmp)
    dm.setup("fit")
    model.train()
    params = model.trainable_parameters()
    opt = model.optimizer_factory(params)
    loader = dm.train_dataloader()
    times, done = [], 0
    t_prev = time.perf_counter()
    while done < steps:
        for batch in loader:
            if fully_hand:  # DiffusionTraining's maths written out
                x0 = batch["x"]
                sched = model.student.schedule
                t = torch.randint(0, sched.num_train_timesteps, (x0.shape[0],))
                eps = torch.randn_like(x0)
                alpha, sigma = sched.alpha(t), sched.sigma(t)
                x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
                out = model.student.unet(x_t, t, return_dict=False)[0]
                loss = F.mse_loss(out, target_for(model.student.prediction_type, x0, eps, alpha, sigma))
            else:
                loss = model.compute_loss(batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = time.perf_counter()
            times.append(now - t_prev)
            t_prev = now
            done += 1
            if done >= steps:
                break
    return times


def hand_manual_steps(name, fixtures, extra, tmp, steps: int) -> list[float]:
    """One hand-written iteration of a manual-optimisation method: D (or critic) steps, then G."""
    from torch.nn.utils import clip_grad_norm_

    from lightning_distill.methods.adversarial import frozen

    model, dm = build(name, fixtures, extra, tmp)
    dm.setup("fit")
    model.train()
    cfg = model.configure_optimizers()
    opts = cfg[0] if isinstance(cfg, tuple) else cfg
    params = lambda opt: [p for group in opt.param_groups for p in group["params"]]  # noqa: E731

    def step(opt, clip):
        if clip is not None:
            clip_grad_norm_(params(opt), clip)
        opt.step()

    loader = dm.train_dataloader()
    critics = model.critics()
    times, done, it = [], 0, 0
    t_prev = time.perf_counter()
    while done < steps:
        for batch in loader:
            plan, g = model.plan(it), model.step_generator(it)
            opt_g, critic_opts = opts[0], opts[1:]
            for _ in range(plan.d_updates):
                out = model.critic_loss(batch, g, plan).loss
                for opt in critic_opts:
                    opt.zero_grad(set_to_none=True)
                out.loss.backward()
                for c, opt in zip(critics, critic_opts):
                    step(opt, c.clip)
            if plan.update_g:
                with frozen(model.critic_parameters()):
                    out = model.generator_loss(batch, g)
                    opt_g.zero_grad(set_to_none=True)
                    out.loss.backward()
                step(opt_g, model.hparams.generator_grad_clip)
            model.gan_iteration += 1
            it += 1
            now = time.perf_counter()
            times.append(now - t_prev)
            t_prev = now
            done += 1
            if done >= steps:
                break
    return times


def train_row(name: str, model, fixtures, extra, tmp, args) -> dict:
    """Framework vs hand-written training step, runs alternating, medians (ms)."""
    manual = not model.automatic_optimization
    fw, hand, full = [], [], []
    for _ in range(args.repeats):
        fw += framework_steps(name, fixtures, extra, tmp, args.steps)[args.warmup:]
        hand_fn = hand_manual_steps if manual else hand_steps
        hand += hand_fn(name, fixtures, extra, tmp, args.steps)[args.warmup:]
        if name == "teacher":
            full += hand_steps(name, fixtures, extra, tmp, args.steps, fully_hand=True)[args.warmup:]
    row = {"framework_ms": 1e3 * statistics.median(fw), "hand_ms": 1e3 * statistics.median(hand),
           "steps_measured": len(fw), "unit": "iteration (D/critic + G steps)" if manual else "step"}
    row["ratio"] = row["framework_ms"] / row["hand_ms"]
    if full:
        row["fully_hand_ms"] = 1e3 * statistics.median(full)
        row["ratio_vs_fully_hand"] = row["framework_ms"] / row["fully_hand_ms"]
    return row


def sampling(model, k: int, n: int, repeats: int) -> dict:
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.methods.lcm import LatentConsistencyDistillation, guidance_scale_embedding

    den = model.sampling_denoiser()
    den.eval()
    shape = (n, *model.sample_shape)
    labels = torch.arange(n) % 10 if model.is_class_conditional else None
    kw, cond = {}, {"class_labels": labels} if labels is not None else {}
    if isinstance(model, LatentConsistencyDistillation):
        # text-conditional: the prompt is encoded once, outside the timed region, for both sides (the
        # comparison is the sampling loop, not the text encoder)
        with torch.no_grad():
            emb = model.teacher.encode_text(model.teacher.tokenize([model.hparams.sample_prompt] * n))
        w = torch.tensor(model.hparams.sample_guidance_scale - 1).repeat(n)
        kw = {"prompt_embeds": emb}
        cond = {"encoder_hidden_states": emb,
                "timestep_cond": guidance_scale_embedding(w, den.unet.config.time_cond_proj_dim)}
    sample_t, bare_t = [], []
    with torch.no_grad():
        # one untimed sample() call first: the first call pays allocator and scheduler set-up costs that a
        # median over few repeats would otherwise count against whichever side runs first
        model.sample(n, k, torch.Generator().manual_seed(0), labels=labels, **kw)
        for _ in range(repeats):
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            model.sample(n, k, g, labels=labels, **kw)
            sample_t.append(time.perf_counter() - t0)
            sched = model.make_scheduler()
            sched.set_timesteps(k)
            x = randn_tensor(shape, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            for t in sched.timesteps:
                den.unet(x, t.expand(n), return_dict=False, **cond)
            bare_t.append(time.perf_counter() - t0)
    s, b = statistics.median(sample_t), statistics.median(bare_t)
    return {"k": k, "n": n, "sample_s": s, "bare_s": b, "ratio": s / b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=None, help="debug presets (default: all with compute_loss)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sample-k", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--sample-n", type=int, default=16)
    ap.add_argument("--sample-repeats", type=int, default=15, help="timed sampling calls per side (interleaved)")
    ap.add_argument("--skip-train", action="store_true", help="measure sampling only")
    ap.add_argument("--extra", default="", help="extra CLI overrides for every preset (e.g. a real teacher)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import shlex
    import tempfile

    from _method_configs import all_debug_presets, write_fixtures

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ld_bench_"))
    fixtures = write_fixtures(tmp / "fixtures")
    extra = shlex.split(args.extra)
    presets = args.presets or all_debug_presets()
    results = {"machine": {"load_avg_start": os.getloadavg(), "cpus": os.cpu_count(), "threads": args.threads,
                           "python": platform.python_version(), "torch": torch.__version__,
                           "lightning": L.__version__},
               "settings": vars(args), "train": {}, "sampling": {}}
    for name in presets:
        model, _ = build(name, fixtures, extra, tmp)
        if args.skip_train:
            results["train"][name] = {"skipped": "--skip-train"}
        else:
            try:
                results["train"][name] = train_row(name, model, fixtures, extra, tmp, args)
            except Exception as err:  # a method whose compute_loss needs a Trainer: say so
                results["train"][name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        try:
            limit = model.max_sample_steps()  # an LCMScheduler student samples with at most its grid's steps
            ks = [k for k in args.sample_k if limit is None or k <= limit]
            results["sampling"][name] = [sampling(model, k, args.sample_n, args.sample_repeats) for k in ks]
        except Exception as err:
            results["sampling"][name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(name, json.dumps(results["train"][name]), json.dumps(results["sampling"][name]), flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(results, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
