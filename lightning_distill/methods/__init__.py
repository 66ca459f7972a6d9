"""Distillation methods: one LightningModule per file.

===============================  ===================================================  ==========================
class                            method                                               file
===============================  ===================================================  ==========================
``DiffusionTraining``            plain eps/x0/v diffusion training (makes teachers)   ``diffusion.py``
``KnowledgeDistillation``        hard/soft-label + feature KD into a smaller UNet     ``knowledge.py``
``ClassifierKD``                 temperature KD of a classifier (logits)              ``classifier_kd.py``
``DataDistillation``             one-step regression on teacher pairs (Luhman)        ``data_distillation.py``
``ProgressiveDistillation``      progressive distillation (Salimans & Ho)             ``progressive.py``
``ConsistencyDistillation``      consistency distillation (Song et al.)               ``consistency.py``
``LatentConsistencyDistillation``  latent, guidance-distilled LCM (Luo et al.)        ``lcm.py``
``AdversarialDiffusionDistillation``  ADD (Sauer et al.)                              ``add.py``
``AdversarialPostTraining``      APT (Lin et al.)                                     ``apt.py``
``DMD2``                         distribution matching + GAN (Yin et al.)             ``dmd2.py``
``SCMDistillation``              continuous-time consistency distillation, sCD        ``scm.py``
                                 (Lu & Song, TrigFlow)
``MeanFlowDistillation``         MeanFlow: average-velocity flow map (Geng et al.)    ``meanflow.py``
===============================  ===================================================  ==========================

Shared bases: ``DistillationMethod`` (``base.py``: student, teacher, sampling, export) and
``AdversarialMethod`` (``adversarial.py``: the one training loop of ADD, APT and DMD2); the mixin
``TextToImageMixin`` (``text.py``: text conditioning, prompt sampling and SD3 export of consistency
distillation, progressive distillation, knowledge distillation and DMD2). A method file
imports only these, never a sibling method (LCM extends consistency distillation, its own family).
"""

from .add import AdversarialDiffusionDistillation
from .adversarial import AdversarialMethod
from .apt import AdversarialPostTraining
from .base import DistillationMethod, LossOutput, NonFiniteLossError
from .classifier_kd import ClassifierKD
from .consistency import ConsistencyDistillation
from .data_distillation import DataDistillation
from .diffusion import DiffusionTraining
from .dmd2 import DMD2
from .knowledge import KnowledgeDistillation
from .lcm import LatentConsistencyDistillation
from .meanflow import MeanFlowDistillation
from .progressive import ProgressiveDistillation
from .scm import SCMDistillation

__all__ = [
    "AdversarialDiffusionDistillation",
    "AdversarialMethod",
    "AdversarialPostTraining",
    "ClassifierKD",
    "ConsistencyDistillation",
    "DMD2",
    "DataDistillation",
    "DiffusionTraining",
    "DistillationMethod",
    "KnowledgeDistillation",
    "LatentConsistencyDistillation",
    "LossOutput",
    "MeanFlowDistillation",
    "NonFiniteLossError",
    "ProgressiveDistillation",
    "SCMDistillation",
]
