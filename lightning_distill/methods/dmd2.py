"""Distribution matching distillation, DMD2 (Yin et al. 2024, arXiv 2405.14867): one-step students.

A generator G (initialised from the teacher) maps noise to images in one (or K) steps. Its gradient is the difference
of two scores at a noised generator sample: the frozen teacher ("real score") and a trainable copy of the teacher that
tracks the generator's own distribution ("fake score"), trained by the denoising loss on stop-gradient samples.
Optionally a small classifier on the fake-score network's bottleneck features adds a GAN term that sees real data
(DMD2, Sec. 4.2), which is what lets the student beat its teacher.

Notation (paper -> code):

=========================================  =============================================
G_theta(z), one step from pure noise       ``generator_samples``: x0 of ``student`` at (z, T-1), unclamped
mu_real(x_t, t) / mu_fake(x_t, t)          ``teacher.denoiser(x_t, t).x0`` / ``fake_score(...).x0``
p_real = x - mu_real(x_t)                  ``x - x0_real``
grad = (p_real - p_fake) / mean|p_real|    :func:`dm_gradient`   (DMD, Eq. 7-8; DMD2, Sec. 4)
0.5 ||x - sg(x - grad)||^2                 :func:`dm_surrogate_loss`
fake-score loss                            :func:`~lightning_distill.losses.denoising_loss`
two time-scale update rule (TTUR)          ``generator_every`` (paper: 5)
=========================================  =============================================

Why (p_real - p_fake) is the gradient of the KL: with score s(x_t) = -(x_t - alpha_t mu(x_t)) / sigma_t^2, s_real -
s_fake = alpha_t (mu_real - mu_fake) / sigma_t^2, and d KL / d x = -w_t (s_real - s_fake) * alpha_t is proportional to
(mu_fake - mu_real) = p_real - p_fake; the per-sample division by mean|p_real| replaces the weight w_t (DMD, Eq. 8),
which makes the step size independent of t.

The training loop is :class:`~lightning_distill.methods.adversarial.AdversarialMethod`'s, shared with ADD and APT: per
iteration (one batch) the critic update(s) first (fake-score denoising loss + weighted GAN D loss), then, on
iterations W, W + N, W + 2N, ... (N = ``generator_every``, W = ``critic_warmup``), one generator update; after S
iterations the generator has had ceil(S / N) updates (tested). ``max_steps`` counts iterations. An attached
``DiscriminatorSchedule`` replaces the fixed TTUR (its ``train_d_backbone=False`` keeps the GAN loss out of the fake-
score UNet: the head alone learns it).

Multi-step generators (``generator_steps`` K > 1) move between their steps as the paper does: the x0
estimate at t_i is re-noised with fresh noise to t_{i+1}, in training (:func:`backward_simulation`) and
in the exported sampler (a stock ``LCMScheduler``, ``FlowMatchLCMScheduler`` on the flow path, whose
boundary scalings are the identity).

Flow-matching teachers: nothing here changes. Both scores are velocity networks read through
:class:`~lightning_distill.parametrisation.Denoiser` (x0 = x_s - s u), the fake score is trained on the teacher's
velocity target (``denoising_loss``), x_t = (1 - s) x + s n, and the score identity above holds on any Gaussian path
x_t = alpha_t x + sigma_t n, so grad and its normaliser mean|x - x0_real| keep their form. The generator's steps are
the levels the exported ``FlowMatchLCMScheduler`` visits at K steps (s = 1, (K-1)/K, ..., 1/K without a shift;
``sampling.generator_timesteps``).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from .. import lora, memory
from ..backbones import prepare_critic
from ..errors import ConfigError
from ..gan.discriminators import BottleneckClassifier, bottleneck_features
from ..gan.features import bottleneck_block
from ..gan.losses import GanLoss
from ..gan.plan import StepPlan, attached_schedule
from ..lora import LoraSpec
from ..losses import denoising_loss
from ..parametrisation import Denoiser, Prediction
from ..sampling import (
    X0_SAMPLER_TIMESTEP_SCALING,
    backward_simulation,
    generator_timesteps,
    lcm_scheduler,
)
from ..teacher import DiffusionTeacher
from .adversarial import AdversarialMethod, Critic, CriticOutput, R1Kind, frozen
from .base import LossOutput, default_optimizer
from .text import GuidedScore, TextToImageMixin

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
    real: Denoiser | Callable[..., Prediction],
    fake: Denoiser,
    t: Tensor,
    noise: Tensor,
    reduction: str = "mean",
    clip: bool = False,
    **cond,
) -> LossOutput:
    """The generator's distribution-matching loss at generator samples ``x`` (DMD2, Sec. 3-4).

    ``real`` is the teacher's denoiser or anything called like it with a ``schedule`` (a guided real score,
    :class:`~lightning_distill.methods.text.GuidedScore`).

    Noises x to x_t = alpha_t x + sigma_t noise, queries both scores without gradients, and returns the
    surrogate whose gradient with respect to x is :func:`dm_gradient` (divided by B*C*H*W for "mean").
    ``clip``: clamp the scores' x0 (``clip_x0``); DMD2's code does not (a pixel beyond the range loses its pull back).
    """
    x_t = real.schedule.add_noise(x.detach(), noise, t)
    with torch.no_grad():
        x0_real = real(x_t, t, clip=clip, **cond).x0
        x0_fake = fake(x_t, t, clip=clip, **cond).x0
    grad = dm_gradient(x, x0_real, x0_fake)
    loss = dm_surrogate_loss(x, grad, reduction)
    return LossOutput(loss, {"dm_loss": loss.detach(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean()})


# --- the LightningModule -------------------------------------------------------------------------


class DMD2(TextToImageMixin, AdversarialMethod):
    """DMD2: a one-step (or K-step) generator trained by distribution matching plus an optional GAN term.

    Networks: ``student`` (the generator, a copy of the teacher), ``teacher`` (frozen real score),
    ``fake_score`` (a trainable copy of the teacher) and, with ``gan``, ``discriminator_head`` (a
    :class:`~lightning_distill.gan.discriminators.BottleneckClassifier` on the fake score's mid-block
    features; a transformer's middle-block image tokens as a map). Each trainable network has its own
    optimiser and gradient-norm clip.

    Critic first: at initialisation the fake score equals the teacher and the DM gradient is exactly
    zero, so a generator-first step 0 would be wasted.

    Args:
        fake_score: fake-score network; None: a copy of the teacher's UNet.
        fake_score_lora: the fake score as the frozen teacher plus trained LoRA adapters
            (``{rank, alpha, target_modules, init}``, :class:`~lightning_distill.lora.LoraSpec`) instead of a full
            copy: its base *is* the teacher's weights (shared, in the teacher's dtype), so it adds the adapters,
            their gradients and optimiser state only; checkpoints hold the adapters. Not with ``fake_score`` or
            ``teacher_offload``.
        generator_steps: K, the generator's step count (1: one-step; > 1: backward simulation).
        dm_t_range: fractions of T bounding the timesteps of the distribution-matching gradient
            (the paper's 0.02 .. 0.98).
        gan: add the GAN term (classifier head on the fake score's bottleneck features).
        gan_generator_weight: weight of the generator GAN loss (paper: 3e-3).
        gan_discriminator_weight: weight of the discriminator loss in the critic update (paper: 1e-2).
        gan_t_range: fractions of T bounding the noise level of the GAN term's inputs (real and fake,
            both networks' losses); the paper samples all of [0, T). At high noise real and fake look
            alike and the head's signal is mostly noise; a lower bound on the signal-to-noise ratio
            (e.g. ``[0, 0.25]``) keeps it informative.
        head_hidden: hidden channels of the head (default: the bottleneck's channels).
        fake_score_optimizer, fake_score_grad_clip: the fake score's optimiser factory and clip.
        discriminator_optimizer: head optimiser factory (None: ``fake_score_optimizer``).
        generator_every: TTUR: a generator update every N iterations, each with ``critic_updates`` (1)
            critic updates (paper: 5 critic updates per generator update).
        critic_warmup: critic-only iterations first (default 0: the fake score starts as the teacher,
            right for a generator that starts as the teacher; a generator from ``init_from``, e.g. a
            consistency-distilled one, has another distribution, which the fake score must learn first).
        gan_loss, r1, r1_weight, generator_grad_clip, discriminator_grad_clip: as
            :class:`AdversarialMethod`, with the paper's defaults (non-saturating; R1 off; clips 10).
        sample_steps: sampler steps for logged grids / predict (None: ``generator_steps``).
        sample_prompt: text-conditional (SD3) teachers: the prompt of logged grids (:class:`TextToImageMixin`:
            text conditioning of all three networks, prompt sampling, ``StableDiffusion3Pipeline`` export).
        real_guidance_scale: text-conditional teachers: classifier-free guidance g of the real score in the
            distribution-matching gradient, uncond + g (cond - uncond) against the prompt "" (the pipelines'
            convention; 1: the conditional teacher). The generator learns the guided distribution, so its
            export is called with guidance_scale=1 (DMD2 uses g = 8 for SDXL). A guidance-distilled teacher
            (Flux-dev) is guided by its embedded guidance instead: 1 only.
        dm_clip_x0: clamp both scores' x0 (the teacher's ``clip_x0``) in the DM gradient; off as in DMD2's code
            (:func:`distribution_matching_loss`). The VP digits presets were measured with it on and keep it.
        **kwargs: :class:`AdversarialMethod`'s and :class:`DistillationMethod`'s arguments
            (``optimizer`` / ``lr_scheduler`` are the generator's).

    Example::

        >>> dm = TeacherDataModule(teacher="bundled:digits")
        >>> model = DMD2(teacher=dm.teacher, generator_every=5, gan=True)
        >>> L.Trainer(max_steps=2000).fit(model, dm)
        >>> model.export("outputs/dmd2")   # a 1-step pipeline (LCMScheduler: x0 from pure noise at T - 1;
        ...                                # FlowMatchLCMScheduler on a flow teacher)
    """

    hparams_ignore = AdversarialMethod.hparams_ignore + ("fake_score", "fake_score_optimizer")

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        fake_score: nn.Module | None = None,
        fake_score_lora: LoraSpec | None = None,
        generator_steps: int = 1,
        dm_t_range: tuple[float, float] = (0.02, 0.98),
        gan: bool = True,
        gan_generator_weight: float = 3e-3,
        gan_discriminator_weight: float = 1e-2,
        gan_t_range: tuple[float, float] = (0.0, 1.0),
        head_hidden: int | None = None,
        fake_score_optimizer: OptimizerCallable = default_optimizer,
        fake_score_grad_clip: float | None = 10.0,
        discriminator_optimizer: OptimizerCallable | None = None,
        generator_every: int = 5,
        gan_loss: GanLoss = "non_saturating",
        r1: R1Kind = "approx",
        r1_weight: float = 0.0,
        generator_grad_clip: float | None = 10.0,
        discriminator_grad_clip: float | None = 10.0,
        sample_steps: int | None = None,
        sample_prompt: str = "",
        real_guidance_scale: float = 1.0,
        dm_clip_x0: bool = False,
        **kwargs,
    ) -> None:
        if generator_steps < 1:
            raise ConfigError(f"generator_steps must be >= 1, got {generator_steps}")
        for name, (lo, hi) in (("dm_t_range", dm_t_range), ("gan_t_range", gan_t_range)):
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"{name} must satisfy 0 <= lo < hi <= 1, got {(lo, hi)}")
        sample_steps = sample_steps or generator_steps  # the sampler runs the generator's own K steps
        paper_defaults = dict(generator_every=generator_every, gan_loss=gan_loss, r1=r1, r1_weight=r1_weight)
        clips = dict(generator_grad_clip=generator_grad_clip, discriminator_grad_clip=discriminator_grad_clip)
        discriminator_optimizer = discriminator_optimizer or fake_score_optimizer
        super().__init__(
            teacher=teacher, discriminator_optimizer=discriminator_optimizer, sample_steps=sample_steps, **paper_defaults, **clips, **kwargs
        )
        self.fake_score_optimizer_factory = fake_score_optimizer
        self.fake_score: Denoiser | None = None
        self.discriminator_head: BottleneckClassifier | None = None
        if self.teacher is None:
            return
        # the generator's K input timesteps, the levels its exported sampler visits
        self.register_buffer("generator_grid", generator_timesteps(self.student.schedule, generator_steps), persistent=False)
        GuidedScore.check(real_guidance_scale, self.teacher, self.text_conditional, "real_guidance_scale")
        spec = LoraSpec.from_config(fake_score_lora, "fake_score_lora")
        if spec is not None:
            if fake_score is not None or self.hparams.get("teacher_offload") or spec.base != "shared":
                raise ConfigError(
                    "fake_score_lora builds the fake score on the teacher's own weights: it cannot be combined with "
                    "a fake_score network, teacher_offload (the shared weights must stay on the device) or base: copy"
                )
            fake_score = lora.lora_of_shared(self.teacher.unet, spec, seed=self.hparams.seed + 1)
        else:
            fake_score = copy.deepcopy(self.teacher.unet).float() if fake_score is None else fake_score
            fake_score.requires_grad_(True)
        prepare_critic(fake_score).train()  # no dropout, and a DiT's label dropout off: the DM gradient reads conditional scores
        if self.hparams.get("gradient_checkpointing"):
            memory.enable_gradient_checkpointing(fake_score, "fake score")
        self.fake_score = Denoiser(fake_score, self.teacher.schedule.copy(), self.teacher.prediction_type, self.teacher.denoiser.clip_x0)
        if gan:  # a UNet's mid block or a transformer's middle block (ConfigError for other networks)
            self.discriminator_head = BottleneckClassifier(bottleneck_block(fake_score)[1], head_hidden)
        self.make_scheduler()  # fail at construction if LCMScheduler cannot express the teacher's schedule

    def make_scheduler(self):
        """Stock ``LCMScheduler`` (flow: ``FlowMatchLCMScheduler``) on the generator grid: x0 estimate,
        fresh noise to the next step."""
        return lcm_scheduler(self, self.hparams.generator_steps, X0_SAMPLER_TIMESTEP_SCALING)

    def max_sample_steps(self) -> int:
        """K: more steps would visit timesteps the generator was not trained at (``LCMScheduler`` refuses
        them itself; ``FlowMatchLCMScheduler`` has no such limit, so it is stated here for both paths)."""
        return int(self.hparams.generator_steps)

    def critics(self) -> list[Critic]:
        """The fake score (its learning rate unscheduled: it must keep tracking the generator), then the head."""
        hp = self.hparams
        nets = [Critic(self.fake_score, self.fake_score_optimizer_factory, hp.fake_score_grad_clip, follows_d_lr_scale=False)]
        if self.discriminator_head is not None:
            nets.append(Critic(self.discriminator_head, self.discriminator_optimizer_factory, hp.discriminator_grad_clip))
        return nets

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if getattr(attached_schedule(self._trainer), "freeze_d_after", None) is not None:
            raise ConfigError(
                "DiscriminatorSchedule(freeze_d_after=...) would stop DMD2's critic updates, and with them the "
                "fake score, which must keep tracking the generator for the distribution-matching gradient; "
                "to stop the GAN term instead, train without it (gan=false) or lower gan_generator_weight"
            )

    # --- a LoRA fake score in checkpoints ------------------------------------------------------

    _FAKE = "fake_score.unet."
    _TEACHER = "teacher.denoiser.unet."

    def _fake_score_is_lora(self) -> bool:
        return self.fake_score is not None and self.hparams.get("fake_score_lora") is not None

    def _lora_prefixes(self) -> list[str]:
        # the fake score's base is the teacher's weights whoever built the student: handled below, always
        return [p for p in super()._lora_prefixes() if p != self._FAKE]

    def _left_out_base_prefixes(self) -> list[str]:
        return super()._left_out_base_prefixes() + ([self._FAKE] if self._fake_score_is_lora() and self.teacher.reloadable else [])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._fake_score_is_lora():  # the adapters; the base is the teacher (re-read, or saved as teacher.*)
            lora.drop_base_weights(checkpoint["state_dict"], self._FAKE)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # teacher.* keys are there now (saved, or re-read)
        if self._fake_score_is_lora():
            lora.restore_base_weights(checkpoint["state_dict"], self.fake_score.unet, self._FAKE, self._TEACHER)

    # --- pieces of one iteration ---------------------------------------------------------------

    def _cond(self, batch: dict) -> dict:
        # Text teachers: the prompt's keywords for generator, fake score and real score alike. The real
        # score is the plain conditional teacher (no classifier-free guidance in its x0 yet).
        if self.text_conditional:
            return self.text_cond(batch)
        return {"class_labels": batch["label"]} if self.is_class_conditional else {}

    def real_score(self) -> Denoiser | GuidedScore:
        """The teacher's denoiser, guided with ``real_guidance_scale`` (text teachers) when it is not 1."""
        g = self.hparams.get("real_guidance_scale", 1.0)
        if g == 1.0:
            return self.teacher.denoiser
        return GuidedScore(self.teacher.denoiser, self.uncond_text_cond(), g)

    def _randn(self, shape, g: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=g, device=self.device)

    def _randint(self, lo: int, hi: int, n: int, g: torch.Generator) -> Tensor:
        return torch.randint(lo, hi, (n,), generator=g, device=self.device)

    def _t_in(self, t_range: tuple[float, float], n: int, g: torch.Generator) -> Tensor:
        """Timesteps uniform over ``t_range`` (fractions of T; at least one timestep)."""
        T = self.student.schedule.num_train_timesteps
        lo, hi = t_range
        return self._randint(int(lo * T), max(int(hi * T), int(lo * T) + 1), n, g)

    def generator_samples(self, n: int, g: torch.Generator, **cond) -> Tensor:
        """Generator samples x = G(x_{t_i}) at a random step i, gradients attached to the generator.

        i = 0 (the only choice for K = 1) starts from pure noise at the top of the grid (T - 1 when K
        divides T); i > 0 starts from the state the generator's own earlier steps reach
        (:func:`~lightning_distill.sampling.backward_simulation`). The x0 estimate is unclamped:
        clamping would zero the gradient of every pixel outside [-1, 1], so the generator could never
        learn to bring it back.
        """
        grid = self.generator_grid
        index = int(self._randint(0, len(grid), 1, g).item()) if len(grid) > 1 else 0
        z = self._randn((n, *self.sample_shape), g)
        x_t = backward_simulation(self.student, z, grid, index, rng=g, **cond)
        return self.student(x_t, grid[index].expand(n), clip=False, **cond).x0

    def discriminator_logits(self, x: Tensor, t: Tensor, noise: Tensor, **cond) -> Tensor:
        """Head logits on fake-score bottleneck features of x noised to level t (gradient flows to x)."""
        sched = self.fake_score.schedule
        x_t = sched.add_noise(x, noise, t)
        # a LoRA fake score runs in the teacher's dtype (its base is the teacher's tensors: bf16 with teacher_dtype)
        dtype = next(self.fake_score.unet.parameters()).dtype
        cond = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        feats = bottleneck_features(self.fake_score.unet, x_t.to(dtype), sched.model_timestep(t), **cond).float()
        return self.discriminator_head(feats)

    # --- losses --------------------------------------------------------------------------------

    def generator_loss(self, batch: dict, g: torch.Generator) -> LossOutput:
        """Distribution matching (+ weighted GAN) loss of the generator."""
        n = batch["x"].shape[0]
        cond = self._cond(batch)
        x = self.generator_samples(n, g, **cond)
        t = self._t_in(self.hparams.dm_t_range, n, g)
        noise, clip = self._randn(x.shape, g), self.hparams.dm_clip_x0
        out = distribution_matching_loss(x, self.real_score(), self.fake_score, t, noise, clip=clip, **cond)
        loss, logs = out.loss, dict(out.logs)
        if self.discriminator_head is not None:
            t_gan = self._t_in(self.hparams.gan_t_range, n, g)
            g_gan = self.g_loss_fn(self.discriminator_logits(x, t_gan, self._randn(x.shape, g), **cond))
            loss = loss + self.hparams.gan_generator_weight * g_gan
            logs["g_gan"] = g_gan.detach()
        logs["g_loss"] = loss.detach()
        return LossOutput(loss, logs)

    def critic_loss(self, batch: dict, g: torch.Generator, plan: StepPlan) -> CriticOutput:
        """Fake-score denoising loss on stop-gradient generator samples (+ weighted GAN D loss and R1).

        With ``plan.train_d_backbone=False`` the D loss trains the head only; the fake score still
        learns its denoising loss.
        """
        n = batch["x"].shape[0]
        cond = self._cond(batch)
        T = self.fake_score.schedule.num_train_timesteps
        with torch.no_grad():
            x_fake = self.generator_samples(n, g, **cond)
        t = self._randint(0, T, n, g)
        fake_loss = denoising_loss(self.fake_score, x_fake, t, self._randn(x_fake.shape, g), **cond)
        loss, logs = fake_loss, {"fake_score_loss": fake_loss.detach()}
        if self.discriminator_head is None:
            logs["critic_loss"] = loss.detach()
            return CriticOutput(LossOutput(loss, logs))
        x_real = batch["x"].to(x_fake.dtype)
        t_real, t_fake = self._t_in(self.hparams.gan_t_range, n, g), self._t_in(self.hparams.gan_t_range, n, g)
        noise_real = self._randn(x_real.shape, g)

        def d_real(x: Tensor) -> Tensor:  # D as a function of the clean image only: t and noise fixed now
            return self.discriminator_logits(x, t_real, noise_real, **cond)

        # a frozen backbone stays out of the GAN and R1 graphs (the true R1's double backward is built in autograd.grad)
        backbone = [] if plan.train_d_backbone else self.fake_score.parameters()
        with frozen(backbone):
            real_logits = d_real(x_real)
            fake_logits = self.discriminator_logits(x_fake, t_fake, self._randn(x_fake.shape, g), **cond)
            d_gan = self.d_loss_fn(real_logits, fake_logits)
            weight = self.hparams.r1_weight * plan.r1_scale
            penalty = self.r1_term(d_real, x_real, real_logits, g, weight)
        loss = loss + self.hparams.gan_discriminator_weight * d_gan
        logs["d_gan"] = d_gan.detach()
        if penalty is not None:
            loss = loss + weight * penalty
            logs["r1"] = penalty.detach()
        logs["critic_loss"] = loss.detach()
        return CriticOutput(LossOutput(loss, logs), d_gan.detach(), real_logits.detach(), fake_logits.detach())


__all__ = ["DMD2", "distribution_matching_loss", "dm_gradient", "dm_surrogate_loss"]
