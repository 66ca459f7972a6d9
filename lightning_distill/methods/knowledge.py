"""Knowledge distillation of a denoiser into a smaller one (Hinton et al. 2015; METHODS.md section 0).

The student is any diffusers UNet the user configures (fewer channels or blocks) and samples with the
same sampler and step count as the teacher. At a noisy input x_t = alpha_t x + sigma_t eps:

* hard label: the true target of the student's parametrisation, ``target_for(kind, x, eps)``;
* soft label: the teacher's prediction at the same (x_t, t), in the student's parametrisation
  (the :class:`~lightning_distill.parametrisation.Denoiser` converts);
* loss = alpha * d(student, hard) + (1 - alpha) * d(student, soft) + sum_b w_b d(P_b f_s^b, f_t^b),
  the last term matching named intermediate blocks (feature KD as in BK-SDM / FitNets), with a
  learned 1x1 convolution P_b from student to teacher width wherever the widths differ.

On a flow-matching teacher (x_s = (1 - s) x + s eps) nothing changes: the student defaults to the
teacher's prediction type, the velocity u = eps - x (``flow_prediction``), so the hard label is eps - x
and the soft label the teacher's velocity, and it samples with the same number of flow Euler steps.

Block names are ``named_modules`` paths of the diffusers UNet, e.g. ``mid_block``, ``down_blocks.1``,
``up_blocks.0``. A block's feature is its output (the first element when a block returns a tuple, as
diffusers down blocks return (hidden_states, skip_states)), read through the package's one forward-hook
grabber, :class:`~lightning_distill.nn_utils.FeatureTap`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import Distance, feature_kd_loss, mixed_kd_loss
from ..nn_utils import FeatureTap
from ..parametrisation import Denoiser, PredictionType, target_for
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput
from .text import TextToImageMixin


def kd_targets(
    teacher: Denoiser, student_kind: PredictionType, x0: Tensor, eps: Tensor, t: Tensor, **cond
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, hard, soft) for one batch; the teacher runs without gradients.

    The soft label is the teacher's prediction without the x0 clipping the Denoiser may apply
    (``clip=False``): diffusers' DDIM sampler uses the raw output for eps, so the unclipped prediction is
    the function the teacher actually samples with.
    """
    sched = teacher.schedule
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    x_t = sched.add_noise(x0, eps, t)
    hard = target_for(student_kind, x0, eps, alpha, sigma)
    with torch.no_grad():
        soft = teacher(x_t, t, clip=False, **cond).get(student_kind)
    return x_t, hard, soft


