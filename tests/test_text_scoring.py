"""Text-to-image students scored by the FID callback, the closing report, ``seeds`` and ``compare`` from prompts, with
``evaluate``'s protocol (image i drawn with prompt i % P, the teacher guided at ``guidance_scale``), on the tiny
SD1.5-style stack (``tests/test_lcm.py``) and the tiny SD3 stack (``tests/_sd3.py``), built locally.

Checked: the callback's logged FD / KID (student and teacher line) equal a recomputation with ``evaluate``'s own
functions on the same prompts and seeds; its stored teacher line's key follows the prompts and the scale (and an
unconditional run's key is what it was); ``prompts: captions`` is ``evaluate --prompts captions``' list; a text
student without prompts is a one-line error at fit start; the report, ``seeds`` and ``compare`` pass the prompts and
scales to ``evaluate`` and record them in their protocol.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_distill import evaluate, teacher_features
from lightning_distill.callbacks.fid import FIDCallback, datamodule_captions
from lightning_distill.callbacks.report import DistillationReport
from lightning_distill.data import TeacherDataModule
from lightning_distill.errors import ConfigError
from lightning_distill.feature_net import DigitsFeatureNet, save_feature_net
from lightning_distill.metrics import decode_latents, reference_stats, score_features
from lightning_distill.teacher import load_teacher

from test_evaluate import MemoryLogger

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["cat", "red dog", "blue", "a cat"]  # short: the tiny tokenizer keeps a few tokens
IMAGE_SIZE = {"sd15": 8, "sd3": 16}
STEPS = {"sd15": 50, "sd3": 40}  # ConsistencyDistillation's N: divides T = 1000


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    from _sd3 import write_tiny_sd3
    from test_lcm import write_tiny_sd

    root = tmp_path_factory.mktemp("text_stacks")
    return {"sd15": write_tiny_sd(root / "sd15"), "sd3": write_tiny_sd3(root / "sd3")}


@pytest.fixture
def captioned(image_folder):
    rows = [{"file_name": f"{c}/{i}.png", "text": f"{'cat' if c == 'a' else 'dog'} {i}"} for c in "ab" for i in range(6)]
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return image_folder


def feature_net(image_size: int):
    torch.manual_seed(0)
    return DigitsFeatureNet(image_size=image_size, channels=3, widths=(4, 8), num_features=8)


def consistency(teacher, kind: str):
    from lightning_distill.methods.consistency import ConsistencyDistillation

    torch.manual_seed(0)
    return ConsistencyDistillation(teacher, original_inference_steps=STEPS[kind], sample_steps=2,
                                   optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))


def datamodule(stack: Path, data, kind: str):
    return TeacherDataModule(teacher=str(stack), data=str(data), image_size=IMAGE_SIZE[kind], channels=3, batch_size=4)


def trainer(tmp_path, callbacks, logger=None):
    return L.Trainer(max_steps=1, logger=logger or False, callbacks=callbacks, enable_checkpointing=False,
                     default_root_dir=tmp_path, limit_val_batches=0, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu")


# --- the FID callback -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_fid_callback_text_student_and_teacher_equal_evaluates_computation(kind, stacks, captioned, tmp_path):
    """Two chunks (4 + 2 images), 4 prompts: images 4 and 5 wrap round to prompts 0 and 1. The student is sampled by
    its own ``sample(prompts=...)``, the teacher by evaluate's text sampler guided at g = 2."""
    size = IMAGE_SIZE[kind]
    dm = datamodule(stacks[kind], captioned, kind)
    teacher = dm.teacher
    net = feature_net(size)
    fid = FIDCallback(every_n_steps=0, num_samples=6, steps=[2], feature_net=net, kid_subsets=2, kid_subset_size=4,
                      chunk_size=4, seed=3, log_teacher=True, prompts=PROMPTS, guidance_scale=2.0,
                      cache_dir=str(tmp_path / "cache"))
    logger = MemoryLogger()
    model = consistency(teacher, kind)
    trainer(tmp_path, [fid], logger).fit(model, dm)
    (logged,) = [m for _, m in logger.logged if any(k.startswith("fid/") for k in m)]

    # the same cells with evaluate's functions: its Prompts, sample_cell (chunks, seeds, prompt i % P), its teacher
    # sampler, and the reference set evaluate reads from the data folder
    prompts = evaluate.Prompts(tuple(PROMPTS), "-")
    ref = reference_stats(evaluate.reference_set(str(captioned), size, "train", 0, 0.1, 3)[0], net, None, device="cpu")
    student = evaluate.Sampler(
        "student", "checkpoint", "-", text_network=type(model.student.unet).__name__, guidance=1.0,
        sample=lambda n, steps, g, p: decode_latents(model.sample(n, steps, g, denoiser=model.student, prompts=p),
                                                     teacher.vae))

    def scores(sampler, cell_prompts=prompts):
        feats, _ = evaluate.sample_cell(sampler, 2, net, 6, 3, 4, 4, "cpu", cell_prompts)
        return score_features(feats, ref, True, 2, 4, 3)

    tag = "{}/digits-feat/2step/n6"
    for sampler, suffix in ((student, ""), (evaluate.teacher_sampler(teacher, guidance_scale=2.0), "/teacher")):
        want = scores(sampler)
        assert logged[tag.format("fid") + suffix] == pytest.approx(want.fd, rel=1e-6, abs=1e-9), suffix or "student"
        assert logged[tag.format("kid") + suffix] == pytest.approx(want.kid, rel=1e-6, abs=1e-9), suffix or "student"
    # the prompts reach the images: other prompts (or the teacher unguided) are other numbers
    other = scores(student, evaluate.Prompts(("dog", "green"), "-"))
    assert logged[tag.format("fid")] != pytest.approx(other.fd, rel=1e-4)
    unguided = scores(evaluate.teacher_sampler(teacher, guidance_scale=1.0))
    assert logged[tag.format("fid") + "/teacher"] != pytest.approx(unguided.fd, rel=1e-4)


