"""``python -m lightning_distill.evaluate`` on text-to-image models: a tiny SD1.5-style stack (``tests/test_lcm.py``)
and a tiny SD3 stack (``tests/_sd3.py``), built locally.

Text models are sampled from prompts (``--prompts FILE`` or ``--prompts captions``), image i with prompt i % P: the
teacher through the framework's text sampler (classifier-free guidance at ``--guidance-scale``), exported folders
with the stock pipeline they were saved as on the shared latents, checkpoints with their ``sample(prompts=...)``.
Checked here against the stock pipelines themselves: a folder's images are the pipeline's own output for the same
generator and prompts; the teacher's are ``StableDiffusionPipeline``'s with the teacher's DDIM, with and without
guidance; the teacher and a folder holding its weights and sampler give the same images (shared noise and prompts).
A text model without prompts, prompts or guidance scales no model takes: one line, exit 2, before the reference
features, nothing written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lightning_distill import evaluate, teacher_features
from lightning_distill.errors import ConfigError
from lightning_distill.feature_net import DigitsFeatureNet, save_feature_net
from lightning_distill.metrics import chunk_bounds, chunk_seed, fd_from_features, generated_features

from test_lcm import write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["cat", "red dog", "blue", "a cat"]  # short: the tiny tokenizer keeps 8 tokens
OPTIONS = ("pass --prompts FILE (one prompt per line) or --prompts captions (the captions of the --data image folder, "
           "metadata.jsonl)")


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """An SD1.5-style student folder as ``export`` writes it (``StableDiffusionPipeline``, no safety checker),
    the same with ``LCMScheduler`` (an LCM student with ``guidance_embedding: false``), the same weights with the
    teacher's own deterministic DDIM (``sd15_ddim``), and an SD3 folder."""
    from diffusers import AutoencoderKL, LCMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from _sd3 import write_tiny_sd3
    from lightning_distill.sampling import deterministic_scheduler
    from lightning_distill.teacher import load_teacher

    root = tmp_path_factory.mktemp("text_models")
    sd = write_tiny_sd(root / "tiny-sd")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(sd / "vae"), text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"), unet=UNet2DConditionModel.from_pretrained(sd / "unet"),
        scheduler=PNDMScheduler.from_pretrained(sd / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd15")
    den = load_teacher(str(root / "sd15")).denoiser
    pipe.scheduler = deterministic_scheduler(dict(pipe.scheduler.config), den.schedule, den.prediction_type, den.clip_x0)
    pipe.save_pretrained(root / "sd15_ddim")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=4)
    pipe.save_pretrained(root / "sd15_lcm")
    return {"tiny_sd": sd, "sd15": root / "sd15", "sd15_ddim": root / "sd15_ddim", "sd15_lcm": root / "sd15_lcm",
            "sd3": write_tiny_sd3(root / "sd3")}


@pytest.fixture
def captioned(image_folder):
    """The 12-image folder (two classes) with a caption per image in metadata.jsonl."""
    rows = [{"file_name": f"{c}/{i}.png", "text": f"a {'cat' if c == 'a' else 'dog'} {i}"} for c in "ab" for i in range(6)]
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return image_folder


def prompt_file(tmp_path, prompts=PROMPTS) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n" + "\n\n".join(prompts) + "\n  \n", encoding="utf-8")  # blank lines are ignored
    return path


def feature_net(image_size: int = 8):
    torch.manual_seed(0)
    return DigitsFeatureNet(image_size=image_size, channels=3, widths=(4, 8), num_features=8)


def common(tmp_path, data, image_size=8, **kw):
    return dict(data=str(data), image_size=image_size, channels=3, num_samples=6, seed=3, chunk_size=4, kid_subsets=2,
                kid_subset_size=4, feature_net=feature_net(image_size), cache_dir=tmp_path / "cache", device="cpu",
                log=lambda msg: None, **kw)


