"""Sample-quality metrics: feature networks, Fréchet distance, KID, cached reference statistics, samplers.

Protocol (Heusel et al. 2017 for FD; Binkowski et al. 2018 for KID): features of N generated images
and of a fixed reference set are compared; FD fits a Gaussian to each set,

    FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)),

KID is the unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3, averaged over
random subsets. Both are meaningless without their protocol, so every number this module produces
travels with the feature network's name, the sample count and the reference set (metric tags such as
``fid/digits-feat/2step/n2000``).

Feature networks are any ``nn.Module`` mapping model-space images ((B, C, H, W) in [-1, 1]) to
(B, ``num_features``) features; ``name`` (optional) names them in tags. Shipped: the digits classifier
(:mod:`lightning_distill.feature_net`, "digits-feat") and Inception-v3 through torch-fidelity
(:class:`InceptionFeatures`, "inception", weights read offline from a local file).

Everything here is a plain function of tensors; :class:`~lightning_distill.callbacks.fid.FIDCallback`
and :mod:`lightning_distill.evaluate` only orchestrate them.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .checkpoint_io import atomic_torch_save
from .errors import ConfigError
from .nn_utils import eval_mode

# --- Fréchet distance and KID (pure functions) ---------------------------------------------------


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (denominator N - 1, as torchmetrics) of (N, d) features, in float64."""
    f = features.double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N, d) features with N >= 2, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sqrt_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982).

    Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the inner matrix is symmetric
    PSD, so ``eigh`` applies and rank-deficient covariances (dead ReLU features, fewer samples than
    dimensions) give no complex parts or NaNs.
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return float(fd.clamp_min(0))  # tiny negative values are round-off of an exact 0


def fd_from_features(f1: Tensor, f2: Tensor) -> float:
    """FD between two (N, d) feature sets."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def check_kid_settings(subsets: int, subset_size: int) -> None:
    """One-line ConfigError for a KID protocol that cannot be computed (before any sampling)."""
    if subsets < 1 or subset_size < 2:
        raise ConfigError(f"KID needs kid_subsets >= 1 and kid_subset_size >= 2, got {subsets} and {subset_size}")


def kernel_distance(
    real: Tensor,
    fake: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID: mean and std of the unbiased polynomial-kernel MMD^2 over random subsets.

    The subset draws follow torchmetrics' ``KernelInceptionDistance.compute`` exactly (one ``randperm``
    of the real set, then one of the fake set, per subset) but from ``generator``, so the value is
    reproducible without touching the global RNG. ``subset_size`` is capped at the smaller set size.
    """
    from torchmetrics.image.kid import poly_mmd

    check_kid_settings(subsets, subset_size)
    real, fake = real.double(), fake.double()
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {real.shape[0]} real / {fake.shape[0]} fake")
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(real.shape[0], generator=generator)[:m]]
        f = fake[torch.randperm(fake.shape[0], generator=generator)[:m]]
        scores.append(poly_mmd(r, f, degree, gamma, coef))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


# --- feature networks ----------------------------------------------------------------------------

#: The file torch-fidelity downloads (and that torchmetrics' default FID uses); never downloaded here.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]