def test_fid_callback_lcm_student_embeds_student_guidance(stacks, captioned, tmp_path):
    """An LCM student with a guidance input (w = g - 1) is sampled at ``student_guidance`` g, as evaluate samples its
    checkpoint; without g it is refused at fit start."""
    from lightning_distill.methods.lcm import LatentConsistencyDistillation

    dm = datamodule(stacks["sd15"], captioned, "sd15")
    torch.manual_seed(0)
    model = LatentConsistencyDistillation(dm.teacher, w_min=1.0, w_max=7.0, time_cond_proj_dim=8,
                                          original_inference_steps=50, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    with torch.no_grad():  # the w projection starts at zero (the student is the teacher at every w): make w count
        torch.nn.init.normal_(model.student.unet.time_embedding.cond_proj.weight, std=1.0)
    with pytest.raises(ConfigError, match="^FIDCallback: the student takes a guidance input .* set student_guidance g$"):
        FIDCallback(prompts=PROMPTS).on_fit_start(SimpleNamespace(datamodule=None), model)
    net = feature_net(8)
    fid = FIDCallback(every_n_steps=0, num_samples=6, steps=[1], feature_net=net, kid=False, chunk_size=4, seed=3,
                      prompts=PROMPTS, student_guidance=4.0, cache_dir=str(tmp_path / "cache"))
    logger = MemoryLogger()
    trainer(tmp_path, [fid], logger).fit(model, dm)
    (logged,) = [m for _, m in logger.logged if any(k.startswith("fid/") for k in m)]
    ref = reference_stats(evaluate.reference_set(str(captioned), 8, "train", 0, 0.1, 3)[0], net, None, device="cpu")

    def fd(g):
        sampler = evaluate.Sampler("lcm", "checkpoint", "-", text_network="UNet2DConditionModel", guidance=g,
                                   sample=lambda n, steps, gen, p: decode_latents(model.sample(
                                       n, steps, gen, denoiser=model.student, prompts=p, guidance_scale=g), dm.teacher.vae))
        feats, _ = evaluate.sample_cell(sampler, 1, net, 6, 3, 4, 4, "cpu", evaluate.Prompts(tuple(PROMPTS), "-"))
        return score_features(feats, ref, False, 2, 4, 3).fd

    assert logged["fid/digits-feat/1step/n6"] == pytest.approx(fd(4.0), rel=1e-6, abs=1e-9)
    assert logged["fid/digits-feat/1step/n6"] != pytest.approx(fd(2.0), rel=1e-4)


def test_fid_teacher_line_key_follows_prompts_and_scale_and_an_unconditional_key_is_unchanged():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"teacher": "t", "data": "digits", "image_size": 8}))
    module = SimpleNamespace(teacher=None)

    def key(**kw):
        fid = FIDCallback(every_n_steps=1, num_samples=64, feature_net="digits", **kw)
        return fid._teacher_key(trainer, module)

    # an unconditional run's key: the list it always was (the teacher lines stored in checkpoints stay valid)
    assert key() == json.dumps(["t", None, None, None, "digits", 8, None, None,
                                "train", [0], 64, 250, True, 100, 1000, "digits"])
    keys = [key(prompts=PROMPTS), key(prompts=PROMPTS[:2]), key(prompts=PROMPTS[::-1]), key(prompts=PROMPTS, guidance_scale=3.0)]
    assert len({key(), *keys}) == 5
    assert key(prompts=PROMPTS) == key(prompts=list(PROMPTS))
    sha = evaluate.Prompts(tuple(PROMPTS), "-").sha256
    assert json.loads(keys[3])[-1] == teacher_features.text_conditioning(sha, 4, 3.0)
    # and how the teacher encodes them: its T5 length, and a guidance-distilled network's embedded guidance
    teacher = lambda length, g, distilled: SimpleNamespace(  # noqa: E731
        max_sequence_length=length, embedded_guidance=g, is_guidance_distilled=distilled)
    encoded = {}
    for spec in [(512, 3.5, True), (16, 3.5, True), (512, 2.0, True), (512, 2.0, False)]:
        module.teacher = teacher(*spec)
        encoded[spec] = key(prompts=PROMPTS)
    assert len(set(encoded.values())) == 4
    module.teacher = teacher(512, 3.5, False)
    assert key(prompts=PROMPTS) == encoded[(512, 2.0, False)]  # no guidance input: the value means nothing