class KnowledgeDistillation(TextToImageMixin, DistillationMethod):
    """Compress the teacher into a smaller student UNet with hard, soft and feature targets.

    Args:
        alpha: weight of the hard label; 1 = plain diffusion training, 0 = soft labels only.
        distance: d(., .) of the output terms (and of the feature terms).
        feature_weights: per-block weights of feature KD, keyed by the student's block path
            (e.g. ``{"mid_block": 1.0}``); empty: no feature KD.
        feature_teacher_blocks: the teacher block each student block is matched to, where the paths
            differ (e.g. a student with fewer blocks); default: the same path.
        sample_steps: steps of logged grids and ``predict`` (the teacher's sampler, so as many as it needs).
        sample_prompt: text-conditional (SD3) teachers: the prompt of logged grids; student and teacher see
            the batch's prompt keywords (:class:`~lightning_distill.methods.text.TextToImageMixin`: also
            the ``StableDiffusion3Pipeline`` export). Feature KD is for UNet blocks (B, C, H, W) only.
        **kwargs: :class:`DistillationMethod`'s arguments: ``student`` (the smaller UNet, e.g. a
            ``diffusers.UNet2DModel`` with fewer channels; None: a copy of the teacher, self-distillation),
            ``optimizer`` (it covers the student and the projections), ``seed``, ...

    Example::

        >>> small = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), ...)
        >>> model = KnowledgeDistillation(teacher, student=small, alpha=0.5, feature_weights={"mid_block": 0.1})
    """

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        alpha: float = 0.5,
        distance: Distance = "l2",
        feature_weights: dict[str, float] | None = None,
        feature_teacher_blocks: dict[str, str] | None = None,
        sample_steps: int = 50,
        sample_prompt: str = "",
        **kwargs,
    ) -> None:
        if teacher is None:
            raise ConfigError("KnowledgeDistillation needs a teacher (set data.teacher)")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
        super().__init__(teacher=teacher, sample_steps=sample_steps, **kwargs)
        self.feature_weights = {k: float(w) for k, w in (feature_weights or {}).items() if w}
        if self.feature_weights and self.text_conditional and type(self.student.unet).__name__ != "UNet2DConditionModel":
            # transformer blocks return token sequences (and text tokens first): no (B, C, H, W) map to project
            raise ConfigError(
                f"feature KD matches UNet feature maps; a {type(self.student.unet).__name__} student has none: "
                "leave feature_weights empty"
            )
        unknown = set(feature_teacher_blocks or {}) - set(self.feature_weights)
        if unknown:
            raise ConfigError(f"feature_teacher_blocks names {sorted(unknown)}, which have no entry in feature_weights")
        self.student_tap = self.teacher_tap = None
        if self.feature_weights:
            teacher_paths = {k: (feature_teacher_blocks or {}).get(k, k) for k in self.feature_weights}
            self.student_tap = _tap(self.student.unet, list(self.feature_weights), "feature_weights (student blocks)")
            self.teacher_tap = _tap(self.teacher.unet, teacher_paths, "feature_teacher_blocks (teacher blocks)")
        self.projections = nn.ModuleDict(self._build_projections())

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ModuleDict keys may not contain dots

    @torch.no_grad()
    def _build_projections(self) -> dict[str, nn.Module]:
        """1x1 convolutions student width -> teacher width, sized by one dry forward pass of each net."""
        if not self.feature_weights:
            return {}
        x = torch.zeros(1, *self.sample_shape, device=next(self.student.parameters()).device)
        t = torch.full((1,), self.student.schedule.num_train_timesteps // 2, device=x.device)
        cond = {"class_labels": torch.zeros(1, dtype=torch.long)} if self.is_class_conditional else {}

        def dry(net: nn.Module, dtype: torch.dtype) -> dict:  # a text UNet's call needs text states (any values)
            width = dict(getattr(net, "config", None) or {}).get("cross_attention_dim")
            if not self.text_conditional or not isinstance(width, int):
                return cond
            return {**cond, "encoder_hidden_states": torch.zeros(1, 1, width, device=x.device, dtype=dtype)}

        with self.student_tap:
            self.student.raw(x, t, **dry(self.student.unet, x.dtype))
        dtype = next(self.teacher.parameters()).dtype
        with self.teacher_tap:
            self.teacher.denoiser.raw(x.to(dtype), t, **dry(self.teacher.unet, dtype))
        projections = {}
        for name in self.feature_weights:
            c_s, c_t = self.student_tap.features[name].shape[1], self.teacher_tap.features[name].shape[1]
            if c_s != c_t:
                projections[self._key(name)] = nn.Conv2d(c_s, c_t, kernel_size=1)
        self._drop_features()
        return projections

    def _drop_features(self) -> None:
        """Release the tapped activations (the taps keep their last features until the next ``with``)."""
        self.student_tap.features.clear()
        self.teacher_tap.features.clear()

    def trainable_parameters(self):
        return super().trainable_parameters() + list(self.projections.parameters())

    def compute_loss(self, batch: dict) -> LossOutput:
        x0 = batch["x"]
        alpha = self.hparams.alpha
        t = torch.randint(0, self.student.schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        if self.text_conditional:
            cond = self.text_cond(batch)
        else:
            cond = {"class_labels": batch["label"]} if self.is_class_conditional else {}
        need_teacher = alpha < 1 or bool(self.feature_weights)
        if need_teacher:
            with self.teacher_tap or nullcontext():
                x_t, hard, soft = kd_targets(self.teacher.denoiser, self.student.prediction_type, x0, eps, t, **cond)
        else:  # alpha = 1 without feature KD is plain diffusion training: skip the teacher pass
            sched = self.student.schedule
            x_t = sched.add_noise(x0, eps, t)
            hard, soft = target_for(self.student.prediction_type, x0, eps, sched.alpha(t), sched.sigma(t)), None
        with self.student_tap or nullcontext():
            pred = self.student.raw(x_t, t, **cond).float()
        out = mixed_kd_loss(pred, hard, soft if alpha < 1 else None, alpha, self.hparams.distance)
        loss, logs = out.loss, dict(out.logs)
        if self.feature_weights:
            proj = {n: self.projections[self._key(n)] for n in self.feature_weights if self._key(n) in self.projections}
            feat = feature_kd_loss(
                self.student_tap.features, self.teacher_tap.features, self.feature_weights, proj, self.hparams.distance
            )
            loss = loss + feat.loss
            logs.update(feat.logs)
            logs["feat"] = feat.loss.detach()
            self._drop_features()
        logs["loss"] = loss.detach()
        return LossOutput(loss, logs)


def _tap(network: nn.Module, names, argument: str) -> FeatureTap:
    """A :class:`FeatureTap` whose unknown-block error also names the argument that asked for the block."""
    try:
        return FeatureTap(network, names)
    except ValueError as err:
        raise ConfigError(f"KnowledgeDistillation {argument}: {err}") from None


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a network (for the "student <= half the teacher" check)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["KnowledgeDistillation", "kd_targets", "count_parameters"]
