"""TeacherDataModule: digits, image folders, and every bad input named in issue 2 (directly and via the CLI)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_distill.cli import cli_main
from lightning_distill.data import DataError, TeacherDataModule, load_digits_tensor
from lightning_distill.teacher import TeacherError, load_teacher

from conftest import write_tiny_teacher

DEBUG_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "teacher" / "debug.yaml")


# --- digits -------------------------------------------------------------------------------------


def test_digits_shapes_range_labels_and_split():
    dm = TeacherDataModule(teacher=None, data="digits", image_size=8, batch_size=32, val_fraction=0.1, split_seed=3)
    dm.setup("fit")
    assert dm.channels == 1 and dm.sample_shape == (1, 8, 8)
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == round(1797 * 0.1)  # 180
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (32, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == torch.long
    x, y = load_digits_tensor(8)
    assert x.min().item() == -1.0 and x.max().item() == 1.0  # 0/16 -> -1, 16/16 -> +1
    assert set(y.tolist()) == set(range(10))
    # at native size the pixels are exactly v / 16 * 2 - 1 of scikit-learn's values 0..16
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images[0]).float()
    torch.testing.assert_close(x[0, 0], raw / 8 - 1)

    train_idx, val_idx = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == 1797
    same = TeacherDataModule(teacher=None, data="digits", image_size=8, split_seed=3)
    same.setup("fit")
    assert same.val_set.indices == dm.val_set.indices
    other = TeacherDataModule(teacher=None, data="digits", image_size=8, split_seed=4)
    other.setup("fit")
    assert other.val_set.indices != dm.val_set.indices
    torch.testing.assert_close(dm.val_images(), x[dm.val_set.indices])


def test_digits_resized():
    x, _ = load_digits_tensor(16)
    assert x.shape == (1797, 1, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    # a blank border column of the 8x8 image stays blank (-1) after resizing
    assert torch.allclose(x[:, :, :, 0].mean(), torch.tensor(-1.0), atol=0.05)


# --- image folders ------------------------------------------------------------------------------


def _make_folder(root: Path) -> Path:
    """cls_a: two RGB images (one nested a level deeper); cls_b: one grayscale and one JPEG."""
    (root / "cls_a" / "deeper").mkdir(parents=True)
    (root / "cls_b").mkdir(parents=True)
    # 12 x 4 (W x H): columns 4..7 white, rest black -> after resize to 4 and centre crop: all white
    stripe = np.zeros((4, 12, 3), dtype=np.uint8)
    stripe[:, 4:8] = 255
    Image.fromarray(stripe).save(root / "cls_a" / "stripe.png")
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(root / "cls_a" / "deeper" / "grey.png")
    Image.fromarray(np.zeros((6, 6), dtype=np.uint8), mode="L").save(root / "cls_b" / "black.png")
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(root / "cls_b" / "white.jpg")
    (root / "cls_b" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_recursive_rgb_gray_crop_and_labels(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    dm = TeacherDataModule(teacher=None, data=str(root), image_size=4, channels=3, class_conditional=True,
                           val_fraction=0.25)
    images, labels = dm.load_all()
    # sorted paths: cls_a/deeper/grey.png, cls_a/stripe.png, cls_b/black.png, cls_b/white.jpg
    assert images.shape == (4, 3, 4, 4)
    assert labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(images[0], torch.full((3, 4, 4), 128 / 255 * 2 - 1))
    torch.testing.assert_close(images[1], torch.ones(3, 4, 4))  # centre crop kept the white stripe
    torch.testing.assert_close(images[2], -torch.ones(3, 4, 4))  # grayscale -> 3 equal channels
    assert images[3].min() > 0.9  # JPEG white
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 1

    gray = TeacherDataModule(teacher=None, data=str(root), image_size=4, channels=1)
    g_images, g_labels = gray.load_all()
    assert g_images.shape == (4, 1, 4, 4)
    assert g_labels.tolist() == [0, 0, 0, 0]  # no class labels unless class_conditional
    # without channels and without a teacher a folder is read as RGB
    assert TeacherDataModule(teacher=None, data=str(root), image_size=4).channels == 3


def test_image_folder_with_teacher_infers_channels(tmp_path, tiny_teacher_dir, image_folder):
    dm = TeacherDataModule(teacher=str(tiny_teacher_dir), data=str(image_folder), image_size=8, batch_size=4)
    assert dm.channels == 1  # the tiny teacher is grayscale
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 1, 8, 8)
    assert dm.teacher.sample_size == 8 and not any(p.requires_grad for p in dm.teacher.parameters())
    dm.teacher.train()
    assert not dm.teacher.training  # frozen teacher stays in eval mode


# --- bad input, directly --------------------------------------------------------------------------


def test_missing_teacher_folder(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        TeacherDataModule(teacher=str(tmp_path / "nowhere"), data="digits", image_size=8)


@pytest.mark.parametrize("sub", ["unet", "scheduler"])
def test_teacher_folder_without_subfolder(tmp_path, sub):
    folder = write_tiny_teacher(tmp_path / "t")
    shutil.rmtree(folder / sub)
    with pytest.raises(TeacherError, match=f"lacks {sub}/"):
        load_teacher(str(folder))


def test_bin_teacher_weights_load_as_tensors_only(tmp_path):
    """A folder whose weights are a ``.bin`` loads through torch's ``weights_only`` loader (equal to the
    safetensors folder), and a ``.bin`` holding any other pickled object is refused in one line."""
    from safetensors.torch import load_file

    folder = write_tiny_teacher(tmp_path / "safe")
    weights = next((folder / "unet").glob("*.safetensors"))
    for name, extra in (("bin", {}), ("pickled", {"payload": Path(".")})):  # a Path is not a tensor / container
        other = shutil.copytree(folder, tmp_path / name)
        torch.save({**load_file(weights), **extra}, other / "unet" / "diffusion_pytorch_model.bin")
        (other / "unet" / weights.name).unlink()
    a, b = load_teacher(str(folder)).unet.state_dict(), load_teacher(str(tmp_path / "bin")).unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TeacherError, match="could not load unet/"):
        load_teacher(str(tmp_path / "pickled"))


def test_teacher_path_is_a_file(tmp_path):
    f = tmp_path / "teacher.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(TeacherError, match="is a file"):
        load_teacher(str(f))


def test_unreadable_and_truncated_images_are_named(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(bad / "ok.png")
    (bad / "garbage.png").write_bytes(b"this is not a png")
    dm = TeacherDataModule(teacher=None, data=str(bad), image_size=8, channels=3)
    with pytest.raises(DataError, match=r"unreadable image .*garbage\.png"):
        dm.setup("fit")

    trunc = tmp_path / "trunc"
    trunc.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(trunc / "cut.png")
    data = (trunc / "cut.png").read_bytes()
    (trunc / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(trunc / "fine.png")
    dm = TeacherDataModule(teacher=None, data=str(trunc), image_size=8, channels=3)
    with pytest.raises(DataError, match=r"unreadable image .*cut\.png"):
        dm.setup("fit")


def test_empty_and_missing_data_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    dm = TeacherDataModule(teacher=None, data=str(empty), image_size=8)
    with pytest.raises(DataError, match="holds no PNG/JPEG images"):
        dm.setup("fit")
    with pytest.raises(DataError, match="neither"):
        TeacherDataModule(teacher=None, data=str(tmp_path / "nope"), image_size=8)


def test_teacher_data_mismatches(tmp_path, tiny_teacher_dir, image_folder):
    with pytest.raises(TeacherError, match="teacher UNet takes 1 channels but the data has 3"):
        TeacherDataModule(teacher=str(tiny_teacher_dir), data=str(image_folder), image_size=8, channels=3)
    with pytest.raises(TeacherError, match="teacher sample_size is 8 but the data gives 16x16"):
        TeacherDataModule(teacher=str(tiny_teacher_dir), data="digits", image_size=16)
    with pytest.raises(TeacherError, match="class_conditional=True but the teacher UNet has no class embedding"):
        TeacherDataModule(teacher=str(tiny_teacher_dir), data="digits", image_size=8, class_conditional=True)
    cond = write_tiny_teacher(tmp_path / "cond", num_class_embeds=10)
    dm = TeacherDataModule(teacher=str(cond), data="digits", image_size=8, class_conditional=True)
    assert dm.teacher.num_classes == 10
    # a class-conditional teacher on an image folder: the sub-folders must be its classes, not silently class 0
    folder = tmp_path / "numbered"
    for name in ("2", "10", "1"):
        (folder / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 100 + int(name), dtype=np.uint8), mode="L").save(folder / name / "x.png")
    with pytest.raises(TeacherError, match=r"class-conditional \(10 classes\) but data.class_conditional is false"):
        TeacherDataModule(teacher=str(cond), data=str(folder), image_size=8)
    dm = TeacherDataModule(teacher=str(cond), data=str(folder), image_size=8, class_conditional=True)
    images, labels = dm.load_all()  # integer names sort as numbers: folders 1, 2, 10 are classes 0, 1, 2
    assert dm.class_names() == ["1", "2", "10"]
    assert labels.tolist() == [0, 2, 1]  # files sorted as paths: 1/x.png, 10/x.png, 2/x.png
    torch.testing.assert_close(images[:, 0, 0, 0], torch.tensor([101, 110, 102]) / 255 * 2 - 1)
    for name in range(3, 12):
        (folder / str(name)).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(folder / str(name) / "x.png")
    with pytest.raises(TeacherError, match="has 11 class folders but the teacher knows 10 classes"):
        TeacherDataModule(teacher=str(cond), data=str(folder), image_size=8, class_conditional=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 2}, "image_size must be at least 4, got 2"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"val_fraction": 1.0}, r"val_fraction must lie in \(0, 1\), got 1.0"),
        ({"channels": 2}, "channels must be 1 or 3, got 2"),
        ({"channels": 3}, "digits data set is grayscale"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(DataError, match=match):
        TeacherDataModule(teacher=None, data="digits", **{"image_size": 8, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    ({"teacher_embedded_guidance": 2.0}, r"data.teacher_embedded_guidance=2.0 is the guidance input of a "
                                         r"guidance-distilled Flux network .* but teacher 'bundled:digits' is a UNet2DModel"),
    ({"teacher_max_sequence_length": 77}, r"data.teacher_max_sequence_length=77 sets the T5 prompt length, but teacher "
                                          r"'bundled:digits' \(UNet2DModel\) has no T5 encoder"),
])
def test_text_conditioning_settings_of_a_teacher_without_them_are_refused(kwargs, match):
    """The T5 length and embedded guidance apply to SD3-with-T5 / Flux teachers only (tests/test_flux.py: the
    CLI, and where they apply); an unconditional teacher, or none, refuses them rather than ignore them."""
    from lightning_distill.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        TeacherDataModule(teacher="bundled:digits", data="digits", image_size=16, **kwargs)
    with pytest.raises(ConfigError, match="but data.teacher is null: unset them"):
        TeacherDataModule(teacher=None, data="digits", image_size=8, **kwargs)


# --- bad input via the CLI ------------------------------------------------------------------------


def _cli_fails(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", DEBUG_CONFIG, *args])
    assert exc.value.code not in (0, None)
    return capsys.readouterr().err


def test_cli_unknown_key_and_wrong_type(tmp_path, capsys):
    root = ["--trainer.default_root_dir", str(tmp_path / "run")]
    err = _cli_fails([*root, "--data.bogus_key", "1"], capsys)
    assert "bogus_key" in err
    err = _cli_fails([*root, "--data.batch_size", "abc"], capsys)
    assert "data.batch_size" in err and "abc" in err
    err = _cli_fails([*root, "--model.init_args.not_an_arg", "3"], capsys)
    assert "not_an_arg" in err
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  imagesize: 8\n")
    err = _cli_fails([*root, "--config", str(extra)], capsys)
    assert "imagesize" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_bad_teacher_is_one_line(tmp_path, capsys):
    err = _cli_fails(["--trainer.default_root_dir", str(tmp_path / "run"), "--data.teacher", str(tmp_path / "gone")],
                     capsys)
    lines = [line for line in err.splitlines() if line.startswith("lightning-distill: error:")]
    assert len(lines) == 1 and "does not exist" in lines[0] and str(tmp_path / "gone") in lines[0]


def test_failing_run_leaves_previous_outputs_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    export = run / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    ckpt.parent.mkdir(parents=True)
    export.parent.mkdir(parents=True)
    ckpt.write_bytes(b"previous checkpoint")
    export.write_bytes(b"previous export")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (ckpt, export)}
    listing = sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*")) + sorted(
        str(p.relative_to(run)) for p in (run / "teacher").rglob("*")
    )

    trunc = tmp_path / "imgs"
    trunc.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(trunc / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(trunc / "b.png")
    data = (trunc / "b.png").read_bytes()
    (trunc / "b.png").write_bytes(data[: len(data) // 2])
    # the data module is built fine; the truncated file is found when fit sets up the data
    err = _cli_fails(
        ["--trainer.default_root_dir", str(run), "--data.data", str(trunc), "--data.channels", "1"], capsys
    )
    assert "unreadable image" in err and "b.png" in err
    for p, (content, mtime) in before.items():
        assert p.read_bytes() == content and p.stat().st_mtime_ns == mtime
    assert listing == sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*")) + sorted(
        str(p.relative_to(run)) for p in (run / "teacher").rglob("*")
    )


def test_cli_channel_mismatch_without_teacher(tmp_path, capsys):
    """DiffusionTraining has no teacher to compare with: the method checks the data against its network."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    err = _cli_fails(["--trainer.default_root_dir", str(tmp_path / "run"), "--data.data", str(folder),
                      "--data.channels", "3"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("lightning-distill: error:")]
    assert len(lines) == 1 and "(3, 8, 8)" in lines[0] and "(1, 8, 8)" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_class_folder_order_is_fixed(tmp_path):
    """Integer names sort as numbers with ties broken by the text ("01" before "1", whatever the hash seed);
    any other name (a superscript digit counts as one) sorts everything as text."""
    from lightning_distill.data import class_folders

    def folder(names):
        root = tmp_path / "-".join(names)
        for n in names:
            (root / n).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4), dtype=np.uint8), mode="L").save(root / n / "x.png")
        return root

    assert class_folders(folder(["10", "01", "2", "1"])) == ["01", "1", "2", "10"]
    assert class_folders(folder(["10", "2", "\u00b2"])) == ["10", "2", "\u00b2"]