def test_fid_prompts_from_a_file_and_captions_are_evaluates(captioned, tmp_path):
    """A prompt file is read as ``evaluate --prompts FILE``; ``captions`` is the data module's captions of the
    reference images in their order: for ``train``, ``evaluate --prompts captions``' list, sha256 and source."""
    path = tmp_path / "prompts.txt"
    path.write_text("\ncat\n\n  red dog \n", encoding="utf-8")
    assert FIDCallback(prompts=str(path)).prompts == evaluate.read_prompt_file(path)
    dm = TeacherDataModule(teacher=None, data=str(captioned), image_size=8, channels=3, split_seed=2)
    train = datamodule_captions(dm, "train")
    assert train == evaluate.reference_set(str(captioned), 8, "train", 2, 0.1, 3, captions=True)[2]
    names = {f"{'cat' if c == 'a' else 'dog'} {i}" for c in "ab" for i in range(6)}
    val, every = datamodule_captions(dm, "val"), datamodule_captions(dm, "all")
    assert every.texts == train.texts + val.texts and set(every.texts) == names and len(val) == 1
    # in the images' order: each caption's image is the reference image at its index
    pixels = {c: dm.pixels[i] for i, c in enumerate(dm.prompts(torch.zeros(12, dtype=torch.long)))}
    assert all(torch.equal(pixels[c], x) for c, x in zip(train.texts, dm.train_images()))
    assert FIDCallback(prompts="captions", reference="val").text_prompts(SimpleNamespace(datamodule=dm)) == val
    # a class-template prompt: each image's own class, as it trained (every caption named class a before)
    templ = TeacherDataModule(teacher=None, data=str(captioned), image_size=8, channels=3, split_seed=2,
                              prompt="a photo of class {label}")
    got = datamodule_captions(templ, "all")
    # the same images in the same order as `every` (metadata: "cat i" in folder a, "dog i" in folder b)
    assert list(got.texts) == [f"a photo of class {'a' if 'cat' in t.split() else 'b'}" for t in every.texts]


