"""Teacher-data mode: (noise, teacher sample[, label]) pairs on disk (Luhman & Luhman 2021, arXiv 2101.02388).

The teacher's deterministic DDIM sampler (eta = 0) maps noise x_T to a sample y = F_teacher(x_T); the
pairs are stored once and then used for ordinary regression training (data distillation). This module
generates them and serves them as datasets; how they are stored (shards, manifest, atomic writes, sha256
checks) is :mod:`lightning_distill.pairs_store`, whose names stay importable from here.

Guarantees of generation:
  * Shard i is drawn from its own generator seeded by (seed, i), so the pairs do not depend on the
    number of ranks, the generation batch size, or on interruptions.
  * Ranks split the shards (shard i goes to rank i % world_size); each shows its own progress bar.
  * A rerun skips the complete shards and regenerates the rest; leftover temporary files are discarded.
  * The manifest is written last (rank 0, after all ranks are done) and is the completion marker;
    :func:`ensure_pairs` regenerates a shard that fails the manifest check.

Text-conditional teachers (SD3): each pair is drawn with one prompt of a :class:`PromptPool` (the data
module's training captions), chosen by the shard's generator after the noise, and stores that prompt's
token ids; the teacher samples from the keywords of those ids, and training regenerates the same keywords
from the stored ids (the method's ``text_cond``), so the keywords themselves, (L + 256) x 4096 floats per
SD3 prompt, are never written. The pool's token ids are fingerprinted in the settings. No guidance: the
pairs are the plain conditional teacher's samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .pairs_store import (  # the storage; every name re-exported from here
    FORMAT_VERSION,
    MANIFEST,
    PairsError,
    check_manifest_settings,
    load_pairs,
    read_manifest,
    read_shard,
    shard_name,
    shard_ok,
    verify_pairs,
    write_manifest,
    write_shard,
)
from .nn_utils import content_digest
from .parametrisation import Denoiser, VPSchedule, ddim_step

TimeGrid = Literal["trailing", "quadratic"]


@dataclass
class PromptPool:
    """The prompts a text-conditional teacher's pairs are drawn from (uniformly, with each shard's generator).

    Args:
        inputs: every prompt's token ids, ``{"input_ids": (P, L)[, "input_ids_2": (P, L)]}`` (``teacher.text_inputs``).
        encode: token ids (a dict like ``inputs``, on the teacher's device) -> the network's text keywords
            (``teacher.text_conditioning``).
        encoders: what ``encode`` depends on besides the ids (``text_cache.encoder_key``: the text encoders'
            settings and weights digests), part of the fingerprint: other encoders, other pairs.

    Example::

        >>> pool = PromptPool(teacher.text_inputs(["a cat", "a dog"]), teacher.text_conditioning)
    """

    inputs: dict[str, Tensor]
    encode: Callable[[dict], dict]
    encoders: dict | None = None

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.inputs.items()}
        if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise ValueError(f"a prompt pool needs token ids of one positive length per key, got sizes {sizes}")

    @property
    def size(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def fingerprint(self) -> dict:
        """Number of prompts, sha256 of their token ids (first 16 hex digits) and the encoders' key: other
        prompts or other text encoders, another cache."""
        h = hashlib.sha256()
        for k in sorted(self.inputs):
            h.update(k.encode())
            h.update(self.inputs[k].long().contiguous().numpy().tobytes())
        out = {"count": self.size, "sha256": h.hexdigest()[:16]}
        return out if self.encoders is None else {**out, "encoders": self.encoders}


@dataclass
class PairsConfig:
    """Settings of a teacher-pairs cache (the ``data.pairs`` block of a config).

    Args:
        dir: folder of the shards and manifest (created; resumed when it already holds shards).
        num_pairs: total number of pairs.
        num_steps: teacher DDIM steps per sample.
        time_grid: ``trailing`` (uniform, diffusers' trailing spacing) or ``quadratic``
            ((linspace(0, sqrt(t_max), N))^2, rounded and deduplicated; Luhman & Luhman).
        t_max: largest timestep of the quadratic grid (default: the last training timestep).
        shard_size: pairs per shard (the unit of resumption and of rank assignment).
        batch_size: teacher batch size during generation.
        seed: base seed; shard i uses seed_for_shard(seed, i).
        val_fraction: fraction of pairs held out for validation (the last pairs, by index; at least one).
        progress: show a tqdm progress bar.

    Example::

        >>> cfg = PairsConfig(dir="runs/pairs_digits", num_pairs=10_000, num_steps=32, time_grid="quadratic")
    """

    dir: str
    num_pairs: int = 10_000
    num_steps: int = 32
    time_grid: TimeGrid = "quadratic"
    t_max: int | None = None
    shard_size: int = 1024
    batch_size: int = 256
    seed: int = 0
    val_fraction: float = 0.05
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_pairs < 1 or self.shard_size < 1 or self.batch_size < 1 or self.num_steps < 1:
            raise ValueError("num_pairs, shard_size, batch_size and num_steps must be positive")
        if self.time_grid not in ("trailing", "quadratic"):
            raise ValueError(f"unknown time_grid {self.time_grid!r}; choose 'trailing' or 'quadratic'")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def shard_count(self, index: int) -> int:
        return min(self.shard_size, self.num_pairs - index * self.shard_size)

    def generation_settings(self) -> dict:
        """What determines the pairs' content (batch size, progress and the val split do not)."""
        d = asdict(self)
        for k in ("dir", "batch_size", "progress", "val_fraction"):
            d.pop(k)
        return d


# --- time grids (pure functions) -----------------------------------------------------------------


def quadratic_timesteps(num_train_timesteps: int, num_steps: int, t_max: int | None = None) -> Tensor:
    """Luhman & Luhman's grid (linspace(0, sqrt(t_max), N))^2, rounded, deduplicated, high to low, then -1.

    Rounding can merge neighbouring points near t = 0, so the grid may hold fewer than N evaluations.
    """
    t_max = num_train_timesteps - 1 if t_max is None else t_max
    if not 0 < t_max < num_train_timesteps:
        raise ValueError(f"t_max must lie in [1, {num_train_timesteps - 1}], got {t_max}")
    if num_steps < 2:
        raise ValueError(f"a quadratic grid needs num_steps >= 2, got {num_steps}")
    pts = torch.linspace(0, t_max**0.5, num_steps, dtype=torch.float64).pow(2).round().long()
    pts = torch.unique(pts).flip(0)  # unique sorts ascending
    return torch.cat([pts, torch.tensor([-1])])


def sampling_grid(schedule: VPSchedule, num_steps: int, time_grid: TimeGrid, t_max: int | None = None) -> Tensor:
    """The teacher's DDIM grid: a descending (K + 1,) long tensor whose last entry is -1 (clean)."""
    if time_grid == "trailing":
        return schedule.trailing_timesteps(num_steps)
    if time_grid == "quadratic":
        return quadratic_timesteps(schedule.num_train_timesteps, num_steps, t_max)
    raise ValueError(f"unknown time_grid {time_grid!r}; choose 'trailing' or 'quadratic'")


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, noise: Tensor, grid: Tensor, **cond) -> Tensor:
    """Deterministic DDIM (eta = 0) from ``noise`` at grid[0] down the grid to grid[-1] = -1: the stock
    ``DDIMScheduler`` step, whose x0 is clamped (``clip_x0``) while its eps stays the network's own
    (``use_clipped_model_output=False``), so the pairs are the samples the teacher's stock sampler (and its
    evaluation) draws. (``Denoiser.ddim`` recomputes eps from the clamped x0.) Flow: the Euler step."""
    x, clip = noise, denoiser.clip_x0
    for t, s in zip(grid[:-1].tolist(), grid[1:].tolist()):
        pred = denoiser(x, torch.tensor(t, device=x.device), clip=False, **cond)
        x0 = pred.x0 if clip is None else pred.x0.clamp(-clip, clip)
        s_ = torch.full((x.shape[0],), s, device=x.device)
        x = ddim_step(x0, pred.eps, denoiser.schedule.alpha(s_), denoiser.schedule.sigma(s_))
    return x


def teacher_fingerprint(denoiser: Denoiser) -> str:
    """sha256 over the teacher's weights (first 16 hex digits): a retrained teacher invalidates the cache."""
    h = hashlib.sha256()
    for name, p in sorted(denoiser.unet.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


#: the pairs' noise scheme, recorded in their settings (2: hashed seeds, the stock DDIM step).
NOISE_SCHEME = 2


def seed_for_shard(seed: int, index: int) -> int:
    """Seed of shard ``index``: independent of world size and generation order, and hashed from ("pairs", seed,
    index), so no shard draws the noise of an evaluation chunk (``metrics.chunk_seed``: seed * 1_000_003 + c; the
    pairs used that formula too, so evaluating at seed 0 scored a data-distilled student on its own training
    noise). A CPU generator keeps a seed's low 32 bits: the hash fills them."""
    digest = hashlib.sha256(f"pairs:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def shard_noise(cfg: PairsConfig, index: int, shape: tuple[int, ...], num_classes: int | None,
                num_prompts: int | None = None):
    """The noise (and labels, prompt indices) of one shard, drawn on the CPU so every device gives the same pairs."""
    gen = torch.Generator().manual_seed(seed_for_shard(cfg.seed, index))
    n = cfg.shard_count(index)
    noise = torch.randn((n, *shape), generator=gen)
    labels = torch.randint(0, num_classes, (n,), generator=gen) if num_classes else None
    prompts = torch.randint(0, num_prompts, (n,), generator=gen) if num_prompts else None
    return noise, labels, prompts


def _dist_info() -> tuple[int, int, Callable[[], None]]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed.barrier
    return 0, 1, lambda: None


def generate_pairs(
    denoiser: Denoiser,
    cfg: PairsConfig,
    sample_shape: tuple[int, ...],
    num_classes: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    barrier: Callable[[], None] | None = None,
    teacher_source: str | None = None,
    stop_after: int | None = None,
    prompts: PromptPool | None = None,
) -> Path:
    """Generate (or finish generating) the pairs of ``cfg`` into ``cfg.dir`` and write the manifest.

    Args:
        denoiser: the frozen teacher's denoiser (its device is used).
        cfg: the pairs settings.
        sample_shape: (C, H, W) of the model space.
        num_classes: draw uniform labels for a class-conditional teacher.
        rank, world_size, barrier: distribution; default: ``torch.distributed`` when initialised.
        teacher_source: recorded in the manifest and the shards (a cache made from another teacher
            is refused rather than silently reused).
        stop_after: generate at most this many shards in this call and return without a manifest
            (testing interruptions; None in normal use).
        prompts: a text-conditional teacher's prompts (each pair stores the token ids it was sampled with).

    Returns:
        The folder.
    """
    d_rank, d_world, d_barrier = _dist_info()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    barrier = d_barrier if barrier is None else barrier
    folder = Path(cfg.dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    settings = pair_settings(denoiser, cfg, sample_shape, num_classes, teacher_source, prompts)
    grid = torch.tensor(settings["timesteps"])
    check_manifest_settings(folder, settings)
    mine = [i for i in range(cfg.num_shards) if i % world_size == rank]
    todo = [i for i in mine if not shard_ok(folder / shard_name(i), cfg.shard_count(i), settings)]
    for i in mine:  # leftovers of a killed run
        tmp = folder / f".{shard_name(i)}.tmp"
        if tmp.exists():
            tmp.unlink()
    if stop_after is not None:
        todo = todo[:stop_after]
    device = next(denoiser.parameters()).device
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(cfg.shard_count(i) for i in todo),
        desc=f"teacher pairs (rank {rank})",
        unit="pair",
        position=rank,
        disable=not cfg.progress,
    )
    meta_settings = json.dumps(settings, sort_keys=True)
    for i in todo:
        noise, labels, which = shard_noise(cfg, i, sample_shape, num_classes, prompts.size if prompts else None)
        ids = {k: v[which] for k, v in prompts.inputs.items()} if prompts is not None else {}
        samples = []
        for start in range(0, noise.shape[0], cfg.batch_size):
            part = slice(start, start + cfg.batch_size)
            z = noise[part].to(device)  # float32 ODE state; a bf16 / fp16 teacher gets its own dtype's input
            cond = {"class_labels": labels[part].to(device)} if labels is not None else {}
            if ids:  # the keywords are regenerated from the stored ids, here and in training
                cond.update(prompts.encode({k: v[part].to(device) for k, v in ids.items()}))
            samples.append(ddim_sample(denoiser, z, grid.to(device), **cond).float().cpu())
            bar.update(z.shape[0])
        tensors = {"noise": noise, "sample": torch.cat(samples), **ids}
        if labels is not None:
            tensors["label"] = labels
        write_shard(folder / shard_name(i), tensors, {"settings": meta_settings, "index": str(i)})
    bar.close()
    if stop_after is not None:
        return folder
    barrier()
    if rank == 0:
        write_manifest(folder, cfg, settings)
    barrier()
    return folder


def pair_settings(
    denoiser: Denoiser, cfg: PairsConfig, sample_shape: tuple[int, ...], num_classes: int | None,
    teacher_source: str | None, prompts: PromptPool | None = None,
) -> dict:
    """Everything that determines the pairs (recorded in the manifest and every shard; compared on reuse)."""
    grid = sampling_grid(denoiser.schedule, cfg.num_steps, cfg.time_grid, cfg.t_max)
    T = denoiser.schedule.num_train_timesteps
    levels = torch.arange(-1, T)
    settings = {**cfg.generation_settings(), "teacher": teacher_source, "sample_shape": list(sample_shape),
                "num_classes": num_classes, "format": FORMAT_VERSION, "teacher_sha256": teacher_fingerprint(denoiser),
                "timesteps": grid.tolist(), "noise_scheme": NOISE_SCHEME,
                # the sampler, not only the weights: the path and its alpha / sigma table (beta schedule, shift),
                # the prediction type and the x0 clamp (the same weights read another way give other pairs)
                "path": denoiser.schedule.path, "prediction_type": denoiser.prediction_type, "clip_x0": denoiser.clip_x0,
                "schedule_sha256": content_digest(denoiser.schedule.alpha(levels), denoiser.schedule.sigma(levels))}
    if prompts is not None:  # only then: caches of other teachers keep their settings
        settings["prompts"] = prompts.fingerprint()
    if next(denoiser.parameters()).dtype != torch.float32:  # a reduced-precision teacher's caches made before
        settings["ode_state"] = "float32"  # the state was held in float32 no longer match (float32 ones still do)
    return json.loads(json.dumps(settings))  # the form it takes after a JSON round trip


def ensure_pairs(
    denoiser: Denoiser,
    cfg: PairsConfig,
    sample_shape: tuple[int, ...],
    num_classes: int | None = None,
    teacher_source: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    barrier: Callable[[], None] | None = None,
    prompts: PromptPool | None = None,
) -> dict[str, Tensor]:
    """Generate what is missing (resuming), regenerate shards that fail the manifest check, then load.

    Every rank calls it; all of them reach the same verdict from the same files, and only rank 0
    deletes, between barriers, so no rank reads a manifest another is removing.
    """
    d_rank, d_world, d_barrier = _dist_info()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    barrier = d_barrier if barrier is None else barrier
    folder = Path(cfg.dir).expanduser()
    if (folder / MANIFEST).exists():
        settings = pair_settings(denoiser, cfg, sample_shape, num_classes, teacher_source, prompts)
        check_manifest_settings(folder, settings)
        bad = verify_pairs(folder)
        if not bad:
            return load_pairs(folder)
        barrier()
        if rank == 0:
            import warnings

            warnings.warn(f"pairs folder {folder}: regenerating corrupt or truncated shard(s) {bad}", stacklevel=2)
            for name in bad:
                (folder / name).unlink(missing_ok=True)
            (folder / MANIFEST).unlink(missing_ok=True)
        barrier()
    generate_pairs(denoiser, cfg, sample_shape, num_classes, rank, world_size, barrier, teacher_source, prompts=prompts)
    return load_pairs(folder)


class PairDataset(Dataset):
    """(noise, teacher sample, label) triples; batches are {"noise", "x", "label"} (x = the teacher sample),
    plus any ``extras`` per pair (a text teacher's token ids)."""

    def __init__(self, noise: Tensor, sample: Tensor, label: Tensor | None = None, extras: dict | None = None) -> None:
        self.noise, self.sample, self.extras = noise, sample, extras or {}
        self.label = label if label is not None else torch.zeros(noise.shape[0], dtype=torch.long)

    def __len__(self) -> int:
        return self.noise.shape[0]

    def __getitem__(self, i: int) -> dict:
        extras = {k: v[i] for k, v in self.extras.items()}
        return {"noise": self.noise[i], "x": self.sample[i], "label": self.label[i], **extras}


def pair_datasets(pairs: dict[str, Tensor], val_fraction: float) -> tuple[PairDataset, PairDataset]:
    """Split by index: the last ``val_fraction`` of the pairs (at least one) for validation."""
    n = pairs["noise"].shape[0]
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise PairsError(f"only {n} pairs: too few to hold out {n_val} for validation")
    label = pairs.get("label")
    extras = {k: v for k, v in pairs.items() if k not in ("noise", "sample", "label")}

    def part(sl: slice) -> PairDataset:
        return PairDataset(pairs["noise"][sl], pairs["sample"][sl], None if label is None else label[sl],
                           {k: v[sl] for k, v in extras.items()})

    train, val = part(slice(0, n - n_val)), part(slice(n - n_val, n))
    return train, val


def main(argv: list[str] | None = None) -> None:
    """Generate a pairs cache without training: ``python -m lightning_distill.teacher_pairs --teacher ...``.

    Under ``torchrun --nproc_per_node K`` the K processes split the shards (gloo / nccl process group).
    The same cache is then used by ``lightning-distill fit`` with matching ``data.pairs`` settings.
    """
    import argparse
    from dataclasses import fields

    from .teacher import load_teacher

    parser = argparse.ArgumentParser(prog="python -m lightning_distill.teacher_pairs", description=main.__doc__)
    parser.add_argument("--teacher", default="bundled:digits")
    parser.add_argument("--image-size", type=int, default=None, help="default: the teacher's sample_size")
    for f in fields(PairsConfig):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
        if f.name == "progress":
            continue
        if f.name == "t_max":
            kind = int
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default if f.name != "dir" else None,
                            required=f.name == "dir")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cfg = PairsConfig(**{f.name: getattr(args, f.name) for f in fields(PairsConfig) if f.name != "progress"})
    teacher = load_teacher(args.teacher)
    if teacher.is_text_conditional:
        parser.error("a text-conditional teacher's pairs need prompts: generate them with `lightning-distill fit` "
                     "and data.pairs (prompts from data.prompt or the image folder's captions)")
    if torch.cuda.is_available():
        teacher.to("cuda")
    size = args.image_size or teacher.sample_size
    shape = (teacher.in_channels, size, size)
    generate_pairs(teacher.denoiser, cfg, shape, teacher.num_classes, teacher_source=teacher.source)
    if _dist_info()[0] == 0:
        print(f"{cfg.num_pairs} pairs in {cfg.dir} (manifest.json)")


if __name__ == "__main__":
    main()


__all__ = [
    "PairsConfig",
    "PairsError",
    "PairDataset",
    "PromptPool",
    "ddim_sample",
    "ensure_pairs",
    "generate_pairs",
    "load_pairs",
    "pair_datasets",
    "pair_settings",
    "quadratic_timesteps",
    "read_shard",
    "sampling_grid",
    "seed_for_shard",
    "verify_pairs",
]