def stock_pipeline(cls_name: str, folder: Path):
    import diffusers

    kw = {"text_encoder_3": None, "tokenizer_3": None} if cls_name == "StableDiffusion3Pipeline" else {}
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pipeline_features(pipe, net, prompts, n, seed, chunk_size, steps, guidance_scale=1.0):
    """The evaluate protocol by hand on the stock pipeline: chunk c from chunk_seed(seed, c), image i with prompt
    i % P, the pipeline drawing its own latents; decoded as the pipeline decodes (without its clamp to [0, 1])."""
    feats = []
    for c, (a, b) in enumerate(chunk_bounds(n, chunk_size)):
        g = torch.Generator().manual_seed(chunk_seed(seed, c))
        z = pipe(prompt=[prompts[i % len(prompts)] for i in range(a, b)], num_inference_steps=steps, generator=g,
                 guidance_scale=guidance_scale, output_type="latent").images
        cfg = pipe.vae.config
        x = pipe.vae.decode(z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)).sample
        feats.append(net(x).double())
    return torch.cat(feats)


def error_line(argv, monkeypatch, capsys) -> str:
    """Run ``python -m lightning_distill.evaluate`` on ``argv``: exit status 2, no traceback; the error's one line.

    Before it stderr may hold the pipelines' loading bars (diffusers' tqdm, shown while a folder loads)."""
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["evaluate", *argv])
    with pytest.raises(SystemExit) as exc:
        evaluate._entry()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("evaluate:")] == lines[-1:]
    return lines[-1]


def no_reference_features(monkeypatch):
    """Reference features are the slow part of a real run (minutes of Inception): a refusal comes before them."""
    def refuse(*args, **kwargs):
        raise AssertionError("reference features computed before the error")

    monkeypatch.setattr(evaluate, "reference_set", refuse)


# --- (a) end to end: a folder is sampled with its stock pipeline, the teacher shares its noise and prompts ------


def test_sd15_folder_and_teacher_end_to_end_with_a_prompt_file(text_models, captioned, tmp_path):
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.feature_net import load_digits_feature_net

    prompts = prompt_file(tmp_path)
    net = feature_net()
    out = tmp_path / "report"
    rows = evaluate.main([
        "--teacher", str(text_models["sd15"]), "--student", f"pndm={text_models['sd15']}",
        "--student", f"ddim={text_models['sd15_ddim']}", "--steps", "2", "--teacher-steps", "2", "--prompts", str(prompts),
        "--data", str(captioned), "--image-size", "8", "--channels", "3", "--num-samples", "6", "--seed", "3",
        "--chunk-size", "4", "--kid-subsets", "2", "--kid-subset-size", "4", "--feature-net",
        str(save_feature_net(net, tmp_path / "feat")), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
        "--out", str(out),
    ])
    fd = {r["model"]: r["fd"] for r in rows if r["kind"] != "data"}
    assert set(fd) == {"teacher", "pndm", "ddim"} and all(math.isfinite(v) for v in fd.values())
    # the folder holding the teacher's weights and DDIM draws the teacher's images: same noise, same prompts
    assert fd["ddim"] == fd["teacher"]
    assert fd["pndm"] != fd["teacher"]

    # each folder's FD is that of its stock pipeline's own images (drawing its own latents from the generator)
    net = load_digits_feature_net(tmp_path / "feat")
    ref = evaluate.reference_images(str(captioned), 8, "train", 0, 0.1, 3)[0]
    for name in ("pndm", "ddim"):
        pipe = stock_pipeline("StableDiffusionPipeline", text_models[f"sd15{'_ddim' if name == 'ddim' else ''}"])
        hand = pipeline_features(pipe, net, PROMPTS, 6, 3, 4, steps=2)
        assert fd[name] == pytest.approx(fd_from_features(hand, net(ref).double()), rel=1e-6)

    # and the images themselves: the output_type="pt" images of the pipeline, for the same generator and prompts
    sampler = evaluate.load_sampler("pndm", text_models["sd15"], None, torch.device("cpu"))
    pipe = stock_pipeline("StableDiffusionPipeline", text_models["sd15"])
    ours = sampler.sample(3, 2, torch.Generator().manual_seed(7), PROMPTS[:3])
    theirs = pipe(prompt=PROMPTS[:3], num_inference_steps=2, generator=torch.Generator().manual_seed(7),
                  guidance_scale=1.0, output_type="pt").images
    assert torch.equal((ours.clamp(-1, 1) + 1) / 2, theirs)
    g = torch.Generator().manual_seed(7)
    latents = randn_tensor((3, 4, 4, 4), generator=g, dtype=torch.float32)  # given latents: the same images
    again = pipe(prompt=PROMPTS[:3], num_inference_steps=2, generator=g, latents=latents, guidance_scale=1.0,
                 output_type="pt").images
    assert torch.equal(again, theirs)

    md, protocol = (out / "results.md").read_text(), json.loads((out / "protocol.json").read_text())
    sha = evaluate.Prompts(tuple(PROMPTS), "-").sha256
    assert protocol["prompts"] == {"source": f"file {prompts}", "count": 4, "sha256": sha}
    assert protocol["guidance_scale"] == 1.0 and protocol["student_guidance"] is None
    assert f"- Prompts: 4 from file {prompts} (sha256 of the list as a UTF-8 JSON array: `{sha}`); image i is drawn " \
           "with prompt i % 4" in md
    assert "- Teacher guidance: classifier-free, scale 1 (the empty prompt" in md
    assert "- pndm: pipeline" in md and "text-to-image (UNet2DConditionModel), guidance scale 1" in md


