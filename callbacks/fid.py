"""FD / KID of the student during training (and of the teacher once per run), logged with their protocol.

Every ``every_n_steps`` global steps (iterations for the adversarial methods) and at the end of training the callback draws ``num_samples``
images from ``pl_module.sample`` (the sampling-EMA weights when an EMA callback is attached) at each
configured step count, extracts features, and logs

    fid/<feature net>/<steps>step/n<num_samples>      kid/<feature net>/<steps>step/n<num_samples>

against a reference set (the data module's train split by default) whose statistics are computed once
and cached on disk (see :func:`lightning_distill.metrics.reference_stats`). With ``log_teacher`` the
teacher's DDIM FD at the same step counts is computed once per run (kept in the checkpoint) and logged
next to it as ``.../teacher``, with a TensorBoard custom-scalars chart holding both lines.

Text-to-image students (SD1.5-style ``UNet2DConditionModel``, ``SD3Transformer2DModel``) are scored from
``prompts`` (a prompt file, a list, or ``"captions"``: the data module's captions of the reference images) with
``evaluate``'s protocol (:mod:`lightning_distill.evaluate`): image i is drawn with prompt i % P, the student by
its own ``sample(..., prompts=...)``, the teacher by ``evaluate``'s text sampler with classifier-free guidance at
``guidance_scale``. The stored teacher line is keyed by the prompts' sha256 and count and the scale, so the
numbers equal ``python -m lightning_distill.evaluate --prompts ...`` on the same models, seeds and data. A text
student without prompts is a one-line error at fit start.

Under DDP the samples are split into fixed chunks, each with its own seed, dealt round-robin to ranks
and gathered back into chunk order: the image set, and its row order (which KID's subsets depend on), is
the same for any number of ranks. Only rank 0 computes and logs.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_distill import backbones, teacher_features
from lightning_distill.errors import ConfigError
from lightning_distill.metrics import (
    ReferenceStats,
    check_kid_settings,
    chunk_bounds,
    decode_latents,
    feature_net_name,
    fingerprint,
    generated_features,
    get_feature_net,
    merge_rank_features,
    reference_stats,
    sample_teacher,
    score_features,
)

StepSpec = int | Literal["current"]
#: What a callback's ``prompts`` takes (the one-line errors name it).
PROMPT_CHOICES = ("a prompt file (one prompt per line, UTF-8), a list of prompts, or 'captions' (the data module's "
                  "captions of the reference images)")



def reference_teacher(pl_module: L.LightningModule):
    """The run's configured teacher, the one every teacher line and report row scores: the method's
    ``reference_teacher`` where it replaces ``teacher`` during the run (progressive distillation promotes each
    round's student to teacher), else ``teacher`` (None without one)."""
    teacher = getattr(pl_module, "reference_teacher", None)
    return teacher if teacher is not None else getattr(pl_module, "teacher", None)

def callback_prompts(spec: str | os.PathLike | list[str] | None):
    """A callback's ``prompts`` as :mod:`~lightning_distill.evaluate` reads them: None, ``"captions"`` (resolved
    against the run's data module by :func:`datamodule_captions` when first needed), a prompt file
    (:func:`~lightning_distill.evaluate.read_prompt_file`, read now: a wrong path fails before training) or the
    list itself (a :class:`~lightning_distill.evaluate.Prompts`)."""
    if spec is None or (isinstance(spec, str) and spec == "captions"):
        return spec
    from lightning_distill.evaluate import Prompts, read_prompt_file

    if isinstance(spec, (str, os.PathLike)):
        return read_prompt_file(spec)
    return Prompts(tuple(str(p) for p in spec), "the given list")


def datamodule_captions(datamodule, reference: str):
    """``prompts: captions``: the prompt each reference image was trained with (the run's ``data.prompt``, with each
    image's own label, or ``data.captions``), in the order of ``train_images()`` / ``val_images()`` (``all``: train
    then val). Where those are the folder's own caption file this is ``evaluate --prompts captions``' list and
    sha256 (:func:`~lightning_distill.evaluate.reference_set`); ``evaluate`` reads only that file."""
    from lightning_distill.evaluate import Prompts

    if datamodule is None or not hasattr(datamodule, "prompts") or not hasattr(datamodule, "train_images"):
        raise ConfigError("prompts 'captions' reads the data module's captions: it needs a TeacherDataModule")
    datamodule.setup()
    train, val = list(datamodule.image_train_set.indices), list(datamodule.image_val_set.indices)
    index = {"train": train, "val": val, "all": train + val}[reference]
    every = datamodule.prompts(datamodule.prompt_labels)
    return Prompts(tuple(every[i] for i in index), f"captions of the {datamodule.hparams.data} {reference} split")


def check_text_settings(
    who: str, pl_module: L.LightningModule, prompts, guidance_scale: float, student_guidance: float | None,
    teacher_sampled: bool,
) -> None:
    """One-line ConfigErrors, at fit start, for what ``evaluate`` refuses (its ``check_text_inputs`` /
    ``check_text_options``): a text-to-image student without prompts or whose ``sample()`` takes none, prompts
    for a model without text input, a guidance scale with no text teacher sampled, an LCM guidance input without
    its ``student_guidance`` g (or a g no student takes)."""
    for name, g in (("guidance_scale", guidance_scale), ("student_guidance", student_guidance)):
        if g is not None and not g >= 1:
            raise ConfigError(f"{who}: {name} must be >= 1 (the pipelines' convention, 1: no guidance), got {g}")
    net = getattr(getattr(pl_module, "student", None), "unet", None)
    text = net is not None and backbones.is_text_conditional(net)
    teacher = reference_teacher(pl_module)
    text_teacher = teacher_sampled and teacher is not None and backbones.is_text_conditional(teacher.unet)
    kind = type(net).__name__
    if text and prompts is None:
        raise ConfigError(f"{who}: the student is text-conditional ({kind}): scoring it needs prompts to condition it "
                          f"on: set prompts to {PROMPT_CHOICES}")
    if text and "prompts" not in inspect.signature(pl_module.sample).parameters:
        raise ConfigError(f"{who}: {type(pl_module).__name__}.sample() takes no prompts, so its text-conditional "
                          f"student ({kind}) cannot be scored")
    if prompts is not None and not text:
        raise ConfigError(f"{who}: prompts given, but the student ({kind}) is not text-conditional: prompts condition "
                          "text-to-image models (UNet2DConditionModel, SD3Transformer2DModel) only")
    if guidance_scale != 1 and not text_teacher:
        raise ConfigError(f"{who}: guidance_scale {guidance_scale} guides a text-to-image teacher, and none is sampled "
                          "here")
    if guidance_scale != 1 and teacher.is_guidance_distilled:
        raise ConfigError(f"{who}: guidance_scale {guidance_scale} is classifier-free guidance against \"\", and the "
                          f"teacher is guidance-distilled (guided by its embedded guidance {teacher.embedded_guidance}, "
                          "data.teacher_embedded_guidance): use 1")
    guided = text and bool(getattr(pl_module, "guidance_embedding", False))
    if guided and student_guidance is None:
        raise ConfigError(f"{who}: the student takes a guidance input (LCM's w embedding, w = g - 1): set "
                          "student_guidance g")
    if student_guidance is not None and not guided:
        raise ConfigError(f"{who}: student_guidance {student_guidance} is the g of LCM students with a guidance input, "
                          f"and {type(pl_module).__name__}'s student has none")


def check_cached_prompts(who: str, pl_module: L.LightningModule, prompts, guidance_scale: float) -> None:
    """Prompts the student and teacher can encode: once ``data.release_encoders`` dropped the text encoders, only
    those in the teacher's ``prompt_table`` (``""`` too where the teacher is guided); refused in one line at fit
    start rather than at the first evaluation."""
    teacher = reference_teacher(pl_module)
    if prompts is None or teacher is None or getattr(teacher, "released", None) is None:
        return
    needed = set(prompts.texts) | ({""} if guidance_scale != 1 else set())
    missing = sorted(p for p in needed if p not in teacher.prompt_table)
    if missing:
        raise ConfigError(f"{who}: the text encoders were released (data.release_encoders) and {len(missing)} of the "
                          f"prompts have no cached embedding (e.g. {missing[0]!r}): drop data.release_encoders to "
                          "score from prompts")


def resolve_steps(spec: list[StepSpec], pl_module: L.LightningModule) -> list[int]:
    """Step counts to evaluate; ``"current"`` is the method's current step count (progressive
    distillation halves it): ``pl_module.current_steps`` when present, else ``hparams.sample_steps``."""
    out: list[int] = []
    for s in spec:
        if s == "current":
            cur = getattr(pl_module, "current_steps", None)
            if cur is None:
                cur = getattr(pl_module, "hparams", {}).get("sample_steps")
            if cur is None:
                raise ConfigError(f"FIDCallback: steps 'current' but {type(pl_module).__name__} has neither current_steps nor hparams.sample_steps")
            s = int(cur)
        if int(s) not in out:
            out.append(int(s))
    return out


class FIDCallback(L.Callback):
    """Periodic FD / KID of the student's samples against real data.

    Args:
        every_n_steps: evaluate every N global steps (0: only at the end of training).
        num_samples: generated images per step count (M in the tag ``n<M>``).
        steps: step counts to sample at; ``"current"`` follows the method's own step count.
        feature_net: ``"digits"`` (bundled classifier, FD-digits), ``"inception"``, a saved classifier
            folder, or any ``nn.Module`` with ``num_features``.
        feature_extractor_weights_path: Inception weights file (``feature_net="inception"`` only).
        reference: which real images: the data module's ``train`` or ``val`` split, or ``all``.
        kid: also compute KID.
        kid_subsets, kid_subset_size: KID subset protocol (subset size capped at the set sizes).
        log_teacher: also log the teacher's DDIM FD at the same step counts (once per run).
        at_train_end: evaluate when training ends (if the last step was not just evaluated).
        prompts: text-to-image students: the prompts image i is drawn with (prompt i % P), as ``evaluate --prompts``:
            a prompt file (one per line, UTF-8, blank lines ignored), the list itself, or ``"captions"`` (the data
            module's captions of the ``reference`` images). Required for a text student, refused for others.
        guidance_scale: the text teacher's classifier-free guidance scale g (``log_teacher``; 1: none), as
            ``evaluate --guidance-scale``.
        student_guidance: g of an LCM student with a guidance input (it embeds w = g - 1), as
            ``evaluate --student-guidance``; required for one, refused for others.
        seed: seed of the evaluation noise (the same images every evaluation: curves show the model
            changing, not the noise), or a list of seeds: each metric is then the mean over them, the
            protocol of ``evaluate`` / ``seeds --eval-seeds`` (one seed's FD is a draw: the digits teacher's
            50-step FD-digits moves from 0.126 to 0.240 over five seeds at 2,000 samples), at one evaluation's
            cost per seed. Worth it where a checkpoint is chosen by this metric (``ModelCheckpoint(monitor=
            ...)``, ``PipelineExport(from_best=True)``).
        chunk_size: images per sampling chunk (one seed each; the unit dealt to ranks).
        cache_dir: reference-statistics cache (None: ``~/.cache/lightning_distill/reference_stats``).
        tag_format: metric name; fields ``metric``, ``feature``, ``steps``, ``num_samples``, ``reference``.

    Example::

        >>> trainer = L.Trainer(callbacks=[EMA(), FIDCallback(every_n_steps=1000, num_samples=2000, steps=[1, 2, 4])])
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 2000,
        steps: list[StepSpec] = (1, 2, 4, 8),
        feature_net: str | nn.Module = "digits",
        feature_extractor_weights_path: str | None = None,
        reference: Literal["train", "val", "all"] = "train",
        kid: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        log_teacher: bool = False,
        at_train_end: bool = True,
        seed: int | list[int] = 0,
        chunk_size: int = 250,
        cache_dir: str | None = None,
        tag_format: str = "{metric}/{feature}/{steps}step/n{num_samples}",
        prompts: str | list[str] | None = None,
        guidance_scale: float = 1.0,
        student_guidance: float | None = None,
    ) -> None:
        if every_n_steps < 0 or num_samples < 2 or chunk_size < 1:
            raise ConfigError(
                f"FIDCallback: need every_n_steps >= 0, num_samples >= 2, chunk_size >= 1; got "
                f"{every_n_steps}, {num_samples}, {chunk_size}"
            )
        bad = [s for s in steps if s != "current" and (not isinstance(s, int) or s < 1)]
        if bad or not steps:
            raise ConfigError(f"FIDCallback: steps must be positive ints or 'current', got {list(steps)}")
        check_kid_settings(kid_subsets, kid_subset_size)
        if reference not in ("train", "val", "all"):
            raise ConfigError(f"FIDCallback: reference must be 'train', 'val' or 'all', got {reference!r}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.steps = list(steps)
        self.feature_net_spec = feature_net
        self.feature_extractor_weights_path = feature_extractor_weights_path
        self.reference = reference
        self.kid = kid
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.log_teacher = log_teacher
        self.at_train_end = at_train_end
        self.seeds = [int(x) for x in seed] if isinstance(seed, (list, tuple)) else [int(seed)]
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise ConfigError(f"FIDCallback: seed must be an int or a non-empty list of distinct ints, got {seed!r}")
        self.chunk_size = chunk_size
        self.cache_dir = cache_dir
        self.tag_format = tag_format
        self.prompts = callback_prompts(prompts)  # a Prompts, "captions" (read at fit start) or None
        self.guidance_scale = float(guidance_scale)
        self.student_guidance = None if student_guidance is None else float(student_guidance)
        self._captions = None  # prompts "captions", read from the data module
        self.feature_net: nn.Module | None = None
        self._ref: ReferenceStats | None = None
        # persisted state
        self.last_eval_step = -1
        self.teacher_metrics: dict[str, float] = {}
        self.teacher_key: str | None = None  # what teacher_metrics were computed for (_teacher_key)
        self.last_metrics: dict[str, float] = {}
        self._layout_written = False

    @property
    def seed(self) -> int:
        """The first evaluation seed (the only one unless ``seed`` was given a list)."""
        return self.seeds[0]

    # --- the one small override hook -----------------------------------------------------------

    def should_evaluate(self, step: int) -> bool:
        return bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0 and step != self.last_eval_step

    # --- helpers -------------------------------------------------------------------------------

    def tag(self, metric: str, steps: int) -> str:
        return self.tag_format.format(
            metric=metric, feature=feature_net_name(self.feature_net), steps=steps, num_samples=self.num_samples,
            reference=self.reference,
        )

    def _get_feature_net(self, device: torch.device) -> nn.Module:
        if self.feature_net is None:
            spec = self.feature_net_spec
            kwargs = {}
            if spec == "inception" and self.feature_extractor_weights_path:
                kwargs["feature_extractor_weights_path"] = self.feature_extractor_weights_path
            self.feature_net = get_feature_net(spec, **kwargs)
        return self.feature_net.to(device)

    def reference_images(self, trainer: L.Trainer) -> Tensor:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_images"):
            raise AttributeError("FIDCallback needs a data module with train_images() / val_images() (TeacherDataModule)")
        if self.reference == "train":
            return dm.train_images()
        if self.reference == "val":
            return dm.val_images()
        return torch.cat([dm.train_images(), dm.val_images()])

    def _reference(self, trainer: L.Trainer, device: torch.device) -> ReferenceStats:
        if self._ref is None:
            self._ref = reference_stats(self.reference_images(trainer), self.feature_net, self.cache_dir, device=device)
        return self._ref

    def _features(self, trainer: L.Trainer, sample_fn, num_classes: int | None, device, seed: int) -> Tensor | None:
        """This rank's features, gathered; the full (num_samples, d) set on rank 0, None elsewhere."""
        world, rank = trainer.world_size, trainer.global_rank
        local = generated_features(
            sample_fn, self.feature_net, self.num_samples, seed, self.chunk_size, num_classes, rank, world, device
        )
        if world == 1:
            return local
        # Ranks hold whole chunks, dealt round-robin: rank 0 has the most rows; pad to that and gather.
        n_chunks = len(chunk_bounds(self.num_samples, self.chunk_size))
        pad = -(-n_chunks // world) * self.chunk_size
        buf = torch.zeros(pad, local.shape[1], dtype=torch.float64, device=device)
        buf[: local.shape[0]] = local.to(device)
        count = torch.tensor([local.shape[0]], device=device)
        gathered = trainer.strategy.all_gather(buf)  # (world, pad, d)
        counts = trainer.strategy.all_gather(count).reshape(-1)
        if rank != 0:
            return None
        # back into chunk order, so that KID (subsets drawn by row index) does not depend on the world size
        per_rank = [gathered[r, : int(counts[r])].cpu() for r in range(world)]
        return merge_rank_features(per_rank, self.num_samples, self.chunk_size)

    def _score(self, trainer, feats: Tensor | None, device, seed: int) -> dict[str, float]:
        if feats is None:
            return {}
        ref = self._reference(trainer, device)
        s = score_features(feats, ref, self.kid, self.kid_subsets, self.kid_subset_size, seed)
        out = {"fid": s.fd}
        if s.kid is not None:
            out["kid"] = s.kid
        return out

    def text_prompts(self, trainer: L.Trainer):
        """The prompts images are drawn with (a :class:`~lightning_distill.evaluate.Prompts`), or None."""
        if isinstance(self.prompts, str):  # "captions"
            if self._captions is None:
                self._captions = datamodule_captions(getattr(trainer, "datamodule", None), self.reference)
            return self._captions
        return self.prompts

    def _check_text(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The text options checked (one-line errors); returns :meth:`text_prompts`."""
        check_text_settings("FIDCallback", pl_module, self.prompts, self.guidance_scale, self.student_guidance,
                           self.log_teacher)
        prompts = self.text_prompts(trainer)
        check_cached_prompts("FIDCallback", pl_module, prompts, self.guidance_scale)
        return prompts

    def _mean_score(self, trainer, sample_fn, num_classes: int | None, device) -> dict[str, float]:
        """``sample_fn``'s metrics averaged over the evaluation seeds (rank 0; {} on the other ranks)."""
        per_seed = [
            self._score(trainer, self._features(trainer, sample_fn, num_classes, device, seed), device, seed)
            for seed in self.seeds
        ]
        return {k: sum(p[k] for p in per_seed) / len(per_seed) for k in per_seed[0]}

    # --- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Compute, log (rank 0) and return this step's metrics; every rank must call it."""
        device = pl_module.device
        # Building the feature network draws random initial weights before its saved ones are loaded, so it
        # happens inside the RNG fork too: otherwise the first evaluation shifts training's random stream
        # (and a run resumed after it would draw other numbers than the uninterrupted run).
        with torch.random.fork_rng(devices=[]):
            self._get_feature_net(device)
        teacher = reference_teacher(pl_module)
        if teacher is not None and teacher is not getattr(pl_module, "teacher", None):
            teacher.to(device)  # not a submodule now (replaced by a promoted one), so not moved with the method
        vae = getattr(teacher, "vae", None)
        num_classes = None
        if getattr(pl_module, "is_class_conditional", False):
            # through the backbone adapter: UNet num_class_embeds, DiT num_embeds_ada_norm
            num_classes = int(backbones.num_classes(pl_module.student.unet))
        prompts = self._check_text(trainer, pl_module)
        if prompts is not None:
            # image i gets prompt i % P: generated_features hands out the indices i % P as it hands out class labels
            num_classes = len(prompts)
            guided = {"guidance_scale": self.student_guidance} if getattr(pl_module, "guidance_embedding", False) else {}
        steps = resolve_steps(self.steps, pl_module)
        metrics: dict[str, float] = {}
        if self.log_teacher and self.teacher_key != (key := self._teacher_key(trainer, pl_module)):
            self.teacher_metrics, self.teacher_key = {}, key  # stored for another teacher, data or protocol
        # Sampling draws from explicit generators only; fork_rng keeps training's RNG stream untouched
        # regardless (resumed and uninterrupted runs must see the same random numbers).
        with torch.random.fork_rng(devices=[]):
            for s in steps:
                if prompts is None:
                    fn = lambda n, g, labels, s=s: decode_latents(pl_module.sample(n, s, g, labels=labels), vae)
                else:
                    fn = lambda n, g, idx, s=s: decode_latents(
                        pl_module.sample(n, s, g, prompts=prompts.for_images(idx), **guided), vae)
                for metric, v in self._mean_score(trainer, fn, num_classes, device).items():
                    metrics[self.tag(metric, s)] = v
            if self.log_teacher and teacher is not None:
                for s in steps:
                    key = self.tag("fid", s) + "/teacher"
                    if key in self.teacher_metrics:
                        continue
                    if prompts is None:
                        fn = lambda n, g, labels, s=s: sample_teacher(teacher, n, s, g, labels)
                    else:  # evaluate's text teacher: its sampler, guided at guidance_scale
                        from lightning_distill.evaluate import teacher_sampler

                        text_teacher = teacher_sampler(teacher, guidance_scale=self.guidance_scale)
                        fn = lambda n, g, idx, s=s, t=text_teacher: t.sample(n, s, g, prompts.for_images(idx))
                    for metric, v in self._mean_score(trainer, fn, num_classes, device).items():
                        self.teacher_metrics[self.tag(metric, s) + "/teacher"] = v
        if self.log_teacher:
            # Teacher values: computed once, logged at every evaluation so they draw a flat reference line.
            for s in steps:
                for m in ("fid", "kid"):
                    key = self.tag(m, s) + "/teacher"
                    if key in self.teacher_metrics:
                        metrics[key] = self.teacher_metrics[key]
        metrics = trainer.strategy.broadcast(metrics, src=0)
        self.teacher_metrics = trainer.strategy.broadcast(self.teacher_metrics, src=0)
        step = trainer.global_step
        self.last_eval_step = step
        self.last_metrics = metrics
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        if trainer.is_global_zero and trainer.loggers:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            self._write_layout(trainer, steps)
            rank_zero_info(f"FIDCallback step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def _write_layout(self, trainer: L.Trainer, steps: list[int]) -> None:
        """One TensorBoard custom-scalars chart per step count holding the student and teacher lines."""
        if self._layout_written or not self.log_teacher:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                charts = {f"{s} steps": ["Multiline", [self.tag("fid", s), self.tag("fid", s) + "/teacher"]] for s in steps}
                logger.experiment.add_custom_scalars({"fid student vs teacher": charts})
                self._layout_written = True

    # --- hooks ---------------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a text student without prompts (and the other text options' misuse) fails now, in one line
        self._check_text(trainer, pl_module)
        # a step count the student's sampler cannot take fails now, not at the first evaluation
        check = getattr(pl_module, "check_sample_steps", None)
        if callable(check):
            for s in resolve_steps(self.steps, pl_module):
                try:
                    check(s)
                except ValueError as err:
                    raise ConfigError(f"FIDCallback steps {list(self.steps)}: {err}") from None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.should_evaluate(trainer.global_step):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self.last_eval_step:
            self.evaluate(trainer, pl_module)

    def _teacher_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """What the stored teacher numbers depend on besides their tag: the run's teacher (the data module's
        source, revision and dtype: progressive distillation's promoted teachers keep round 0's line), its data
        and split, and this callback's protocol (reference split, seeds, sample count, chunks, KID settings, and
        the feature network's content: a retrained or rescaled network under the same name is another one); for
        text-to-image runs also the prompts (sha256, count) and the teacher's guidance scale (appended only then, so
        the keys of other runs, and the teacher lines their checkpoints hold, stay as they were)."""
        hp = getattr(getattr(trainer, "datamodule", None), "hparams", None) or {}
        source = hp.get("teacher") or getattr(reference_teacher(pl_module), "source", None)
        run = [str(source), *(hp.get(k) for k in ("teacher_revision", "teacher_dtype", "teacher_prediction_type", "data",
                                                  "image_size", "split_seed", "val_fraction"))]
        net = fingerprint(self.feature_net) if self.feature_net is not None else str(self.feature_net_spec)
        protocol = [self.reference, self.seeds, self.num_samples, self.chunk_size, self.kid, self.kid_subsets,
                    self.kid_subset_size, net]
        prompts = self.text_prompts(trainer)
        if prompts is not None:
            protocol.append(teacher_features.text_conditioning(prompts.sha256, len(prompts), self.guidance_scale))
            teacher = reference_teacher(pl_module)  # how it encodes: the T5 length, a Flux-dev's own guidance
            if teacher is not None:
                protocol.append([teacher.max_sequence_length,
                                 teacher.embedded_guidance if teacher.is_guidance_distilled else None])
        return json.dumps([*run, *protocol], default=str)

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval_step": self.last_eval_step, "teacher_metrics": dict(self.teacher_metrics),
                "teacher_key": self.teacher_key}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_eval_step = int(state_dict.get("last_eval_step", -1))
        self.teacher_metrics = dict(state_dict.get("teacher_metrics", {}))
        self.teacher_key = state_dict.get("teacher_key")  # None (older checkpoints): computed again once


__all__ = ["FIDCallback", "callback_prompts", "check_text_settings", "datamodule_captions", "resolve_steps"]