def test_text_student_without_prompts_and_misused_options_are_one_line_errors_at_fit_start(stacks, tmp_path, monkeypatch):
    from conftest import make_tiny_unet
    from lightning_distill.methods.diffusion import DiffusionTraining

    stub = SimpleNamespace(datamodule=None)
    text = consistency(load_teacher(str(stacks["sd3"])), "sd3")
    plain = DiffusionTraining(unet=make_tiny_unet(8), sample_steps=2)
    choices = ("a prompt file (one prompt per line, UTF-8), a list of prompts, or 'captions' (the data module's "
               "captions of the reference images)")
    for who, callback in (("FIDCallback", FIDCallback(log_teacher=True)), ("DistillationReport", DistillationReport("x"))):
        with pytest.raises(ConfigError) as err:
            callback.on_fit_start(stub, text)
        assert str(err.value) == (f"{who}: the student is text-conditional (SD3Transformer2DModel): scoring it needs "
                                  f"prompts to condition it on: set prompts to {choices}")
    cases = [
        (FIDCallback(prompts=PROMPTS), plain, "FIDCallback: prompts given, but the student (UNet2DModel) is not "
         "text-conditional: prompts condition text-to-image models (UNet2DConditionModel, SD3Transformer2DModel) only"),
        (FIDCallback(prompts=PROMPTS, guidance_scale=3.0), text,  # log_teacher is false: no teacher is sampled
         "FIDCallback: guidance_scale 3.0 guides a text-to-image teacher, and none is sampled here"),
        (DistillationReport("x", guidance_scale=2.0), plain,
         "DistillationReport: guidance_scale 2.0 guides a text-to-image teacher, and none is sampled here"),
        (FIDCallback(prompts=PROMPTS, student_guidance=4.0), text, "FIDCallback: student_guidance 4.0 is the g of LCM "
         "students with a guidance input, and ConsistencyDistillation's student has none"),
    ]
    for callback, model, message in cases:
        with pytest.raises(ConfigError) as err:
            callback.on_fit_start(stub, model)
        assert str(err.value) == message
    with pytest.raises(ConfigError, match="guidance_scale must be >= 1"):
        FIDCallback(prompts=PROMPTS, guidance_scale=0.5).on_fit_start(stub, text)
    FIDCallback(prompts=PROMPTS, guidance_scale=2.0, log_teacher=True).on_fit_start(stub, text)  # accepted
    FIDCallback().on_fit_start(stub, plain)
    # a guidance-distilled teacher (Flux-dev) is guided by its embedded guidance: classifier-free guidance on top is
    # refused at fit start (it was refused only at the first evaluation)
    monkeypatch.setattr(type(text.teacher), "is_guidance_distilled", property(lambda self: True))
    with pytest.raises(ConfigError, match=r"FIDCallback: guidance_scale 2.0 is classifier-free .* guidance-distilled"):
        FIDCallback(prompts=PROMPTS, guidance_scale=2.0, log_teacher=True).on_fit_start(stub, text)


# --- the closing report -------------------------------------------------------------------------------------------


def test_report_scores_the_text_export_from_the_data_modules_captions(stacks, captioned, tmp_path, capsys):
    from lightning_distill.callbacks import PipelineExport

    dm = datamodule(stacks["sd15"], captioned, "sd15")
    teacher = dm.teacher
    feat = save_feature_net(feature_net(8), tmp_path / "feat")
    out = tmp_path / "report"
    report = DistillationReport(str(out), steps=[1], teacher_steps=[2], num_samples=6, seed=3, feature_net=str(feat),
                                prompts="captions", guidance_scale=2.0)
    trainer(tmp_path, [PipelineExport(str(tmp_path / "student")), report]).fit(
        consistency(teacher, "sd15"), dm)
    assert "| student (pipeline) |" in capsys.readouterr().out
    protocol = json.loads((out / "protocol.json").read_text())
    captions = evaluate.reference_set(str(captioned), 8, "train", 0, 0.1, 3, captions=True)[2]
    assert protocol["prompts"] == captions.protocol() and protocol["guidance_scale"] == 2.0
    assert protocol["prompts"]["source"] == f"captions of the {captioned} train split"
    assert "- Teacher guidance: classifier-free, scale 2" in (out / "results.md").read_text()
    # the rows are evaluate's on the export, with evaluate's own --prompts captions
    again = evaluate.evaluate_models(teacher, {"student": tmp_path / "student"}, steps=[1], teacher_steps=[2],
                                     num_samples=6, seed=3, feature_net=str(feat), data=str(captioned), image_size=8,
                                     channels=3, prompts="captions", guidance_scale=2.0, teacher_cache=False,
                                     cache_dir=tmp_path / "cache2", device="cpu", log=lambda m: None)
    fd = lambda rows: {(r["model"], r["steps"]): r["fd"] for r in rows}  # noqa: E731
    assert fd(report.rows) == pytest.approx(fd(again), rel=1e-6)


# --- seeds and compare ----------------------------------------------------------------------------------------------


@pytest.fixture
def sd3_run(stacks, captioned, tmp_path):
    """A seeds runner's ``--out`` holding one seed's run folder whose export is an SD3 pipeline (the tiny stack)."""
    out = tmp_path / "seeds"
    shutil.copytree(stacks["sd3"], out / "seed_0" / "student")
    feat = save_feature_net(feature_net(16), tmp_path / "feat")
    common = ["--steps", "1", "--teacher-steps", "1", "--num-samples", "6", "--feature-net", str(feat), "--device",
              "cpu", "--cache-dir", str(tmp_path / "cache")]
    overrides = ["--data.teacher", str(stacks["sd3"]), "--data.data", str(captioned), "--data.image_size", "16",
                 "--data.channels", "3"]
    return dict(out=out, feat=feat, common=common, overrides=overrides, sd3=stacks["sd3"], data=captioned)