def test_sd3_folder_and_teacher_end_to_end_and_a_stochastic_sampler_is_reproducible(text_models, captioned, tmp_path):
    """SD3: the teacher and its own folder draw the same images; a ``FlowMatchLCMScheduler`` folder, whose fresh
    noise ``StableDiffusion3Pipeline`` draws from torch's global generator, gives the generator-driven loop's
    images (what ``sample()`` runs), the same every time, and leaves the global generator as it was."""
    from diffusers import FlowMatchLCMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.parametrisation import Denoiser, FlowSchedule
    from lightning_distill.sampling import at_steps, text_to_image_loop
    from lightning_distill.teacher import load_teacher

    sd3 = text_models["sd3"]
    rows = evaluate.evaluate_models(str(sd3), {"own": sd3}, steps=[1, 2], teacher_steps=[1, 2], prompts=PROMPTS,
                                    **common(tmp_path, captioned, image_size=16))
    fd = {(r["model"], r["steps"]): r["fd"] for r in rows if r["kind"] != "data"}
    assert all(math.isfinite(v) for v in fd.values())
    assert fd[("own", 1)] == fd[("teacher", 1)] and fd[("own", 2)] == fd[("teacher", 2)]

    lcm = tmp_path / "sd3_lcm"
    shutil.copytree(sd3, lcm)
    FlowMatchLCMScheduler(shift=3.0).save_pretrained(lcm / "scheduler")
    index = json.loads((lcm / "model_index.json").read_text())
    (lcm / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "FlowMatchLCMScheduler"]}))
    sampler = evaluate.load_sampler("lcm", lcm, None, torch.device("cpu"))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = (sampler.sample(2, 3, torch.Generator().manual_seed(5), PROMPTS[:2]) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)

    teacher = load_teacher(str(sd3))
    sched = at_steps(FlowMatchLCMScheduler.from_pretrained(lcm, subfolder="scheduler"), 3)
    sched.set_timesteps(3)  # the loop sample() runs: the generator also draws the fresh noise of each step
    g = torch.Generator().manual_seed(5)
    x = randn_tensor((2, 4, 8, 8), generator=g, dtype=torch.float32)
    den = Denoiser(teacher.unet, FlowSchedule.from_scheduler(sched), "flow_prediction")
    with torch.no_grad():
        z = text_to_image_loop(den, sched, x, g, **teacher.encode_prompts(PROMPTS[:2]))
        by_hand = teacher.decode_latents(z)
    assert torch.allclose(a, by_hand, atol=1e-5)


