"""Print the student-vs-teacher FD table at the end of fit (the README main job's last output)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class DistillationReport(L.Callback):
    """At fit end, score the exported student and the teacher with the evaluation report and print it.

    The student is scored from the folder that :class:`~lightning_distill.callbacks.PipelineExport` just
    wrote (so the table describes exactly what a user loads with ``DiffusionPipeline.from_pretrained``);
    without an export callback it scores ``pl_module`` through a fresh export into ``out_dir/student``.

    Args:
        out_dir: where the report (results.md/csv, fd_vs_steps.png, sample grids) is written.
        steps: student step counts.
        teacher_steps: teacher DDIM step counts (include the teacher's full count, e.g. 50).
        num_samples: generated images per cell; seed: noise seed (the same for every model).
        feature_net: feature network name (``digits`` gives FD-digits) or an ``nn.Module`` with ``num_features``.
        teacher_cache: read the teacher's cells from :mod:`~lightning_distill.teacher_features` entries with
            the same content key (the user cache, or those the teacher folder ships) instead of sampling
            the fixed teacher again; the report names every entry it read. False samples them.
        prompts: text-to-image students: ``evaluate --prompts`` (image i gets prompt i % P): a prompt file, the
            list itself, or ``"captions"`` (the data module's captions of the reference, train, images). Required
            for a text student (checked at fit start), refused for others.
        guidance_scale: the text teacher's classifier-free guidance scale (``evaluate --guidance-scale``; 1: none).
        student_guidance: g of an LCM student with a guidance input (``evaluate --student-guidance``).

    Example::

        >>> trainer = L.Trainer(callbacks=[PipelineExport("out/student"), DistillationReport("out/report")])
    """

    def __init__(
        self,
        out_dir: str,
        steps: list[int] = [1, 2, 4],  # noqa: B006 - jsonargparse needs a literal default
        teacher_steps: list[int] = [1, 2, 4, 50],  # noqa: B006
        num_samples: int = 2000,
        seed: int = 0,
        feature_net: str = "digits",
        teacher_cache: bool = True,
        prompts: str | list[str] | None = None,
        guidance_scale: float = 1.0,
        student_guidance: float | None = None,
    ) -> None:
        from .fid import callback_prompts

        self.out_dir = out_dir
        self.steps = list(steps)
        self.teacher_steps = list(teacher_steps)
        self.num_samples = num_samples
        self.seed = seed
        self.feature_net = feature_net
        self.teacher_cache = teacher_cache
        self.prompts = callback_prompts(prompts)  # a Prompts, "captions" (read from the data module) or None
        self.guidance_scale = float(guidance_scale)
        self.student_guidance = None if student_guidance is None else float(student_guidance)
        self.rows: list[dict] | None = None

    def _text_prompts(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The prompts the report scores with (evaluate's reference is the train split), the options checked."""
        from .fid import check_cached_prompts, check_text_settings, datamodule_captions

        check_text_settings("DistillationReport", pl_module, self.prompts, self.guidance_scale, self.student_guidance,
                           bool(self.teacher_steps))
        prompts = self.prompts
        if isinstance(prompts, str):  # "captions"
            prompts = datamodule_captions(trainer.datamodule, "train")
        check_cached_prompts("DistillationReport", pl_module, prompts, self.guidance_scale)
        return prompts

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a text student without prompts fails here, in one line, not after the whole training
        self._text_prompts(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_distill import sharding
        from lightning_distill.evaluate import evaluate_models

        from .fid import reference_teacher

        # a PipelineExport's folder (it records the path on rank 0 only, so every rank decides by its presence)
        exporter = next((cb for cb in trainer.callbacks if hasattr(cb, "exported_to")), None)
        exported = getattr(exporter, "exported_to", None)
        if exporter is None and trainer.world_size > 1:  # exported here: every rank joins the gather (FSDP2)
            with sharding.unsharded(pl_module.sampling_denoiser(), rank_zero=trainer.is_global_zero):
                if trainer.is_global_zero:
                    exported = str(pl_module.export(Path(self.out_dir) / "student"))
            trainer.strategy.barrier("report_export")
        if not trainer.is_global_zero:
            return
        prompts = self._text_prompts(trainer, pl_module)
        if exported is None:
            exported = str(pl_module.export(Path(self.out_dir) / "student"))
        # the reference set is the run's own data (its folder, size, channels and split), not the digits default
        hp = getattr(trainer.datamodule, "hparams", None) or {}
        data = {k: hp[k] for k in ("data", "image_size", "channels", "split_seed", "val_fraction") if hp.get(k) is not None}
        self.rows = evaluate_models(
            **data,
            teacher=reference_teacher(pl_module),
            students={"student": exported},
            steps=self.steps,
            teacher_steps=self.teacher_steps,
            num_samples=self.num_samples,
            seed=self.seed,
            out_dir=self.out_dir,
            feature_net=self.feature_net,
            device=pl_module.device,
            log=rank_zero_info,
            teacher_cache=self.teacher_cache,
            prompts=prompts,
            guidance_scale=self.guidance_scale,
            student_guidance=self.student_guidance,
        )
        table = (Path(self.out_dir) / "results.md").read_text()
        print(f"\n{table}\nExported student pipeline: {exported}\nReport: {self.out_dir}\n", file=sys.stdout, flush=True)
