"""Adversarial diffusion distillation, ADD (Sauer et al. 2023, arXiv 2311.17042).

The student (initialised from the teacher) denoises real images noised to one of 1-4 fixed timesteps
in one step. Two losses train it (Sec. 3.2, Eq. 1-5):

* adversarial: a discriminator made of a frozen feature network with small trainable heads on several
  of its layers (DINOv2 in the paper; here pluggable, the teacher UNet's encoder by default), hinge
  loss, R1 penalty on real images;
* distillation: re-noise the student output x_theta to a random t, let the frozen teacher denoise it,
  and regress x_theta onto that (stop-gradient) with weight c(t) = alpha_t (Eq. 4).

Total generator loss L = L_adv + lambda L_distill, lambda = 2.5 (paper). The paper has no released
training code; METHODS.md section 4 marks the details as unconfirmed.

Notation (paper -> code):

==========================  ====================================================
tau_1..tau_n (student t)    ``student_timesteps`` (the x0 sampler's grid of ``num_student_steps``)
x_s (noised real input)     ``x_t`` in :meth:`AdversarialDiffusionDistillation.generate`
x_theta(x_s, s)             the student's x0 estimate (``Generated.x``)
t, x_theta,t (re-noised)    ``s``, ``x_s`` in :func:`add_distillation_loss`
psi (teacher)               ``teacher.denoiser``
c(t), lambda                ``distill_weighting``, ``distill_weight``
==========================  ====================================================

Sampling: the student's input at every timestep during training is a real image noised with fresh
Gaussian noise, so the sampler must feed it the same kind of input: each step takes the student's x0
estimate and re-noises it with fresh noise to the next timestep (consistency-model multistep sampling),
which is what the stock ``LCMScheduler`` does. Its grid with ``original_inference_steps =
num_student_steps`` is exactly the student timesteps, and fewer sampling steps visit a subset of them;
``timestep_scaling`` is set so high that its boundary scalings are the identity (c_skip < 3e-7), so the
student's x0 is used as is. The exported pipeline is a plain DDPMPipeline + LCMScheduler. On a
flow-matching teacher it is ``FlowMatchLCMScheduler`` (x0 = x_s - s u, then (1 - s') x0 + s' eps): the
student timesteps are the levels it visits at K steps (:func:`~lightning_distill.sampling.generator_timesteps`:
s = 1, (K-1)/K, ..., 1/K without a shift); N < K steps visit a subset of them when N divides K (no shift). (Deterministic
DDIM re-noising instead reuses the student's own noise estimate, an input the student never saw in
training: on digits it made 2- and 4-step samples worse than 1-step ones, FD 1.61 / 2.78 against
0.67 / 0.42 with fresh noise for the same weights.)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..gan.discriminators import Discriminator
from ..gan.features import denoiser_features
from ..parametrisation import Denoiser
from ..sampling import X0_SAMPLER_TIMESTEP_SCALING, backward_simulation, generator_timesteps, lcm_scheduler
from ..teacher import DiffusionTeacher
from .adversarial import AdversarialMethod, Generated
from .base import LossOutput
from .text import TextToImageMixin

Weighting = Literal["alpha", "constant", "alpha_squared"]


def distillation_weight(alpha: Tensor, weighting: Weighting) -> Tensor:
    """c(t) of ADD Eq. 4: ``"alpha"`` = alpha_t (the paper's choice), ``"alpha_squared"``, or 1."""
    if weighting == "alpha":
        return alpha
    if weighting == "alpha_squared":
        return alpha**2
    if weighting == "constant":
        return torch.ones_like(alpha)
    raise ConfigError(f"unknown distill_weighting {weighting!r}; choose 'alpha', 'alpha_squared' or 'constant'")


def add_distillation_loss(
    x0_student: Tensor,
    teacher: Denoiser,
    s: Tensor,
    eps: Tensor,
    weighting: Weighting = "alpha",
    **cond,
) -> Tensor:
    """ADD distillation loss (Eq. 4): E c(s) || x_theta - stopgrad(x_psi(alpha_s x_theta + sigma_s eps, s)) ||^2.

    The squared error is averaged over pixels, weighted per sample, then averaged over the batch.
    Gradient reaches ``x0_student`` only through the first term (the target is under stop-gradient).
    """
    sched = teacher.schedule
    with torch.no_grad():
        x_s = sched.add_noise(x0_student.detach(), eps, s)
        target = teacher(x_s, s, **cond).x0.to(x0_student.dtype)
    per_sample = F.mse_loss(x0_student, target, reduction="none").flatten(1).mean(1)
    return (distillation_weight(sched.alpha(s), weighting) * per_sample).mean()


class AdversarialDiffusionDistillation(TextToImageMixin, AdversarialMethod):
    """ADD: a 1-4 step student trained by an adversarial loss on frozen features plus teacher distillation.

    Args:
        num_student_steps: number of fixed student timesteps: t_n = n (T // K) - 1, n = 1..K (for
            T = 1000, K = 4: 999, 749, 499, 249, the paper's), the grid the sampler visits (flow
            teachers: s = n / K without a shift; ``sampling.generator_timesteps``).
        feature_network: frozen feature network of the discriminator: any module mapping
            ``(x, t=None, **cond)`` to a list of feature tensors (``ModuleFeatures`` wraps ordinary
            networks, e.g. the digits classifier; ``HFVisionFeatures`` loads DINOv2 from a local folder).
            None: the teacher's own network at timestep ``feature_timestep``: a UNet's encoder, a
            transformer's blocks (their image tokens as maps; :func:`~lightning_distill.gan.features.denoiser_features`).
        feature_levels: teacher levels: a UNet's down block indices (-1 = mid block), a transformer's
            block indices (-1 = last block); None: all.
        feature_timestep: timestep at which the teacher encoder looks at (clean) images (fed to it as
            ``schedule.model_timestep``: s * T on a flow teacher).
        train_features: train the discriminator's backbone too: a trainable copy of the teacher UNet
            (as APT's discriminator) instead of the frozen encoder. Not the paper's ADD (its feature
            network is frozen); for small data where a frozen network's heads lose to the generator.
            Only with ``feature_network=None``.
        discriminator_t_range: ``[lo, hi]``: the discriminator sees real and fake images noised to a
            random t in that range (one t and one noise draw per sample, shared by the real, fake and
            R1 evaluations of a step), and the teacher encoder gets that t, as LADD's discriminator
            (arXiv 2403.12015) does; None: clean images at ``feature_timestep`` (ADD).
        head_hidden: width of the discriminator heads.
        spatial_logits: one logit per feature position (as ADD's heads) instead of one per head.
        distill_weight: lambda (2.5 in the paper).
        distill_weighting: c(t).
        backward_simulation: probability that a sample drawn at a later student timestep (not the
            first, pure-noise one) gets as input what the sampler gives it, the student's own earlier
            steps from pure noise re-noised with fresh noise (DMD2's backward simulation, no gradient
            through them), instead of a noised real image. Not in the ADD paper (0, its setting);
            1.0 trains the later steps only on the inputs they see at sampling time, so they learn to
            correct the earlier steps' errors rather than to denoise real images.
        r1_weight: as :class:`AdversarialMethod` (here 1e-2).
        sample_steps: steps of logged grids and ``predict`` (None: ``num_student_steps``).
        sample_prompt: text-conditional (SD3) teachers: the prompt of logged grids (:class:`TextToImageMixin`:
            student, teacher and the teacher-feature discriminator get the batch's prompt keywords;
            ``StableDiffusion3Pipeline`` export).
        **kwargs: :class:`AdversarialMethod`'s and :class:`DistillationMethod`'s arguments.

    The discriminator is class-conditional (projection) when the student is; on a text teacher its heads
    are conditioned (projection) on the pooled text embedding, when the teacher has one (SD3). The
    distillation loss re-noises to any t in [0, T - 1].

    Example::

        >>> dm = TeacherDataModule("bundled:digits")
        >>> model = AdversarialDiffusionDistillation(dm.teacher, num_student_steps=2)
        >>> L.Trainer(max_steps=2000, callbacks=[EMA(0.999)]).fit(model, dm)
    """

    hparams_ignore = AdversarialMethod.hparams_ignore + ("feature_network",)

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        num_student_steps: int = 4,
        feature_network: nn.Module | None = None,
        feature_levels: list[int] | None = None,
        feature_timestep: int = 0,
        train_features: bool = False,
        discriminator_t_range: tuple[int, int] | None = None,
        head_hidden: int = 64,
        spatial_logits: bool = True,
        distill_weight: float = 2.5,
        distill_weighting: Weighting = "alpha",
        backward_simulation: float = 0.0,
        r1_weight: float = 1e-2,
        sample_steps: int | None = None,
        sample_prompt: str = "",
        **kwargs,
    ) -> None:
        distillation_weight(torch.ones(1), distill_weighting)  # validates the choice
        if not 0.0 <= backward_simulation <= 1.0:
            raise ConfigError(f"backward_simulation is a probability in [0, 1], got {backward_simulation}")
        if not 1 <= num_student_steps <= 8:
            raise ConfigError(f"ADD uses 1-4 (at most 8) student timesteps, got {num_student_steps}")
        sample_steps = sample_steps or num_student_steps
        super().__init__(teacher=teacher, r1_weight=r1_weight, sample_steps=sample_steps, **kwargs)
        if self.teacher is None:
            raise ConfigError("AdversarialDiffusionDistillation needs a teacher (set data.teacher)")
        T = self.student.schedule.num_train_timesteps
        self.register_buffer("student_timesteps", generator_timesteps(self.student.schedule, num_student_steps), persistent=False)
        if discriminator_t_range is not None:
            lo, hi = (int(v) for v in discriminator_t_range)
            if not 0 <= lo <= hi < T:
                raise ConfigError(f"discriminator_t_range must satisfy 0 <= lo <= hi < {T}, got {list(discriminator_t_range)}")
        teacher_features = feature_network is None
        feature_timestep = self.teacher.schedule.model_timestep(torch.tensor(feature_timestep)).item()
        if train_features:
            if not teacher_features:
                raise ConfigError("train_features=True trains a copy of the teacher network: leave feature_network unset")
            feature_network = denoiser_features(self.teacher.unet, feature_levels, feature_timestep, mode="copy")
        elif teacher_features:  # frozen: the teacher's own network, not registered as a submodule
            feature_network = denoiser_features(self.teacher.unet, feature_levels, feature_timestep)
        else:
            feature_network.requires_grad_(False)
        text = self.discriminator_probe_cond()  # a text teacher's keywords of "" (None otherwise)
        pooled = (text or {}).get("pooled_projections")
        self.discriminator = Discriminator(
            feature_network,
            self.sample_shape,
            hidden=head_hidden,
            spatial=spatial_logits,
            num_classes=self.num_classes,
            cond_dim=None if pooled is None else int(pooled.shape[-1]),
            # a conditional teacher network needs the labels (text keywords) too
            backbone_cond=teacher_features and (self.teacher.num_classes is not None or self.text_conditional),
            probe_cond=text if teacher_features else None,
        )
        # the frozen teacher's network is not registered in the feature wrapper: its parameters come from the teacher
        read = self.teacher.unet if teacher_features and not train_features else feature_network
        backbone_dtype = next(iter(read.parameters()), torch.empty(0)).dtype
        if self.hparams.r1 == "approx" and backbone_dtype != torch.float32:
            # E(D(x) - D(x + sigma n))^2 is ~sigma^2 ||grad D||^2: a reduced-precision backbone's rounding floor
            # (bf16: ~2.5e-8) swamps it (1,650x the float32 value at sigma 1e-4)
            raise ConfigError(
                f"r1: approx measures D's change under noise of std r1_sigma = {self.hparams.r1_sigma}, below the rounding "
                f"of the {backbone_dtype} teacher network the discriminator reads: use r1: true, a float32 teacher "
                "(data.teacher_dtype) or train_features: true (a float32 copy)"
            )
        self.make_scheduler()  # fail at construction if LCMScheduler cannot express the teacher's schedule

    def make_scheduler(self):
        """Stock ``LCMScheduler`` (flow: ``FlowMatchLCMScheduler``): the student's x0, re-noised with fresh
        noise, at the student timesteps."""
        return lcm_scheduler(self, self.student_timesteps.numel(), X0_SAMPLER_TIMESTEP_SCALING)

    def max_sample_steps(self) -> int:
        """K: more steps would visit timesteps the student was not trained at (``LCMScheduler`` refuses
        them itself; ``FlowMatchLCMScheduler`` has no such limit, so it is stated here for both paths)."""
        return self.student_timesteps.numel()

    # --- AdversarialMethod hooks ---------------------------------------------------------------

    def generate(self, batch: dict, gen: torch.Generator) -> Generated:
        """x_theta(x_s, s): real images noised to a random student timestep, denoised in one step (unclamped x0)."""
        x = batch["x"]
        idx = torch.randint(0, self.student_timesteps.numel(), (x.shape[0],), generator=gen, device=x.device)
        t = self.student_timesteps[idx]
        eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x_t = self.student.schedule.add_noise(x, eps, t)
        cond = self.network_cond(batch)
        if self.hparams.backward_simulation > 0:
            x_t = self._backward_simulated(x_t, idx, cond, gen)
        return Generated(self.student(x_t, t, clip=False, **cond).x0, self._labels(batch), cond)

    def _backward_simulated(self, x_t: Tensor, idx: Tensor, cond: dict, gen: torch.Generator) -> Tensor:
        """Replace the inputs of a ``backward_simulation`` fraction of the later-step samples by sampler states.

        A sample at grid index i > 0 gets, with that probability, the state the sampler reaches after
        the student's own first i steps from pure noise (``sampling.backward_simulation``, fresh noise
        between steps, no gradient). Random draws come from ``gen``, so resumed runs repeat them.
        """
        pick = torch.rand(idx.shape, generator=gen, device=idx.device) < self.hparams.backward_simulation
        z = torch.randn(x_t.shape, generator=gen, device=x_t.device, dtype=x_t.dtype)
        x_t = x_t.clone()
        with torch.no_grad():
            for i in range(1, self.student_timesteps.numel()):
                rows = (pick & (idx == i)).nonzero().flatten()
                if rows.numel():
                    rows_cond = {k: v[rows] for k, v in cond.items()}
                    x_t[rows] = backward_simulation(self.student, z[rows], self.student_timesteps, i, rng=gen, **rows_cond)
        return x_t

    def discriminator_t_range(self) -> tuple[int, int] | None:
        t_range = self.hparams.discriminator_t_range
        return None if t_range is None else (int(t_range[0]), int(t_range[1]))

    def generator_extra_loss(self, fake: Generated, batch: dict, gen: torch.Generator) -> LossOutput | None:
        x0 = fake.x
        T = self.student.schedule.num_train_timesteps
        s = torch.randint(0, T, (x0.shape[0],), generator=gen, device=x0.device)
        eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        if self.hparams.distill_weight == 0:  # LADD: no teacher pass (the draws above keep the random stream)
            return None
        distill = add_distillation_loss(
            x0, self.teacher.denoiser, s, eps, self.hparams.distill_weighting, **fake.cond
        )
        return LossOutput(self.hparams.distill_weight * distill, {"distill": distill.detach()})


__all__ = ["AdversarialDiffusionDistillation", "add_distillation_loss", "distillation_weight"]