def _evaluate_sd3(run, student, prompts, guidance_scale):
    rows = evaluate.evaluate_models(str(run["sd3"]), {"x": student}, steps=[1], teacher_steps=[1], num_samples=6, seed=0,
                                    feature_net=str(run["feat"]), data=str(run["data"]), image_size=16, channels=3,
                                    prompts=prompts, guidance_scale=guidance_scale, teacher_cache=False,
                                    device="cpu", log=lambda m: None)
    return {r["kind"]: r["fd"] for r in rows if r["kind"] != "data"}


def test_seeds_pass_prompts_and_guidance_to_evaluate_and_record_them(sd3_run, tmp_path):
    from lightning_distill import seeds

    config = ROOT / "configs" / "consistency" / "debug_sd3.yaml"
    out, student = sd3_run["out"], sd3_run["out"] / "seed_0" / "student"
    files = {}
    for name, prompts in (("a", PROMPTS), ("b", ["dog", "green"])):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(prompts) + "\n")
    argv = ["--config", str(config), "--seeds", "0", "--skip-train", "--out", str(out), *sd3_run["common"]]
    per_prompts = {}
    for name in ("a", "b"):
        seeds.main([*argv, "--prompts", str(files[name]), "--guidance-scale", "2", "--", *sd3_run["overrides"]])
        protocol = json.loads((out / "protocol.json").read_text())
        assert protocol["prompts"] == evaluate.read_prompt_file(files[name]).protocol()
        assert protocol["guidance_scale"] == 2.0 and protocol["student_guidance"] is None
        assert f"- Prompts: {protocol['prompts']['count']} from file {files[name]}" in (out / "results.md").read_text()
        with open(out / "per_seed.csv", newline="") as f:
            per_prompts[name] = {r["kind"]: float(r["fd"]) for r in csv.DictReader(f)}
        want = _evaluate_sd3(sd3_run, student, str(files[name]), 2.0)
        assert per_prompts[name]["pipeline"] == pytest.approx(want["pipeline"], rel=1e-5)  # the csv's 6 digits
        assert per_prompts[name]["teacher"] == pytest.approx(want["teacher"], rel=1e-5)
    assert per_prompts["a"]["pipeline"] != pytest.approx(per_prompts["b"]["pipeline"], rel=1e-4)


def test_compare_passes_prompts_and_guidance_to_evaluate_and_records_them(sd3_run, tmp_path, monkeypatch, capsys):
    from lightning_distill import compare

    student = sd3_run["out"] / "seed_0" / "student"
    out = tmp_path / "compare"
    argv = ["--run", f"a={student}", "--teacher", str(sd3_run["sd3"]), "--data", str(sd3_run["data"]), "--image-size",
            "16", "--out", str(out), *sd3_run["common"]]
    # without prompts, evaluate's one-line refusal of the text models, naming --prompts
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["compare", *argv])
    with pytest.raises(SystemExit) as exc:
        compare._entry()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # before it: the pipelines' loading bars
    assert "Traceback" not in "\n".join(err) and [e for e in err if e.startswith("compare:")] == err[-1:]
    assert err[-1] == (f"compare: error: ConfigError: teacher {str(sd3_run['sd3'])!r} is text-conditional "
                       f"(SD3Transformer2DModel): evaluate needs prompts to condition it on: pass {evaluate.PROMPT_OPTIONS}")
    assert not out.exists()
    summary = compare.main([*argv, "--prompts", "captions", "--guidance-scale", "2"])
    protocol = json.loads((out / "protocol.json").read_text())
    captions = evaluate.reference_set(str(sd3_run["data"]), 16, "train", 0, 0.1, 3, captions=True)[2]
    assert protocol["prompts"] == captions.protocol() and protocol["guidance_scale"] == 2.0
    assert "- Teacher guidance: classifier-free, scale 2" in (out / "results.md").read_text()
    want = _evaluate_sd3(sd3_run, student, "captions", 2.0)
    fd = {r["kind"]: r["fd_median"] for r in summary}
    assert fd["pipeline"] == pytest.approx(want["pipeline"], rel=1e-6)
    assert fd["teacher"] == pytest.approx(want["teacher"], rel=1e-6)
