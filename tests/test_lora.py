"""LoRA students (lightning_distill/lora.py, issue #23 item 3): spec validation, injection, training only the
adapters, adapter-only state dicts and checkpoints, diffusers' LoRA file read by the stock loaders, fusing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_distill.errors import ConfigError
from lightning_distill.lora import (
    LORA_WEIGHT_NAME,
    LoraSpec,
    add_lora,
    drop_base_weights,
    fuse_lora,
    has_lora,
    is_lora_key,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    parameter_counts,
    read_lora_file,
    resolve_target_modules,
    restore_base_weights,
    save_lora,
    trainable_fraction,
)

from conftest import make_tiny_unet

B = 2


def tiny_cond_unet(seed: int = 0):
    """The tiny SD UNet of test_lcm (cross-attention in one down and one up block)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )


def tiny_sd3(seed: int = 0):
    """Two joint blocks: the last one is context_pre_only (no context-stream output projection or FF)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8,
    )


def call(model, seed: int = 1) -> torch.Tensor:
    """One forward pass on fixed random inputs, whatever the backbone."""
    g = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    with torch.no_grad():
        if name == "UNet2DModel":
            x = torch.randn(B, 1, 8, 8, generator=g)
            return model(x, torch.tensor([10, 500])).sample
        if name == "UNet2DConditionModel":
            x, ehs = torch.randn(B, 4, 4, 4, generator=g), torch.randn(B, 8, 16, generator=g)
            return model(x, torch.tensor([10, 500]), ehs).sample
        x, ehs, pooled = (torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 5, 16, generator=g),
                          torch.randn(B, 8, generator=g))
        return model(hidden_states=x, timestep=torch.tensor([100.0, 700.0]), encoder_hidden_states=ehs,
                     pooled_projections=pooled).sample


def perturb_lora(model, seed: int = 3, scale: float = 0.1):
    """Give the adapters non-zero B (as after training), so an exported LoRA has an effect to reproduce."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_key(name):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# --- the spec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 0}, ["rank", "0"]),
    ({"rank": 2.5}, ["rank", "2.5"]),
    ({"alpha": -1.0}, ["alpha", "-1.0"]),
    ({"init": "pissa"}, ["'pissa'", "gaussian", "kaiming"]),
    ({"target_modules": "atention"}, ["'atention'", "attention_ff", "all"]),
    ({"target_modules": []}, ["target_modules", "[]"]),
])
def test_spec_errors_name_the_value_and_the_choices(kwargs, words):
    with pytest.raises(ConfigError) as err:
        LoraSpec(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_spec_from_config_round_trip_and_unknown_keys():
    spec = LoraSpec.from_config({"rank": 8, "alpha": 16, "target_modules": ["to_q", "to_v"], "init": "kaiming"})
    assert spec.target_modules == ("to_q", "to_v") and spec.lora_alpha == 16
    assert LoraSpec.from_config(spec.to_dict()) == spec
    assert spec.to_dict()["target_modules"] == ["to_q", "to_v"]  # plain types: weights_only-loadable hparams
    assert LoraSpec(rank=4).lora_alpha == 4 and LoraSpec.from_config(None) is None
    with pytest.raises(ConfigError, match=r"unknown keys \['dropout'\].*'rank'"):
        LoraSpec.from_config({"rank": 4, "dropout": 0.1})


def test_default_targets_per_backbone():
    # pixel UNet2DModel: the resnets too (the tiny one's only attention is in its mid block)
    assert {"to_q", "to_out.0", "conv1", "conv2", "time_emb_proj"} <= set(resolve_target_modules(make_tiny_unet(), None))
    # SD UNet: attention + feed-forward projections (LCM-LoRA), no convolutions
    assert set(resolve_target_modules(tiny_cond_unet(), None)) == {
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"}
    # MMDiT: the context stream's projections as well
    assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.2"} <= set(
        resolve_target_modules(tiny_sd3(), None))


def test_unknown_target_is_an_error_listing_existing_layers():
    with pytest.raises(ConfigError) as err:
        add_lora(make_tiny_unet(), LoraSpec(target_modules=["to_qq", "conv1"]))
    msg = str(err.value)
    assert "['to_qq']" in msg and "UNet2DModel" in msg and "conv1" in msg and "to_q" in msg
    # a container (the Attention block) is not a layer LoRA can adapt
    with pytest.raises(ConfigError, match="attn1"):
        add_lora(tiny_cond_unet(), LoraSpec(target_modules=["attn1"]))
    with pytest.raises(ConfigError, match="already has LoRA"):
        add_lora(add_lora(make_tiny_unet(), LoraSpec(rank=2)), LoraSpec(rank=2))


# --- building and training ---------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
@pytest.mark.parametrize("make", [make_tiny_unet, tiny_cond_unet], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_output_unchanged_at_init_and_init_deterministic(make, init):
    base = make()
    ref = call(base)
    student = add_lora(make(), LoraSpec(rank=4, alpha=8, init=init), seed=7)
    assert has_lora(student) and type(student) is type(base)
    torch.testing.assert_close(call(student), ref, rtol=0, atol=0)  # B = 0: exactly the base
    state = torch.random.get_rng_state()
    again = add_lora(make(), LoraSpec(rank=4, alpha=8, init=init), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded init leaves the global RNG alone
    a, b = lora_state_dict(student), lora_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = lora_state_dict(add_lora(make(), LoraSpec(rank=4, alpha=8, init=init), seed=8))
    assert any(not torch.equal(a[k], other[k]) for k in a if ".lora_A." in k)


def test_one_optimiser_step_changes_only_lora_weights():
    student = add_lora(tiny_cond_unet(), LoraSpec(rank=4), seed=0)
    base_before = {k: v.clone() for k, v in student.state_dict().items() if not is_lora_key(k)}
    lora_before = {k: v.clone() for k, v in lora_state_dict(student).items()}
    trainable = [p for p in student.parameters() if p.requires_grad]  # what trainable_parameters() returns
    assert sum(p.numel() for p in trainable) == sum(v.numel() for v in lora_before.values())
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(B, 4, 4, 4, generator=g), torch.randn(B, 8, 16, generator=g)
    student(x, torch.tensor([10, 500]), ehs).sample.square().mean().backward()
    opt.step()
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # bit-identical base
    lora_after = lora_state_dict(student)
    changed = [k for k in lora_before if not torch.equal(lora_after[k], lora_before[k])]
    assert changed and all(".lora_B." in k or ".lora_A." in k for k in changed)


def test_trainable_fraction_and_counts():
    full = tiny_cond_unet()
    assert trainable_fraction(full) == 1.0
    student = add_lora(tiny_cond_unet(), LoraSpec(rank=2), seed=0)
    trainable, total = parameter_counts(student)
    assert trainable == sum(v.numel() for v in lora_state_dict(student).values())
    assert total == trainable + sum(p.numel() for p in full.parameters())
    assert 0 < trainable_fraction(student) == trainable / total < 0.1


# --- adapter weights and checkpoints -----------------------------------------------------------------


def test_lora_state_dict_round_trip_holds_only_lora():
    student = perturb_lora(add_lora(make_tiny_unet(), LoraSpec(rank=4, alpha=2), seed=0))
    sd = lora_state_dict(student)
    assert sd and all(is_lora_key(k) for k in sd)
    assert sum(v.numel() for v in sd.values()) == parameter_counts(student)[0]  # exactly the trained weights
    fresh = add_lora(make_tiny_unet(), LoraSpec(rank=4, alpha=2), seed=1)
    assert not torch.equal(call(fresh), call(student))
    load_lora_state_dict(fresh, {k: v.clone() for k, v in sd.items()})
    torch.testing.assert_close(call(fresh), call(student), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="1 missing"):
        load_lora_state_dict(fresh, dict(list(sd.items())[1:]))


class Holder(nn.Module):
    """Stands in for the LightningModule: a student under ``student.`` and something else trainable."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.head = nn.Linear(2, 2)


def test_checkpoint_stores_lora_only_and_resumes_onto_a_rebuilt_base():
    spec = LoraSpec(rank=4, alpha=8)
    module = Holder(perturb_lora(add_lora(tiny_cond_unet(), spec, seed=0)))
    sd = module.state_dict()
    removed = drop_base_weights(sd, "student.")
    assert removed and all(not is_lora_key(k) for k in removed)
    student_keys = [k for k in sd if k.startswith("student.")]
    assert all(is_lora_key(k) for k in student_keys) and "head.weight" in sd  # others untouched
    assert sum(sd[k].numel() for k in student_keys) == parameter_counts(module.student)[0]
    # resume: the student is rebuilt from the base (the teacher) with fresh adapters, then loaded strictly
    resumed = Holder(add_lora(tiny_cond_unet(), spec, seed=5))
    added = restore_base_weights(sd, resumed.student, "student.")
    assert sorted(added) == sorted(removed)
    resumed.load_state_dict(sd, strict=True)
    torch.testing.assert_close(call(resumed.student), call(module.student), rtol=0, atol=0)


# --- export: the LoRA file and the stock loaders -----------------------------------------------------


def test_save_lora_loads_with_the_stock_model_loader(tmp_path):
    student = perturb_lora(add_lora(tiny_cond_unet(), LoraSpec(rank=2, alpha=3), seed=0))  # alpha/r != 1
    path = save_lora(student, tmp_path / "lora")
    assert path.name == LORA_WEIGHT_NAME
    sd, meta = read_lora_file(tmp_path / "lora")
    assert set(sd) == set(lora_state_dict(student)) and meta["r"] == 2 and meta["lora_alpha"] == 3
    base = tiny_cond_unet()  # a fresh copy of the student's base
    base.load_lora_adapter(tmp_path / "lora", prefix="unet", weight_name=LORA_WEIGHT_NAME)
    close(call(base), call(student))


def test_save_lora_sd3_transformer_loads_with_the_stock_loader(tmp_path):
    student = perturb_lora(add_lora(tiny_sd3(), LoraSpec(rank=2, alpha=5), seed=0))
    save_lora(student, tmp_path / "lora")
    base = tiny_sd3()
    base.load_lora_adapter(tmp_path / "lora", weight_name=LORA_WEIGHT_NAME)  # SD3's default prefix "transformer"
    close(call(base), call(student))


def test_unet2d_lora_file_round_trip(tmp_path):
    """UNet2DModel has no diffusers LoRA loader: the same file layout, read by load_lora."""
    student = perturb_lora(add_lora(make_tiny_unet(), LoraSpec(rank=3, alpha=1.5), seed=0))
    save_lora(student, tmp_path / "lora")
    loaded = load_lora(make_tiny_unet(), tmp_path / "lora")
    close(call(loaded), call(student))
    assert parameter_counts(loaded)[0] == parameter_counts(student)[0]  # trainable again: training can go on


def test_layer_trained_in_full_checkpoint_fuse_and_files(tmp_path):
    """A layer the base lacks (LCM's guidance input) trains in full beside the adapters (peft modules_to_save):
    found by new_layers, kept by drop_base_weights, fused as its trained copy, written to full_layers.safetensors
    rather than the stock LoRA file, and read back by load_lora onto a network that has the layer."""
    from diffusers import UNet2DConditionModel

    from lightning_distill.lora import FULL_LAYERS_NAME, new_layers

    teacher = tiny_cond_unet()
    config = {**{k: v for k, v in teacher.config.items() if not k.startswith("_")}, "time_cond_proj_dim": 8}

    def with_w_input():
        net = UNet2DConditionModel.from_config(config)
        net.load_state_dict(teacher.state_dict(), strict=False)
        return net

    student = with_w_input()
    assert new_layers(student, teacher) == ["time_embedding.cond_proj"]
    perturb_lora(add_lora(student, LoraSpec(rank=2), seed=0, train_in_full=new_layers(student, teacher)))
    trained = [n for n, p in student.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert trained == ["time_embedding.cond_proj.modules_to_save.default.weight"]
    sd = {f"s.{k}": v for k, v in student.state_dict().items()}
    drop_base_weights(sd, "s.")
    assert f"s.{trained[0]}" in sd and "s.time_embedding.cond_proj.original_module.weight" not in sd
    g = torch.Generator().manual_seed(1)
    x, ehs, w = torch.randn(B, 4, 4, 4, generator=g), torch.randn(B, 8, 16, generator=g), torch.randn(B, 8, generator=g)

    def out(model):
        with torch.no_grad():
            return model(x, torch.tensor([10, 500]), ehs, timestep_cond=w).sample

    close(out(fuse_lora(student)), out(student))
    save_lora(student, tmp_path / "lora")
    assert set(read_lora_file(tmp_path / "lora")[0]) == {k for k in lora_state_dict(student) if ".lora_" in k}
    assert set(read_lora_file(tmp_path / "lora" / FULL_LAYERS_NAME)[0]) == {"time_embedding.cond_proj.weight"}
    close(out(load_lora(with_w_input(), tmp_path / "lora")), out(student))
    with pytest.raises(ConfigError, match=r"\['time_embedding.cond_proj'\] trained in full that UNet2DConditionModel lacks"):
        load_lora(tiny_cond_unet(), tmp_path / "lora")


def test_load_lora_without_header_reads_alpha_as_rank(tmp_path):
    """A LoRA file without diffusers' config header (other trainers): rank from B, alpha = rank."""
    from safetensors.torch import save_file

    student = perturb_lora(add_lora(make_tiny_unet(), LoraSpec(rank=3), seed=0))  # alpha = rank
    save_file({f"unet.{k}": v.contiguous() for k, v in lora_state_dict(student).items()}, tmp_path / LORA_WEIGHT_NAME)
    assert read_lora_file(tmp_path)[1] is None
    close(call(load_lora(make_tiny_unet(), tmp_path)), call(student))
    with pytest.raises(ConfigError, match="no 'transformer' weights"):
        read_lora_file(tmp_path, "transformer")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_lcm import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_pipeline_load_lora_weights_reproduces_the_student(tiny_sd, tmp_path):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def pipeline(unet):
        return StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(tiny_sd / "vae"), unet=unet,
            text_encoder=CLIPTextModel.from_pretrained(tiny_sd / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer"),
            scheduler=PNDMScheduler.from_pretrained(tiny_sd / "scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def latents(pipe):
        return pipe("a photo of cat", num_inference_steps=2, height=8, width=8, guidance_scale=2.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    student = perturb_lora(add_lora(UNet2DConditionModel.from_pretrained(tiny_sd / "unet"), LoraSpec(rank=2, alpha=4),
                                    seed=0))
    save_lora(student, tmp_path / "lora")
    stock = pipeline(UNet2DConditionModel.from_pretrained(tiny_sd / "unet"))
    stock.load_lora_weights(tmp_path / "lora")
    close(call(stock.unet), call(student))
    close(latents(stock), latents(pipeline(fuse_lora(student))))  # same samples as the student's weights


def test_sd3_pipeline_load_lora_weights_reproduces_the_student(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from _sd3 import write_tiny_sd3

    folder = write_tiny_sd3(tmp_path / "sd3")

    def latents(pipe):
        return pipe("cat", num_inference_steps=2, height=16, width=16, guidance_scale=2.0,
                    max_sequence_length=8, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    student = perturb_lora(add_lora(SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer"),
                                    LoraSpec(rank=2, alpha=4), seed=0))
    save_lora(student, tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    base = latents(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora = latents(pipe)
    pipe.transformer = fuse_lora(student)  # the student's own (fused) weights
    close(with_lora, latents(pipe))
    assert not torch.allclose(with_lora, base, atol=1e-3)  # the LoRA did change the samples


def _transformer_case(name):
    """(model factory, backbones.call inputs) for the transformer backbones of test_backbones."""
    from test_backbones import tiny_dit, tiny_flux, tiny_sana

    g = torch.Generator().manual_seed(0)
    if name == "DiT":
        return tiny_dit, (torch.randn(B, 1, 8, 8, generator=g), torch.tensor([10, 500])), {
            "class_labels": torch.tensor([3, 7])}
    if name == "Flux":
        return tiny_flux, (torch.randn(B, 4, 8, 8, generator=g), torch.tensor([100.0, 700.0])), {
            "encoder_hidden_states": torch.randn(B, 6, 16, generator=g), "pooled_projections": torch.randn(B, 8)}
    return tiny_sana, (torch.randn(B, 4, 8, 8, generator=g), torch.tensor([100.0, 700.0])), {
        "encoder_hidden_states": torch.randn(B, 5, 8, generator=g),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}


@pytest.mark.parametrize("name", ["DiT", "Flux", "Sana"])
def test_transformer_backbones_init_export_and_fuse(name, tmp_path):
    """Through the backbone adapter (what Denoiser calls): unchanged at init, file and fused exports equal."""
    from lightning_distill import backbones

    make, args, cond = _transformer_case(name)

    def out(model):
        with torch.no_grad():
            return backbones.call(model, *args, **cond)

    ref = out(make().eval())  # eval: DiT's label dropout would draw random labels in train mode
    student = add_lora(make(), LoraSpec(rank=2, alpha=4), seed=0).eval()
    assert {"to_q", "to_k", "to_v", "to_out.0"} <= set(student.peft_config["default"].target_modules)
    # not bit-exact for SANA: its linear attention feeds the projections a transposed (non-contiguous)
    # input, on which peft's wrapped Linear rounds differently from nn.Linear (1 ulp, with B = 0)
    torch.testing.assert_close(out(student), ref, rtol=0, atol=1e-6)
    perturb_lora(student)
    assert not torch.allclose(out(student), ref, atol=1e-4)
    save_lora(student, tmp_path / "lora")
    base = make().eval()
    if name == "DiT":  # no diffusers LoRA loader for DiTTransformer2DModel
        load_lora(base, tmp_path / "lora")
    else:
        base.load_lora_adapter(tmp_path / "lora", weight_name=LORA_WEIGHT_NAME)
    close(out(base), out(student))
    close(out(fuse_lora(student)), out(student))


# --- export: fused -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_tiny_unet, tiny_cond_unet], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_fuse_lora_gives_a_stock_model(make, tmp_path):
    student = perturb_lora(add_lora(make(), LoraSpec(rank=4, alpha=2), seed=0))
    fused = fuse_lora(student)
    assert has_lora(student) and not has_lora(fused) and type(fused) is type(student)  # student left as it was
    assert not any(is_lora_key(k) or "base_layer" in k for k in fused.state_dict())
    assert fused.state_dict().keys() == make().state_dict().keys()
    assert all(p.requires_grad for p in fused.parameters())
    close(call(fused), call(student))
    fused.save_pretrained(tmp_path / "fused")
    reloaded = type(student).from_pretrained(tmp_path / "fused")
    assert not has_lora(reloaded) and not getattr(reloaded, "_hf_peft_config_loaded", False)
    close(call(reloaded), call(student))


def test_export_merges_a_bf16_students_adapters_in_float32(tmp_path):
    """A student trained in bf16 (bf16-true) exports W + alpha / r * B A formed in float32, as the student
    computes base and adapter apart: peft merges in the base's dtype, where a small update rounds away."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from lightning_distill.export import write_student_pipeline

    student = perturb_lora(add_lora(make_tiny_unet(), LoraSpec(rank=2, alpha=2), seed=0), scale=1e-3).to(torch.bfloat16)
    expected = fuse_lora(copy.deepcopy(student).float()).state_dict()  # the same merge of a float32 copy
    folder = write_student_pipeline(student, lambda net: DDPMPipeline(unet=net, scheduler=DDPMScheduler()), tmp_path / "out")
    got = UNet2DModel.from_pretrained(folder / "unet").state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("which", ["lcm", "meanflow"])
def test_a_network_rebuilt_on_a_shared_base_holds_the_teachers_tensors_and_only_its_new_layer(which):
    """LCM's guidance-input UNet and MeanFlow's interval-input UNet rebuilt with ``share``: every tensor but the
    new layer's is the teacher's own (same storage and dtype: bf16 here), built on the meta device, so no
    float32 copy is made and then dropped; the new layer is float32 and zero where the method needs it. The
    network computes what the float32 copy (``share=False``) computes, and the teacher is untouched. A module
    holding both matched and new tensors is refused (its init would write into the teacher's)."""
    from lightning_distill.flow_map import flow_map_unet
    from lightning_distill.methods.lcm import student_unet_with_guidance_embedding
    from lightning_distill.nn_utils import rebuilt_with_weights

    teacher = (tiny_cond_unet() if which == "lcm" else make_tiny_unet()).to(torch.bfloat16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    if which == "lcm":
        build, new_prefix = (lambda share: student_unet_with_guidance_embedding(teacher, 8, share=share)), "time_embedding.cond_proj."
    else:
        build, new_prefix = (lambda share: flow_map_unet(teacher, share=share)), "class_embedding."
    rng = torch.random.get_rng_state()
    shared, copied = build(True), build(False)
    # both settings draw the new layers alike (student_lora.base: shared and copy start from one student) and
    # leave the global generator as it was (the copy drew them from it, moving every later training draw)
    assert torch.equal(torch.random.get_rng_state(), rng)
    mine = dict(shared.named_parameters())
    for name, p in copied.named_parameters():
        if name.startswith(new_prefix):
            torch.testing.assert_close(mine[name], p, rtol=0, atol=0, msg=name)
    storage = {k: (p.data_ptr(), p.dtype) for k, p in teacher.named_parameters()}
    for name, p in shared.named_parameters():
        if name.startswith(new_prefix):
            assert p.dtype == torch.float32 and name not in storage and not p.is_meta
        else:
            assert (p.data_ptr(), p.dtype) == storage[name], name
    assert not any(p.data_ptr() in {s for s, _ in storage.values()} for p in copied.parameters())
    assert {p.dtype for p in copied.parameters()} == {torch.float32}

    x = torch.randn(2, 4 if which == "lcm" else 1, 4 if which == "lcm" else 8, 4 if which == "lcm" else 8)
    t = torch.tensor([10, 500])
    kwargs = ({"encoder_hidden_states": torch.randn(2, 3, 16), "timestep_cond": torch.randn(2, 8)} if which == "lcm"
              else {"class_labels": torch.tensor([3.0, 40.0])})
    with torch.no_grad():
        out = shared.float()(x, t, **kwargs).sample  # .float() makes the shared net a float32 copy: compare it
        torch.testing.assert_close(out, copied(x, t, **kwargs).sample, rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())

    with pytest.raises(RuntimeError, match="conv_in .*share=False"):
        rebuilt_with_weights(make_tiny_unet(), {"in_channels": 2}, share=True)  # conv_in: new weight, matched bias
