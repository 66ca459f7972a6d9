"""Prompt embeddings computed once and cached on disk, text encoders released (#23 item 4): the cached
embeddings are StableDiffusion3Pipeline.encode_prompt's, the cache follows the captions, and a run with the
encoders released trains as the uncached run, logs samples and exports a complete pipeline."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from _sd3 import IMAGE_SIZE, write_tiny_sd3
from lightning_distill.data import DataError, TeacherDataModule
from lightning_distill.teacher import TeacherError

SAMPLE_PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


def captions(folder, changed: dict | None = None) -> list[str]:
    """Write metadata.jsonl for the 12 images (``changed``: file name -> another caption); returns the captions
    in the data module's (sorted file) order."""
    rows = [{"file_name": f"{c}/{i}.png", "text": f"a photo of {'cat' if c == 'a' else 'dog'} {i}"}
            for c in ("a", "b") for i in range(6)]
    for r in rows:
        r["text"] = (changed or {}).get(r["file_name"], r["text"])
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return [r["text"] for r in rows]


def make_dm(tiny_sd3_dir, folder, **kw):
    return TeacherDataModule(teacher=str(tiny_sd3_dir), data=str(folder), image_size=IMAGE_SIZE, batch_size=4, **kw)


def test_cached_embeddings_are_the_pipelines_and_follow_the_captions(tiny_sd3_dir, image_folder, tmp_path,
                                                                      tiny_flow_teacher_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)

    def reference(prompts):  # the pipeline's own encoding, T5 absent
        with torch.no_grad():
            e, _, p, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        return e, p

    cache = tmp_path / "text.pt"
    texts = captions(image_folder)
    dm = make_dm(tiny_sd3_dir, image_folder, text_cache=str(cache))
    dm.setup()
    full = dm.train_set.dataset
    ref_e, ref_p = reference(texts)
    items = [full[i]["text_cond"] for i in range(len(texts))]
    got_e = torch.stack([it["encoder_hidden_states"] for it in items])
    torch.testing.assert_close(got_e, ref_e, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack([it["pooled_projections"] for it in items]), ref_p, rtol=0, atol=1e-6)
    # stored without the zero T5 tokens (256) and the zero padding of the CLIP features (40 -> 48)
    assert full.text.tensors["encoder_hidden_states"].shape == (12, 8, 40) and got_e.shape == (12, 8 + 256, 48)
    # a batch carries the keywords (and still the token ids); "" is in the teacher's table, for guidance
    batch = next(iter(dm.train_dataloader()))
    assert batch["text_cond"]["encoder_hidden_states"].shape == (4, 264, 48) and batch["input_ids"].shape == (4, 8)
    torch.testing.assert_close(dm.teacher.prompt_table[""]["encoder_hidden_states"], reference([""])[0], rtol=0, atol=1e-6)

    # same captions: read from disk (encoding would fail here)
    hit = make_dm(tiny_sd3_dir, image_folder, text_cache=str(cache))

    def no_encoding(*a, **k):
        raise AssertionError("encoded although the cache matches")

    hit.teacher.text_conditioning = no_encoding
    hit.teacher.prompt_table[""] = dm.teacher.prompt_table[""]
    hit.setup()
    assert torch.equal(hit.train_set.dataset.text.tensors["encoder_hidden_states"], full.text.tensors["encoder_hidden_states"])

    # one caption changed: the cache is stale, recomputed and rewritten
    new = captions(image_folder, {"b/2.png": "a blue dog digit 7"})
    stale = make_dm(tiny_sd3_dir, image_folder, text_cache=str(cache))
    stale.setup()
    e2 = torch.stack([stale.train_set.dataset[i]["text_cond"]["encoder_hidden_states"] for i in range(12)])
    torch.testing.assert_close(e2, reference(new)[0], rtol=0, atol=1e-6)
    k = texts.index("a photo of dog 2")
    assert not torch.allclose(e2[k], got_e[k]) and torch.equal(e2[:k], got_e[:k])
    stored = torch.load(cache, weights_only=True)["tensors"]["encoder_hidden_states"]
    torch.testing.assert_close(stored[k], stale.train_set.dataset.text.tensors["encoder_hidden_states"][k], rtol=0, atol=0)
    # the same captions through other encoder weights: the key holds the weights, so they are re-encoded
    changed = make_dm(tiny_sd3_dir, image_folder, text_cache=str(cache))
    with torch.no_grad():
        changed.teacher.text_encoder.text_model.embeddings.token_embedding.weight.add_(0.5)
    changed.setup()
    e3 = changed.train_set.dataset.text.tensors["encoder_hidden_states"]
    assert not torch.allclose(e3, stale.train_set.dataset.text.tensors["encoder_hidden_states"])

    with pytest.raises(DataError, match="need a text-conditional teacher"):
        TeacherDataModule(teacher=str(tiny_flow_teacher_dir), data="digits", image_size=8, release_encoders=True)


