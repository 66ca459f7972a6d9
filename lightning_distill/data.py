"""Data and the frozen teacher, shared by every method: :class:`TeacherDataModule`.

Data sources:
  * ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped inside the
    scikit-learn wheel: nothing is downloaded), resized to ``image_size``, scaled to [-1, 1].
  * a folder of PNG/JPEG images (searched recursively), resized and centre-cropped; with
    ``class_conditional`` the first-level sub-folder names are the classes.

Batches are dicts: ``{"x": (B, C, H, W) in [-1, 1], "label": (B,) long}``.

Latent teachers (a ``vae/`` folder): ``"x"`` holds the VAE latents the networks see (encoded once at
setup, optionally cached to disk: ``latent_cache``). Text-conditional teachers (``text_encoder/`` +
``tokenizer/``): batches also carry ``"input_ids"`` (B, L) (SD3 teachers: also ``"input_ids_2"``, for the
second CLIP encoder: ``teacher.text_inputs``), the tokenised prompt of each image, from a
fixed ``prompt`` (``{label}`` is replaced by the class name) or a caption file in the image folder
(``metadata.jsonl`` with ``file_name`` / ``text`` fields, or ``prompts.txt`` with one line per image in
sorted file order); the method turns them into the network's text keywords with ``teacher.text_conditioning``
(``teacher.encode_text`` for SD1.5-style teachers). With ``text_cache`` / ``release_encoders`` every prompt is
encoded once at setup instead and batches also carry ``"text_cond"``, the keywords themselves; with
``release_encoders`` the text encoders and the VAE's encoder then leave the teacher (:mod:`lightning_distill.text_cache`).

Teacher-data mode (``pairs``, see :mod:`lightning_distill.teacher_pairs`): the train / val sets are
(noise, teacher sample) pairs generated once by the teacher's DDIM sampler and cached on disk; batches
are then ``{"noise", "x" (the teacher's sample), "label"}`` (text teachers: also the token ids of the
training prompt each pair was sampled with). ``train_images()`` still gives real data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Sequence, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from . import backbones
from .checkpoint_io import atomic_torch_save
from .errors import ConfigError
from .resume import EpochSeededRandomSampler, ResumableDataLoader
from .teacher import SANA_COMPLEX_HUMAN_INSTRUCTION, DiffusionTeacher, TeacherError
from .teacher_pairs import PairsConfig
from .text_cache import TextEmbeddings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """Unusable data: an empty folder, an unreadable image, a bad setting."""


def load_digits_tensor(image_size: int = 16) -> tuple[Tensor, Tensor]:
    """All 1,797 scikit-learn digits as (N, 1, S, S) float in [-1, 1] and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # values 0..16 -> [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return x, torch.from_numpy(digits.target).long()


#: the longest T5 prompt StableDiffusion3Pipeline and FluxPipeline accept (their check_inputs refuse more)
MAX_T5_LENGTH = 512


#: ``data.teacher_complex_human_instruction``'s default: ``SanaPipeline``'s own instruction (named, not spelled out,
#: so that the saved config of every run does not carry its lines).
DEFAULT_INSTRUCTION = "default"
Instruction = Union[Literal["default"], list[str], None]


def is_default_instruction(instruction: Instruction | Sequence[str]) -> bool:
    """Whether ``data.teacher_complex_human_instruction`` is its default, ``SanaPipeline``'s own instruction
    (``"default"``, or its lines)."""
    if isinstance(instruction, str):
        return instruction == DEFAULT_INSTRUCTION
    return instruction is not None and tuple(instruction) == SANA_COMPLEX_HUMAN_INSTRUCTION


def resolved_instruction(instruction: Instruction | Sequence[str]) -> tuple[str, ...] | None:
    """The instruction lines a ``data.teacher_complex_human_instruction`` value gives a SANA teacher (what
    :attr:`DiffusionTeacher.complex_human_instruction` then holds): ``"default"`` -> ``SanaPipeline``'s own; None or
    no lines -> None."""
    if is_default_instruction(instruction):
        return SANA_COMPLEX_HUMAN_INSTRUCTION
    return tuple(instruction) if instruction else None


