"""Distribution matching distillation, DMD2 (Yin et al. 2024, arXiv 2405.14867): one-step students.

A generator G (initialised from the teacher) maps noise to images in one (or K) steps. Its gradient is
the difference of two scores at a noised generator sample: the frozen teacher ("real score") and a
trainable copy of the teacher that tracks the generator's own distribution ("fake score"), trained by
the ordinary denoising loss on stop-gradient generator samples. Optionally a small classifier on the
fake-score network's bottleneck features adds a GAN term that sees real data (DMD2, Sec. 4.2), which is
what lets the student beat its teacher.

Notation (paper -> code):

=========================================  =============================================
G_theta(z), one step from pure noise       ``generate``: x0 of ``student`` at (z, T-1), unclipped
mu_real(x_t, t) / mu_fake(x_t, t)          ``teacher.denoiser(x_t, t).x0`` / ``fake_score(...).x0``
p_real = x - mu_real(x_t)                  ``x - x0_real``
grad = (p_real - p_fake) / mean|p_real|    :func:`dm_gradient`   (DMD, Eq. 7-8; DMD2, Sec. 4)
0.5 ||x - sg(x - grad)||^2                 :func:`dm_surrogate_loss`
fake-score loss                            :func:`~lightning_distill.methods.diffusion.denoising_loss`
two time-scale update rule (TTUR)          ``fake_updates_per_generator`` (paper: 5)
=========================================  =============================================

Why (p_real - p_fake) is the gradient of the KL: with score s(x_t) = -(x_t - alpha_t mu(x_t)) / sigma_t^2,
s_real - s_fake = alpha_t (mu_real - mu_fake) / sigma_t^2, and d KL / d x = -w_t (s_real - s_fake) * alpha_t
is proportional to (mu_fake - mu_real) = p_real - p_fake; the per-sample division by mean|p_real|
replaces the weight w_t (DMD, Eq. 8), which makes the step size independent of t.

One iteration (one batch, manual optimisation): critic update(s) first (fake-score denoising loss
+ weighted GAN D loss), then, on iterations W, W + N, W + 2N, ... (N = ``fake_updates_per_generator``,
W = ``critic_warmup``, default 0), one
generator update; after S iterations the generator has had ceil(S / N) updates (tested).

Step counting: ``trainer.global_step`` counts iterations, not optimiser steps. Lightning counts every
``LightningOptimizer.step`` call, so only the last update of an iteration is stepped that way; the
others go through the same ``strategy.optimizer_step`` path (precision plugin,
``on_before_optimizer_step`` hooks) uncounted. ``max_steps``, checkpoint intervals and the EMA
callback therefore read "iterations" (``AdversarialMethod`` instead lets ``global_step`` count every
optimiser step); ``gan_iteration`` (a checkpointed buffer) counts them too.

Randomness of an iteration is drawn from a generator seeded by ``(seed, gan_iteration)``, so a run
resumed from a checkpoint draws the same noise as an uninterrupted one (tested).

Discriminator schedule: when an :class:`~lightning_distill.methods.adversarial.AdversarialSchedule`
callback is attached (``callbacks/discriminator.py``'s ``DiscriminatorSchedule``), its
``plan(iteration)`` replaces the fixed TTUR: ``d_updates`` critic updates, the generator updates when
``update_g``, ``r1_scale`` multiplies ``r1_weight`` (approximated R1 on real data), ``d_lr_scale``
scales the head's learning rate and ``train_d_backbone=False`` keeps the GAN loss out of the fake-score
UNet (the head alone learns it; the fake score keeps its denoising loss). For example
``DiscriminatorSchedule(d_updates_per_g=5)`` takes 5 critic updates and 1 generator update per batch.

Multi-step generators (``generator_steps`` K > 1) move between their steps as the paper does: the x0
estimate at t_i is re-noised with fresh noise to t_{i+1}, in training (:func:`backward_simulation`) and
in the exported sampler (a stock ``LCMScheduler`` whose boundary scalings are the identity).

Not in this file (differences from the paper): no classifier-free guidance on the real score (the
digits teacher is unconditional).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..export import load_student_state
from ..parametrisation import Denoiser, PredictionType, VPSchedule
from ..teacher import DiffusionTeacher
from .adversarial import (
    DiscriminatorAugment,
    StepPlan,
    approx_r1_penalty,
    attached_schedule,
    capture_features,
    check_augment_policy,
    frozen,
    iteration_generator,
    load_init_state,
    ns_d_loss,
    ns_g_loss,
    remember_initial_lr,
    unclipped_x0,
)
from .base import DistillationMethod, LossOutput, check_finite, default_optimizer
from ..sampling import X0_SAMPLER_TIMESTEP_SCALING, backward_simulation, generator_timesteps, lcm_scheduler
from .diffusion import denoising_loss

# --- maths (pure functions) ----------------------------------------------------------------------


def dm_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-6) -> Tensor:
    """The distribution-matching gradient of DMD2: grad = (p_real - p_fake) / mean|p_real| per sample.

    p = x - mu(x_t) for each score, so p_real - p_fake = x0_fake - x0_real: the gradient points from the
    real denoiser's estimate towards the fake one's, and a descent step ``x - lr * grad`` moves x
    towards what the teacher believes and away from what the generator currently produces.

    Args:
        x: generator samples (B, C, H, W), the point at which the gradient is taken.
        x0_real: the real (teacher) denoiser's x0 estimate at the noised x_t.
        x0_fake: the fake-score denoiser's x0 estimate at the same x_t.
        eps: lower bound of the normaliser mean|p_real| (a sample the teacher reproduces exactly
            would otherwise divide by zero).

    Returns:
        grad, float32, same shape as x, no graph attached.
    """
    x, x0_real, x0_fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    p_real = x - x0_real
    p_fake = x - x0_fake
    # Per-sample normaliser over (C, H, W), kept as (B, 1, 1, 1) to broadcast (DMD, Eq. 8).
    weight = p_real.abs().flatten(1).mean(1).clamp_min(eps).view(-1, *([1] * (x.ndim - 1)))
    return (p_real - p_fake) / weight


def dm_surrogate_loss(x: Tensor, grad: Tensor, reduction: str = "mean") -> Tensor:
    """0.5 ||x - stopgrad(x - grad)||^2: a scalar whose gradient with respect to x is ``grad``.

    With ``reduction="sum"`` d loss / d x = grad exactly; with ``"mean"`` (the default, as in the
    paper's code) the loss is averaged over all B*C*H*W elements, so d loss / d x = grad / (B*C*H*W).
    Adam-type optimisers are invariant to that constant; it matters only relative to other loss terms
    (the GAN weight 3e-3 is calibrated against the mean reduction).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    target = (x - grad.to(x.dtype)).detach()
    return 0.5 * F.mse_loss(x.float(), target.float(), reduction=reduction)


def distribution_matching_loss(
    x: Tensor,
    real: Denoiser,
    fake: Denoiser,
    t: Tensor,
    noise: Tensor,
    reduction: str = "mean",
    **cond,
) -> LossOutput:
    """The generator's distribution-matching loss at generator samples ``x`` (DMD2, Sec. 3-4).

    Noises x to x_t = alpha_t x + sigma_t noise, queries both scores without gradients, and returns the
    surrogate whose gradient with respect to x is :func:`dm_gradient` (divided by B*C*H*W for "mean").
    """
    x_t = real.schedule.add_noise(x.detach(), noise, t)
    with torch.no_grad():
        x0_real = real(x_t, t, **cond).x0
        x0_fake = fake(x_t, t, **cond).x0
    grad = dm_gradient(x, x0_real, x0_fake)
    loss = dm_surrogate_loss(x, grad, reduction)
    return LossOutput(loss, {"dm_loss": loss.detach(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean()})


def bottleneck_features(unet: nn.Module, x_t: Tensor, t: Tensor, module_name: str = "mid_block", **cond) -> Tensor:
    """The output of ``unet.<module_name>`` (default the mid block) for input (x_t, t), via a forward hook.

    The forward pass stops once the module has run (:func:`capture_features`), so the decoder half
    of the UNet is never evaluated.
    """
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    cond = {k: v for k, v in cond.items() if v is not None}
    layer = unet.get_submodule(module_name)
    return capture_features(unet, [layer], lambda: unet(x_t, t.clamp_min(0), **cond, return_dict=False))[0]


class BottleneckClassifier(nn.Module):
    """The GAN head: a small conv net on the fake-score UNet's bottleneck features -> one logit per sample.

    Args:
        channels: channels of the bottleneck features (the UNet's last ``block_out_channels``).
        hidden: channels of the head's hidden layers (default: ``channels``).
        groups: GroupNorm groups (must divide ``hidden``).

    Example::

        >>> head = BottleneckClassifier(64)
        >>> head(torch.randn(8, 64, 4, 4)).shape
        torch.Size([8])
    """

    def __init__(self, channels: int, hidden: int | None = None, groups: int = 8) -> None:
        super().__init__()
        hidden = hidden or channels
        groups = math.gcd(groups, hidden)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features.float()).squeeze(1)


# --- the LightningModule -------------------------------------------------------------------------


class DMD2(DistillationMethod):
    """DMD2: a one-step (or K-step) generator trained by distribution matching plus an optional GAN term.

    Networks: ``student`` (the generator, a copy of the teacher), ``teacher`` (frozen real score),
    ``fake_score`` (a trainable copy of the teacher) and, with ``gan``, ``discriminator_head`` (a
    :class:`BottleneckClassifier` on the fake score's mid-block features). Each trainable network has
    its own optimiser and gradient-norm clip; all of them, their optimiser states and the iteration
    counter ``gan_iteration`` are in checkpoints.

    One training iteration (one batch): ``plan.d_updates`` critic updates (fake-score denoising loss on
    fresh stop-gradient generator samples, plus the weighted GAN discriminator loss on real vs fake),
    then, if ``plan.update_g``, one generator update (distribution matching + weighted GAN generator
    loss). Critic first: at initialisation the fake score equals the teacher and the DM gradient is
    exactly zero, so a generator-first step 0 would be wasted. The plan comes from an attached
    :class:`~lightning_distill.methods.adversarial.AdversarialSchedule` callback
    (``DiscriminatorSchedule``) when there is one, else from ``fake_updates_per_generator``:
    ``update_g`` on iterations 0, N, 2N, ... and one critic update every iteration (TTUR).

    Args:
        teacher: the frozen teacher (linked from ``data.teacher`` by the CLI).
        student: generator network; None: a copy of the teacher's UNet.
        fake_score: fake-score network; None: a copy of the teacher's UNet.
        student_prediction_type: what the generator outputs; None keeps the teacher's.
        generator_steps: K, the generator's step count (1: one-step; > 1: backward simulation).
        fake_updates_per_generator: fake-score (and discriminator) updates per generator update (TTUR).
        critic_warmup: critic-only iterations before the first generator update (default 0: the fake
            score starts as the teacher, which is right for a generator that starts as the teacher; a
            generator from ``init_from`` has another distribution, which the fake score must learn first).
        dm_t_range: fractions of T bounding the timesteps of the distribution-matching gradient
            (the paper's 0.02 .. 0.98).
        dm_reduction: reduction of the surrogate loss, see :func:`dm_surrogate_loss`.
        gan: add the GAN term (classifier head on the fake score's bottleneck features).
        gan_generator_weight: weight of the non-saturating generator GAN loss (paper: 3e-3).
        gan_discriminator_weight: weight of the discriminator loss in the critic update (paper: 1e-2).
        gan_feature_module: UNet submodule whose output feeds the head.
        gan_t_range: fractions of T bounding the noise level of the GAN term's inputs (real and fake,
            both networks' losses); the paper samples all of [0, T). At high noise real and fake look
            alike and the head's signal is mostly noise; a lower bound on the signal-to-noise ratio
            (e.g. ``[0, 0.25]``) keeps it informative.
        head_hidden: hidden channels of the head (default: the bottleneck's channels).
        d_augment: differentiable augmentations (``"translation"``, ``"cutout"``; DiffAugment) of every
            GAN input, real and fake, before the noise; the generator's gradient passes through them.
            With a small dataset (digits: 1,617 training images) the head otherwise memorises the
            real images: its loss falls on training data while it rises above chance on held-out data,
            and the generator chases that overfit head.
        r1_weight: weight of an approximated R1 penalty (APT) on real data in the D loss (paper: 0,
            off); a schedule's ``r1_scale`` multiplies it.
        r1_sigma: perturbation scale of the approximated R1.
        generator_optimizer, fake_score_optimizer: optimiser factories of the generator and fake score.
        discriminator_optimizer: head optimiser factory (None: ``fake_score_optimizer``).
        generator_lr_scheduler: optional LR scheduler of the generator (stepped per generator update).
        generator_grad_clip, fake_score_grad_clip, discriminator_grad_clip: grad-norm clips per
            network (None: off; paper: 10).
        sample_steps: sampler steps for logged grids / predict (None: ``generator_steps``).
        sample_every_n_steps, num_log_samples, seed: as in :class:`DistillationMethod`.
        init_from, init_use_ema: start the generator from a trained student instead of the teacher (a
            ``.ckpt`` of any method, EMA weights when ``init_use_ema``, or an exported pipeline folder),
            e.g. a consistency-distilled one; the fake score is still a copy of the teacher, so give the
            critic a head start with ``critic_warmup``.

    Example::

        >>> dm = TeacherDataModule(teacher="bundled:digits")
        >>> model = DMD2(teacher=dm.teacher, fake_updates_per_generator=5, gan=True)
        >>> L.Trainer(max_steps=2000).fit(model, dm)
        >>> model.export("outputs/dmd2")   # a 1-step pipeline (LCMScheduler: x0 from pure noise at T - 1)
    """

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        student: nn.Module | None = None,
        fake_score: nn.Module | None = None,
        student_prediction_type: PredictionType | None = None,
        generator_steps: int = 1,
        fake_updates_per_generator: int = 5,
        critic_warmup: int = 0,
        dm_t_range: tuple[float, float] = (0.02, 0.98),
        dm_reduction: Literal["mean", "sum"] = "mean",
        gan: bool = True,
        gan_generator_weight: float = 3e-3,
        gan_discriminator_weight: float = 1e-2,
        gan_feature_module: str = "mid_block",
        gan_t_range: tuple[float, float] = (0.0, 1.0),
        head_hidden: int | None = None,
        d_augment: list[str] | None = None,
        r1_weight: float = 0.0,
        r1_sigma: float = 0.01,
        generator_optimizer: OptimizerCallable = default_optimizer,
        fake_score_optimizer: OptimizerCallable = default_optimizer,
        discriminator_optimizer: OptimizerCallable | None = None,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        generator_grad_clip: float | None = 10.0,
        fake_score_grad_clip: float | None = 10.0,
        discriminator_grad_clip: float | None = 10.0,
        sample_steps: int | None = None,
        sample_every_n_steps: int = 0,
        num_log_samples: int = 64,
        seed: int = 0,
        init_from: str | None = None,
        init_use_ema: bool = True,
    ) -> None:
        if generator_steps < 1:
            raise ValueError(f"generator_steps must be >= 1, got {generator_steps}")
        if fake_updates_per_generator < 1:
            raise ValueError(f"fake_updates_per_generator must be >= 1, got {fake_updates_per_generator}")
        if critic_warmup < 0:
            raise ValueError(f"critic_warmup must be >= 0, got {critic_warmup}")
        lo, hi = dm_t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"dm_t_range must satisfy 0 <= lo < hi <= 1, got {tuple(dm_t_range)}")
        glo, ghi = gan_t_range
        if not 0.0 <= glo < ghi <= 1.0:
            raise ValueError(f"gan_t_range must satisfy 0 <= lo < hi <= 1, got {tuple(gan_t_range)}")
        if dm_reduction not in ("mean", "sum"):
            raise ValueError(f"dm_reduction must be 'mean' or 'sum', got {dm_reduction!r}")
        augment_policy = check_augment_policy(d_augment or ())
        state = None
        if init_from is not None:
            state, recorded = load_student_state(init_from, init_use_ema)
            student_prediction_type = student_prediction_type or recorded
        super().__init__(
            teacher=teacher,
            student=student,
            student_prediction_type=student_prediction_type,
            optimizer=generator_optimizer,
            lr_scheduler=generator_lr_scheduler,
            sample_steps=sample_steps or generator_steps,
            sample_every_n_steps=sample_every_n_steps,
            num_log_samples=num_log_samples,
            seed=seed,
        )
        self.save_hyperparameters(
            ignore=[
                "teacher",
                "student",
                "fake_score",
                "generator_optimizer",
                "fake_score_optimizer",
                "discriminator_optimizer",
                "generator_lr_scheduler",
            ]
        )
        if state is not None:
            load_init_state(self.student.unet, state, init_from)
        # The sampler runs the generator's own K steps unless told otherwise.
        self.hparams.sample_steps = sample_steps or generator_steps
        self.automatic_optimization = False
        # an attribute, not hparams: under LightningCLI hparams hold the config's value (may be None)
        self.d_augment = augment_policy
        self.fake_score_optimizer_factory = fake_score_optimizer
        self.discriminator_optimizer_factory = discriminator_optimizer or fake_score_optimizer
        # Iterations done (batches); persistent, so resumed runs continue the plan and the random streams.
        self.register_buffer("gan_iteration", torch.zeros((), dtype=torch.long))
        self.fake_score: Denoiser | None = None
        self.discriminator_head: BottleneckClassifier | None = None
        if teacher is None:
            return
        if fake_score is None:
            fake_score = copy.deepcopy(self.teacher.unet).float()
        fake_score.requires_grad_(True)
        fake_score.train()
        schedule = VPSchedule(self.teacher.schedule._alphas_cumprod[1:].clone())
        self.fake_score = Denoiser(fake_score, schedule, self.teacher.prediction_type, self.teacher.denoiser.clip_x0)
        if gan:
            channels = int(fake_score.config.block_out_channels[-1])
            self.discriminator_head = BottleneckClassifier(channels, head_hidden)
        self.make_scheduler()  # fail at construction if LCMScheduler cannot express the teacher's schedule

    def make_scheduler(self):
        """Stock ``LCMScheduler`` on the generator grid: x0 estimate, fresh noise to the next step."""
        return lcm_scheduler(self, self.hparams.generator_steps, X0_SAMPLER_TIMESTEP_SCALING)

    # --- pieces of one iteration ---------------------------------------------------------------

    def _cond(self, batch: dict) -> dict:
        return {"class_labels": batch["label"]} if self.is_class_conditional else {}

    def _randn(self, shape, g: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=g, device=self.device)

    def _randint(self, lo: int, hi: int, n: int, g: torch.Generator) -> Tensor:
        return torch.randint(lo, hi, (n,), generator=g, device=self.device)

    def _gan_t(self, n: int, g: torch.Generator) -> Tensor:
        """Noise levels of GAN inputs: uniform over ``gan_t_range`` (fractions of T; at least one timestep)."""
        T = self.fake_score.schedule.num_train_timesteps
        lo, hi = self.hparams.gan_t_range
        return self._randint(int(lo * T), max(int(hi * T), int(lo * T) + 1), n, g)

    def generate(self, n: int, g: torch.Generator, **cond) -> Tensor:
        """Generator samples x = G(x_{t_i}) at a random step i, gradients attached to the generator.

        i = 0 (the only choice for K = 1) starts from pure noise at the top of the grid (T - 1 when K
        divides T); i > 0 starts from the state the generator's own earlier steps reach
        (:func:`backward_simulation`). The x0 estimate is taken
        without ``clip_x0`` (:func:`unclipped_x0`): clamping would zero the gradient of every pixel
        outside [-1, 1], so the generator could never learn to bring it back.
        """
        grid = generator_timesteps(self.student.schedule, self.hparams.generator_steps).to(self.device)
        index = int(self._randint(0, len(grid), 1, g).item()) if len(grid) > 1 else 0
        z = self._randn((n, *self.sample_shape), g)
        x_t = backward_simulation(self.student, z, grid, index, rng=g, **cond)
        return unclipped_x0(self.student, x_t, grid[index].expand(n), **cond)

    def _augment(self, x: Tensor, g: torch.Generator) -> DiscriminatorAugment:
        """``d_augment`` drawn now for a batch shaped like x (the identity without a policy, drawing nothing)."""
        return DiscriminatorAugment.draw(self.d_augment, x.shape, g, x.device)

    def discriminator_logits(
        self, x: Tensor, t: Tensor, noise: Tensor, train_backbone: bool = True, augment=None, **cond
    ) -> Tensor:
        """Head logits on fake-score bottleneck features of x (augmented) noised to level t (gradient flows to x)."""
        if augment is not None:
            x = augment(x)
        x_t = self.fake_score.schedule.add_noise(x, noise, t)
        feats = bottleneck_features(self.fake_score.unet, x_t, t, self.hparams.gan_feature_module, **cond)
        return self.discriminator_head(feats if train_backbone else feats.detach())

    def generator_loss(self, batch: dict, g: torch.Generator) -> LossOutput:
        """Distribution matching (+ weighted non-saturating GAN) loss of the generator."""
        n = batch["x"].shape[0]
        cond = self._cond(batch)
        T = self.student.schedule.num_train_timesteps
        x = self.generate(n, g, **cond)
        lo, hi = self.hparams.dm_t_range
        t = self._randint(int(lo * T), max(int(hi * T), int(lo * T) + 1), n, g)
        out = distribution_matching_loss(
            x, self.teacher.denoiser, self.fake_score, t, self._randn(x.shape, g), self.hparams.dm_reduction, **cond
        )
        loss, logs = out.loss, dict(out.logs)
        if self.discriminator_head is not None:
            t_gan = self._gan_t(n, g)
            # D frozen: no gradient accumulates in it, but the input gradient still reaches x.
            with frozen(list(self.fake_score.parameters()) + list(self.discriminator_head.parameters())):
                logits = self.discriminator_logits(
                    x, t_gan, self._randn(x.shape, g), augment=self._augment(x, g), **cond
                )
            g_gan = ns_g_loss(logits)
            loss = loss + self.hparams.gan_generator_weight * g_gan
            logs["g_gan"] = g_gan.detach()
        logs["g_loss"] = loss.detach()
        return LossOutput(loss, logs)

    def critic_loss(
        self, batch: dict, g: torch.Generator, r1_weight: float = 0.0, train_backbone: bool = True
    ) -> tuple[LossOutput, Tensor | None, Tensor | None]:
        """Fake-score denoising loss on stop-gradient generator samples (+ weighted GAN D loss).

        Returns (loss, real logits, fake logits); the logits are None without the GAN term. With
        ``train_backbone=False`` (a schedule freezing the D backbone) the D loss trains the head only;
        the fake score still learns its denoising loss.
        """
        n = batch["x"].shape[0]
        cond = self._cond(batch)
        T = self.fake_score.schedule.num_train_timesteps
        with torch.no_grad():
            x_fake = self.generate(n, g, **cond)
        t = self._randint(0, T, n, g)
        fake_loss = denoising_loss(self.fake_score, x_fake, t, self._randn(x_fake.shape, g), **cond)
        loss, logs = fake_loss, {"fake_score_loss": fake_loss.detach()}
        real_logits = fake_logits = None
        if self.discriminator_head is not None:
            x_real = batch["x"].to(x_fake.dtype)
            t_real, t_fake = self._gan_t(n, g), self._gan_t(n, g)
            noise_real = self._randn(x_real.shape, g)
            aug_real, aug_fake = self._augment(x_real, g), self._augment(x_fake, g)
            real_logits = self.discriminator_logits(x_real, t_real, noise_real, train_backbone, augment=aug_real, **cond)
            fake_logits = self.discriminator_logits(
                x_fake, t_fake, self._randn(x_fake.shape, g), train_backbone, augment=aug_fake, **cond
            )
            d_gan = ns_d_loss(real_logits, fake_logits)
            loss = loss + self.hparams.gan_discriminator_weight * d_gan
            logs["d_gan"] = d_gan.detach()
            if r1_weight > 0:
                # D as a function of the clean image only: t and the diffusion noise are fixed now.
                def disc(x: Tensor) -> Tensor:
                    return self.discriminator_logits(x, t_real, noise_real, train_backbone, augment=aug_real, **cond)

                r1 = approx_r1_penalty(
                    disc, x_real, self.hparams.r1_sigma, noise=self._randn(x_real.shape, g), real_logits=real_logits
                )
                loss = loss + r1_weight * r1
                logs["r1"] = r1.detach()
            real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
        logs["critic_loss"] = loss.detach()
        return LossOutput(loss, logs), real_logits, fake_logits

    def compute_loss(self, batch: dict) -> LossOutput:
        """Validation: both losses of the current networks on a fixed random stream, no update."""
        g = self.step_generator(2**40)  # disjoint from the training iterations' streams
        crit, _, _ = self.critic_loss(batch, g)
        gen = self.generator_loss(batch, g)
        return LossOutput(gen.loss.detach() + crit.loss.detach(), {**gen.logs, **crit.logs})

    # --- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self):
        opts = [
            self.optimizer_factory(self.trainable_parameters()),
            self.fake_score_optimizer_factory(list(self.fake_score.parameters())),
        ]
        if self.discriminator_head is not None:
            opts.append(remember_initial_lr(self.discriminator_optimizer_factory(list(self.discriminator_head.parameters()))))
        if self.lr_scheduler_factory is None:
            return opts
        return opts, [{"scheduler": self.lr_scheduler_factory(opts[0]), "interval": "step"}]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        cb = attached_schedule(self._trainer)
        if getattr(cb, "freeze_d_after", None) is not None:
            raise ValueError(
                "DiscriminatorSchedule(freeze_d_after=...) would stop DMD2's critic updates, and with them the "
                "fake score, which must keep tracking the generator for the distribution-matching gradient; "
                "to stop the GAN term instead, train without it (gan=false) or lower gan_generator_weight"
            )

    def plan(self, step: int) -> StepPlan:
        """An attached schedule callback's plan, else the fixed TTUR of ``fake_updates_per_generator``."""
        cb = attached_schedule(self._trainer)
        if cb is not None:
            return cb.plan(step)
        after = step - self.hparams.critic_warmup
        return StepPlan(update_g=after >= 0 and after % self.hparams.fake_updates_per_generator == 0, d_updates=1)

    def step_generator(self, step: int) -> torch.Generator:
        """Random stream of iteration ``step`` on this process: see :func:`iteration_generator`."""
        return iteration_generator(self.hparams.seed, step, self.device, self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        opts = self.optimizers()
        opt_g, opt_f = opts[0], opts[1]
        opt_d = opts[2] if len(opts) > 2 else None
        hp = self.hparams
        step = int(self.gan_iteration)
        plan = self.plan(step)
        g = self.step_generator(step)
        if opt_d is not None:
            for group in opt_d.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * plan.d_lr_scale
        logs: dict[str, Tensor] = {}
        real_logits = fake_logits = None

        # 1. critic: fake score (+ discriminator head), plan.d_updates times
        for i in range(plan.d_updates):
            out, real_logits, fake_logits = self.critic_loss(
                batch, g, hp.r1_weight * plan.r1_scale, plan.train_d_backbone
            )
            check_finite(out, self.global_step)
            opt_f.zero_grad(set_to_none=True)
            if opt_d is not None:
                opt_d.zero_grad(set_to_none=True)
            self.manual_backward(out.loss)
            # Lightning counts every LightningOptimizer.step in global_step; only the last update of an
            # iteration is counted, so global_step (max_steps, checkpoint and EMA intervals) counts iterations.
            last = i == plan.d_updates - 1 and not plan.update_g
            steps = [(opt_d, hp.discriminator_grad_clip, False)] if opt_d is not None else []
            self.step_optimizers(steps + [(opt_f, hp.fake_score_grad_clip, last)])
            logs.update(out.logs)

        # 2. generator: distribution matching (+ GAN), critic frozen
        if plan.update_g:
            out = self.generator_loss(batch, g)
            check_finite(out, self.global_step)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(out.loss)
            self.step_optimizer(opt_g, hp.generator_grad_clip)
            sched = self.lr_schedulers()
            if sched is not None:
                sched.step()
            logs.update(out.logs)

        self.gan_iteration += 1
        if logs:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, batch_size=batch["x"].shape[0])
        # What a DiscriminatorSchedule callback reads in on_train_batch_end.
        return {
            "plan": plan,
            "iteration": step,
            "d_loss": logs.get("d_gan"),
            "g_loss": logs.get("g_loss"),
            "real_logits": real_logits,
            "fake_logits": fake_logits,
        }


__all__ = [
    "DMD2",
    "BottleneckClassifier",
    "bottleneck_features",
    "distribution_matching_loss",
    "dm_gradient",
    "dm_surrogate_loss",
]
