"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512): halve the sampler's step count per round.

A student that samples in N DDIM steps (on a flow-matching teacher: N Euler steps of
``FlowMatchEulerDiscreteScheduler``) learns to do in one step what the frozen teacher does in two.
After a round the student becomes the teacher and N halves (:class:`~lightning_distill.callbacks.progressive.TeacherSwap`
decides when). Notation (paper, Algorithm 2 -> code):

=========================  ======================================================================
z_t                        ``z_t`` = alpha_t x + sigma_t eps at the student's grid point i
t, t', t''                 ``t``, ``t_mid``, ``s``: points 2i, 2i+1, 2i+2 of the 2N-step trailing grid
                           (the paper's u = (i+1)/N, u - 0.5/N, u - 1/N in continuous time)
z_{t''} (teacher)          ``z_teacher``: two deterministic teacher DDIM steps t -> t' -> t''
x_tilde                    ``x_tilde``: the x that makes ONE student DDIM step t -> t'' land on z_teacher
w(lambda_t)                ``loss_weight``: max(SNR_t, 1) ("truncated SNR") or SNR_t + 1
=========================  ======================================================================

Times are the model's integer timesteps on diffusers' *trailing* grid, which nests (the N-step grid is
every other point of the 2N-step grid; see ``NoiseSchedule.trailing_timesteps``), so a student's sampling
steps are exactly the next round's teacher steps, and t'' = -1 (clean, sigma = 0) on the last step.

The student predicts v or x0, never eps: an eps-student's x0 = (z - sigma eps) / alpha blows up at the
few-step high-noise end (paper, Sec. 4). A teacher of any prediction type works; the parametrisation
layer converts.

Flow-matching teachers (METHODS.md section 7): nothing here changes. On x_s = (1 - s) x + s eps the
deterministic DDIM step alpha_s' x0 + sigma_s' eps is the Euler step x_s + (s' - s) u, so the teacher's
two DDIM steps are two Euler steps and x_tilde (written with alpha, sigma only) is the x0 whose velocity
u = (z_t - x_tilde) / s carries one Euler step onto them: x_tilde = (s z_teacher - s'' z_t) / (s - s'').
The student then predicts the velocity (``flow_prediction``, the path's default), which the stock Euler
sampler steps with. With shift 1 and N dividing T its N-step grid s = 1, (N-1)/N, ..., 0 is exactly the
trailing grid trained on (``sampling.at_steps``); for other N the levels differ by rounding (< 1/T). A
shifted teacher (shift != 1) is the README's known limit: diffusers' stretched grid is then not the
trailing one (up to 0.05 in s for shift 3, N = 4), so the student samples off its training levels.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from .. import memory
from ..errors import ConfigError
from ..parametrisation import Denoiser, NoiseSchedule, expand_like
from ..sampling import sampler_grid_gap  # lived here first (__all__)
from ..teacher import DiffusionTeacher
from .base import DistillationMethod, LossOutput
from .text import TextToImageMixin

LossWeighting = Literal["truncated_snr", "snr_plus_one"]
LOSS_WEIGHTINGS = ("truncated_snr", "snr_plus_one")
STUDENT_PREDICTION_TYPES = ("v_prediction", "sample", "flow_prediction")


# --- maths (pure functions) -----------------------------------------------------------------------


def x_tilde(z_teacher: Tensor, z_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """The distillation target of Algorithm 2: x_tilde = (z_teacher - (sigma_s/sigma_t) z_t) / (alpha_s - (sigma_s/sigma_t) alpha_t).

    A DDIM step from z_t with clean estimate x is z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t;
    solving z_s = z_teacher for x gives x_tilde. At the clean endpoint s = -1 (alpha_s = 1, sigma_s = 0)
    it reduces to x_tilde = z_teacher. The denominator (alpha_s sigma_t - sigma_s alpha_t) / sigma_t is
    positive whenever s is less noisy than t.

    Args:
        z_teacher: (B, ...) the teacher's two-step result at level s.
        z_t: (B, ...) the noisy input at level t.
        alpha_t, sigma_t, alpha_s, sigma_s: (B,) noise levels of t and s.

    Returns:
        (B, ...) x_tilde.
    """
    ratio = expand_like(sigma_s / sigma_t, z_t)
    return (z_teacher - ratio * z_t) / (expand_like(alpha_s, z_t) - ratio * expand_like(alpha_t, z_t))


def loss_weight(snr: Tensor, weighting: LossWeighting = "truncated_snr") -> Tensor:
    """Per-sample weight of the x-space loss (paper, Sec. 4): max(SNR, 1) or SNR + 1.

    SNR + 1 is what a plain v-space MSE implies on the VP path (||v_hat - v||^2 = (SNR + 1) ||x_hat - x||^2);
    truncated SNR behaves like eps-loss at high SNR and like x-loss as SNR -> 0. On the flow path a
    velocity MSE would weigh the x-error by 1 / s^2 = (sqrt(SNR) + 1)^2 instead: both choices here are
    then weightings in their own right, the paper's truncated SNR the default.
    """
    if weighting == "truncated_snr":
        return snr.clamp_min(1.0)
    if weighting == "snr_plus_one":
        return snr + 1.0
    raise ConfigError(f"unknown loss_weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}")


def progressive_loss(x_hat: Tensor, target: Tensor, snr: Tensor, weighting: LossWeighting = "truncated_snr") -> Tensor:
    """Batch mean of w(SNR_t) * mean_pixels (x_hat - x_tilde)^2 (Algorithm 2, loss line)."""
    per_sample = (x_hat.float() - target.float()).pow(2).flatten(1).mean(1)
    return (loss_weight(snr.float(), weighting) * per_sample).mean()


def student_timesteps(schedule: NoiseSchedule, num_student_steps: int, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(t, t_mid, s) for student grid indices ``i`` in [0, N): points 2i, 2i+1, 2i+2 of the 2N-step grid.

    i = 0 is the noisiest step (t = T - 1); i = N - 1 ends at s = -1 (clean).
    """
    grid = schedule.trailing_timesteps(2 * num_student_steps).to(i.device)
    return grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]


def two_step_target(teacher: Denoiser, z_t: Tensor, t: Tensor, t_mid: Tensor, s: Tensor, **cond) -> Tensor:
    """x_tilde from two deterministic teacher DDIM steps t -> t_mid -> s (call under ``torch.no_grad``)."""
    z_mid = teacher.ddim(z_t, t, t_mid, **cond)
    z_teacher = teacher.ddim(z_mid, t_mid, s, **cond)
    sched = teacher.schedule
    return x_tilde(z_teacher, z_t, sched.alpha(t), sched.sigma(t), sched.alpha(s), sched.sigma(s))


def round_lr_factor(step: int, round_length: int | None) -> float:
    """Learning-rate multiplier at round-local optimiser step ``step``: linear from 1 to 0 over the round.

    The paper anneals the rate linearly to zero within every round and restarts it at the next. The
    last step of a round (step = round_length - 1) still uses 1 / round_length, never exactly zero.
    ``round_length`` None (rounds that end on a plateau) keeps the rate constant.
    """
    if not round_length:
        return 1.0
    return max(0.0, 1.0 - step / round_length)


def check_halving(start_steps: int, final_steps: int) -> int:
    """Number of halvings from ``start_steps`` to ``final_steps``; ValueError when none reaches it."""
    if final_steps < 1 or start_steps < 1:
        raise ConfigError(f"step counts must be positive, got start {start_steps} and final {final_steps}")
    reachable = [start_steps]
    while reachable[-1] % 2 == 0:
        reachable.append(reachable[-1] // 2)
    if final_steps not in reachable:
        raise ConfigError(
            f"final_steps={final_steps} is not reachable by halving the student's {start_steps} steps; "
            f"reachable step counts: {reachable}"
        )
    return reachable.index(final_steps)


# --- the LightningModule ---------------------------------------------------------------------------


def _default_adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=5e-5)  # the paper's CIFAR-10 setting


class ProgressiveDistillation(TextToImageMixin, DistillationMethod):
    """Progressive distillation: an N-step student regresses onto two steps of the teacher.

    The student starts as a copy of the teacher's UNet (or ``student``). Rounds, teacher promotion,
    optimiser resets and stopping are driven by the ``TeacherSwap`` callback, which calls
    :meth:`promote_student`; the current N, the round index and (from round 1 on) the promoted teacher
    are saved in every checkpoint, so a resumed run continues in the same round with the same teacher.

    Randomness of the training loss (i and eps) comes from a generator seeded by ``seed``, the rank and
    a draw counter that is checkpointed, so a resumed run draws exactly what an uninterrupted one would.

    Args:
        teacher: the frozen teacher (linked from ``data.teacher``); samples well in 2N DDIM (flow: Euler) steps.
        num_student_steps: N, the student's step count in the first round (the teacher takes 2N).
        student_prediction_type: ``v_prediction`` or ``sample`` (x0) on the VP path, ``flow_prediction``
            (the only one a flow Euler sampler steps with) on the flow path; eps is refused (see module
            doc). None: the path's velocity (``v_prediction`` / ``flow_prediction``).
        loss_weighting: ``truncated_snr`` = max(SNR, 1) (the paper) or ``snr_plus_one``.
        student_dropout: dropout probability set on every ``nn.Dropout`` of the student (paper: 0);
            None keeps the network's own.
        student_clip_x0: clamp of the student's x0 in its sampler and export. None (default) keeps the
            student's DDIM step linear in its prediction, which is what x_tilde assumes; the final
            step's output may then leave [-1, 1] slightly. A promoted teacher inherits it.
        optimizer: optimiser factory for the student's parameters (Adam, lr 5e-5 by default). Its rate
            is annealed within each round (:func:`round_lr_factor`), so there is no ``lr_scheduler``.
        sample_steps: steps of logged grids and ``predict``; None: N. Every round sets it to the new N.
        sample_prompt: text-conditional (SD3) teachers: the prompt of logged grids; student and teacher see
            the batch's prompt keywords (:class:`~lightning_distill.methods.text.TextToImageMixin`, which also
            exports an SD3 student as ``StableDiffusion3Pipeline``).
        **kwargs: :class:`DistillationMethod`'s arguments: ``student`` (None copies the teacher's UNet,
            the paper's initialisation), ``sample_every_n_steps``, ``num_log_samples``, ``seed``.

    Example::

        >>> dm = TeacherDataModule(teacher="bundled:digits")
        >>> model = ProgressiveDistillation(dm.teacher, num_student_steps=16)
        >>> trainer = L.Trainer(callbacks=[TeacherSwap(steps_per_round=800, final_steps=1), EMA()])
        >>> trainer.fit(model, dm)
    """

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        num_student_steps: int = 32,
        student_prediction_type: Literal["v_prediction", "sample", "flow_prediction"] | None = None,
        loss_weighting: LossWeighting = "truncated_snr",
        student_dropout: float | None = 0.0,
        student_clip_x0: float | None = None,
        optimizer: OptimizerCallable = _default_adam,
        sample_steps: int | None = None,
        sample_prompt: str = "",
        **kwargs,
    ) -> None:
        if teacher is None:
            raise ConfigError("ProgressiveDistillation needs a teacher (set data.teacher)")
        student_prediction_type = student_prediction_type or teacher.schedule.velocity_prediction
        if student_prediction_type not in STUDENT_PREDICTION_TYPES:
            raise ConfigError(
                f"student_prediction_type {student_prediction_type!r} is not supported by progressive "
                f"distillation (eps-prediction fails at few steps); choose one of {STUDENT_PREDICTION_TYPES}"
            )
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"unknown loss_weighting {loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
        if student_dropout is not None and not 0.0 <= student_dropout < 1.0:
            raise ConfigError(f"student_dropout must lie in [0, 1), got {student_dropout}")
        T = teacher.schedule.num_train_timesteps
        if not 1 <= num_student_steps <= T // 2:
            raise ConfigError(f"num_student_steps must lie in [1, {T // 2}] (the teacher takes 2N of T={T}), got {num_student_steps}")
        # A run resumed through the CLI gets the checkpoint's sample_steps (its round's N) here.
        sample_steps = sample_steps or num_student_steps
        # No lr_scheduler: configure_optimizers anneals the rate within each round.
        super().__init__(teacher=teacher, student_prediction_type=student_prediction_type, optimizer=optimizer,
                         lr_scheduler=None, sample_steps=sample_steps, **kwargs)
        self.student.clip_x0 = student_clip_x0
        # x_tilde assumes the student samples with the path's stock DDIM / Euler step: build that sampler
        # now, so a prediction type it cannot step with (x0 or v on the flow path) fails here, before
        # training, instead of at the first logged grid or export (and say which rounds it samples off-grid).
        self.warn_off_grid_rounds(num_student_steps)
        if student_dropout is not None:
            for m in self.student.modules():
                if isinstance(m, nn.Dropout):
                    m.p = student_dropout
        self.num_student_steps = num_student_steps
        self.round_index = 0
        self._configured_teacher = (teacher,)  # a tuple: not a submodule, so neither saved nor replaced
        #: optimiser steps per round, for the LR annealing; set by ``TeacherSwap.setup``.
        self.round_length: int | None = None
        self._draws = 0

    def warn_off_grid_rounds(self, num_student_steps: int) -> None:
        """Warn (once, before training) where the stock sampler of a round's N steps off the levels that round
        trains on (:func:`sampler_grid_gap` above 1e-3 in sigma: T not divisible by N on the VP path, a
        shifted flow teacher's stretched grid); the rounds are N, N/2, ... down to 1."""
        from lightning.pytorch.utilities import rank_zero_warn

        scheduler, rounds, n = self.make_scheduler(), [], num_student_steps
        while n >= 1:
            rounds.append(n)
            n = n // 2 if n % 2 == 0 else 0
        gaps = {n: sampler_grid_gap(scheduler, self.student.schedule, n) for n in rounds}
        off = {n: round(g, 4) for n, g in gaps.items() if g > 1e-3}
        if off:
            rank_zero_warn(
                f"progressive distillation: at N = {sorted(off, reverse=True)} steps the stock sampler visits noise "
                f"levels up to {off} (N: sigma) off the grid the student trains on (DDIM steps t -> t - T // N, T = {self.student.schedule.num_train_timesteps}, or a flow shift stretching the grid); the exported student "
                "samples there. N dividing T (and shift 1 for flow) keeps them equal"
            )

    # --- loss --------------------------------------------------------------------------------------

    def _train_generator(self, device: torch.device) -> torch.Generator | None:
        """A generator for this training draw (None outside training: the global RNG, forked by eval)."""
        if not self.training:
            return None
        seed = (self.hparams.seed * 0x9E3779B1 + self._draws * 1_000_003 + self.global_rank) % (2**63)
        self._draws += 1
        return torch.Generator(device=device).manual_seed(seed)

    def compute_loss(self, batch: dict) -> LossOutput:
        x0 = batch["x"].float()
        gen = self._train_generator(x0.device)
        n = self.num_student_steps
        i = torch.randint(0, n, (x0.shape[0],), generator=gen, device=x0.device)
        eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        sched = self.student.schedule
        t, t_mid, s = student_timesteps(sched, n, i)
        if self.text_conditional:
            cond = self.text_cond(batch)
        else:
            cond = {"class_labels": batch["label"]} if self.is_class_conditional else {}
        z_t = sched.add_noise(x0, eps, t)
        with torch.no_grad():
            target = two_step_target(self.teacher.denoiser, z_t, t, t_mid, s, **cond)
        x_hat = self.student(z_t, t, clip=False, **cond).x0  # student_clip_x0 is for sampling: trained unclamped
        loss = progressive_loss(x_hat, target, sched.snr(t), self.hparams.loss_weighting)
        return LossOutput(loss, {"loss": loss})

    # --- rounds ------------------------------------------------------------------------------------

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.trainable_parameters())
        if not self.round_length:  # rounds that end on a plateau have no length to anneal over
            return opt
        # A fresh LambdaLR per round: its step counter is the round-local step (reset with the optimiser).
        # The length is read at each step, so a resume that restores the round after this call (strategies
        # that restore after setup) still anneals over the restored round's budget (TeacherSwap sets it).
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: round_lr_factor(step, self.round_length))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _promoted_teacher(self, unet: nn.Module, prediction_type: str, clip_x0: float | None) -> DiffusionTeacher:
        """A frozen, sourceless teacher (so checkpoints carry its weights) around ``unet``."""
        import diffusers

        old = self.teacher
        config = dict(old.scheduler_config)
        if "prediction_type" in config:  # FlowMatch* configs have none (and warn about an unknown key)
            config["prediction_type"] = prediction_type
        scheduler = getattr(diffusers, old.scheduler_class).from_config(config)
        teacher = DiffusionTeacher(
            unet,
            scheduler,
            prediction_type=prediction_type,
            source=None,
            vae=old.vae,
            text_encoder=old.text_encoder,
            tokenizer=old.tokenizer,
            clip_x0=clip_x0,
            text_encoder_2=old.text_encoder_2,
            tokenizer_2=old.tokenizer_2,
            max_sequence_length=old.max_sequence_length,
            # every text part of the configured teacher (SD3's T5, a Flux network's embedded guidance, a SANA
            # teacher's instruction): a round conditions the promoted network on the prompts as round 0 did (T5 ids
            # in the batches need T5)
            text_encoder_3=old.text_encoder_3,
            tokenizer_3=old.tokenizer_3,
            embedded_guidance=old.embedded_guidance,
            complex_human_instruction=old.complex_human_instruction,
        )
        # cached prompts and the record of released encoders (data.release_encoders) carry over
        teacher.prompt_table, teacher.released = old.prompt_table, old.released
        # The student's own path, not one re-read from the scheduler config: a resolution-dependent flow
        # shift (use_dynamic_shifting) was fixed for the student when it was built.
        teacher.denoiser.schedule = self.student.schedule.copy()
        for p in teacher.parameters():
            p.grad = None
        if self.hparams.get("teacher_offload"):  # the promoted network stays on the CPU between its calls too
            memory.offload_between_calls(teacher.unet)
            return teacher
        return teacher.to(self.device)

    def promote_student(self) -> None:
        """End of a round: a weight copy of the student becomes the frozen teacher and N halves."""
        if self.num_student_steps % 2:
            raise ValueError(f"cannot halve a {self.num_student_steps}-step student")
        # The promoted teacher keeps the student's x0 clamp (none by default): its two DDIM steps are then
        # exactly the steps its sampler was trained to take (clamping x0 would move them off x_tilde).
        clip = self.student.clip_x0
        self.teacher = self._promoted_teacher(self._student_copy_for_teacher(), self.student.prediction_type, clip)
        self.set_round(self.round_index + 1, self.num_student_steps // 2)

    def _student_copy_for_teacher(self) -> nn.Module:
        """A weight copy of the student's network in the precision the user chose for teachers
        (data.teacher_dtype), read from the current teacher. (A bare StopIteration from an analytic,
        parameterless teacher would escape into Lightning's data loop and silently end the epoch instead
        of the round: fall back to the student's dtype.)"""
        param = next(self.teacher.parameters(), None)
        param = param if param is not None else next(self.student.parameters())
        return copy.deepcopy(self.student.unet).to(dtype=param.dtype)

    @property
    def reference_teacher(self) -> DiffusionTeacher:
        """The configured (round-0) teacher in every round: what the FID callback's teacher line and the report
        score (:attr:`teacher` is the previous round's student from round 1 on)."""
        return self._configured_teacher[0]

    @property
    def current_steps(self) -> int:
        """The student's current step count (read by ``FIDCallback(steps=["current"])``)."""
        return self.num_student_steps

    def set_round(self, round_index: int, num_student_steps: int) -> None:
        self.round_index = round_index
        self.num_student_steps = num_student_steps
        # Logged grids, predict and export sample with the student's current step count.
        self.set_sample_steps(num_student_steps)

    # --- checkpoints -------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # drops a reloadable (round-0) teacher's weights
        checkpoint["progressive"] = {
            "round": self.round_index,
            "num_student_steps": self.num_student_steps,
            "draws": self._draws,
            "teacher_in_checkpoint": not self.teacher.reloadable,
            "teacher_prediction_type": self.teacher.prediction_type,
            "teacher_clip_x0": self.teacher.denoiser.clip_x0,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before the state dict is loaded: rebuild the promoted teacher's container here so that
        # its saved weights load into it (and it stays sourceless, hence saved again next time).
        state = checkpoint.get("progressive")
        if state is not None:
            self.set_round(state["round"], state["num_student_steps"])
            self._draws = state["draws"]
            if state["round"] > 0:  # a promoted teacher, whatever the configured one is
                self.teacher = self._promoted_teacher(  # in the configured teacher's precision, as promoted
                    self._student_copy_for_teacher(), state["teacher_prediction_type"], state["teacher_clip_x0"]
                )
        super().on_load_checkpoint(checkpoint)


__all__ = [
    "ProgressiveDistillation",
    "x_tilde",
    "loss_weight",
    "progressive_loss",
    "student_timesteps",
    "two_step_target",
    "round_lr_factor",
    "sampler_grid_gap",
    "check_halving",
]