def check_teacher_text_settings(
    teacher: DiffusionTeacher, max_sequence_length: int | None = None, embedded_guidance: float | None = None,
    complex_human_instruction: Instruction | Sequence[str] = DEFAULT_INSTRUCTION,
) -> None:
    """Refuse, in one line, a prompt length, an embedded guidance or an instruction the teacher has no use for.

    ``max_sequence_length`` is the T5 prompt length: it needs a T5 encoder (an SD3 ``text_encoder_3/``, a Flux
    ``text_encoder_2/``) and lies in [1, 512], as the pipelines check; a SANA teacher's is the Gemma2 prompt length
    (``SanaPipeline``'s ``max_sequence_length``, 300 by default; at least 1, the pipeline sets no upper limit).
    ``embedded_guidance`` is the guidance input of a guidance-distilled Flux network (``guidance_embeds``, Flux-dev);
    elsewhere it would be silently ignored. ``complex_human_instruction`` other than its default (``SanaPipeline``'s
    own) is ``SanaPipeline``'s, for SANA teachers only. None (length, guidance): not set, nothing to check.

    Raises:
        ConfigError: a setting the teacher does not read, or a value out of range.
    """
    name = f"teacher {teacher.source or type(teacher.unet).__name__!r}"
    net = type(getattr(teacher.unet, "_orig_mod", teacher.unet)).__name__
    sana = isinstance(backbones.backbone_for(teacher.unet), backbones.SanaBackbone)
    if max_sequence_length is not None:
        t5 = teacher.text_encoder_2 if teacher.is_flux else teacher.text_encoder_3
        if sana:
            if int(max_sequence_length) < 1:
                raise ConfigError(f"data.teacher_max_sequence_length (a SANA teacher's Gemma2 prompt length) must be at "
                                  f"least 1, got {max_sequence_length}")
        elif t5 is None:
            raise ConfigError(
                f"data.teacher_max_sequence_length={max_sequence_length} sets the T5 prompt length, but {name} ({net}) "
                "has no T5 encoder (an SD3 text_encoder_3/ or a Flux text_encoder_2/) nor SANA's Gemma2: unset it"
            )
        elif not 1 <= int(max_sequence_length) <= MAX_T5_LENGTH:
            raise ConfigError(
                f"data.teacher_max_sequence_length must lie in [1, {MAX_T5_LENGTH}] (the pipelines' limit), got "
                f"{max_sequence_length}"
            )
    if embedded_guidance is not None:
        if not teacher.is_guidance_distilled:
            raise ConfigError(
                f"data.teacher_embedded_guidance={embedded_guidance} is the guidance input of a guidance-distilled "
                f"Flux network (FluxTransformer2DModel with guidance_embeds), but {name} is a {net} without it: unset it"
            )
        if not math.isfinite(float(embedded_guidance)):
            raise ConfigError(f"data.teacher_embedded_guidance must be a finite number, got {embedded_guidance}")
    if not sana and not is_default_instruction(complex_human_instruction):
        raise ConfigError(
            "data.teacher_complex_human_instruction is the instruction SanaPipeline puts before every prompt, but "
            f"{name} is a {net} (SANA teachers: SanaTransformer2DModel): unset it"
        )