def test_images_beside_class_folders_are_refused_where_labels_are_used(tmp_path):
    """An image at the top of a folder with class folders has no class: where the labels are used
    (class_conditional, a {label} prompt) it is a one-line DataError naming it (it silently became the first
    folder's class); unconditional use reads it as before."""
    from lightning_distill.data import DataError

    root = _make_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8), mode="L").save(root / "stray.png")
    with pytest.raises(DataError, match=r"1 image\(s\) at the top of .* \(e\.g\. stray\.png\) beside the class folders"):
        TeacherDataModule(teacher=None, data=str(root), image_size=4, channels=3, class_conditional=True).load_all()
    images, labels = TeacherDataModule(teacher=None, data=str(root), image_size=4, channels=3).load_all()
    assert images.shape[0] == 5 and labels.tolist() == [0] * 5


def test_a_16_bit_grey_png_keeps_its_values(tmp_path):
    """A 16-bit PNG (mode I;16): 20000 / 65535 grey reads as 2 * 0.305 - 1 = -0.39 in one or three channels
    (PIL's convert clipped it to 255: solid white, 1.0)."""
    from lightning_distill.data import load_image

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((6, 6), 20000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    for channels in (1, 3):
        x = load_image(path, 4, channels)
        assert x.shape == (channels, 4, 4)
        torch.testing.assert_close(x, torch.full_like(x, 20000 / 65535 * 2 - 1), atol=1e-4, rtol=0)