# --- (b) image i gets prompt i % P, whatever the chunking ---------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11])
def test_prompt_of_image_i_is_i_mod_p_for_any_chunk_size(chunk_size):
    seen: list[str] = []

    def record(n, steps, g, prompts):
        assert isinstance(prompts, list) and len(prompts) == n
        seen.extend(prompts)
        return torch.zeros(n, 3, 8, 8)

    sampler = evaluate.Sampler("spy", "pipeline", "-", record, text_network="UNet2DConditionModel", guidance=1.0)
    prompts = evaluate.Prompts(("p0", "p1", "p2"), "-")
    feats, _ = evaluate.sample_cell(sampler, 1, feature_net(), 11, 0, chunk_size, 4, "cpu", prompts)
    assert feats.shape == (11, 8)
    assert seen == [f"p{i % 3}" for i in range(11)]

    # split over ranks as the FID callback splits it: each rank's images keep their own prompts
    for world in (2, 3):
        got: dict[int, list[str]] = {}
        for rank in range(world):
            got[rank] = []
            generated_features(lambda n, g, idx, r=rank: got[r].extend(prompts.for_images(idx)) or torch.zeros(n, 3, 8, 8),
                               feature_net(), 11, 0, chunk_size, len(prompts), rank=rank, world_size=world)
        chunks = chunk_bounds(11, chunk_size)
        for rank in range(world):  # rank r draws chunks r, r + W, ... (then, idle in a last round, one dropped image)
            mine = [i for c in range(rank, len(chunks), world) for i in range(*chunks[c])]
            assert got[rank][: len(mine)] == [f"p{i % 3}" for i in mine]


def test_prompt_files_and_captions(captioned, tmp_path):
    p = evaluate.read_prompt_file(prompt_file(tmp_path, ["  cat ", "réd dög", "blue"]))
    assert p.texts == ("cat", "réd dög", "blue") and len(p) == 3
    assert p.for_images(torch.arange(7)) == ["cat", "réd dög", "blue", "cat", "réd dög", "blue", "cat"]
    assert evaluate.Prompts(("a\nb",), "-").sha256 != evaluate.Prompts(("a", "b"), "-").sha256
    ref, heldout, captions = evaluate.reference_set(str(captioned), 8, "train", 0, 0.1, 3, captions=True)
    # the reference images' own captions, in their order (the train split of the seeded permutation)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    names = [f"a {'cat' if i < 6 else 'dog'} {i % 6}" for i in range(12)]
    assert captions.texts == tuple(names[i] for i in perm[1:].tolist()) and ref.shape[0] == len(captions) == 11
    assert captions.source == f"captions of the {captioned} train split"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8"):
        evaluate.read_prompt_file(tmp_path / "latin1.txt")
    with pytest.raises(ConfigError, match="no prompts in file"):
        evaluate.read_prompt_file(prompt_file(tmp_path, ["", "  "]))


# --- (c) teacher guidance: other images, another cache key ----------------------------------------------------


