"""``DistillationMethod``: the LightningModule every method subclasses.

What it owns:
  * ``student`` (a :class:`~lightning_distill.parametrisation.Denoiser`) and the frozen ``teacher``.
  * The optimiser (``OptimizerCallable``) over ``trainable_parameters()``, the student by default.
  * ``sample(n, steps, generator)``: the student's sampler, a loop over a stock diffusers scheduler so
    that the exported pipeline reproduces it sample for sample.
  * Image-grid logging every ``sample_every_n_steps`` global steps, and a finite-loss guard.

Checkpoint rule for the teacher: a teacher loaded from a source (a folder or hub id) is reloadable and
its weights are left out of checkpoints (they are re-read from the source on resume). A teacher that
has no source, such as a progressive-distillation student promoted to teacher, is saved in full.

A subclass writes its maths as pure functions and implements ``compute_loss(batch) -> LossOutput``.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from .. import backbones
from ..errors import ConfigError
from ..losses import LossOutput, NonFiniteLossError, check_finite  # noqa: F401 - re-exported for methods and the CLI
from ..nn_utils import eval_mode, lcm_step_limit  # eval_mode is re-exported: methods import it from here
from .. import checkpoint_content, lora, memory, sharding
from ..checkpoint_content import build_module, module_spec  # noqa: F401 - re-exported: methods import them here
from ..lora import LoraSpec
from ..parametrisation import Denoiser, PredictionType
from ..resume import offset_seed
from ..sampling import VP_SAMPLER_PREDICTIONS
from ..teacher import DiffusionTeacher


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class DistillationMethod(L.LightningModule):
    """Base class: a trainable ``student`` denoiser, an optional frozen ``teacher``, sampling and logging.

    Args:
        teacher: the frozen teacher (from ``TeacherDataModule.teacher``; linked by the CLI).
        student: the student network (a diffusers UNet). None: a copy of the teacher's UNet.
        student_prediction_type: what the student outputs; None keeps the teacher's.
        student_lora: train a LoRA of the student instead of all its weights
            (``{rank, alpha, target_modules, init, base}``, :class:`~lightning_distill.lora.LoraSpec`): only the
            adapters train, on the teacher's own frozen weights by default (``base: shared``); checkpoints hold the adapters and a reference to the base (the teacher's source);
            the export is the fused network plus the adapter file ``pytorch_lora_weights.safetensors``.
        gradient_checkpointing: activation checkpointing of the student (DMD2: and of its fake score) through
            the diffusers model's ``enable_gradient_checkpointing()`` (:mod:`lightning_distill.memory`).
        teacher_offload: keep the frozen teacher network's weights on the CPU, copied to the device for each
            of its calls only (:func:`~lightning_distill.memory.offload_between_calls`; a no-op on a CPU run).
        optimizer: optimiser factory for ``trainable_parameters()``.
        lr_scheduler: optional LR scheduler factory (stepped every optimiser step; in the adversarial
            loop, every generator update).
        sample_steps: step count used for logged sample grids and ``predict``.
        sample_every_n_steps: log an image grid every N global steps (0: never).
        num_log_samples: images per logged grid.
        seed: seed of the fixed noise used for logged grids.

    Example::

        >>> class MyMethod(DistillationMethod):
        ...     def compute_loss(self, batch):
        ...         ...
        ...         return LossOutput(loss, {"mse": loss})
    """

    #: init args kept out of ``hparams``: the teacher (re-linked by the CLI) and factories (not
    #: serialisable). A subclass with more such arguments extends the tuple. Every key left in hparams
    #: must be a constructor argument: ``load_from_checkpoint`` and a CLI resume pass them back.
    hparams_ignore: tuple[str, ...] = ("teacher", "optimizer", "lr_scheduler")
    #: the method differentiates the student numerically (sCD, MeanFlow): its network must compute in float32
    float32_student: bool = False

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        student: nn.Module | None = None,
        student_prediction_type: PredictionType | None = None,
        student_lora: LoraSpec | None = None,
        gradient_checkpointing: bool = False,
        teacher_offload: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        sample_steps: int = 4,
        sample_every_n_steps: int = 0,
        num_log_samples: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Saved once, here, for the whole class hierarchy: Lightning collects the init args of every
        # subclass frame above this one (a subclass's local reassigned before super().__init__ is saved
        # as reassigned). The student config stays so `load_from_checkpoint(path, teacher=...)` rebuilds it.
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        # Under LightningCLI hparams are the parsed config instead, which holds a subclass's unresolved
        # default (ADD's sample_steps None = num_student_steps): record the step count in use.
        self.hparams.sample_steps = sample_steps
        self.teacher = teacher
        self.register_load_state_dict_pre_hook(self._restore_before_load)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.student: Denoiser | None = None
        if teacher_offload and teacher is None:
            raise ConfigError(f"teacher_offload needs a teacher; {type(self).__name__} has none (set it to false)")
        # a student derived from the teacher (its copy, with adapters) is rebuilt identically on resume, so
        # a LoRA checkpoint can leave its frozen base out (on_save_checkpoint)
        self._student_from_teacher = student is None
        if teacher is not None or student is not None:
            self.build_student(student, student_prediction_type)
            if "student_prediction_type" in self.hparams:
                # resolved (teacher's, or an init_from student's): a checkpoint names what the student outputs
                self.hparams.student_prediction_type = self.student.prediction_type

    def set_sample_steps(self, steps: int) -> None:
        """Change the step count of logged grids, ``predict`` and FID "current" (progressive rounds).

        Stored in ``hparams``, so a checkpoint records it and a resumed run (which re-applies hparams as
        constructor arguments) starts from it until the checkpoint's own state sets it again.
        """
        self.hparams.sample_steps = steps

    # --- construction --------------------------------------------------------------------------

    @property
    def shares_teacher_base(self) -> bool:
        """Whether the student is a LoRA network whose frozen base is the teacher's own tensors
        (``student_lora.base: shared`` and no student given: one derived from the teacher)."""
        spec = LoraSpec.from_config(self.hparams.get("student_lora"))
        return spec is not None and spec.base == "shared" and self._student_from_teacher

    def build_student(self, student: nn.Module | None, prediction_type: PredictionType | None) -> None:
        """Wrap the student network in a Denoiser that shares the teacher's schedule."""
        if self.teacher is None:
            raise ConfigError(f"{type(self).__name__} needs a teacher (set data.teacher)")
        student, spec = build_module(student), LoraSpec.from_config(self.hparams.get("student_lora"))
        shared = self.shares_teacher_base
        if student is None:  # a LoRA student on the teacher's own weights (no copy) or a float32 copy
            student = lora.shared_copy(self.teacher.unet) if shared else copy.deepcopy(self.teacher.unet).float()
        student = backbones.prepare_student(student)  # DiT: its label dropout switched off
        if spec is None:  # (a LoRA student's requires_grad is set by add_lora; a shared base stays frozen)
            student.requires_grad_(True)
        student.train()
        if self.hparams.get("gradient_checkpointing"):
            memory.enable_gradient_checkpointing(student, "student")
        if spec is not None:
            from diffusers.training_utils import cast_training_params
            from lightning.pytorch.utilities import rank_zero_info

            # freezes the base; layers a teacher-derived student adds (LCM's w input) train in full
            new = lora.new_layers(student, self.teacher.unet) if self._student_from_teacher else ()
            lora.add_lora(student, spec, seed=self.hparams.get("seed", 0), train_in_full=new)
            cast_training_params(student, dtype=torch.float32)  # adapters on a bf16 shared base: float32
            if shared:  # LCM / MeanFlow rebuilt the network as a copy: its frozen base becomes the teacher's
                lora.tie_base(student, self.teacher.unet)
            trainable, total = lora.parameter_counts(student)
            base = f"{lora.shared_tensors(student, self.teacher.unet)} base tensors are the teacher's" if shared else "base copied"
            rank_zero_info(f"{type(self).__name__}: LoRA student, {trainable:,} of {total:,} parameters train; {base}")
        prediction_type = prediction_type or self.teacher.prediction_type
        velocity = self.teacher.schedule.velocity_prediction
        if self.teacher.schedule.path == "flow" and prediction_type != velocity:
            # the stock flow samplers (FlowMatch*Scheduler) step with the velocity: nothing else exports
            raise ConfigError(
                f"a student of a flow-matching teacher predicts the velocity ({velocity!r}): "
                f"student_prediction_type {prediction_type!r} has no stock flow sampler"
            )
        if self.teacher.schedule.path == "vp" and prediction_type not in VP_SAMPLER_PREDICTIONS:
            # DDIM / LCM / DPM-Solver refuse the flow velocity: fail here, not at the first sample after training
            raise ConfigError(
                f"a student of a variance-preserving teacher has a stock VP sampler only for "
                f"{', '.join(VP_SAMPLER_PREDICTIONS)}: student_prediction_type {prediction_type!r} has none"
            )
        self.student = Denoiser(student, self.teacher.schedule.copy(), prediction_type, self.teacher.denoiser.clip_x0)
        self.student_scheduler_config = dict(self.teacher.scheduler_config)

    def trainable_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]

    # --- Lightning plumbing --------------------------------------------------------------------

    def to(self, *args, **kwargs):
        # an offloaded teacher network stays on the CPU (it moves for each of its calls: memory.py)
        with memory.kept_on_cpu(getattr(getattr(self, "teacher", None), "denoiser", None), "unet", args, kwargs):
            return super().to(*args, **kwargs)

    def setup(self, stage: str) -> None:
        lora.check_shared_base(self, self._trainer)  # what a network sharing another's tensors cannot run with
        if self.hparams.get("teacher_offload"):  # here, after every copy of the teacher's network is made
            memory.check_strategy(self._trainer)
            memory.offload_between_calls(self.teacher.unet)
        # Without a teacher (DiffusionTraining) nothing else compares the data with the network: a
        # channel or size mismatch would otherwise surface as a conv error inside the first step.
        shape = getattr(getattr(self._trainer, "datamodule", None), "sample_shape", None)
        if self.student is not None and shape is not None and tuple(shape) != self.sample_shape:
            from ..data import DataError

            raise DataError(
                f"the data gives samples of shape {tuple(shape)} but the {type(self).__name__} student "
                f"expects {self.sample_shape} (match data.channels / data.image_size to the network)"
            )

    def configure_model(self) -> None:
        # under ModelParallelStrategy: FSDP2 of the Denoiser networks (sharding.py); otherwise nothing
        sharding.configure_model(self)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        # Random state in checkpoints, so a resumed run draws the noise an uninterrupted one would; a warning
        # when a resume's restored optimiser state replaces a newly configured learning rate.
        from ..resume import OptimizerSettingsCheck, ResumeRNG

        return [ResumeRNG(), OptimizerSettingsCheck()]

    def compute_loss(self, batch: dict) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.compute_loss(batch)
        check_finite(out, self.global_step)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()}, prog_bar=True, batch_size=batch["x"].shape[0])
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: dict, prefix: str) -> Tensor:
        # Fixed seed: validation losses of the same weights are comparable across epochs and runs. manual_seed
        # seeds every device: the module's own accelerator's generator is restored too (else each rank's
        # training noise would restart from seed + 1 after every validation, the same on every rank).
        accel = self.device.type != "cpu"
        with torch.random.fork_rng(devices=[self.device] if accel else [], device_type=self.device.type if accel else None):
            torch.manual_seed(self.hparams.seed + 1)
            out = self.compute_loss(batch)
        # on the module's device: sync_dist reduces each value across ranks, and NCCL has no CPU tensors
        logs = {f"{prefix}/{k}": torch.as_tensor(v, device=self.device) for k, v in out.logs.items()}
        self.log_dict(logs, sync_dist=True, batch_size=batch["x"].shape[0])
        return out.loss

    def predict_generator(self, batch_idx: int) -> torch.Generator:
        """The noise of prediction batch ``batch_idx`` on this rank (each rank numbers its own batches from 0:
        with ``seed + batch_idx`` alone, the ranks of a DDP predict drew the same noise)."""
        world = self._trainer.world_size if self._trainer is not None else 1  # (predict_step called directly)
        stream = batch_idx * world + self.global_rank
        return torch.Generator(device="cpu").manual_seed(offset_seed(self.hparams.seed, stream))

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        gen = self.predict_generator(batch_idx)
        return self.sample(batch["x"].shape[0], self.hparams.sample_steps, gen, labels=self._labels(batch))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.hparams.sample_every_n_steps
        if every and self.global_step % every == 0 and self.global_step > 0:
            self.log_sample_grid()

    # --- teacher in checkpoints ----------------------------------------------------------------

    def _lora_prefixes(self) -> list[str]:
        """State-dict prefixes of the LoRA networks whose frozen base is rebuilt from the teacher on resume
        (the student and its copies, e.g. consistency distillation's theta_minus)."""
        if not (self._student_from_teacher and self.teacher is not None and self.teacher.reloadable):
            return []
        return [f"{name}.unet." for name, child in self.named_children()
                if isinstance(child, Denoiser) and lora.has_lora(child.unet)]

    def _left_out_base_prefixes(self) -> list[str]:
        """Every network whose frozen base a checkpoint leaves out and a resume re-reads from the teacher
        (:meth:`_lora_prefixes`; DMD2 adds its LoRA fake score): what ``check_left_out_base`` guards."""
        return self._lora_prefixes()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hparams = checkpoint.get("hyper_parameters") or {}
        for key, value in list(hparams.items()):
            if isinstance(value, nn.Module):
                hparams[key] = module_spec(value)
            elif isinstance(value, LoraSpec):  # plain types: weights_only loading refuses dataclasses
                hparams[key] = value.to_dict()
        if self.teacher is not None and self.teacher.reloadable:
            checkpoint["teacher_source"] = {"source": self.teacher.source, "revision": self.teacher.revision}
            if self._left_out_base_prefixes():  # the base as it is (dtype, bytes): a resume must re-read the same
                checkpoint["teacher_source"].update(checkpoint_content.base_identity(self.teacher))
        if not sharding.is_sharded_state(checkpoint["state_dict"]):  # FSDP2 shards: its loader needs every key
            checkpoint_content.drop_left_out_weights(checkpoint["state_dict"], self._lora_prefixes(), self.teacher)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint_content.check_lora_spec(checkpoint, self.hparams.get("student_lora"))
        checkpoint_content.check_left_out_base(checkpoint.get("teacher_source"), self.teacher, self._left_out_base_prefixes())
        if "state_dict" in checkpoint:  # FSDP strategies pop it: loaded already, through the pre-hook below
            self.restore_left_out_weights(checkpoint["state_dict"])

    def restore_left_out_weights(self, sd: dict, prefix: str = "") -> None:
        """Put back into ``sd`` what :meth:`on_save_checkpoint` left out (:mod:`lightning_distill.checkpoint_content`);
        also a ``load_state_dict`` pre-hook, as FSDP strategies load the state before ``on_load_checkpoint``."""
        networks = {lp: self.get_submodule(lp[:-len(".unet.")]).unet for lp in self._lora_prefixes()}
        checkpoint_content.restore_left_out_weights(sd, networks, self.teacher, prefix)

    def _restore_before_load(self, module, state_dict, prefix, *args) -> None:
        self.restore_left_out_weights(state_dict, prefix)

    # --- sampling ------------------------------------------------------------------------------

    def _labels(self, batch: dict) -> Tensor | None:
        return batch["label"] if self.is_class_conditional else None

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional student (UNet ``num_class_embeds``, DiT ``num_embeds_ada_norm``)."""
        return backbones.num_classes(self.student.unet)

    @property
    def is_class_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample, read from the student network's config through its backbone adapter."""
        return backbones.sample_shape(self.student.unet)

    def make_scheduler(self):
        """The stock diffusers scheduler that defines the student's sampler (and its export).

        DDIM on the VP path, flow Euler on the flow path (``sampling.deterministic_scheduler``);
        x0-sampler methods override it with ``sampling.lcm_scheduler``.
        """
        from ..sampling import deterministic_scheduler

        return deterministic_scheduler(
            self.student_scheduler_config, self.student.schedule, self.student.prediction_type, self.student.clip_x0
        )

    def sampling_scheduler(self, steps: int):
        """``make_scheduler()`` set up for ``steps`` steps (``sampling.at_steps``), built once per count
        (building a diffusers scheduler costs ~15 ms)."""
        from ..sampling import at_steps

        cache = self.__dict__.setdefault("_scheduler_cache", {})
        if "base" not in cache:
            cache["base"] = self.make_scheduler()
        if steps not in cache:  # at_steps returns a VP scheduler itself: one object for every count
            cache[steps] = at_steps(cache["base"], steps, self.student.schedule)
        return cache[steps]

    def max_sample_steps(self) -> int | None:
        """The most steps the student's sampler can take (None: any number).

        An ``LCMScheduler`` sampler only visits its training grid (``original_inference_steps`` points):
        consistency, ADD and DMD2 students are trained at exactly those timesteps.
        """
        return lcm_step_limit(self.sampling_scheduler(1))

    def check_sample_steps(self, steps: int) -> None:
        """Raise a clear error for a step count the sampler cannot take."""
        if steps < 1:
            raise ConfigError(f"sampling steps must be >= 1, got {steps}")
        limit = self.max_sample_steps()
        if limit is not None and steps > limit:
            raise ConfigError(
                f"{type(self).__name__} samples with 1..{limit} steps: its sampler (LCMScheduler, "
                f"original_inference_steps = {limit}) only visits the timesteps the student was trained at; "
                f"got {steps}"
            )

    def sampling_denoiser(self) -> Denoiser:
        """The network used for sampling: the EMA copy when an EMA callback is attached."""
        trainer = self._trainer
        if trainer is not None:
            for cb in trainer.callbacks:
                module = getattr(cb, "sampling_module", None)
                if callable(module) and module(self) is not None:
                    return module(self)
        return self.student

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
        denoiser: Denoiser | None = None,
    ) -> Tensor:
        """Draw ``n`` samples in ``steps`` network evaluations; returns (n, C, H, W) in model space.

        The loop is ``DDPMPipeline``'s (noise from ``randn_tensor`` with ``generator``, then
        ``scheduler.step``), so an exported pipeline given the same generator gives the same images.
        """
        from diffusers.utils.torch_utils import randn_tensor

        from ..sampling import set_pipeline_steps

        den = denoiser or self.sampling_denoiser()
        steps = steps or self.hparams.sample_steps
        self.check_sample_steps(steps)
        sched = self.sampling_scheduler(steps)
        # as the network's stock pipeline sets them (Flux's sigmas); resets the step state, so reuse is safe
        set_pipeline_steps(sched, steps, self.student.schedule)
        device = next(den.parameters()).device
        x = randn_tensor((n, *self.sample_shape), generator=generator, device=device)
        with eval_mode(den):
            for t in sched.timesteps:
                cond = {"class_labels": labels.to(device)} if labels is not None else {}
                out = den.network(x, t.to(device), **cond).float()
                x = sched.step(out, t, x, generator=generator).prev_sample
        return x

    def log_sample_grid(self, tag: str = "samples") -> None:
        """Log a grid of samples from fixed noise to TensorBoard (rank 0 only; a sharded network's forward
        is a collective, so then every rank samples)."""
        logs = self.trainer.is_global_zero and self.logger is not None and hasattr(self.logger.experiment, "add_image")
        if logs or (self.logger is not None and sharding.is_sharded(self.sampling_denoiser())):
            from torchvision.utils import make_grid

            gen = torch.Generator().manual_seed(self.hparams.seed)
            n = self.hparams.num_log_samples
            labels = torch.arange(n) % self.num_classes if self.is_class_conditional else None
            x = self.sample(n, self.hparams.sample_steps, gen, labels=labels)
        if logs:
            grid = make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=int(n**0.5))
            self.logger.experiment.add_image(f"{tag}/{self.hparams.sample_steps}step", grid, self.global_step)

    # --- export --------------------------------------------------------------------------------

    def export(self, target, use_ema: bool = True):
        """Write the student (EMA weights when available) as a diffusers pipeline folder."""
        from ..export import export_pipeline

        den = self.sampling_denoiser() if use_ema else self.student
        vae = getattr(self.teacher, "vae", None)  # a latent DiT exports as DiTPipeline, which decodes with it
        # a LoRA student: fused, its adapter file beside it, in one atomic write (export.write_student_pipeline)
        return export_pipeline(den.unet, self.sampling_scheduler(self.hparams.sample_steps), target, vae=vae)