def load_run_teacher(data: Mapping, source: str | os.PathLike | None = None) -> DiffusionTeacher:
    """The teacher as a run's ``data`` settings load it: :class:`TeacherDataModule`'s ``teacher*`` arguments (its
    ``hparams``, or a config's ``data`` block) passed to :func:`~lightning_distill.teacher.load_teacher` (revision,
    dtype, prediction type, T5 / Gemma2 length, embedded guidance, SANA's instruction), from ``source`` instead of
    ``data["teacher"]`` if given. The one place a run's teacher is loaded from its settings, so a re-load (seeds,
    compare) is the run's teacher.

    ``teacher_complex_human_instruction`` absent from ``data`` (settings written before it existed) is its default,
    ``SanaPipeline``'s own; present and None is no instruction.

    Raises:
        ConfigError: a prompt length, embedded guidance or instruction the teacher does not read
            (:func:`check_teacher_text_settings`).
        TeacherError: the teacher cannot be loaded.
    """
    from . import teacher as teacher_module  # looked up at call time: a patched load_teacher is the one called

    length, guidance = data.get("teacher_max_sequence_length"), data.get("teacher_embedded_guidance")
    instruction = data.get("teacher_complex_human_instruction", DEFAULT_INSTRUCTION)
    kwargs = dict(revision=data.get("teacher_revision"), dtype=data.get("teacher_dtype") or "float32",
                  prediction_type=data.get("teacher_prediction_type"))
    # passed only where set: None is load_teacher's own default (the pipeline's prompt length; 3.5)
    if length is not None:
        kwargs["max_sequence_length"] = int(length)
    if guidance is not None:
        kwargs["embedded_guidance"] = float(guidance)
    if not is_default_instruction(instruction):  # None (no instruction) or other lines: passed as given
        kwargs["complex_human_instruction"] = instruction
    teacher = teacher_module.load_teacher(str(source if source is not None else data.get("teacher")), **kwargs)
    if length is not None or guidance is not None or not is_default_instruction(instruction):
        check_teacher_text_settings(teacher, length, guidance, instruction)
    return teacher


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor."""

    def __init__(
        self, images: Tensor, labels: Tensor, extras: dict[str, Tensor] | None = None, text: TextEmbeddings | None = None
    ) -> None:
        self.images, self.labels = images, labels
        self.extras = extras or {}  # further per-item tensors, e.g. "input_ids" for text teachers
        self.text = text  # precomputed text keywords: item "text_cond"

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.images[i], "label": self.labels[i], **{k: v[i] for k, v in self.extras.items()}}
        if self.text is not None:
            item["text_cond"] = self.text[i]
        return item


def find_images(root: str | os.PathLike) -> list[Path]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no PNG/JPEG images")
    return files


def load_image(path: Path, image_size: int, channels: int) -> Tensor:
    """Read one image, resize the short side and centre-crop to ``image_size``; (C, S, S) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as img:
            img.load()  # forces decoding, so a truncated file fails here and is named
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: convert() would clip at 255 (white)
                import numpy as np

                grey = torch.from_numpy(np.asarray(img, dtype=np.float32) / 65535.0)[None].clamp(0, 1)
                img = grey.expand(channels if channels in (1, 3) else 3, -1, -1).contiguous()
            else:
                img = img.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"unreadable image {path}: {err}") from err
    if isinstance(img, Tensor):  # a 16-bit image, already in [0, 1]
        img = TF.center_crop(TF.resize(img, image_size, antialias=True), image_size)
        return img * 2 - 1
    img = TF.resize(img, image_size, antialias=True)
    img = TF.center_crop(img, image_size)
    return TF.to_tensor(img) * 2 - 1