def test_teacher_guidance_scale_changes_images_and_cache_key_and_is_the_pipelines(text_models, captioned, tmp_path):
    from lightning_distill.teacher import load_teacher

    teacher = load_teacher(str(text_models["sd15"]))
    images = {}
    for g in (1.0, 3.0):
        sampler = evaluate.teacher_sampler(teacher, guidance_scale=g)
        images[g] = sampler.sample(3, 2, torch.Generator().manual_seed(0), PROMPTS[:3])
        # the stock pipeline with the teacher's DDIM, guided the same way ("" as the negative prompt)
        pipe = stock_pipeline("StableDiffusionPipeline", text_models["sd15_ddim"])
        theirs = pipe(prompt=PROMPTS[:3], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      guidance_scale=g, output_type="pt").images
        assert torch.allclose((images[g].clamp(-1, 1) + 1) / 2, theirs, atol=1e-6)
    assert not torch.allclose(images[1.0], images[3.0], atol=1e-3)

    net = feature_net()
    digest = teacher_features.teacher_digest(teacher, net, "cpu")
    sha = evaluate.Prompts(tuple(PROMPTS), "-").sha256
    key = lambda sha, n, g: teacher_features.cell_key(digest, 2, 6, 3, 4, teacher_features.text_conditioning(sha, n, g))
    keys = {key(sha, 4, 1.0), key(sha, 4, 3.0), key(evaluate.Prompts(("cat",), "-").sha256, 1, 1.0)}
    assert len(keys) == 3 and teacher_features.cell_key(digest, 2, 6, 3, 4) not in keys

    # end to end: another scale (or prompt list) samples the teacher again; the same one reads its cached cell
    def run(g, prompts=PROMPTS):
        rows = evaluate.evaluate_models(teacher, {}, teacher_steps=[2], prompts=prompts, guidance_scale=g,
                                        out_dir=tmp_path / f"out{g}", **common(tmp_path, captioned))
        cached = json.loads((tmp_path / f"out{g}" / "protocol.json").read_text())["teacher_features_cached"]
        return next(r["fd"] for r in rows if r["kind"] == "teacher"), cached

    fd1, cached1 = run(1.0)
    # without image_size a latent teacher is scored at its pipeline's default resolution, sample size x the VAE's
    # scale factor (4 x 2 = 8 here: the same cell as above); it was refused before
    rows = evaluate.evaluate_models(teacher, {}, teacher_steps=[2], prompts=PROMPTS, out_dir=tmp_path / "out_default",
                                    **{**common(tmp_path, captioned), "image_size": None})
    assert next(r["fd"] for r in rows if r["kind"] == "teacher") == fd1
    fd3, cached3 = run(3.0)
    assert fd1 != fd3 and not cached1 and not cached3
    _, cached_other = run(3.0, PROMPTS[:2])
    assert not cached_other
    fd3_again, cached3_again = run(3.0)
    assert fd3_again == fd3 and list(cached3_again) == ["2"]
    md = (tmp_path / "out3.0" / "results.md").read_text()
    assert "- Teacher guidance: classifier-free, scale 3 (the empty prompt as the unconditional one" in md


# --- (d) one-line errors: exit 2, before the reference features, nothing written ------------------------------


@pytest.mark.parametrize(
    ("role", "model", "cls"),
    [("student", "sd15", "UNet2DConditionModel"), ("student", "sd15_lcm", "UNet2DConditionModel"),
     ("student", "sd3", "SD3Transformer2DModel"), ("teacher", "sd15", "UNet2DConditionModel"),
     ("teacher", "sd3", "SD3Transformer2DModel")],
)
def test_a_text_to_image_model_without_prompts_is_one_line_error(text_models, role, model, cls, tmp_path, monkeypatch,
                                                                  capsys):
    no_reference_features(monkeypatch)
    path = text_models[model]
    who = ["--teacher", "none", "--student", f"s={path}"] if role == "student" else ["--teacher", str(path)]
    line = error_line([
        *who, "--steps", "1", "2", "--teacher-steps", "1", "--num-samples", "4", "--image-size", "8", "--channels", "3",
        "--device", "cpu", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")], monkeypatch, capsys)
    what = f"student 's' ({path})" if role == "student" else f"teacher {str(path)!r}"
    assert line == f"evaluate: error: ConfigError: {what} is text-conditional ({cls}): evaluate needs prompts to " \
                   f"condition it on: {OPTIONS}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["prompts_unconditional_teacher", "captions_unconditional_student", "captions_digits",
                                  "guidance_unconditional_teacher", "student_guidance_no_lcm", "missing_prompt_file"])
