"""GAN building blocks of the adversarial methods (ADD, APT, DMD2's GAN head).

``losses`` (GAN losses, true and approximated R1), ``plan`` (the step plan and the schedule-callback
protocol), ``features`` (feature networks: UNet and transformer denoisers, any module), ``discriminators`` (heads). The
one adversarial training loop that uses them is
:class:`lightning_distill.methods.adversarial.AdversarialMethod`.
"""

from .discriminators import BottleneckClassifier, Discriminator, MultiLevelHeads, bottleneck_features
from .features import (
    DigitsClassifierFeatures,
    HFVisionFeatures,
    ModuleFeatures,
    TransformerFeatures,
    UNetEncoderFeatures,
    bottleneck_block,
    denoiser_features,
)
from .losses import (
    GAN_LOSSES,
    GanLoss,
    approx_r1_penalty,
    discriminator_accuracy,
    hinge_d_loss,
    hinge_g_loss,
    ns_d_loss,
    ns_g_loss,
    r1_penalty,
)
from .plan import AdversarialSchedule, StepPlan, attached_schedule, d_updates_at, iteration_generator

__all__ = [
    "AdversarialSchedule",
    "BottleneckClassifier",
    "DigitsClassifierFeatures",
    "Discriminator",
    "GAN_LOSSES",
    "GanLoss",
    "HFVisionFeatures",
    "ModuleFeatures",
    "MultiLevelHeads",
    "StepPlan",
    "TransformerFeatures",
    "UNetEncoderFeatures",
    "approx_r1_penalty",
    "attached_schedule",
    "bottleneck_block",
    "bottleneck_features",
    "d_updates_at",
    "denoiser_features",
    "discriminator_accuracy",
    "hinge_d_loss",
    "hinge_g_loss",
    "iteration_generator",
    "ns_d_loss",
    "ns_g_loss",
    "r1_penalty",
]