def class_folders(root: str | os.PathLike, files: list[Path] | None = None) -> list[str]:
    """The classes of an image folder: its first-level sub-folders that hold images, sorted as text (as
    torchvision's ``ImageFolder``), or as numbers when every name is an integer ("2" before "10", so that
    folders ``0`` ... ``N`` are classes 0 ... N; equal numbers by their text, "01" before "1")."""
    root = Path(root).expanduser()
    files = find_images(root) if files is None else files
    names = {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    if names and all(n.isascii() and n.isdecimal() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def image_folder_labels(root: str | os.PathLike, strict: bool = False) -> tuple[list[Path], Tensor]:
    """The folder's images (sorted) and each one's class: the index of its sub-folder among
    :func:`class_folders` (0 for an image at the top).

    Raises:
        DataError: (``strict``: the labels are used) images at the top of a folder that also has class
            folders: they have no class, and 0 would silently make them the first folder's.
    """
    files = find_images(root)
    classes = class_folders(root, files)
    root = Path(root).expanduser()
    loose = [p for p in files if len(p.relative_to(root).parts) == 1]
    if strict and classes and loose:
        raise DataError(
            f"{len(loose)} image(s) at the top of {root} (e.g. {loose[0].name}) beside the class folders {classes[:5]}"
            f"{'...' if len(classes) > 5 else ''}: they have no class; move them into a class folder"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p.relative_to(root).parts[0]] if len(p.relative_to(root).parts) > 1 else 0 for p in files]
    return files, torch.tensor(labels, dtype=torch.long)


def load_image_folder(
    root: str | os.PathLike, image_size: int, channels: int, class_conditional: bool
) -> tuple[Tensor, Tensor]:
    """Decode a whole folder into memory (every file checked before training starts); labels are the
    sub-folders' classes when ``class_conditional``, else 0."""
    files, labels = image_folder_labels(root, strict=class_conditional)
    images = torch.stack([load_image(p, image_size, channels) for p in files])
    return images, labels if class_conditional else torch.zeros_like(labels)


class TeacherDataModule(L.LightningDataModule):
    """The frozen teacher plus the data every method trains on.

    Args:
        teacher: ``"bundled:digits"``, a local diffusers folder (``unet/`` + ``scheduler/``), a hub id
            (needs a network), or None to train without a teacher (``DiffusionTraining``).
        teacher_revision: hub revision (commit, branch or tag) for hub ids.
        teacher_dtype: precision the teacher is held in; a full student stays float32, a LoRA student's
            shared base (``student_lora.base: shared``) is the teacher's and computes in this precision.
        teacher_prediction_type: override the teacher scheduler's ``prediction_type``.
        teacher_max_sequence_length: the T5 prompt length of an SD3 teacher with ``text_encoder_3/`` or a Flux
            teacher, the Gemma2 prompt length of a SANA teacher (the pipelines' ``max_sequence_length``); None: the
            pipeline's default (SD3 256, Flux 512, SANA 300). Refused for a teacher without T5 or Gemma2.
        teacher_complex_human_instruction: a SANA teacher's ``complex_human_instruction``, the lines
            ``SanaPipeline`` puts before every prompt (a list of strings); ``"default"``: the pipeline's own; None: no
            instruction. Any other value is refused for other teachers.
        teacher_embedded_guidance: the guidance input of a guidance-distilled Flux network (``guidance_embeds``,
            Flux-dev; ``FluxPipeline``'s ``guidance_scale``), given with every prompt to teacher and student, and
            what the exported student is called with; None: 3.5, the pipeline's default. Refused for other networks.
        data: ``"digits"`` or a folder of images.
        image_size: side of the square training images.
        channels: image channels for a folder (1 or 3); default: the teacher's, else 3. Digits are 1.
        class_conditional: keep labels for class-conditional teachers (folders: sub-folder = class).
        batch_size, val_batch_size, num_workers: loader settings.
        val_fraction, split_seed: the fixed seeded train/val split.
        prompt: text-conditional teachers: one prompt for every image; ``{label}`` is replaced by the
            image's class name (the digit, or the sub-folder name).
        captions: text-conditional teachers: a ``metadata.jsonl`` or ``prompts.txt`` caption file
            (default: the one in the image folder, if any). Exclusive with ``prompt``.
        latent_cache: latent teachers: a ``.pt`` file holding the encoded data set; written once,
            reused while teacher, data, image size, the images' pixels and the VAE's weights match.
        text_cache: text-conditional teachers: a ``.pt`` file holding every prompt's embeddings (the
            network's text keywords); written once, reused while teacher, revision, prompts and encoder
            settings match. Batches then carry ``"text_cond"``, which the methods use instead of encoding.
        release_encoders: text-conditional teachers: encode every prompt once (with ``text_cache``, or in
            memory), plus ``""`` and the method's sampling prompts, then drop the text encoders and the VAE's
            encoder from the teacher before training (the VAE decoder stays; exports read the dropped parts
            back from the teacher's source).
        pairs: teacher-data mode: train on cached (noise, teacher sample) pairs instead (generated on
            first use, resumable; see :class:`~lightning_distill.teacher_pairs.PairsConfig`).

    Example::

        >>> dm = TeacherDataModule(teacher="bundled:digits", data="digits", image_size=16)
        >>> dm.teacher.denoiser  # the frozen teacher every method receives
    """

    def __init__(
        self,
        teacher: str | None = "bundled:digits",
        teacher_revision: str | None = None,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        teacher_prediction_type: Literal["epsilon", "sample", "v_prediction"] | None = None,
        data: str = "digits",
        image_size: int = 16,
        channels: int | None = None,
        class_conditional: bool = False,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        pairs: PairsConfig | None = None,
        prompt: str | None = None,
        captions: str | None = None,
        latent_cache: str | None = None,
        text_cache: str | None = None,
        release_encoders: bool = False,
        teacher_max_sequence_length: int | None = None,
        teacher_embedded_guidance: float | None = None,
        teacher_complex_human_instruction: Instruction = DEFAULT_INSTRUCTION,
    ) -> None:
        super().__init__()
        if isinstance(teacher_complex_human_instruction, str) and teacher_complex_human_instruction != DEFAULT_INSTRUCTION:
            raise ConfigError(  # one string would read as its characters
                f"data.teacher_complex_human_instruction takes {DEFAULT_INSTRUCTION!r} (SanaPipeline's own), null (none) "
                f"or a list of lines, not the string {teacher_complex_human_instruction!r}")
        if teacher_complex_human_instruction is not None and not isinstance(teacher_complex_human_instruction, str):
            teacher_complex_human_instruction = list(teacher_complex_human_instruction)  # hparams.yaml stays plain YAML
        if image_size < 4:
            raise DataError(f"image_size must be at least 4, got {image_size}")
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if channels is not None and channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        self.save_hyperparameters()
        if teacher is None and (teacher_max_sequence_length is not None or teacher_embedded_guidance is not None
                                or not is_default_instruction(teacher_complex_human_instruction)):
            raise ConfigError("data.teacher_max_sequence_length, data.teacher_embedded_guidance and "
                              "data.teacher_complex_human_instruction set a teacher's text conditioning, but data.teacher "
                              "is null: unset them")
        self.teacher: DiffusionTeacher | None = load_run_teacher(self.hparams) if teacher is not None else None
        if data == "digits":
            if channels not in (None, 1):
                raise DataError("the digits data set is grayscale: channels must be 1")
            self.channels = 1
        else:
            if not Path(data).expanduser().is_dir():
                raise DataError(f"data must be 'digits' or an existing image folder; {data!r} is neither")
            self.channels = channels or (self.teacher.in_channels if self.teacher and not self.teacher.is_latent else 3)
        self.image_size = image_size
        self.check_teacher()
        if (text_cache or release_encoders) and not (self.teacher is not None and self.teacher.is_text_conditional):
            raise DataError(
                "data.text_cache and data.release_encoders need a text-conditional teacher (text_encoder/ and "
                f"tokenizer/); teacher {teacher!r} has no text encoder"
            )
        if release_encoders and pairs is not None:
            raise DataError("data.release_encoders does not combine with data.pairs (pair batches carry token ids, "
                            "which need the text encoders); set one of them")
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # --- teacher / data agreement --------------------------------------------------------------

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of what the networks see (latent shape for latent teachers)."""
        t = self.teacher
        if t is not None and t.is_latent:
            f = t.vae_scale_factor
            return (t.in_channels, self.image_size // f, self.image_size // f)
        return (self.channels, self.image_size, self.image_size)

    def check_teacher(self) -> None:
        """Raise a one-line TeacherError when teacher and data disagree (before any training step)."""
        t = self.teacher
        if t is None:
            return
        if t.is_latent:
            vae_in = int(t.vae.config.in_channels)
            if vae_in != self.channels:
                raise TeacherError(f"teacher VAE takes {vae_in}-channel images but the data has {self.channels}")
            if self.image_size % t.vae_scale_factor:
                raise TeacherError(
                    f"image_size {self.image_size} is not divisible by the VAE's factor {t.vae_scale_factor}"
                )
        elif t.in_channels != self.channels:
            raise TeacherError(f"teacher UNet takes {t.in_channels} channels but the data has {self.channels}")
        size = self.sample_shape[-1]
        if t.sample_size != size:
            raise TeacherError(
                f"teacher sample_size is {t.sample_size} but the data gives {size}x{size} "
                f"(set image_size to match the teacher)"
            )
        if self.hparams.class_conditional and t.num_classes is None and t.unet.config.get("class_embed_type") is None:
            raise TeacherError("class_conditional=True but the teacher UNet has no class embedding (num_class_embeds)")
        if t.num_classes and self.hparams.data != "digits":  # an image folder: its sub-folders are the classes
            if not self.hparams.class_conditional:
                raise TeacherError(
                    f"the teacher is class-conditional ({t.num_classes} classes) but data.class_conditional is false, "
                    f"so every image of {self.hparams.data} would be class 0: set data.class_conditional: true "
                    "(the first-level sub-folders are the classes)"
                )
            classes = class_folders(self.hparams.data)
            if len(classes) > t.num_classes:
                raise TeacherError(
                    f"{self.hparams.data} has {len(classes)} class folders but the teacher knows {t.num_classes} classes"
                )

    # --- Lightning hooks -----------------------------------------------------------------------

    def load_all(self) -> tuple[Tensor, Tensor]:
        hp = self.hparams
        if hp.data == "digits":
            return load_digits_tensor(self.image_size)
        return load_image_folder(hp.data, self.image_size, self.channels, hp.class_conditional)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.build_sets()
        if self.hparams.release_encoders and self.trainer is not None:
            self.release_encoders(self.trainer.lightning_module)

    def build_sets(self) -> None:
        from .text_cache import cache_key, caption_embeddings, remember_prompts

        hp = self.hparams
        images, labels = self.load_all()
        # a prompt's {label} names the image's sub-folder whether or not the labels condition the network
        uses_names = "{label}" in (hp.prompt or "")
        named = labels if hp.data == "digits" or hp.class_conditional else image_folder_labels(hp.data, uses_names)[1]
        self.prompt_labels = named  # what each image's prompt is built from: prompts(prompt_labels), in load order
        extras, text = self.prompt_inputs(named), None
        if extras and (hp.text_cache or hp.release_encoders):  # every prompt encoded once, "" for guidance
            prompts = self.prompts(named)
            key = cache_key(self.teacher, hp.teacher, hp.teacher_revision, prompts) if hp.text_cache else None
            text = caption_embeddings(self.teacher, prompts, key, hp.text_cache)
            remember_prompts(self.teacher, [""])
        self.pixels = images  # train_images / val_images: pixels, also when the data set holds latents
        if self.teacher is not None and self.teacher.is_latent:
            images = self.encode_latents(images)
        n = images.shape[0]
        n_val = max(1, int(round(n * self.hparams.val_fraction)))
        if n - n_val < 1:
            raise DataError(f"only {n} images: too few to split into train and validation")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.split_seed))
        full = TensorImageDataset(images, labels, extras, text)
        self.val_set = Subset(full, perm[:n_val].tolist())
        self.train_set = Subset(full, perm[n_val:].tolist())
        self.image_train_set, self.image_val_set = self.train_set, self.val_set
        if self.hparams.pairs is not None:
            self.setup_pairs()

    # --- latent and text-conditional teachers --------------------------------------------------

    def class_names(self) -> list[str]:
        if self.hparams.data == "digits":
            return [str(i) for i in range(10)]
        return class_folders(self.hparams.data)

    def prompts(self, labels: Tensor) -> list[str]:
        """One prompt per image (same order as ``load_all``), from ``prompt`` or a caption file."""
        hp = self.hparams
        folder = None if hp.data == "digits" else Path(hp.data).expanduser()
        captions = hp.captions
        if captions is None and folder is not None and hp.prompt is None:
            found = [folder / n for n in ("metadata.jsonl", "prompts.txt") if (folder / n).is_file()]
            captions = str(found[0]) if found else None
        if hp.prompt is not None and captions is not None:
            raise DataError("set either data.prompt or data.captions, not both")
        if hp.prompt is not None:
            names = self.class_names() if "{label}" in hp.prompt else []
            return [hp.prompt.format(label=names[i] if i < len(names) else i) for i in labels.tolist()]
        if captions is None:
            raise DataError(
                "the teacher is text-conditional but no prompts were given: set data.prompt, data.captions, "
                "or put metadata.jsonl / prompts.txt in the image folder"
            )
        path = Path(captions).expanduser()
        if not path.is_file():
            raise DataError(f"caption file {captions!r} does not exist")
        if folder is None:
            raise DataError("caption files need an image folder (data is 'digits': use data.prompt)")
        files = [p.relative_to(folder).as_posix() for p in find_images(folder)]
        if path.suffix == ".jsonl":
            import json

            table = {}
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        table[row["file_name"]] = row["text"]
                    except (json.JSONDecodeError, KeyError) as err:
                        raise DataError(f"{path}:{n}: expected {{\"file_name\", \"text\"}} ({err})") from err
            missing = [f for f in files if f not in table]
            if missing:
                raise DataError(f"{path} has no caption for {len(missing)} images, e.g. {missing[0]!r}")
            return [table[f] for f in files]
        lines = [line.rstrip("\n") for line in path.read_text().splitlines()]
        if len(lines) != len(files):
            raise DataError(f"{path} has {len(lines)} lines but the folder holds {len(files)} images")
        return lines

    def prompt_inputs(self, labels: Tensor) -> dict[str, Tensor]:
        """``{"input_ids": (N, L)}`` for text-conditional teachers (SD3: also ``input_ids_2``), else ``{}``."""
        if self.teacher is None or not self.teacher.is_text_conditional:
            return {}
        return self.teacher.text_inputs(self.prompts(labels))

    def release_encoders(self, model=None) -> None:
        """Encode the prompts ``model`` samples with (its ``prompts_to_cache()``) and ``""``, then drop the text
        encoders and the VAE's encoder from the teacher (and from ``model.teacher``, if another object)."""
        from .text_cache import release_encoders, remember_prompts

        prompts = [""] + list(model.prompts_to_cache() if hasattr(model, "prompts_to_cache") else [])
        for teacher in {id(t): t for t in (self.teacher, getattr(model, "teacher", None)) if t is not None}.values():
            remember_prompts(teacher, prompts)
            release_encoders(teacher)

    def encode_latents(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Encode the whole data set with the teacher's VAE once (on a GPU if there is one), with a disk cache
        keyed by the images themselves, the VAE's weights and dtype and its scaling / shift factors (the teacher's
        name and the data's settings alone would let an edited folder or another VAE read stale latents)."""
        from .nn_utils import content_digest

        hp = self.hparams
        cache = Path(hp.latent_cache).expanduser() if hp.latent_cache else None
        key = None if cache is None else {
            "teacher": str(hp.teacher), "revision": hp.teacher_revision, "data": str(hp.data),
            "image_size": self.image_size, "n": int(images.shape[0]),
            "content": content_digest(images, self.teacher.vae, type(self.teacher.vae).__name__),
            # baked into the cached latents ((mode - shift) * scale): a corrected config must re-encode
            "vae_scaling": [float(getattr(self.teacher.vae.config, k, None) or d) for k, d in
                            (("scaling_factor", 1.0), ("shift_factor", 0.0))]}
        if cache is not None and cache.is_file():
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                return stored["latents"]
        vae = self.teacher.vae
        home = next(vae.parameters()).device
        device = torch.device("cuda") if torch.cuda.is_available() else home
        vae.to(device)
        try:
            latents = torch.cat([
                self.teacher.encode_images(images[i : i + batch_size].to(device)).cpu()
                for i in range(0, images.shape[0], batch_size)
            ])
        finally:
            vae.to(home)
        if cache is not None:
            # atomic, each DDP rank its own temporary file (unique across nodes); the last rename wins
            atomic_torch_save({"key": key, "latents": latents}, cache)
        return latents

    def setup_pairs(self) -> None:
        """Teacher-data mode: generate (or resume, or verify) the pairs and train on them."""
        from .teacher_pairs import PromptPool, ensure_pairs, pair_datasets
        from .text_cache import encoder_key

        cfg = self.hparams.pairs
        if isinstance(cfg, dict):
            cfg = PairsConfig(**cfg)
        if self.teacher is None:
            raise DataError("teacher-data mode (pairs) needs a teacher")
        dist = {}
        if self.trainer is not None:
            strategy = self.trainer.strategy
            dist = {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size, "barrier": strategy.barrier}
            self.teacher.to(strategy.root_device)
        prompts = None
        if self.teacher.is_text_conditional:  # the training images' prompts; each pair stores its token ids
            ids, train = self.image_train_set.dataset.extras, torch.as_tensor(self.image_train_set.indices)
            prompts = PromptPool({k: v[train] for k, v in ids.items()}, self.teacher.text_conditioning,
                                 encoder_key(self.teacher))
        pairs = ensure_pairs(
            self.teacher.denoiser, cfg, self.sample_shape, self.teacher.num_classes, self.teacher.source, **dist,
            prompts=prompts,
        )
        self.train_set, self.val_set = pair_datasets(pairs, cfg.val_fraction)

    def train_images(self) -> Tensor:
        """All training images as one tensor in pixel space, in [-1, 1] (reference statistics, FID), also
        for a latent teacher, whose data set holds their VAE latents."""
        self.setup()
        return self.pixels[self.image_train_set.indices]

    def val_images(self) -> Tensor:
        self.setup()
        return self.pixels[self.image_val_set.indices]

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(ds) > batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Shuffle order a function of (seed, epoch) and a loader that resumes mid-epoch, so a run
        # resumed from last.ckpt sees the batches an uninterrupted run would (lightning_distill/resume.py).
        ds, bs = self.train_set, self.hparams.batch_size
        return ResumableDataLoader(
            ds,
            batch_size=bs,
            sampler=EpochSeededRandomSampler(ds, seed=int(os.environ.get("PL_GLOBAL_SEED", 0))),
            drop_last=len(ds) > bs,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


__all__ = ["TeacherDataModule", "DataError", "TeacherError", "check_teacher_text_settings", "image_folder_labels",
           "load_digits_tensor", "load_image_folder", "load_run_teacher"]