def test_text_options_no_model_takes_are_one_line_errors(case, text_models, tiny_teacher_dir, captioned, tmp_path,
                                                         monkeypatch, capsys):
    no_reference_features(monkeypatch)
    common_args = ["--steps", "1", "--teacher-steps", "1", "--num-samples", "4", "--image-size", "8", "--device", "cpu",
                   "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    prompts = str(prompt_file(tmp_path))
    argv, expected = {
        "prompts_unconditional_teacher": (
            ["--teacher", str(tiny_teacher_dir), "--prompts", prompts],
            f"ConfigError: --prompts (file {prompts}) given, but no model here is text-conditional (teacher "
            f"{str(tiny_teacher_dir)!r}): prompts condition text-to-image models (UNet2DConditionModel, "
            "SD3Transformer2DModel, FluxTransformer2DModel) only"),
        "captions_unconditional_student": (
            ["--teacher", "none", "--student", f"s={tiny_teacher_dir}", "--prompts", "captions", "--data", str(captioned)],
            f"ConfigError: --prompts captions given, but no model here is text-conditional (student 's' "
            f"({tiny_teacher_dir})): prompts condition text-to-image models (UNet2DConditionModel, "
            "SD3Transformer2DModel, FluxTransformer2DModel) only"),
        "captions_digits": (
            ["--teacher", str(text_models["sd15"]), "--prompts", "captions"],
            "ConfigError: --prompts captions reads the captions of the reference images: --data must be an image "
            "folder with metadata.jsonl (or prompts.txt); data is 'digits'"),
        "guidance_unconditional_teacher": (
            ["--teacher", str(tiny_teacher_dir), "--guidance-scale", "3"],
            "ConfigError: --guidance-scale 3.0 guides a text-to-image teacher, and there is none here"),
        "student_guidance_no_lcm": (
            ["--teacher", str(text_models["sd15"]), "--student", f"s={text_models['sd15_lcm']}", "--prompts", prompts,
             "--student-guidance", "4"],
            "ConfigError: --student-guidance 4.0 is the g of LCM students with a guidance input "
            "(LatentConsistencyModelPipeline folders, their checkpoints), and there is none here"),
        "missing_prompt_file": (
            ["--teacher", str(text_models["sd15"]), "--prompts", str(tmp_path / "nothing.txt")],
            f"FileNotFoundError: prompt file {str(tmp_path / 'nothing.txt')!r} does not exist; --prompts takes FILE or "
            "'captions'"),
    }[case]
    line = error_line([*argv, *common_args], monkeypatch, capsys)
    assert line == f"evaluate: error: {expected}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_an_lcm_students_checkpoint_and_export_are_scored_alike(text_models, captioned, tmp_path, monkeypatch):
    """The LCM debug preset on the tiny SD stack (a w-embedding student): its checkpoint (``sample()``) and its
    ``LatentConsistencyModelPipeline`` export (the stock pipeline) draw the same images from the same prompts,
    guidance and noise. Without prompts, or without ``--student-guidance``, both are refused alike."""
    from lightning_distill.cli import cli_main

    run = tmp_path / "run"
    cli_main(["fit", "--config", str(ROOT / "configs/lcm/debug.yaml"), "--data.teacher", str(text_models["tiny_sd"]),
              "--data.data", str(captioned), "--trainer.default_root_dir", str(run), "--trainer.max_steps", "1",
              "--trainer.logger", "false"])
    assert json.loads((run / "student" / "model_index.json").read_text())["_class_name"] == "LatentConsistencyModelPipeline"
    students = {"ckpt": run / "checkpoints" / "last.ckpt", "export": run / "student"}
    monkeypatch.setattr(evaluate, "reference_set", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reference")))
    for name, spec in students.items():
        with pytest.raises(ConfigError) as err:
            evaluate.evaluate_models(teacher=None, students={name: spec}, steps=[1], **common(tmp_path, captioned))
        assert str(err.value) == (f"student {name!r} ({spec}) is text-conditional (UNet2DConditionModel): evaluate "
                                  f"needs prompts to condition it on: {OPTIONS}")
        with pytest.raises(ConfigError) as err:
            evaluate.evaluate_models(teacher=None, students={name: spec}, steps=[1], prompts=PROMPTS,
                                     **common(tmp_path, captioned))
        assert str(err.value) == (f"student {name!r} ({spec}) takes a guidance input (LCM's w embedding, w = g - 1): "
                                  "pass --student-guidance g")
    monkeypatch.undo()
    rows = evaluate.evaluate_models(teacher=None, students=students, steps=[1, 2], prompts="captions",
                                    student_guidance=3.0, out_dir=tmp_path / "out", **common(tmp_path, captioned))
    fd = {(r["model"], r["steps"]): r["fd"] for r in rows if r["kind"] != "data"}
    assert all(math.isfinite(v) for v in fd.values())
    assert fd[("ckpt", 1)] == pytest.approx(fd[("export", 1)], rel=1e-5)
    assert fd[("ckpt", 2)] == pytest.approx(fd[("export", 2)], rel=1e-5)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "LCM students with a guidance input: g = 3 (w = 2)" in md
    assert f"from captions of the {captioned} train split" in md


# --- Flux: FluxPipeline folders and Flux teachers ---------------------------------------------------------------


@torch.no_grad()
def flux_pipeline_features(pipe, net, prompts, n, seed, chunk_size, steps, guidance_scale):
    """:func:`pipeline_features` for ``FluxPipeline``, as a user calls it: it draws its own latents from the
    generator (height / width given: its default is 1024 px), returns them packed, and steps a
    ``FlowMatchLCMScheduler`` with torch's global generator (given here the chunk generator's state after the
    latents, as tests/test_flux.py's pipeline_latents); unpacked and decoded as the pipeline decodes."""
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill import backbones

    feats = []
    for c, (a, b) in enumerate(chunk_bounds(n, chunk_size)):
        g = torch.Generator().manual_seed(chunk_seed(seed, c))
        randn_tensor((b - a, 4, 8, 8), generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(g.get_state())
            z = pipe(prompt=[prompts[i % len(prompts)] for i in range(a, b)], height=16, width=16,
                     num_inference_steps=steps, generator=torch.Generator().manual_seed(chunk_seed(seed, c)),
                     guidance_scale=guidance_scale, output_type="latent").images
        z = backbones.unpack_latents(z, 8, 8)
        cfg = pipe.vae.config
        feats.append(net(pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample).double())
    return torch.cat(feats)


def test_flux_folders_and_teacher_end_to_end(captioned, tmp_path):
    """A Flux teacher is scored from prompts, and a FluxPipeline folder through the stock FluxPipeline: the teacher
    and its own folder draw the same images (packed latents, FluxPipeline's sigmas, the embedded guidance 3.5); the
    exported student of the consistency debug preset (FlowMatchLCMScheduler, 2 steps) scores as the FluxPipeline's
    own images for the same generators and prompts, called with guidance_scale = the teacher's embedded guidance,
    also at another one (data.teacher_embedded_guidance, reaching the student folder's call through the teacher)."""
    from diffusers import FluxPipeline

    from _flux import write_tiny_flux
    from lightning_distill.teacher import load_teacher
    from test_flux import run_preset

    flux = write_tiny_flux(tmp_path / "tiny-flux")
    prompts = prompt_file(tmp_path)
    feat = save_feature_net(feature_net(16), tmp_path / "feat")
    out = tmp_path / "report"
    rows = evaluate.main([
        "--teacher", str(flux), "--student", f"own={flux}", "--steps", "1", "2", "--teacher-steps", "1", "2",
        "--prompts", str(prompts), "--data", str(captioned), "--image-size", "16", "--channels", "3", "--num-samples",
        "6", "--seed", "3", "--chunk-size", "4", "--kid-subsets", "2", "--kid-subset-size", "4", "--feature-net",
        str(feat), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--out", str(out),
    ])
    fd = {(r["model"], r["steps"]): r["fd"] for r in rows if r["kind"] != "data"}
    assert set(fd) == {(m, s) for m in ("teacher", "own") for s in (1, 2)} and all(math.isfinite(v) for v in fd.values())
    assert fd[("own", 1)] == fd[("teacher", 1)] and fd[("own", 2)] == fd[("teacher", 2)]
    md = (out / "results.md").read_text()
    assert "text-to-image (FluxTransformer2DModel), guidance scale 1, embedded guidance 3.5" in md

    net = feature_net(16)  # common()'s network, the same weights
    ref = net(evaluate.reference_images(str(captioned), 16, "train", 0, 0.1, 3)[0]).double()
    for g in (None, 2.0):
        root = tmp_path / f"cd-{g}"
        run_preset(flux, captioned, root, "--trainer.max_steps", "1", "--trainer.logger", "false",
                   *(["--data.teacher_embedded_guidance", str(g)] if g is not None else []))
        rows = evaluate.main([  # the run's guidance given to the teacher, from which the folder's call takes it
            "--teacher", str(flux), "--student", f"cd={root / 'student'}", "--steps", "2", "--teacher-steps", "1",
            "--prompts", str(prompts), "--data", str(captioned), "--image-size", "16", "--channels", "3",
            "--num-samples", "6", "--seed", "3", "--chunk-size", "4", "--kid-subsets", "2", "--kid-subset-size", "4",
            "--feature-net", str(feat), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--out",
            str(tmp_path / f"out-{g}"), *(["--teacher-embedded-guidance", str(g)] if g is not None else []),
        ])
        teacher = load_teacher(str(flux), embedded_guidance=3.5 if g is None else g)
        (row,) = [r for r in rows if r["model"] == "cd"]
        assert f"embedded guidance {teacher.embedded_guidance:g}" in (tmp_path / f"out-{g}" / "results.md").read_text()
        pipe = FluxPipeline.from_pretrained(root / "student")
        pipe.set_progress_bar_config(disable=True)
        hand = flux_pipeline_features(pipe, net, PROMPTS, 6, 3, 4, 2, teacher.embedded_guidance)
        assert math.isfinite(row["fd"]) and row["fd"] == pytest.approx(fd_from_features(hand, ref), rel=1e-6)
        if g is not None:  # the guidance matters: at the pipeline's default 3.5 the folder draws other images
            other = flux_pipeline_features(pipe, net, PROMPTS, 6, 3, 4, 2, 3.5)
            assert not torch.allclose(other, hand, atol=1e-4)


@pytest.mark.parametrize("teacher, option, expected", [
    ("sd15", "--teacher-embedded-guidance",
     "ConfigError: data.teacher_embedded_guidance=2.0 is the guidance input of a guidance-distilled Flux network "
     "(FluxTransformer2DModel with guidance_embeds), but teacher "),
    ("none", "--teacher-embedded-guidance", "ConfigError: --teacher-embedded-guidance and --teacher-max-sequence-length "
                                            "set the teacher's text conditioning, but --teacher is none: unset them"),
    ("sd3", "--teacher-max-sequence-length", "ConfigError: data.teacher_max_sequence_length=2 sets the T5 prompt length"),
])
def test_teacher_text_options_where_they_do_not_apply_are_one_line(teacher, option, expected, text_models, tmp_path,
                                                                  monkeypatch, capsys):
    no_reference_features(monkeypatch)
    line = error_line([
        "--teacher", str(text_models.get(teacher, "none")), option, "2", "--prompts", str(prompt_file(tmp_path)),
        "--teacher-steps", "1", "--num-samples", "4", "--image-size", "8", "--device", "cpu", "--out",
        str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")], monkeypatch, capsys)
    assert line.startswith(f"evaluate: error: {expected}"), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
