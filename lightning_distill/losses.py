"""Reusable knowledge-distillation losses (Hinton et al. 2015; METHODS.md section 0), as pure functions.

* :func:`temperature_kd_loss`: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) for logits.
* :func:`pseudo_huber`: the one pseudo-Huber distance, its constant c and reduction chosen by the caller.
* :func:`regression_distance`: per-sample L2 / L1 / pseudo-Huber distance for regression outputs.
* :func:`denoising_loss`: the plain diffusion loss in a denoiser's own parametrisation.
* :func:`mixed_kd_loss`: alpha * d(student, hard) + (1 - alpha) * d(student, soft) for a denoiser.
* :func:`classifier_kd_loss`: alpha * CE(student, label) + (1 - alpha) * temperature KD, for logits.
* :func:`feature_kd_loss`: weighted distances between (projected) intermediate features.

Every loss that has more than one term returns a :class:`~lightning_distill.methods.base.LossOutput`
whose ``logs`` hold the terms, so a method logs them without recomputing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .parametrisation import Denoiser, target_for


@dataclass
class LossOutput:
    """A method's loss and the named terms it logs (each must be finite)."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


Distance = Literal["l2", "l1", "pseudo_huber"]
DISTANCES = ("l2", "l1", "pseudo_huber")
HuberReduction = Literal["mean", "sum", "elementwise"]
HUBER_REDUCTIONS = ("mean", "sum", "elementwise")


def temperature_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Classic KD loss: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch.

    The T^2 factor keeps the gradient size independent of T (the soft-target gradients scale as
    1 / T^2; Hinton et al. 2015, Sec. 2). At T = 1 this is the plain KL divergence.

    Args:
        student_logits: (B, K) logits of the student (gradients flow through these).
        teacher_logits: (B, K) logits of the teacher (treated as constants).
        temperature: T > 0; T > 1 flattens both distributions.

    Returns:
        A scalar: the sum over classes, mean over the batch.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    # kl_div(input=log q, target=log p) = sum p (log p - log q) = KL(p || q) with p = teacher.
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def pseudo_huber(pred: Tensor, target: Tensor, c: float, reduction: HuberReduction) -> Tensor:
    """Per-sample pseudo-Huber distance (Charbonnier; Song & Dhariwal 2023); returns shape (B,).

    With d = pred - target flattened to D elements per sample, ``reduction`` says where the square root
    goes (each method keeps the form and c of its reference code):

    * ``sum``: sqrt(||d||^2 + c^2) - c, improved consistency training (c = 0.00054 sqrt(D) there);
    * ``mean``: sqrt(||d||^2 / D + c^2) - c, the same on the root-mean-square, so c does not grow with D;
    * ``elementwise``: mean_i (sqrt(d_i^2 + c^2) - c), the diffusers LCM script's "huber" loss (c = 0.001).

    Quadratic (divided by 2c) where the distance is small against c, linear where it is large.
    """
    diff = (pred.float() - target.float()).flatten(1)
    if reduction == "sum":
        return (diff.pow(2).sum(1) + c**2).sqrt() - c
    if reduction == "mean":
        return (diff.pow(2).mean(1) + c**2).sqrt() - c
    if reduction == "elementwise":
        return ((diff.pow(2) + c**2).sqrt() - c).mean(1)
    raise ValueError(f"unknown pseudo-Huber reduction {reduction!r}; choose one of {HUBER_REDUCTIONS}")


def regression_distance(
    pred: Tensor, target: Tensor, distance: Distance = "l2", huber_c: float = 0.03
) -> Tensor:
    """Per-sample distance between two batches; returns shape (B,).

    ``l2``: mean squared error; ``l1``: mean absolute error; ``pseudo_huber``: :func:`pseudo_huber` with
    reduction ``mean``, sqrt(||a - b||^2 / D + c^2) - c, D the number of elements per sample.
    """
    if distance == "pseudo_huber":
        return pseudo_huber(pred, target, huber_c, "mean")
    diff = (pred.float() - target.float()).flatten(1)
    if distance == "l2":
        return diff.pow(2).mean(1)
    if distance == "l1":
        return diff.abs().mean(1)
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


def denoising_loss(
    denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, min_snr_gamma: float | None = None, **cond
) -> Tensor:
    """Per-batch denoising loss in the network's own parametrisation (Ho et al. 2020, Eq. 14).

    Optional Min-SNR-gamma weighting (Hang et al. 2023) when ``min_snr_gamma`` is given.
    """
    sched = denoiser.schedule
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    x_t = sched.add_noise(x0, eps, t)
    out = denoiser.raw(x_t, t, **cond).float()
    target = target_for(denoiser.prediction_type, x0, eps, alpha, sigma)
    per_sample = F.mse_loss(out, target, reduction="none").flatten(1).mean(1)
    if min_snr_gamma is not None:
        snr = sched.snr(t)
        w = snr.clamp(max=min_snr_gamma)
        # Min-SNR weights are defined for x0-loss; divide by what the parametrisation already implies.
        implied = {
            "epsilon": snr, "sample": torch.ones_like(snr), "v_prediction": snr + 1,
            "flow_prediction": (snr.sqrt() + 1) ** 2,  # x0 = x_s - s u: the u-error is the x0-error over s
        }[denoiser.prediction_type]
        per_sample = per_sample * w / implied
    return per_sample.mean()