class Record(L.Callback):
    """Per-step training loss; with ``released``, checks that the teacher holds no text encoder during fit."""

    def __init__(self, released: bool) -> None:
        self.released, self.losses = released, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from transformers import CLIPPreTrainedModel

        t = pl_module.teacher
        held = [m for m in pl_module.modules() if isinstance(m, CLIPPreTrainedModel)]
        if self.released:
            assert t.text_encoder is None and t.text_encoder_2 is None and t.vae.encoder is None and not held
            assert "text_cond" in batch
        else:
            assert held

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit_consistency(tiny_sd3_dir, folder, root, method_cls=None, image_size=IMAGE_SIZE, method_kw=None, **data_kw):
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_distill.methods.consistency import ConsistencyDistillation

    L.seed_everything(0)
    dm = TeacherDataModule(teacher=str(tiny_sd3_dir), data=str(folder), image_size=image_size, batch_size=4, **data_kw)
    method = (method_cls or ConsistencyDistillation)(
        dm.teacher, original_inference_steps=40, sample_steps=2, sample_every_n_steps=1, num_log_samples=2,
        sample_prompt=SAMPLE_PROMPT, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), **(method_kw or {}),
    )
    record = Record(released=bool(data_kw))
    trainer = L.Trainer(max_steps=2, logger=TensorBoardLogger(root, name="logs"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[record], accelerator="cpu", default_root_dir=root)
    trainer.fit(method, dm)
    return dm, method, record, trainer


def test_released_encoders_train_as_the_uncached_run_and_export(tiny_sd3_dir, image_folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils.torch_utils import randn_tensor

    from lightning_distill.text_cache import parameter_bytes

    captions(image_folder)
    dm0, plain, rec0, _ = fit_consistency(tiny_sd3_dir, image_folder, tmp_path / "plain")
    dm1, method, rec1, trainer = fit_consistency(tiny_sd3_dir, image_folder, tmp_path / "released",
                                                 text_cache=str(tmp_path / "text.pt"), release_encoders=True)
    # the same training: per-step losses and the trained weights
    assert len(rec1.losses) == len(rec0.losses) == 2
    torch.testing.assert_close(torch.tensor(rec1.losses), torch.tensor(rec0.losses), rtol=1e-5, atol=1e-6)
    for k, v in method.student.state_dict().items():
        torch.testing.assert_close(v, plain.student.state_dict()[k], rtol=1e-5, atol=1e-6)
    assert list((tmp_path / "released" / "logs").rglob("events.out.tfevents*"))  # sample grids from cached prompts

    # memory released: the two CLIP encoders and the VAE's encoder (+ quant_conv), counted on the held teacher
    t0 = dm0.teacher
    expected = sum(parameter_bytes(m) for m in (t0.text_encoder, t0.text_encoder_2, t0.vae.encoder, t0.vae.quant_conv))
    assert method.teacher.released.nbytes == expected > 0
    assert parameter_bytes(method.teacher) == parameter_bytes(t0) - expected

    # prompts outside the cache are refused by name; cached ones sample
    with pytest.raises(TeacherError, match=r"released .* prompts \['a red cat'\] have no cached embedding"):
        method.sample(1, 1, prompts=["a red cat"])

    # a checkpoint leaves the (reloadable) teacher out and loads back strictly onto the released teacher
    ckpt_path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    method.on_load_checkpoint(ckpt)
    method.load_state_dict(ckpt["state_dict"])

    # the export is a complete pipeline (encoders read back from the source) and reproduces sample()
    folder = method.export(tmp_path / "student")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        ref = getattr(t0, name).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in getattr(pipe, name).state_dict().items())
    prompts = [SAMPLE_PROMPT, ""]
    ours = method.sample(2, 2, torch.Generator().manual_seed(5), prompts=prompts)
    g = torch.Generator().manual_seed(5)
    randn_tensor(ours.shape, generator=g)  # the pipeline's fresh noise comes from the global generator (tests/test_sd3.py)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(g.get_state())
        theirs = pipe(prompts, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2, guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_sd15_style_lcm_with_released_encoders(image_folder, tmp_path):
    """SD1.5-style teacher (one CLIPTextModel, encoder_hidden_states only): guided LCM trains as uncached (the
    "" of its CFG from the table) and exports a complete LatentConsistencyModelPipeline."""
    from diffusers import LatentConsistencyModelPipeline

    from lightning_distill.methods.lcm import LatentConsistencyDistillation
    from test_lcm import write_tiny_sd

    sd = write_tiny_sd(tmp_path / "tiny-sd")
    captions(image_folder)
    kw = dict(method_cls=LatentConsistencyDistillation, image_size=8, method_kw={"w_min": 2.0, "w_max": 6.0})
    _, plain, rec0, _ = fit_consistency(sd, image_folder, tmp_path / "plain", **kw)
    dm, method, rec1, _ = fit_consistency(sd, image_folder, tmp_path / "released", release_encoders=True, **kw)
    assert len(rec1.losses) == len(rec0.losses) == 2
    torch.testing.assert_close(torch.tensor(rec1.losses), torch.tensor(rec0.losses), rtol=1e-5, atol=1e-6)
    item = dm.train_set[0]
    ref = plain.teacher.encode_text(item["input_ids"][None])[0]
    torch.testing.assert_close(item["text_cond"]["encoder_hidden_states"], ref, rtol=0, atol=1e-6)
    assert method.teacher.released.modules == ("text_encoder", "vae.encoder")
    pipe = LatentConsistencyModelPipeline.from_pretrained(method.export(tmp_path / "lcm"), safety_checker=None)
    ref = plain.teacher.text_encoder.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in pipe.text_encoder.state_dict().items())
    ours = method.sample(1, 1, torch.Generator().manual_seed(1), prompts=[SAMPLE_PROMPT], guidance_scale=3.0)
    theirs = pipe([SAMPLE_PROMPT], height=8, width=8, num_inference_steps=1, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(1), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
