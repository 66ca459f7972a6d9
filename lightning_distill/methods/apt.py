"""Adversarial post-training, APT (Lin et al. 2025, arXiv 2501.08316, "Seaweed-APT").

A one-step generator, first distilled (consistency distillation) and then trained adversarially against
REAL data only: no teacher targets. Confirmed by the paper (METHODS.md section 5): the generator starts
from a consistency-distilled student; the discriminator backbone is initialised from the same
diffusion network, with extra heads on several layers producing a logit; R1 is replaced by the
approximated R1; 1-step generation. Unconfirmed starting points (tune): non-saturating loss, RMSProp
(alpha 0.9), lr around 5e-6, generator EMA around 0.995, approx-R1 lambda 100 with sigma 0.01, and
collapse if trained long, hence early stopping on FID.

Notation (paper -> code):

=======================  ===========================================================
G(z)                     :meth:`AdversarialPostTraining.generate`: the student's x0 at t = T - 1
D(x, t)                  ``discriminator``: teacher-network copy (a UNet's encoder, a transformer's
                         blocks) + ``MultiLevelHeads``
x_t (D's input)          alpha_t x + sigma_t n, t ~ U{d_t_min .. d_t_max} (:meth:`discriminate`)
L_aR1                    :func:`~lightning_distill.gan.losses.approx_r1_penalty`
=======================  ===========================================================

Sampling and export: the stock DDIM sampler with one trailing step evaluates the student at t = T - 1
on pure noise and returns its (clipped) x0: the same map G that is trained here. On a flow-matching
teacher t = T - 1 is s = 1 and the stock sampler is ``FlowMatchEulerDiscreteScheduler``, whose one step
z + (0 - 1) u = z - u is again the student's x0 estimate G(z). An SD3 (text) student exports as a
``StableDiffusion3Pipeline`` with that scheduler (:class:`~lightning_distill.methods.text.TextToImageMixin`):
generator and discriminator backbone get the batch's prompt keywords, the heads its pooled text embedding.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable

from ..errors import ConfigError
from ..gan.discriminators import Discriminator
from ..gan.features import denoiser_features
from ..gan.losses import GanLoss
from ..teacher import DiffusionTeacher
from .adversarial import AdversarialMethod, Generated, R1Kind
from .text import TextToImageMixin


def apt_optimizer(params) -> torch.optim.Optimizer:
    """RMSProp with alpha = 0.9, the APT paper's optimiser (lr unconfirmed; 5e-6 there, larger for small nets)."""
    return torch.optim.RMSprop(params, lr=5e-6, alpha=0.9)


class AdversarialPostTraining(TextToImageMixin, AdversarialMethod):
    """APT: one-step generator vs a diffusion-backbone discriminator on real data, approximated R1.

    The teacher's network (UNet or transformer) initialises the discriminator backbone (and the generator unless ``init_from``
    names a consistency-distilled student to start from, the paper's recipe).

    Args:
        d_levels: discriminator backbone levels with a head (a UNet's down block indices, -1 = mid block;
            a transformer's block indices, -1 = last block).
        head_hidden: head width.
        spatial_logits: one logit per position instead of one per head (APT: one per head).
        d_t_min, d_t_max: range of the discriminator's noise timestep (None: T - 1).
        train_d_backbone: train the discriminator backbone (APT) or only its heads.
        optimizer, discriminator_optimizer, gan_loss, r1, r1_weight: as :class:`AdversarialMethod`,
            with the paper's defaults (RMSProp, non-saturating, approximated R1 with weight 100).
        sample_steps: steps of logged sample grids and ``predict`` (1: the trained one-step map; more
            steps run the DDIM (flow: Euler) sampler, which the generator was not trained for).
        sample_prompt: text-conditional (SD3) teachers: the prompt of logged grids.
        **kwargs: :class:`AdversarialMethod`'s and :class:`DistillationMethod`'s arguments.

    Example::

        >>> model = AdversarialPostTraining(dm.teacher, init_from="runs/cd_digits/checkpoints/last.ckpt")
        >>> L.Trainer(callbacks=[EMA(0.995), FIDCallback(steps=[1])]).fit(model, dm)
    """

    def __init__(
        self,
        teacher: DiffusionTeacher | None = None,
        *,
        d_levels: list[int] | None = None,
        head_hidden: int = 64,
        spatial_logits: bool = False,
        d_t_min: int = 0,
        d_t_max: int | None = None,
        train_d_backbone: bool = True,
        optimizer: OptimizerCallable = apt_optimizer,
        discriminator_optimizer: OptimizerCallable = apt_optimizer,
        gan_loss: GanLoss = "non_saturating",
        r1: R1Kind = "approx",
        r1_weight: float = 100.0,
        sample_steps: int = 1,
        sample_prompt: str = "",
        **kwargs,
    ) -> None:
        paper_defaults = dict(optimizer=optimizer, discriminator_optimizer=discriminator_optimizer, gan_loss=gan_loss, r1=r1)
        super().__init__(teacher=teacher, r1_weight=r1_weight, sample_steps=sample_steps, **paper_defaults, **kwargs)
        if self.teacher is None:
            raise ConfigError("AdversarialPostTraining needs a teacher (set data.teacher): it initialises the discriminator")
        T = self.student.schedule.num_train_timesteps
        self.generator_timestep = int(self.student.schedule.trailing_timesteps(1)[0])  # T - 1: pure noise in
        self.d_t_max = T - 1 if d_t_max is None else d_t_max
        if not 0 <= d_t_min <= self.d_t_max < T:
            raise ConfigError(f"need 0 <= d_t_min <= d_t_max < {T}, got {d_t_min}, {d_t_max}")
        backbone = denoiser_features(self.teacher.unet, d_levels, mode="copy" if train_d_backbone else "frozen_copy")
        cond = self.is_class_conditional
        text = self.discriminator_probe_cond()  # a text teacher's keywords of "" (None otherwise)
        pooled = (text or {}).get("pooled_projections")
        self.discriminator = Discriminator(
            backbone,
            self.sample_shape,
            hidden=head_hidden,
            spatial=spatial_logits,
            num_classes=self.num_classes if cond else None,
            cond_dim=None if pooled is None else int(pooled.shape[-1]),
            backbone_cond=cond or text is not None,
            probe_cond=text,
        )
        self.discriminator.train()

    # --- AdversarialMethod hooks ---------------------------------------------------------------

    def generate(self, batch: dict, gen: torch.Generator) -> Generated:
        """G(z): the student's unclamped x0 estimate from pure noise at t = T - 1 (one step)."""
        x = batch["x"]
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        cond = self.network_cond(batch)
        t = torch.full((x.shape[0],), self.generator_timestep, device=x.device, dtype=torch.long)
        return Generated(self.student(z, t, clip=False, **cond).x0, self._labels(batch), cond)

    def discriminator_t_range(self) -> tuple[int, int]:
        return (self.hparams.d_t_min, self.d_t_max)


__all__ = ["AdversarialPostTraining", "apt_optimizer"]