def mixed_kd_loss(
    pred: Tensor, hard: Tensor, soft: Tensor | None, alpha: float, distance: Distance = "l2"
) -> LossOutput:
    """alpha * d(pred, hard) + (1 - alpha) * d(pred, soft) (METHODS.md section 0).

    Args:
        pred: the student's output.
        hard: the ground-truth target (true eps / x0 / v for a denoiser).
        soft: the teacher's output on the same input, in the student's parametrisation. May be None
            only when ``alpha == 1`` (then the teacher need not run at all).
        alpha: weight of the hard term, in [0, 1]. 1: hard labels only; 0: soft labels only.
        distance: see :func:`regression_distance`.

    Returns:
        LossOutput with ``logs`` = {"hard", "soft" (when computed), "kd"}.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if soft is None and alpha < 1.0:
        raise ValueError(f"alpha = {alpha} < 1 needs the teacher's soft target")
    logs: dict[str, Tensor] = {}
    loss = pred.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        hard_term = regression_distance(pred, hard, distance).mean()
        logs["hard"] = hard_term.detach()
        loss = loss + alpha * hard_term
    if soft is not None and alpha < 1:
        soft_term = regression_distance(pred, soft.detach(), distance).mean()
        logs["soft"] = soft_term.detach()
        loss = loss + (1 - alpha) * soft_term
    logs["kd"] = loss.detach()
    return LossOutput(loss, logs)


def classifier_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float, alpha: float
) -> LossOutput:
    """alpha * CE(z_s, label) + (1 - alpha) * T^2 KL(softmax(z_t / T) || softmax(z_s / T)).

    The hard term uses the temperature-1 student logits, as in Hinton et al. 2015.

    Returns:
        LossOutput with ``logs`` = {"ce" (when alpha > 0), "kl", "loss"}.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    logs: dict[str, Tensor] = {}
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        if labels is None:
            raise ValueError(f"alpha = {alpha} > 0 needs hard labels")
        ce = F.cross_entropy(student_logits.float(), labels)
        logs["ce"] = ce.detach()
        loss = loss + alpha * ce
    kl = temperature_kd_loss(student_logits, teacher_logits, temperature)
    logs["kl"] = kl.detach()
    if alpha < 1:
        loss = loss + (1 - alpha) * kl
    logs["loss"] = loss.detach()
    return LossOutput(loss, logs)


def match_spatial(feature: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a (B, C, H, W) feature map to ``size`` (area-average down, bilinear up); no-op if equal."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


def feature_kd_loss(
    student_features: Mapping[str, Tensor],
    teacher_features: Mapping[str, Tensor],
    weights: Mapping[str, float],
    projections: Mapping[str, nn.Module] | None = None,
    distance: Distance = "l2",
) -> LossOutput:
    """Sum over named blocks of weight * d(proj(student feature), teacher feature) (FitNets-style hints).

    Args:
        student_features, teacher_features: feature maps keyed by the same (student) block name.
        weights: per-block weight; blocks with weight 0 are skipped.
        projections: per-block module mapping student width to teacher width (1x1 conv); missing
            entries mean identity. Student maps are resized to the teacher's spatial size if needed.
        distance: see :func:`regression_distance`.

    Returns:
        LossOutput with one ``feat/<name>`` log per block.
    """
    projections = projections or {}
    logs: dict[str, Tensor] = {}
    loss = None
    for name, w in weights.items():
        if w == 0:
            continue
        if name not in student_features or name not in teacher_features:
            raise KeyError(f"feature block {name!r} was not captured (student: {sorted(student_features)}, "
                           f"teacher: {sorted(teacher_features)})")
        s, t = student_features[name], teacher_features[name].detach()
        if name in projections:
            s = projections[name](s)
        s = match_spatial(s, t.shape[-2:])
        term = regression_distance(s, t, distance).mean()
        logs[f"feat/{name}"] = term.detach()
        loss = w * term if loss is None else loss + w * term
    if loss is None:
        loss = torch.zeros(())
    return LossOutput(loss, logs)


__all__ = [
    "DISTANCES",
    "Distance",
    "HUBER_REDUCTIONS",
    "HuberReduction",
    "NonFiniteLossError",
    "check_finite",
    "classifier_kd_loss",
    "denoising_loss",
    "feature_kd_loss",
    "match_spatial",
    "mixed_kd_loss",
    "pseudo_huber",
    "regression_distance",
    "temperature_kd_loss",
]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; training stops and the last good checkpoint is kept."""


def check_finite(out: LossOutput, step: int) -> None:
    terms = {"loss": out.loss, **out.logs}
    for name, value in terms.items():
        value = torch.as_tensor(value)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteLossError(f"non-finite value in loss term {name!r} at global step {step}: {value.item()}")
