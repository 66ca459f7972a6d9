"""LCM: a tiny Stable-Diffusion-like teacher built locally, latent data, CFG convention, w-embedding, export."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import write_captions

from lightning_distill.data import DataError, TeacherDataModule
from lightning_distill.methods.consistency import solver_step
from lightning_distill.methods.lcm import LatentConsistencyDistillation, cfg_prediction, guidance_scale_embedding
from lightning_distill.parametrisation import Prediction

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "photo", "of", "red", "blue", "cat", "dog", "digit"]


def write_tiny_tokenizer(path: Path):
    """A CLIPTokenizer over single characters (+ a few merges): no download."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("".join(WORDS)) | set("0123456789"))
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars] + ["ca", "cat</w>"]
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=8)
    tok.save_pretrained(path)
    return len(vocab)


def write_tiny_sd(path: Path) -> Path:
    """unet/ (UNet2DConditionModel), vae/ (AutoencoderKL, factor 2), text_encoder/ (CLIP), tokenizer/, scheduler/
    (SD1.5's PNDM config): a Stable-Diffusion-shaped teacher of a few thousand parameters."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = write_tiny_tokenizer(path / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(path / "text_encoder")
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=8, scaling_factor=0.18215,
    ).save_pretrained(path / "vae")
    UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).save_pretrained(path / "unet")
    PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    ).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture
def captioned_folder(image_folder):
    return write_captions(image_folder)


def make_dm(tiny_sd, folder, **kw):
    return TeacherDataModule(teacher=str(tiny_sd), data=str(folder), image_size=8, batch_size=4, **kw)


def test_guidance_embedding_is_the_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 2.5, 7.0])
    for dim in (8, 9, 256):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), ref)


def test_latent_data_prompts_and_cache(tiny_sd, captioned_folder, tmp_path):
    cache = tmp_path / "latents.pt"
    dm = make_dm(tiny_sd, captioned_folder, latent_cache=str(cache))
    assert dm.sample_shape == (4, 4, 4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 4, 4, 4) and batch["input_ids"].shape == (4, 8)
    assert cache.exists()
    # the latents are the VAE's (scaled) encodings of the images
    images = torch.stack([dm.train_set.dataset.images[0]])
    dm2 = make_dm(tiny_sd, captioned_folder, latent_cache=str(cache))
    dm2.setup()
    torch.testing.assert_close(dm2.train_set.dataset.images, dm.train_set.dataset.images)
    raw = make_dm(tiny_sd, captioned_folder)
    img = raw.load_all()[0][:2]
    z = raw.teacher.vae.encode(img).latent_dist.mode() * 0.18215
    torch.testing.assert_close(dm.train_set.dataset.images[:2], z)
    # the key holds the images and the VAE: other VAE weights, or an edited image (same count, names and
    # size), are re-encoded rather than read stale from the cache
    other_vae = make_dm(tiny_sd, captioned_folder, latent_cache=str(cache))
    with torch.no_grad():
        other_vae.teacher.vae.encoder.conv_in.bias.add_(0.5)
    other_vae.setup()
    assert not torch.allclose(other_vae.train_set.dataset.images, dm.train_set.dataset.images)
    # the same VAE weights with another scaling factor in its config (baked into the cached latents): re-encoded
    make_dm(tiny_sd, captioned_folder, latent_cache=str(tmp_path / "scaled.pt")).setup()
    rescaled = make_dm(tiny_sd, captioned_folder, latent_cache=str(tmp_path / "scaled.pt"))
    rescaled.teacher.vae.register_to_config(scaling_factor=0.5)
    rescaled.setup()
    torch.testing.assert_close(rescaled.train_set.dataset.images, dm.train_set.dataset.images * (0.5 / 0.18215))
    import shutil

    from PIL import Image

    folder = shutil.copytree(captioned_folder, tmp_path / "folder")
    first = make_dm(tiny_sd, folder, latent_cache=str(tmp_path / "copy.pt"))
    first.setup()
    path = sorted(p for p in folder.rglob("*.png"))[0]
    Image.new("RGB", Image.open(path).size, (255, 0, 0)).save(path)
    edited = make_dm(tiny_sd, folder, latent_cache=str(tmp_path / "copy.pt"))
    edited.setup()
    assert not torch.equal(edited.train_set.dataset.images, first.train_set.dataset.images)
    # the reference images of FID are the pixels, not the latents the data set trains on
    pixels = raw.load_all()[0]
    assert torch.equal(dm.train_images(), pixels[dm.train_set.indices]) and torch.equal(dm.val_images(), pixels[dm.val_set.indices])
    assert images.shape[1] == 4
    # prompts: metadata order follows the sorted files; a fixed prompt formats {label} with class names
    assert dm.prompts(torch.zeros(12, dtype=torch.long))[6] == "a photo of dog 0"
    fixed = make_dm(tiny_sd, captioned_folder, prompt="a photo of {label}", captions=None)
    with pytest.raises(DataError, match="either data.prompt or data.captions"):
        make_dm(tiny_sd, captioned_folder, prompt="x", captions=str(captioned_folder / "metadata.jsonl")).setup()
    assert fixed.prompts(torch.tensor([0, 1])) == ["a photo of a", "a photo of b"]
    # ... and the data set's prompts name each image's sub-folder, though a text teacher's labels are all 0
    fixed.setup()
    full = fixed.train_set.dataset
    assert full.labels.eq(0).all()
    expected = fixed.teacher.text_inputs(["a photo of a"] * 6 + ["a photo of b"] * 6)
    assert torch.equal(full.extras["input_ids"], expected["input_ids"])


def test_cfg_teacher_step_by_hand(tiny_sd, captioned_folder):
    dm = make_dm(tiny_sd, captioned_folder)
    method = LatentConsistencyDistillation(dm.teacher, original_inference_steps=50)
    teacher = dm.teacher
    emb_c = teacher.encode_text(teacher.tokenize(["a red cat", "a blue dog"]))
    emb_u = method.uncond_embeds(2, "cpu")
    torch.testing.assert_close(emb_u[0], teacher.encode_text(teacher.tokenize([""]))[0])
    x, t, s = torch.randn(2, 4, 4, 4), torch.tensor([999, 519]), torch.tensor([979, 499])
    w = torch.tensor([3.0, 0.0])
    guided = method.guided_teacher(emb_c, emb_u, w)(x, t)
    c = teacher.denoiser(x, t, encoder_hidden_states=emb_c)
    u = teacher.denoiser(x, t, encoder_hidden_states=emb_u)
    # LCM convention: cond + w (cond - uncond); w = 0 is the plain conditional model
    torch.testing.assert_close(guided.eps[0], c.eps[0] + 3.0 * (c.eps[0] - u.eps[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided.x0[1], c.x0[1], atol=1e-5, rtol=1e-5)
    # = Imagen / diffusers convention with g = w + 1: uncond + g (cond - uncond)
    torch.testing.assert_close(guided.eps[0], u.eps[0] + 4.0 * (c.eps[0] - u.eps[0]), atol=1e-5, rtol=1e-5)
    # the teacher's DDIM step with guidance, by hand
    ac = teacher.schedule
    x0 = c.x0 + w.view(-1, 1, 1, 1) * (c.x0 - u.x0)
    eps = c.eps + w.view(-1, 1, 1, 1) * (c.eps - u.eps)
    ref = ac.alpha(s).view(-1, 1, 1, 1) * x0 + ac.sigma(s).view(-1, 1, 1, 1) * eps
    out = solver_step(method.guided_teacher(emb_c, emb_u, w), ac, x, t, s, "ddim")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    p = cfg_prediction(Prediction(*(torch.ones(1),) * 3), Prediction(*(torch.zeros(1),) * 3), torch.tensor([2.0]))
    assert p.x0.item() == p.eps.item() == p.v.item() == 3.0


def test_lcm_distills_tiny_sd_and_exports_lcm_pipeline(tiny_sd, captioned_folder, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from lightning_distill.callbacks import EMA

    dm = make_dm(tiny_sd, captioned_folder)
    method = LatentConsistencyDistillation(
        dm.teacher, w_min=1.0, w_max=7.0, time_cond_proj_dim=8, original_inference_steps=50,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    assert method.student.unet.config.time_cond_proj_dim == 8
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([499])
    emb = dm.teacher.encode_text(dm.teacher.tokenize(["a cat"]))

    def out(w):
        cond = {"encoder_hidden_states": emb, "timestep_cond": guidance_scale_embedding(torch.tensor([w]), 8)}
        return method.student.raw(x, t, **cond)

    # zero-initialised w projection: the student starts as the teacher's conditional model
    torch.testing.assert_close(out(1.0), dm.teacher.unet(x, t, encoder_hidden_states=emb).sample)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, callbacks=[EMA(decay=0.5)], accelerator="cpu")
    trainer.fit(method, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    method.student.eval()
    assert (out(1.0) - out(7.0)).abs().max() > 1e-4  # the w embedding changes the output

    path = method.export(tmp_path / "lcm")
    pipe = LatentConsistencyModelPipeline.from_pretrained(path, safety_checker=None)
    assert isinstance(pipe.scheduler, LCMScheduler)
    prompts = ["a red cat", "a blue dog"]
    for steps, g in ((1, 2.0), (2, 6.5)):
        ours = method.sample(2, steps, torch.Generator().manual_seed(steps), prompts=prompts, guidance_scale=g)
        theirs = pipe(prompts, height=8, width=8, num_inference_steps=steps, guidance_scale=g,
                      generator=torch.Generator().manual_seed(steps), output_type="latent").images
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # a guidance scale outside the trained w range (g = w + 1 in [2, 8]) extrapolates the embedding: warned
    with pytest.warns(UserWarning, match=r"guidance_scale 12.0 embeds w = 11.0, outside the trained range \[w_min, w_max\] = \[1.0, 7.0\]"):
        method.sample(1, 1, torch.Generator().manual_seed(0), prompts=["a cat"], guidance_scale=12.0)


def test_lcm_configs_build_with_the_tiny_stand_in(tiny_sd, captioned_folder, tmp_path):
    from lightning_distill.cli import cli_main

    root = tmp_path / "debug"
    cli_main(["fit", "--config", str(ROOT / "configs/lcm/debug.yaml"), "--data.teacher", str(tiny_sd),
              "--data.data", str(captioned_folder), "--trainer.default_root_dir", str(root)])
    assert (root / "student" / "model_index.json").exists()
    cli = cli_main(["--config", str(ROOT / "configs/lcm/sd15.yaml"), "--data.teacher", str(tiny_sd),
                    "--data.data", str(captioned_folder), "--data.image_size", "8", "--data.teacher_dtype", "float32",
                    "--data.latent_cache", "null", "--trainer.default_root_dir", str(tmp_path / "sd15")], run=False)
    assert isinstance(cli.model, LatentConsistencyDistillation)
    assert cli.model.hparams.original_inference_steps == 50


def test_an_sdxl_unet_is_refused_before_its_weights_load(tiny_sd, tmp_path):
    """SDXL's UNet (``addition_embed_type="text_time"``) needs pooled text and size ids that are not built:
    a one-line TeacherError from its config (before: it loaded and failed inside the first forward)."""
    import json
    import shutil

    from lightning_distill.teacher import TeacherError, load_teacher

    xl = shutil.copytree(tiny_sd, tmp_path / "xl")
    cfg = json.loads((xl / "unet" / "config.json").read_text())
    (xl / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    for f in (xl / "unet").glob("*.safetensors"):
        f.write_bytes(b"not weights")  # refused from the config: the weights are never read
    with pytest.raises(TeacherError, match="addition_embed_type='text_time' .*SDXL.* is not supported"):
        load_teacher(str(xl))


@pytest.mark.parametrize("method_name", ["consistency", "knowledge"])
def test_an_sd15_style_student_exports_a_stable_diffusion_pipeline_that_reproduces_it(tiny_sd, captioned_folder, tmp_path, method_name):
    """Methods other than LCM on an SD1.5-style teacher: the export is the teacher's StableDiffusionPipeline
    (VAE, text encoder, tokenizer) around the student UNet and the method's sampler, and at guidance_scale=1
    it reproduces sample() (it was a DDPMPipeline without text encoder or VAE, which could not run)."""
    from diffusers import StableDiffusionPipeline

    from lightning_distill.methods.consistency import ConsistencyDistillation
    from lightning_distill.methods.knowledge import KnowledgeDistillation

    dm = make_dm(tiny_sd, captioned_folder)
    cls = ConsistencyDistillation if method_name == "consistency" else KnowledgeDistillation
    method = cls(dm.teacher, sample_steps=2)
    with torch.no_grad():  # a student that differs from the teacher
        for p in method.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pipe = StableDiffusionPipeline.from_pretrained(method.export(tmp_path / "student"), safety_checker=None)
    assert pipe.text_encoder is not None and pipe.vae is not None
    prompts = ["a red cat", "a blue dog"]
    ours = method.sample(2, 2, torch.Generator().manual_seed(3), prompts=prompts)
    theirs = pipe(prompts, height=8, width=8, num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
