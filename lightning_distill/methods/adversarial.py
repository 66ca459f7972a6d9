"""The adversarial training loop shared by ADD, APT and DMD2: :class:`AdversarialMethod`.

One iteration (one batch, Lightning manual optimisation) follows the iteration's :class:`StepPlan`:

1. ``plan.d_updates`` critic updates: the method's :meth:`~AdversarialMethod.critic_loss` trains every
   network of :meth:`~AdversarialMethod.critics` (ADD / APT: the discriminator; DMD2: the fake score
   and, with its GAN term, the head), each with its own optimiser and gradient clip;
2. if ``plan.update_g``, one generator update from :meth:`~AdversarialMethod.generator_loss`, every
   critic network frozen (no gradient accumulates in it; the input gradient still flows).

The plan comes from an attached :class:`~lightning_distill.gan.plan.AdversarialSchedule` callback
(``DiscriminatorSchedule``) when there is one, else from ``critic_updates`` (critic updates per
iteration, fractions allowed), ``generator_every`` (a generator update on every N-th iteration: DMD2's
two time-scale update rule) and ``critic_warmup`` (critic-only iterations first).

Step counting, the same for every adversarial method: ``trainer.global_step`` (``max_steps``,
checkpoint intervals, the EMA callback) counts iterations. Lightning counts every
``LightningOptimizer.step``, so only the last update of an iteration is stepped that way; the others go
through the same ``strategy.optimizer_step`` path (precision plugin, ``on_before_optimizer_step``
hooks) uncounted. The checkpointed buffer ``gan_iteration`` counts iterations too (the plan and the
random streams read it).

Randomness of an iteration comes from a generator seeded by (seed, iteration, rank), so a resumed run
repeats the uninterrupted one and DDP ranks draw different noise; validation uses one fixed stream.

The default :meth:`~AdversarialMethod.critic_loss` / :meth:`~AdversarialMethod.generator_loss` are
those of a discriminator on images (ADD, APT): a subclass sets ``self.discriminator`` and implements
:meth:`~AdversarialMethod.generate`. DMD2 supplies its own pair.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .. import lora
from ..errors import ConfigError
from ..export import load_student_state
from ..gan.discriminators import Discriminator
from ..gan.losses import GAN_LOSSES, GanLoss, approx_r1_penalty, r1_penalty
from ..gan.plan import StepPlan, attached_schedule, d_updates_at, iteration_generator
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput, check_finite, default_optimizer
from .manual_optimisation import ManualOptimisation

R1Kind = Literal["true", "approx", "none"]


@dataclass
class Generated:
    """A generator output: the fake images and the condition they were made with.

    Attributes:
        x: the fake images.
        class_labels: their class labels (class-conditional students), for the discriminator's heads.
        cond: the network keywords they were made with (:meth:`AdversarialMethod.network_cond`: class
            labels or a text student's prompt keywords), for the teacher and a discriminator that reads a
            conditional network.
    """

    x: Tensor
    class_labels: Tensor | None = None
    cond: dict = field(default_factory=dict)


@dataclass
class CriticOutput:
    """The critic loss of one update and what a schedule callback reads (all but ``loss`` detached).

    Attributes:
        loss: the total critic loss and its logged terms.
        d_loss: the GAN discriminator term alone (None without one).
        real_logits, fake_logits: the discriminator's logits on real and fake images (None without).
    """

    loss: LossOutput
    d_loss: Tensor | None = None
    real_logits: Tensor | None = None
    fake_logits: Tensor | None = None


@dataclass(frozen=True)
class Critic:
    """A network trained in the critic step: its optimiser factory and gradient-norm clip.

    ``follows_d_lr_scale``: the plan's ``d_lr_scale`` multiplies its learning rate (the discriminator;
    not DMD2's fake score, which must keep tracking the generator).
    """

    module: nn.Module
    optimizer: OptimizerCallable
    clip: float | None
    follows_d_lr_scale: bool = True


@contextmanager
def frozen(params: Iterable[nn.Parameter]):
    """Temporarily set ``requires_grad=False`` on the given parameters (restored on exit)."""
    changed = [p for p in params if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def load_init_state(unet: nn.Module, state: dict[str, Tensor], init_from: str) -> None:
    """Load a trained student's weights (``load_student_state(init_from)``) into ``unet``: all must fit."""
    if lora.has_lora(unet):  # checked first: a partial load would write into a base shared with the teacher
        raise ConfigError(f"init_from {init_from!r} loads a full student; it cannot be combined with student_lora")
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"init_from {init_from!r} does not fit the student UNet: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def remember_initial_lr(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Store each group's configured rate as ``initial_lr``: the plan's ``d_lr_scale`` is relative to
    it, and it is saved with the optimiser state, so a resumed run scales the same base rate."""
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


class AdversarialMethod(ManualOptimisation, DistillationMethod):
    """Generator (``student``) against critic networks, trained by one manual-optimisation loop.

    Args:
        init_from: start the generator from a trained student instead of the teacher: a ``.ckpt`` of
            any method or an exported pipeline folder (its UNet must fit the student's).
        init_use_ema: take the checkpoint's sampling-EMA weights when it has them.
        discriminator_optimizer: optimiser factory of the discriminator (the generator's is ``optimizer``,
            its LR schedule ``lr_scheduler``, stepped per generator update).
        gan_loss: ``"hinge"`` or ``"non_saturating"``.
        r1: ``"true"`` (double backward), ``"approx"`` (APT) or ``"none"``.
        r1_weight: weight of the R1 term in the discriminator loss (gamma / 2 for true R1).
        r1_sigma: perturbation scale of the approximated R1.
        critic_updates: critic updates per iteration when no schedule callback is attached (fractions
            allowed: 0.5 = one every other iteration).
        generator_every: a generator update on every N-th iteration (after ``critic_warmup``).
        critic_warmup: critic-only iterations before the first generator update.
        generator_grad_clip, discriminator_grad_clip: max gradient norm per network (None: off).
        **kwargs: :class:`DistillationMethod`'s arguments (teacher, student, optimizer, sample_steps, ...).
    """

    hparams_ignore = DistillationMethod.hparams_ignore + ("discriminator_optimizer",)

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        init_from: str | None = None,
        init_use_ema: bool = True,
        discriminator_optimizer: OptimizerCallable = default_optimizer,
        gan_loss: GanLoss = "hinge",
        r1: R1Kind = "true",
        r1_weight: float = 1.0,
        r1_sigma: float = 0.01,
        critic_updates: float = 1.0,
        generator_every: int = 1,
        critic_warmup: int = 0,
        generator_grad_clip: float | None = None,
        discriminator_grad_clip: float | None = None,
        **kwargs,
    ) -> None:
        if gan_loss not in GAN_LOSSES:
            raise ConfigError(f"unknown gan_loss {gan_loss!r}; choose one of {sorted(GAN_LOSSES)}")
        if r1 not in ("true", "approx", "none"):
            raise ConfigError(f"unknown r1 {r1!r}; choose 'true', 'approx' or 'none'")
        d_updates_at(0, critic_updates)  # validates the ratio
        if generator_every < 1 or critic_warmup < 0:
            raise ConfigError(f"need generator_every >= 1 and critic_warmup >= 0, got {generator_every}, {critic_warmup}")
        if critic_updates < 1 and (critic_warmup > 0 or generator_every > 1):
            # some iteration would then update nothing, and max_steps would stop counting iterations
            raise ConfigError(
                f"critic_updates={critic_updates} < 1 leaves iterations without a critic update, so it needs a "
                f"generator update on every iteration: critic_warmup=0 and generator_every=1 (got {critic_warmup}, {generator_every})"
            )
        state = None
        if init_from is not None:
            state, recorded = load_student_state(init_from, init_use_ema)
            kwargs["student_prediction_type"] = kwargs.get("student_prediction_type") or recorded
        super().__init__(teacher=teacher, **kwargs)
        if state is not None and self.student is None:
            raise ConfigError(f"{type(self).__name__} needs a teacher (set data.teacher) to start from init_from")
        if state is not None:
            load_init_state(self.student.unet, state, init_from)
        self.automatic_optimization = False
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.d_loss_fn, self.g_loss_fn = GAN_LOSSES[gan_loss]
        self.discriminator: Discriminator | None = None
        # Iterations done; persistent so that resumed runs continue the plan and the random streams.
        self.register_buffer("gan_iteration", torch.zeros((), dtype=torch.long))

    # --- what a subclass supplies --------------------------------------------------------------

    def critics(self) -> list[Critic]:
        """The networks of the critic step, in the order they are stepped (default: the discriminator)."""
        if self.discriminator is None:
            raise ConfigError(f"{type(self).__name__} has no discriminator")
        return [Critic(self.discriminator, self.discriminator_optimizer_factory, self.hparams.discriminator_grad_clip)]

    def generate(self, batch: dict, gen: torch.Generator) -> Generated:  # pragma: no cover - abstract
        """Fake images for a batch (with gradient to the student when grad is enabled)."""
        raise NotImplementedError

    def discriminator_t_range(self) -> tuple[int, int] | None:
        """``(lo, hi)``: D sees its inputs noised to a random t in that range (and gets t); None: clean."""
        return None

    def generator_extra_loss(self, fake: Generated, batch: dict, gen: torch.Generator) -> LossOutput | None:
        """Non-adversarial generator terms (weighted already); None when there are none."""
        return None

    # --- the losses of a discriminator on images (ADD, APT) -------------------------------------

    def discriminate(
        self, x: Tensor, class_labels: Tensor | None, gen: torch.Generator, cond: dict | None = None
    ) -> Callable[[Tensor], Tensor]:
        """Return D as a function of images only, with any internal randomness drawn now from ``gen``.

        With :meth:`discriminator_t_range` (APT; ADD's LADD option) the images are noised at a random t,
        one t and one noise draw per sample taken here, so real, fake and R1 evaluations see the same
        function of the image. The backbone gets the network's own timestep of t
        (``schedule.model_timestep``: t itself on the VP path, s_t * T on the flow path).

        ``cond``: the text keywords of the images (:attr:`Generated.cond`): a conditional backbone gets
        them all, heads with a condition embedding the pooled text embedding (``pooled_projections``).
        """
        d = self.discriminator
        labels = class_labels if d.heads.class_embed is not None or d.backbone_cond else None
        # class labels reach the backbone as ``class_labels`` (backbone_cond); text keywords as they are
        net_cond = {k: v for k, v in (cond or {}).items() if k != "class_labels"} if d.backbone_cond else {}
        emb = (cond or {}).get("pooled_projections") if d.heads.cond_dim else None
        t_range = self.discriminator_t_range()
        if t_range is None:
            return lambda images: d(images, class_labels=labels, cond_embedding=emb, **net_cond)
        t = torch.randint(int(t_range[0]), int(t_range[1]) + 1, (x.shape[0],), generator=gen, device=x.device)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        sched = self.student.schedule
        model_t = sched.model_timestep(t)

        def d_fn(images: Tensor) -> Tensor:
            n = images.shape[0]
            kw = {k: v[:n] for k, v in net_cond.items()}
            return d(sched.add_noise(images, noise[:n], t[:n]), model_t[:n], class_labels=labels,
                     cond_embedding=None if emb is None else emb[:n], **kw)

        return d_fn

    def network_cond(self, batch: dict) -> dict:
        """The keywords every network gets for a batch: a text student's prompt keywords
        (``TextToImageMixin.text_cond``), else the class labels of a class-conditional one, else none."""
        if getattr(self, "text_conditional", False):
            return self.text_cond(batch)
        labels = self._labels(batch)
        return {"class_labels": labels} if labels is not None else {}

    def discriminator_probe_cond(self) -> dict | None:
        """Network keywords for the discriminator's shape probe (batch 2): a text teacher's keywords of the
        prompt ""; None otherwise (class labels are the discriminator's own ``backbone_cond``)."""
        if not getattr(self, "text_conditional", False):
            return None
        return {k: v.expand(2, *v.shape[1:]).cpu() for k, v in self.uncond_text_cond().items()}

    def r1_term(self, d_fn: Callable[[Tensor], Tensor], real: Tensor, real_logits: Tensor, gen: torch.Generator, weight: float) -> Tensor | None:
        """The configured R1 penalty of ``d_fn`` on ``real`` (unweighted), or None when off."""
        if self.hparams.r1 == "none" or weight <= 0:
            return None
        if self.hparams.r1 == "true":
            return r1_penalty(d_fn, real)
        noise = torch.randn(real.shape, generator=gen, device=real.device, dtype=real.dtype)
        return approx_r1_penalty(d_fn, real, self.hparams.r1_sigma, noise=noise, real_logits=real_logits)

    def critic_loss(self, batch: dict, gen: torch.Generator, plan: StepPlan) -> CriticOutput:
        """D loss on real images vs fresh fakes (+ weighted R1); ``plan.train_d_backbone=False`` trains the heads only."""
        backbone = [] if plan.train_d_backbone else self.discriminator.backbone_parameters()
        with frozen(backbone):  # leaves the backbone out of the graph, so backward gives it no gradient
            real = batch["x"]
            with torch.no_grad():
                fake = self.generate(batch, gen)
            d_fn = self.discriminate(real, fake.class_labels, gen, fake.cond)
            real_logits = d_fn(real)
            fake_logits = d_fn(fake.x.detach())
            gan = self.d_loss_fn(real_logits, fake_logits)
            loss, logs = gan, {"d_loss": gan.detach()}
            weight = self.hparams.r1_weight * plan.r1_scale
            penalty = self.r1_term(d_fn, real, real_logits, gen, weight)
            if penalty is not None:
                loss = loss + weight * penalty
                logs["r1"] = penalty.detach()
        return CriticOutput(LossOutput(loss, logs), gan.detach(), real_logits.detach(), fake_logits.detach())

    def generator_loss(self, batch: dict, gen: torch.Generator) -> LossOutput:
        """Adversarial G loss on fresh fakes plus :meth:`generator_extra_loss`."""
        fake = self.generate(batch, gen)
        d_fn = self.discriminate(batch["x"], fake.class_labels, gen, fake.cond)
        adv = self.g_loss_fn(d_fn(fake.x))
        loss, logs = adv, {"g_adv": adv.detach()}
        extra = self.generator_extra_loss(fake, batch, gen)
        if extra is not None:
            loss = loss + extra.loss
            logs.update({k: v.detach() for k, v in extra.logs.items()})
        logs["g_loss"] = loss.detach()
        return LossOutput(loss, logs)

    # --- plan, randomness, optimisers -----------------------------------------------------------

    def plan(self, step: int) -> StepPlan:
        """An attached schedule callback's plan, else ``critic_updates`` / ``generator_every`` / ``critic_warmup``."""
        cb = attached_schedule(self._trainer)
        if cb is not None:
            return cb.plan(step)
        hp = self.hparams
        after = step - hp.critic_warmup
        return StepPlan(update_g=after >= 0 and after % hp.generator_every == 0, d_updates=d_updates_at(step, hp.critic_updates))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        hp = self.hparams
        own = {"critic_updates": hp.critic_updates, "generator_every": hp.generator_every, "critic_warmup": hp.critic_warmup}
        if attached_schedule(self._trainer) is not None and own != {"critic_updates": 1.0, "generator_every": 1, "critic_warmup": 0}:
            rank_zero_warn(
                f"{type(self).__name__}: the attached DiscriminatorSchedule plans every iteration, so the method's "
                f"{own} are not used; set the schedule's d_updates_per_g / d_warmup_steps instead"
            )

    def step_generator(self, step: int) -> torch.Generator:
        """Random stream of iteration ``step`` on this process: see :func:`~lightning_distill.gan.plan.iteration_generator`."""
        return iteration_generator(self.hparams.seed, step, self.device, self.global_rank)

    def critic_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.critics() for p in c.module.parameters()]

    def configure_optimizers(self):
        g_opt = self.optimizer_factory(self.trainable_parameters())
        opts = [g_opt]
        for c in self.critics():
            opt = c.optimizer([p for p in c.module.parameters() if p.requires_grad])
            opts.append(remember_initial_lr(opt) if c.follows_d_lr_scale else opt)
        if self.lr_scheduler_factory is None:
            return opts
        return opts, [{"scheduler": self.lr_scheduler_factory(g_opt), "interval": "step"}]

    # --- the loop -------------------------------------------------------------------------------

    def compute_loss(self, batch: dict) -> LossOutput:
        """Validation: the critic and generator losses of the current networks, no update, no R1."""
        # a fixed stream, disjoint from the training iterations' ones: its low 32 bits (all a CPU generator's
        # seed keeps) are nonzero too; 2**40 alone replayed iteration 0's draws on the CPU
        gen = self.step_generator(2**40 + 0x5BD1E995)
        critic = self.critic_loss(batch, gen, StepPlan(r1_scale=0.0))
        with torch.no_grad():
            g_out = self.generator_loss(batch, gen)
        return LossOutput(g_out.loss.detach() + critic.loss.loss.detach(), {**critic.loss.logs, **g_out.logs})

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        step = int(self.gan_iteration)
        plan = self.plan(step)
        gen = self.step_generator(step)
        if plan.d_updates == 0 and not plan.update_g:
            raise ConfigError(
                f"iteration {step} would update no network ({plan}): max_steps counts iterations, so every "
                "iteration must take a critic or a generator update (check the DiscriminatorSchedule's "
                "d_warmup_steps / freeze_d_after and the method's critic_updates)"
            )
        g_opt, *critic_opts = self.optimizers()
        critics = self.critics()
        for c, opt in zip(critics, critic_opts):
            if c.follows_d_lr_scale:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * plan.d_lr_scale
        logs: dict[str, Tensor] = {}
        critic = None
        # 1. critic updates (Goodfellow et al. 2014, Algorithm 1: k D steps per G step)
        for i in range(plan.d_updates):
            critic = self.critic_loss(batch, gen, plan)
            check_finite(critic.loss, self.global_step)
            for opt in critic_opts:
                opt.zero_grad(set_to_none=True)
            self.manual_backward(critic.loss.loss)
            last = i == plan.d_updates - 1 and not plan.update_g
            self.step_optimizers(
                [(opt, c.clip, last and j == len(critic_opts) - 1) for j, (c, opt) in enumerate(zip(critics, critic_opts))]
            )
            logs.update(critic.loss.logs)
        # 2. generator update, critics frozen (no gradient accumulates in them; the input gradient flows)
        if plan.update_g:
            with frozen(self.critic_parameters()):
                g_out = self.generator_loss(batch, gen)
                check_finite(g_out, self.global_step)
                g_opt.zero_grad(set_to_none=True)
                self.manual_backward(g_out.loss)
            self.step_optimizer(g_opt, self.hparams.generator_grad_clip)
            sched = self.lr_schedulers()
            if sched is not None:
                sched.step()
            logs.update(g_out.logs)
        self.gan_iteration += 1
        if logs:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, batch_size=batch["x"].shape[0])
        # What a DiscriminatorSchedule callback reads in on_train_batch_end.
        return {
            "plan": plan,
            "iteration": step,
            "d_loss": critic.d_loss if critic is not None else None,
            "g_loss": logs.get("g_loss"),
            "real_logits": critic.real_logits if critic is not None else None,
            "fake_logits": critic.fake_logits if critic is not None else None,
        }


__all__ = [
    "AdversarialMethod",
    "Critic",
    "CriticOutput",
    "Generated",
    "R1Kind",
    "frozen",
    "load_init_state",
    "remember_initial_lr",
]