def inception_weights_path(feature_extractor_weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception-v3 weights file to read: the given one, else torch hub's cache location.

    torch-fidelity stores its download at ``<torch hub dir>/checkpoints/<file>`` (``torch.hub.get_dir()``,
    i.e. ``$TORCH_HOME/hub`` or ``~/.cache/torch/hub``); this looks there and nowhere else.

    Raises:
        FileNotFoundError: naming the file, where it was looked for, and where to get it.
    """
    if feature_extractor_weights_path is not None:
        path = Path(feature_extractor_weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception-v3 weights not found at feature_extractor_weights_path={str(path)!r}. "
                f"This file is torch-fidelity's {INCEPTION_FILE} (download {INCEPTION_URL} on a machine with "
                "network access and copy it there); nothing is downloaded at run time."
            )
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception-v3 weights {INCEPTION_FILE} not found in the torch hub cache: expected {path}. "
            f"Download {INCEPTION_URL} on a machine with network access and put it at that path (or pass "
            "feature_extractor_weights_path=<file>); nothing is downloaded at run time."
        )
    return path


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2048-d, torch-fidelity's FID network) from a local weights file.

    Takes model-space images ((B, C, H, W) in [-1, 1], 1 or 3 channels), quantises them to uint8 RGB
    as saved images would be, and returns (B, 2048) features: the standard FID protocol.

    Args:
        feature_extractor_weights_path: the weights file; None: the torch hub cache (see
            :func:`inception_weights_path`).
        antialias: torchmetrics' antialiased resize to 299 (False: torch-fidelity's TF-1 resize).

    Example::

        >>> net = InceptionFeatures("/data/weights-inception-2015-12-05-6726825d.pth")
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 2048])
    """

    num_features = 2048
    name = "inception"

    def __init__(self, feature_extractor_weights_path: str | os.PathLike | None = None, antialias: bool = True) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = inception_weights_path(feature_extractor_weights_path)
        self.weights_path, self.antialias = str(path), bool(antialias)
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path),
            antialias=antialias,
        )
        self.inception.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"Inception features take 1- or 3-channel images, got {x.shape[1]} channels")
        # The uint8 cast turns NaN into 0 (a black image): a diverged model's NaN images would get finite features,
        # hence a finite FD / KID. Rows with a non-finite pixel come out NaN instead, as the digits network's do,
        # so score_features scores them NaN (the seeds runner's worst value).
        bad = ~torch.isfinite(x).flatten(1).all(1)
        img = ((x.float().nan_to_num(0.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        feats = self.inception(img).reshape(x.shape[0], -1)
        return feats.masked_fill(bad[:, None].to(feats.device), float("nan"))


FEATURE_NETS = ("digits", "inception")


def get_feature_net(spec: str | os.PathLike | nn.Module = "digits", **kwargs) -> nn.Module:
    """Resolve a feature network: ``"digits"`` (bundled classifier), ``"inception"``, a saved classifier
    folder, or any ``nn.Module`` with ``num_features``. Returned frozen, in eval mode."""
    if isinstance(spec, nn.Module):
        net = spec
    elif spec == "digits":
        from .feature_net import load_digits_feature_net

        net = load_digits_feature_net(**kwargs)
    elif spec == "inception":
        net = InceptionFeatures(**kwargs)
    elif Path(str(spec)).expanduser().is_dir():
        from .feature_net import load_digits_feature_net

        net = load_digits_feature_net(Path(str(spec)).expanduser())
    else:
        raise ValueError(f"unknown feature network {spec!r}; choose one of {FEATURE_NETS}, a saved classifier folder, or an nn.Module")
    if not isinstance(getattr(net, "num_features", None), int):
        raise TypeError(f"feature network {type(net).__name__} needs an int attribute num_features")
    net.requires_grad_(False)
    return net.eval()


def feature_net_name(net: nn.Module) -> str:
    """The name used in metric tags: ``net.name`` when set, else the class name."""
    return str(getattr(net, "name", None) or type(net).__name__)


#: feature-network attributes that change its features without being weights (the digits classifier's
#: ``feature_scale``, Inception's ``antialias`` resize): part of :func:`fingerprint`.
FEATURE_SETTINGS = ("feature_scale", "antialias")


def fingerprint(net: nn.Module) -> str:
    """A content hash of a feature network (class, width, every weight and its :data:`FEATURE_SETTINGS`):
    part of the cache keys of reference statistics and teacher features."""
    h = hashlib.sha1(f"{type(net).__qualname__}:{net.num_features}".encode())
    settings = {k: getattr(net, k) for k in FEATURE_SETTINGS if hasattr(net, k)}
    if settings:
        h.update(repr(sorted(settings.items())).encode())
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(net: nn.Module, images: Tensor, batch_size: int = 500, device: torch.device | str | None = None) -> Tensor:
    """Features of ``images`` ((N, C, H, W), model space) in batches; (N, d) float64 on the CPU."""
    device = torch.device(device) if device is not None else next(iter(net.parameters()), torch.empty(0)).device
    out = [net(images[i : i + batch_size].to(device)).double().cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).reshape(images.shape[0], -1)


# --- reference statistics, cached on disk --------------------------------------------------------


@dataclass
class ReferenceStats:
    """Features of a reference set, their Gaussian fit and the key that identifies them."""

    mu: Tensor
    sigma: Tensor
    features: Tensor
    key: str
    feature_net: str
    from_cache: bool = False

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_distill" / "reference_stats"


def reference_key(images: Tensor, net: nn.Module) -> str:
    """Cache key: hash of the reference images themselves, the feature network's fingerprint and the count.

    Hashing the pixels (not the data's settings) means any change of data, split, size or channels
    gives a new key, and the same images reached by another route share one entry.
    """
    h = hashlib.sha1(f"{tuple(images.shape)}".encode())
    h.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    return f"{feature_net_name(net)}-n{images.shape[0]}-{h.hexdigest()[:12]}-{fingerprint(net)}"


def read_cache_entry(
    path: str | os.PathLike, shapes: dict[str, tuple[int | None, ...]], then: str = "computing it again",
) -> dict[str, Tensor] | None:
    """The tensors of a cache file written by ``atomic_torch_save``, or None, with a warning naming the file,
    when it cannot be used: ``torch.load`` fails (a copy cut short, a disk error; its own message names no
    file), or a key of ``shapes`` is missing or has another shape (None: any size in that dimension).
    ``then``: what the caller does instead, for the warning.

    The writes are atomic, so a damaged entry comes from outside (a copy, a disk); the caller recomputes it,
    which is what an absent entry would cost, instead of aborting an evaluation over a cache.
    """
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises RuntimeError, EOFError, OSError, UnpicklingError ...
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    else:
        problem = None
        if not isinstance(entry, dict):
            problem = f"holds a {type(entry).__name__}, not a dict of tensors"
        else:
            for k, shape in shapes.items():
                v = entry.get(k)
                if not isinstance(v, Tensor):
                    problem = f"no tensor {k!r} (keys {sorted(map(str, entry))})"
                elif v.ndim != len(shape) or any(want is not None and got != want for got, want in zip(v.shape, shape)):
                    want = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
                    problem = f"{k!r} has shape {tuple(v.shape)}, expected {want}"
                if problem:
                    break
    if problem is None:
        return entry
    warnings.warn(f"cache entry {path} cannot be used ({problem}): {then}", stacklevel=3)
    return None


def reference_stats(
    images: Tensor,
    net: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> ReferenceStats:
    """Reference features and Gaussian statistics, read from ``cache_dir`` when present, else computed
    once and written there (atomically: a crash never leaves a half-written entry). An entry that cannot be
    read (a copy cut short, a disk error, other contents: :func:`read_cache_entry`) is recomputed and
    replaced, with a warning naming the file."""
    key = reference_key(images, net)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"{key}.pt"
    d, n = net.num_features, images.shape[0]
    entry = read_cache_entry(path, {"mu": (d,), "sigma": (d, d), "features": (n, d)}) if path.is_file() else None
    if entry is not None:
        return ReferenceStats(entry["mu"], entry["sigma"], entry["features"], key, feature_net_name(net), from_cache=True)
    feats = extract_features(net, images, batch_size, device)
    mu, sigma = gaussian_stats(feats)
    try:
        atomic_torch_save({"mu": mu, "sigma": sigma, "features": feats}, path)
    except OSError as err:  # a read-only or full cache: as teacher cells (teacher_features.cached_cell), not fatal
        warnings.warn(f"cannot write the reference statistics' cache entry {path} ({err}): they are used without "
                      "being cached", stacklevel=2)
    return ReferenceStats(mu, sigma, feats, key, feature_net_name(net))


@dataclass
class Score:
    """FD and KID of one generated set against one reference, with its protocol."""

    fd: float
    kid: float | None
    kid_std: float | None
    num_samples: int
    feature_net: str
    num_reference: int
    extra: dict = field(default_factory=dict)


def score_features(
    fake: Tensor,
    ref: ReferenceStats,
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> Score:
    """FD (and KID, its subsets drawn from ``seed``) of generated features against a reference.

    Non-finite features (a diverged student's NaN images) score NaN rather than raising in the matrix square
    root: one such model then shows as NaN in a report instead of aborting every other model's evaluation.
    """
    if not bool(torch.isfinite(fake).all()):
        nan = float("nan")
        return Score(nan, nan if kid else None, nan if kid else None, int(fake.shape[0]), ref.feature_net, ref.num_images)
    mu, sigma = gaussian_stats(fake)
    fd = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    k = ks = None
    if kid:
        k, ks = kernel_distance(
            ref.features, fake, kid_subsets, kid_subset_size, generator=torch.Generator().manual_seed(seed)
        )
    return Score(fd, k, ks, int(fake.shape[0]), ref.feature_net, ref.num_images)


# --- samplers ------------------------------------------------------------------------------------


def ddim_scheduler_for(scheduler_config: dict, clip_x0: float | None = 1.0, prediction_type: str | None = None):
    """A deterministic DDIM sampler (eta = 0, trailing spacing, last step onto x0) from any VP scheduler config.

    The same settings as ``DistillationMethod.make_scheduler`` (``sampling.deterministic_scheduler``),
    so teacher and student step counts mean the same grid.
    """
    from .parametrisation import VPSchedule
    from .sampling import deterministic_scheduler
    from diffusers import DDIMScheduler

    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    schedule = VPSchedule.from_scheduler(DDIMScheduler.from_config(cfg))
    return deterministic_scheduler(cfg, schedule, prediction_type or cfg.get("prediction_type", "epsilon"), clip_x0)


@torch.no_grad()
def scheduler_sample(
    unet: nn.Module,
    scheduler,
    n: int,
    steps: int,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``DDPMPipeline``'s loop (``randn_tensor`` noise, then ``scheduler.step``): (n, C, H, W) in model space.

    It is the loop of ``DistillationMethod.sample`` and of exported pipelines, so a checkpoint, its
    export and the teacher are sampled the same way from the same generator. A flow-map network (MeanFlow:
    a ``"timestep"`` class embedding, no class table) takes the interval as ``class_labels``, which this
    loop cannot pass: it is sampled with ``flow_map.flow_map_sample``, MeanFlow's own loop.

    ``unet`` is any denoiser :mod:`lightning_distill.backbones` supports, called through ``backbones.call``
    and shaped by ``backbones.sample_shape``: a UNet gets the scalar timestep as ``DDPMPipeline`` passes it;
    a transformer gets it expanded to the batch (``DiTPipeline``), keywords and a learned-sigma output
    mapped by its adapter. ``labels`` (n,) are the class labels of a class-conditional network (a DiT
    needs them). Text-conditional networks are refused: this loop has no prompts to give them.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from . import backbones
    from .errors import ConfigError
    from .flow_map import flow_map_sample, is_flow_map_unet
    from .sampling import at_steps

    if is_flow_map_unet(unet):
        if labels is not None:
            raise ValueError("a flow-map network is unconditional: its class input is the interval t - r")
        return flow_map_sample(unet, scheduler, n, steps, generator, device)

    if backbones.is_text_conditional(unet):
        raise ConfigError(
            f"{type(unet).__name__} is text-conditional: sampling for evaluation draws unconditional or "
            "class-conditional samples and has no prompt embeddings to pass"
        )
    shape = backbones.sample_shape(unet)
    # DDPMPipeline hands a UNet the scalar timestep (the UNet broadcasts it); the transformer pipelines
    # (DiTPipeline, ...) expand it to the batch first, and their models need the (B,) timestep.
    per_sample_t = not isinstance(backbones.backbone_for(unet), backbones.UNetBackbone)
    p = next(unet.parameters())
    device = torch.device(device) if device is not None else p.device
    scheduler = at_steps(scheduler, steps)  # flow schedulers: the trailing grid at every step count
    scheduler.set_timesteps(steps)
    x = randn_tensor((n, *shape), generator=generator, device=device)
    cond = {"class_labels": labels.to(device)} if labels is not None else {}
    with eval_mode(unet):
        for t in scheduler.timesteps:
            model_t = t.to(device)
            if per_sample_t:
                model_t = model_t.reshape(-1).expand(n)
            out = backbones.call(unet, x.to(p.dtype), model_t, **cond).float()
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def decode_latents(x: Tensor, vae: nn.Module | None) -> Tensor:
    """Model space -> images in [-1, 1]: identity for pixel models, VAE decode for latent ones: z / scaling_factor
    + shift_factor (SD3's VAE has a shift; the inverse of ``DiffusionTeacher.encode_images``)."""
    if vae is None:
        return x
    scale = float(getattr(vae.config, "scaling_factor", None) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    p = next(vae.parameters())
    return vae.decode((x.float() / scale + shift).to(p.dtype), return_dict=False)[0].float()


@torch.no_grad()
def sample_teacher(teacher, n: int, steps: int, generator: torch.Generator | None = None, labels: Tensor | None = None) -> Tensor:
    """Sample a :class:`~lightning_distill.teacher.DiffusionTeacher` with ``steps`` DDIM (eta = 0; flow: Euler) steps.

    Returns images in [-1, 1] (latent teachers are decoded by their VAE).

    Example::

        >>> x = sample_teacher(load_teacher("bundled:digits"), 16, 50, torch.Generator().manual_seed(0))
    """
    from .sampling import at_steps, deterministic_scheduler

    den = teacher.denoiser
    sched = deterministic_scheduler(teacher.scheduler_config, den.schedule, den.prediction_type, den.clip_x0)
    sched = at_steps(sched, steps, den.schedule)
    return decode_latents(scheduler_sample(teacher.unet, sched, n, steps, generator, labels), teacher.vae)


class GuidedNetwork:
    """A denoiser's network under classifier-free guidance as the stock text-to-image pipelines apply it:
    one batched call on (unconditional, conditional) keywords, then uncond + g (cond - uncond) on the raw output.

    :class:`~lightning_distill.methods.text.GuidedScore` guides the (x0, eps, v) prediction a training loss
    reads; a sampler's ``scheduler.step`` takes the raw output instead (eps, v or velocity), which is what
    ``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline`` guide. Both are linear in the output, so they
    agree up to rounding; this one keeps the pipelines' order of operations. It has the ``network`` call of
    :class:`~lightning_distill.parametrisation.Denoiser`, so :func:`~lightning_distill.sampling.text_to_image_loop`
    runs it.

    Args:
        denoiser: the teacher's denoiser.
        uncond: the text keywords of the unconditional prompt (batch 1; the pipelines' negative prompt "").
        guidance_scale: g, the pipelines' convention (g = 1: the conditional network).
    """

    def __init__(self, denoiser, uncond: dict, guidance_scale: float) -> None:
        self.denoiser, self.uncond, self.guidance_scale = denoiser, uncond, float(guidance_scale)

    def network(self, x_t: Tensor, model_t: Tensor, **cond) -> Tensor:
        n = x_t.shape[0]
        model_t = torch.as_tensor(model_t, device=x_t.device)
        model_t = model_t.expand(n) if model_t.ndim == 0 else model_t
        both = {k: torch.cat([self.uncond[k].to(v).expand(n, *v.shape[1:]), v]) for k, v in cond.items()}
        uncond, text = self.denoiser.network(torch.cat([x_t, x_t]), torch.cat([model_t, model_t]), **both).chunk(2)
        return uncond + self.guidance_scale * (text - uncond)


@torch.no_grad()
def sample_text_teacher(
    teacher, prompts: list[str], steps: int, generator: torch.Generator | None = None, guidance_scale: float = 1.0,
) -> Tensor:
    """Sample a text-to-image :class:`~lightning_distill.teacher.DiffusionTeacher`: one image per prompt.

    The sampler of :func:`sample_teacher` (DDIM, eta = 0, trailing; flow: Euler on the trailing grid) in the
    text pipelines' loop (:func:`~lightning_distill.sampling.text_to_image_loop`) with the prompts' keywords
    (``teacher.encode_prompts``, as the pipelines' ``encode_prompt``) and, for ``guidance_scale`` > 1,
    classifier-free guidance with the empty prompt as the unconditional one (:class:`GuidedNetwork`). The
    initial noise is ``randn_tensor`` from ``generator`` in float32, as every evaluated model draws it.

    Returns:
        (len(prompts), C, H, W) images in [-1, 1] (decoded by the teacher's VAE).
    """
    from diffusers.utils.torch_utils import randn_tensor

    from . import backbones
    from .sampling import at_steps, deterministic_scheduler, set_pipeline_steps, text_to_image_loop

    if guidance_scale < 1:
        raise ConfigError(f"guidance_scale must be >= 1 (1: no guidance, as the pipelines), got {guidance_scale}")
    den = teacher.denoiser
    device = next(teacher.unet.parameters()).device
    sched = deterministic_scheduler(teacher.scheduler_config, den.schedule, den.prediction_type, den.clip_x0)
    sched = set_pipeline_steps(at_steps(sched, steps, den.schedule), steps, den.schedule, device=device)  # Flux: its sigmas
    cond = {k: v.to(device) for k, v in teacher.encode_prompts(list(prompts)).items()}
    x = randn_tensor((len(prompts), *backbones.sample_shape(teacher.unet)), generator=generator, device=device,
                     dtype=torch.float32)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    net = den
    if guidance_scale != 1:
        net = GuidedNetwork(den, {k: v.to(device) for k, v in teacher.encode_prompts([""]).items()}, guidance_scale)
    with eval_mode(teacher.unet):
        x = text_to_image_loop(net, sched, x, generator, **cond)
    return decode_latents(x, teacher.vae)


@torch.no_grad()
def pipeline_sample(
    pipe, prompts: list[str], steps: int, generator: torch.Generator | None = None, guidance_scale: float = 1.0,
    max_sequence_length: int | None = None, **pipeline_kwargs,
) -> Tensor:
    """A stock text-to-image pipeline (``StableDiffusionPipeline``, ``StableDiffusion3Pipeline``,
    ``LatentConsistencyModelPipeline``, ``FluxPipeline``, ``SanaPipeline``) called as a user calls it, with
    ``output_type="latent"``: (n, C, h, w) latents.

    * The initial latents are drawn here, ``randn_tensor`` from ``generator`` in float32 (as the teacher and the
      checkpoints draw theirs), and passed as ``latents``: the values the pipeline draws itself from the same
      generator, which it then also receives for the scheduler's fresh noise (``LCMScheduler``).
    * ``FluxPipeline`` draws them as (n, C, h, w) too and packs them 2 x 2 (:func:`~lightning_distill.backbones.
      pack_latents`): they are passed packed, with the ``height`` / ``width`` they decode to (the pipeline's
      default is 1024 px whatever the network), and its packed output is unpacked. ``SanaPipeline`` gets the
      ``height`` / ``width`` too, and ``use_resolution_binning=False`` (as every pipeline with that option): it would
      look the size up in its aspect-ratio tables, which refuse a network ``sample_size`` outside 16 - 128 (a square
      size in them maps onto itself, so nothing else changes).
    * ``SanaPipeline`` steps the scheduler with the generator, as the framework's loop does.
    * ``StableDiffusion3Pipeline`` and ``FluxPipeline`` call ``scheduler.step`` without the generator, so a
      ``FlowMatchLCMScheduler``'s fresh noise would come from torch's global generator: for the call, the global
      CPU generator holds ``generator``'s state after the latents (what the framework's ``sample()`` draws from;
      CUDA's global generator is seeded from ``generator``'s seed), and the global state is restored afterwards.
    * A flow scheduler is rebuilt for ``steps`` by :func:`~lightning_distill.sampling.at_steps` (the trailing grid,
      as for unconditional flow folders; at an export's own step count it is the exported scheduler); a
      resolution-dependent one (Flux's ``use_dynamic_shifting``) with its shift at the network's token count, as
      the teacher's sampler (:func:`sample_text_teacher`) fixes it.

    ``guidance_scale``: the pipeline's (``FluxPipeline``: the embedded guidance of a guidance-distilled network);
    ``max_sequence_length``: the T5 prompt length of a pipeline with T5, ``SanaPipeline``'s Gemma2 length (None: the
    pipeline's default); ``pipeline_kwargs``: further keywords of the call (``SanaPipeline``'s
    ``complex_human_instruction``).
    ``pipe.vae`` decodes the result (:func:`decode_latents`: the pipelines' own decode, without their clamp to [0, 1]).
    """
    from diffusers.utils.torch_utils import randn_tensor

    from . import backbones
    from .parametrisation import FlowSchedule
    from .sampling import at_steps

    net = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    device = next(net.parameters()).device
    shape = (len(prompts), *backbones.sample_shape(net))
    latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    extra = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
    extra.update(pipeline_kwargs)
    if isinstance(backbones.backbone_for(net), (backbones.FluxBackbone, backbones.SanaBackbone)):
        extra.update(height=shape[-2] * pipe.vae_scale_factor, width=shape[-1] * pipe.vae_scale_factor)
    if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        extra["use_resolution_binning"] = False
    scheduler = pipe.scheduler
    schedule = None
    if scheduler.config.get("use_dynamic_shifting"):
        schedule = FlowSchedule.from_scheduler(scheduler, backbones.image_seq_len(net))
    pipe.scheduler = at_steps(scheduler, steps, schedule)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            if generator is not None and generator.device.type == "cpu":
                torch.set_rng_state(generator.get_state())
            if cuda and generator is not None:
                with torch.cuda.device(cuda[0]):
                    torch.cuda.manual_seed(generator.initial_seed())
            out = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                       latents=backbones.to_pipeline_layout(net, latents), generator=generator, output_type="latent",
                       return_dict=False, **extra)[0]
            return backbones.from_pipeline_layout(net, out, shape).float()
    finally:
        pipe.scheduler = scheduler


# --- generated feature sets, reproducible across ranks and batch sizes ---------------------------


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of chunk ``chunk``: each chunk of samples has its own generator, so the images do not depend
    on how chunks are split over ranks (chunk c of seed s never equals a chunk of another seed)."""
    return (int(seed) * 1_000_003 + int(chunk)) % (2**63 - 1)


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


@torch.no_grad()
def generated_features(
    sample_fn: Callable[[int, torch.Generator, Tensor | None], Tensor],
    net: nn.Module,
    n: int,
    seed: int = 0,
    chunk_size: int = 250,
    num_classes: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """Features of this rank's share of ``n`` generated images ((n_local, d) float64, CPU).

    Chunk c (images c*chunk_size ...) is sampled from ``chunk_seed(seed, c)`` by ``sample_fn(count,
    generator, labels)`` on rank ``c % world_size``; class-conditional models get labels ``i % num_classes``
    (balanced classes; a text-to-image evaluation passes the prompt count P, so image i gets prompt i % P,
    whatever the chunking). Every rank calls ``sample_fn`` equally often: a rank without a chunk in the last
    round draws one image and drops it, since under FSDP2 each network forward is a collective that every
    rank must join (with uneven counts the other ranks would wait forever).
    """
    feats = []
    chunks = chunk_bounds(n, chunk_size)
    for c in range(rank, -(-len(chunks) // world_size) * world_size, world_size):
        if c >= len(chunks):  # no chunk left for this rank: keep its network calls in step with the others
            sample_fn(1, torch.Generator().manual_seed(chunk_seed(seed, c)), torch.zeros(1, dtype=torch.long) if num_classes else None)
            continue
        a, b = chunks[c]
        gen = torch.Generator().manual_seed(chunk_seed(seed, c))
        labels = torch.arange(a, b) % num_classes if num_classes else None
        x = sample_fn(b - a, gen, labels)
        feats.append(extract_features(net, x, chunk_size, device))
    if not feats:
        return torch.zeros(0, net.num_features, dtype=torch.float64)
    return torch.cat(feats)



def merge_rank_features(per_rank: list[Tensor], n: int, chunk_size: int) -> Tensor:
    """Join the ranks' :func:`generated_features` (rank r holds chunks r, r + W, r + 2W, ...) back into
    chunk order: the rows one process would produce.

    The order matters: KID draws its subsets by row index, so rows joined rank by rank would give another
    KID for every world size (FD, a function of the mean and covariance, would not notice).

    Raises:
        ValueError: when a rank's row count is not that of its chunks.
    """
    world = len(per_rank)
    taken = [0] * world
    parts = []
    for c, (a, b) in enumerate(chunk_bounds(n, chunk_size)):
        r = c % world
        parts.append(per_rank[r][taken[r] : taken[r] + b - a])
        taken[r] += b - a
    have = [int(f.shape[0]) for f in per_rank]
    if have != taken:
        raise ValueError(f"rank row counts {have} do not match {n} images in chunks of {chunk_size}: expected {taken}")
    return torch.cat(parts)

__all__ = [
    "gaussian_stats",
    "frechet_distance",
    "fd_from_features",
    "kernel_distance",
    "InceptionFeatures",
    "inception_weights_path",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "get_feature_net",
    "feature_net_name",
    "fingerprint",
    "extract_features",
    "ReferenceStats",
    "reference_stats",
    "reference_key",
    "read_cache_entry",
    "default_cache_dir",
    "Score",
    "score_features",
    "ddim_scheduler_for",
    "scheduler_sample",
    "decode_latents",
    "sample_teacher",
    "GuidedNetwork",
    "sample_text_teacher",
    "pipeline_sample",
    "chunk_seed",
    "chunk_bounds",
    "generated_features",
    "merge_rank_features",
]
