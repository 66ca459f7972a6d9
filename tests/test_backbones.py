"""Backbone adapters (lightning_distill.backbones): every supported diffusers denoiser, called through
``Denoiser``, gives exactly what its diffusers pipeline computes by hand from the same inputs (the
pipeline's timestep units, keyword names, Flux's 2x2 packing and ids, the learned-sigma half of DiT and
SANA); helpers (sample shape, class / text conditioning); the one-line refusal of an unsupported class;
a DiT teacher folder (transformer/ + scheduler/) that loads, distils for a few steps and samples.

All models are tiny random ones built here (one block, 8x8 latents); nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from lightning_distill import backbones
from lightning_distill.errors import ConfigError
from lightning_distill.parametrisation import Denoiser, FlowSchedule, VPSchedule
from lightning_distill.teacher import TeacherError, load_teacher

from conftest import make_tiny_unet

B, H, W = 2, 8, 8


def tiny_dit(learn_sigma: bool = True, num_classes: int = 10, channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=channels,
        out_channels=2 * channels if learn_sigma else channels, num_layers=1, sample_size=H, patch_size=2,
        num_embeds_ada_norm=num_classes,
    )


def tiny_sd3(seed: int = 0):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=H, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=H,
    )


def tiny_flux(guidance_embeds: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )


def tiny_sana(learn_sigma: bool = True, timestep_scale: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=8 if learn_sigma else 4, num_attention_heads=2, attention_head_dim=4,
        num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
        caption_channels=8, sample_size=H, patch_size=1, timestep_scale=timestep_scale,
    )


def _flow_timesteps(n: int = 4) -> torch.Tensor:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(n)
    return sched.timesteps  # float32, sigma * 1000: what the SD3 / Flux / SANA loops iterate over


def _exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- each backbone equals its pipeline's call -----------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_equals_dit_pipeline_call(learn_sigma):
    model = tiny_dit(learn_sigma).eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    den = Denoiser(model, VPSchedule.from_scheduler(sched), "epsilon")
    x, labels = torch.randn(B, 1, H, W), torch.tensor([3, 7])
    sched.set_timesteps(4)
    with torch.no_grad():
        for t in sched.timesteps:
            # DiTPipeline.__call__ (guidance_scale 1): timesteps expanded to the batch, then the
            # "learned sigma" branch keeps the first latent_channels of a 2C output
            noise_pred = model(x, timestep=t[None].expand(B), class_labels=labels).sample
            latent_channels = model.config.in_channels
            if learn_sigma:
                assert model.config.out_channels // 2 == latent_channels
                noise_pred, _ = torch.split(noise_pred, latent_channels, dim=1)
            ours = den.network(x, t, class_labels=labels)
            assert ours.shape == x.shape
            _exact(ours, noise_pred)
            _exact(den.raw(x, t, class_labels=labels), noise_pred)  # VP: the index is the timestep
    with pytest.raises(ConfigError, match="class-conditional: pass class_labels"):
        den.network(x, sched.timesteps[0])


def test_sd3_equals_sd3_pipeline_call():
    model = tiny_sd3().eval()
    den = Denoiser(model, FlowSchedule(1000, shift=3.0), "flow_prediction")
    x, text, pooled = torch.randn(B, 4, H, W), torch.randn(B, 5, 16), torch.randn(B, 8)
    with torch.no_grad():
        for t in _flow_timesteps():
            # StableDiffusion3Pipeline: timestep = t.expand(B), the scheduler's sigma * 1000 as a float
            ref = model(hidden_states=x, timestep=t.expand(B), encoder_hidden_states=text,
                        pooled_projections=pooled, return_dict=False)[0]
            _exact(den.network(x, t, encoder_hidden_states=text, pooled_projections=pooled), ref)
        # the integer-timestep path feeds s_i * T, diffusers' training table (to float32 rounding)
        i = torch.tensor([999, 500])
        ref = model(hidden_states=x, timestep=den.schedule.model_timestep(i), encoder_hidden_states=text,
                    pooled_projections=pooled, return_dict=False)[0]
        _exact(den.raw(x, i, encoder_hidden_states=text, pooled_projections=pooled), ref)
    with pytest.raises(ConfigError, match="takes the conditions encoder_hidden_states, pooled_projections; got class_labels"):
        den.network(x, t, encoder_hidden_states=text, pooled_projections=pooled, class_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux_equals_flux_pipeline_call(guidance_embeds):
    model = tiny_flux(guidance_embeds).eval()
    den = Denoiser(model, FlowSchedule(1000, shift=3.0), "flow_prediction")
    x, text, pooled = torch.randn(B, 4, H, W), torch.randn(B, 6, 16), torch.randn(B, 8)
    cond = {"encoder_hidden_states": text, "pooled_projections": pooled}
    guidance = torch.full([1], 3.5).expand(B) if guidance_embeds else None
    if guidance_embeds:
        cond["guidance"] = guidance
    with torch.no_grad():
        for t in _flow_timesteps():
            # FluxPipeline: packed latents and their ids, zero text ids, timestep / 1000, unpack at the end
            latents = FluxPipeline._pack_latents(x, B, 4, H, W)
            img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype)
            txt_ids = torch.zeros(text.shape[1], 3).to(device=x.device, dtype=text.dtype)
            timestep = t.expand(B).to(latents.dtype)
            packed = model(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids,
                           img_ids=img_ids, return_dict=False)[0]
            ref = FluxPipeline._unpack_latents(packed, H, W, vae_scale_factor=1)
            ours = den.network(x, t, **cond)
            assert ours.shape == x.shape
            _exact(ours, ref)
    assert backbones.sample_shape(model) == (4, 128, 128)  # FluxPipeline's default: 1024 px / 8
    if guidance_embeds:
        with pytest.raises(ConfigError, match="needs a guidance scale"):
            den.network(x, t, encoder_hidden_states=text, pooled_projections=pooled)


def test_flux_packing_round_trips():
    x = torch.randn(B, 3, 6, 4)
    packed = backbones.pack_latents(x)
    assert packed.shape == (B, 6, 12)
    _exact(packed, FluxPipeline._pack_latents(x, B, 3, 6, 4))
    _exact(backbones.unpack_latents(packed, 6, 4), x)
    _exact(backbones.flux_image_ids(6, 4), FluxPipeline._prepare_latent_image_ids(B, 3, 2, "cpu", torch.float32))
    with pytest.raises(ConfigError, match="must be even, got 5x4"):
        backbones.pack_latents(torch.randn(1, 3, 5, 4))


@pytest.mark.parametrize("learn_sigma, timestep_scale", [(True, 1.0), (False, 0.5)])
def test_sana_equals_sana_pipeline_call(learn_sigma, timestep_scale):
    model = tiny_sana(learn_sigma, timestep_scale).eval()
    den = Denoiser(model, FlowSchedule(1000, shift=3.0), "flow_prediction")
    x, text = torch.randn(B, 4, H, W), torch.randn(B, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # the first prompt is padded
    with torch.no_grad():
        for t in _flow_timesteps():
            # SanaPipeline: timestep = t.expand(B) * timestep_scale; learned sigma: chunk(2, dim=1)[0]
            timestep = t.expand(B) * model.config.timestep_scale
            ref = model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timestep,
                        return_dict=False)[0]
            if model.config.out_channels // 2 == x.shape[1]:
                ref = ref.chunk(2, dim=1)[0]
            ours = den.network(x, t, encoder_hidden_states=text, encoder_attention_mask=mask)
            assert ours.shape == x.shape
            _exact(ours, ref)
        # the mask reaches the model: without it the padded prompt reads its padding
        unmasked = den.network(x, t, encoder_hidden_states=text)
        assert not torch.allclose(unmasked[0], ours[0]) and torch.allclose(unmasked[1], ours[1], atol=1e-6)


def test_unet_condition_model_is_called_as_before():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=H, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=4,
    ).eval()
    den = Denoiser(model, VPSchedule.from_scheduler(DDIMScheduler()), "epsilon")
    x, text, t = torch.randn(B, 1, H, W), torch.randn(B, 3, 8), torch.tensor([10, 900])
    with torch.no_grad():
        _exact(den.network(x, t, encoder_hidden_states=text), model(x, t, encoder_hidden_states=text).sample)
    assert backbones.is_text_conditional(model) and not backbones.is_class_conditional(model)


def test_helpers_read_each_config():
    assert backbones.sample_shape(make_tiny_unet(8, 3)) == (3, 8, 8)
    assert backbones.num_classes(make_tiny_unet(8, 1, num_class_embeds=10)) == 10
    assert backbones.num_classes(make_tiny_unet(8, 1)) is None
    assert not backbones.is_text_conditional(make_tiny_unet())
    dit = tiny_dit(num_classes=10)
    assert backbones.sample_shape(dit) == (1, H, W) and backbones.num_classes(dit) == 10
    assert not backbones.is_text_conditional(dit) and backbones.image_seq_len(dit) == (H // 2) ** 2
    sd3, sana = tiny_sd3(), tiny_sana()
    assert backbones.sample_shape(sd3) == (4, H, W) and backbones.is_text_conditional(sd3)
    assert backbones.image_seq_len(sd3) == (H // 2) ** 2 and backbones.num_classes(sd3) is None
    assert backbones.sample_shape(sana) == (4, H, W) and backbones.image_seq_len(sana) == H * W
    assert backbones.image_seq_len(tiny_flux()) == 64 * 64  # 128 x 128 latents in 2 x 2 patches


def test_student_copy_of_a_dit_does_not_drop_labels():
    # DiT drops labels in train mode (classifier-free-guidance training), each block on its own draw;
    # a distilled student regresses conditional targets, so its copy never drops them.
    model = backbones.prepare_student(tiny_dit()).train()
    x, labels = torch.randn(64, 1, H, W), torch.arange(64) % 10
    with torch.no_grad():
        _exact(backbones.call(model, x, torch.full((64,), 500), class_labels=labels),
               backbones.call(model.eval(), x, torch.full((64,), 500), class_labels=labels))


# --- refusals --------------------------------------------------------------------------------------


def test_unsupported_model_class_is_a_one_line_error(tmp_path):
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class TinyMystery(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 2):
            super().__init__()
            self.lin = torch.nn.Linear(width, width)

    with pytest.raises(ConfigError) as err:
        Denoiser(TinyMystery(), VPSchedule.from_scheduler(DDIMScheduler()), "epsilon")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("TinyMystery is not a supported denoiser; supported: UNet2DModel")
    for name in backbones.SUPPORTED:
        assert name in msg
    # a teacher folder holding one: refused before any weights are read
    folder = tmp_path / "teacher"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    DDIMScheduler().save_pretrained(folder / "scheduler")
    with pytest.raises(TeacherError, match=r"transformer: PixArtTransformer2DModel is not a supported denoiser; supported: "):
        load_teacher(str(folder))


def test_plain_modules_keep_the_unet_call():
    # test doubles and custom networks (not diffusers models) are called model(x_t, t, **cond)
    class Echo(torch.nn.Module):
        def forward(self, x, t, return_dict=True, **cond):
            return (x * t.reshape(-1, 1, 1, 1),)

    den = Denoiser(Echo(), FlowSchedule(10), "flow_prediction")
    x = torch.ones(B, 1, 2, 2)
    _exact(den.network(x, torch.tensor([2.0, 3.0])), x * torch.tensor([2.0, 3.0]).reshape(-1, 1, 1, 1))


# --- a DiT teacher end to end ----------------------------------------------------------------------


def write_tiny_dit_teacher(path, prediction_type: str = "epsilon", num_classes: int = 10):
    """A class-conditional pixel-space DiT teacher folder as DiT checkpoints lay it out (transformer/ +
    scheduler/ + model_index.json; no VAE, so it denoises 8x8 grayscale images directly)."""
    model = tiny_dit(learn_sigma=True, num_classes=num_classes)
    model.save_pretrained(path / "transformer")
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, timestep_spacing="trailing",
                          set_alpha_to_one=True)
    sched.save_pretrained(path / "scheduler")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def test_load_teacher_reads_a_dit_folder(tmp_path):
    folder = write_tiny_dit_teacher(tmp_path / "dit")
    teacher = load_teacher(str(folder))
    assert type(teacher.unet).__name__ == "DiTTransformer2DModel"
    assert (teacher.in_channels, teacher.sample_size, teacher.num_classes) == (1, H, 10)
    assert teacher.schedule.path == "vp" and teacher.prediction_type == "epsilon"
    x, labels, t = torch.randn(B, 1, H, W), torch.tensor([1, 2]), torch.tensor([5, 500])
    with torch.no_grad():
        ref = tiny_dit()(x, timestep=t, class_labels=labels).sample[:, :1]
        _exact(teacher.denoiser.raw(x, t, class_labels=labels), ref)
    # an empty unet/ beside transformer/ does not hide it when model_index.json names the transformer
    (folder / "unet").mkdir()
    assert type(load_teacher(str(folder)).unet).__name__ == "DiTTransformer2DModel"


def test_consistency_distils_a_dit_teacher(tmp_path):
    from lightning_distill.cli import cli_main

    from _method_configs import debug_config

    folder = write_tiny_dit_teacher(tmp_path / "dit")
    cli = cli_main([
        "fit", "--config", str(debug_config("consistency")), "--data.teacher", str(folder),
        "--data.image_size", "8", "--data.class_conditional", "true",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
        "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
    ])
    model = cli.model
    assert cli.trainer.global_step == 2
    assert type(model.student.unet).__name__ == "DiTTransformer2DModel"
    assert model.sample_shape == (1, H, W) and model.num_classes == 10 and model.is_class_conditional
    trained = {k: v for k, v in model.student.unet.state_dict().items()}
    start = load_teacher(str(folder)).unet.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "the student did not train"
    labels = torch.arange(3)
    x = model.sample(3, 2, torch.Generator().manual_seed(0), labels=labels)
    assert x.shape == (3, 1, H, W) and torch.isfinite(x).all()
    again = model.sample(3, 2, torch.Generator().manual_seed(0), labels=labels)
    _exact(x, again)
    assert not torch.allclose(x, model.sample(3, 2, torch.Generator().manual_seed(0), labels=labels + 5))


def test_flow_sigma_dpm_solver_config_is_read_as_flow_not_vp():
    # SanaPipeline checkpoints ship DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_prediction):
    # its alphas_cumprod is not the path it samples, so it must not load as a VP teacher, but as the flow path
    # of its flow_shift (tests/test_flow_solver_configs.py).
    from diffusers import DPMSolverMultistepScheduler

    from lightning_distill.parametrisation import FlowSchedule, schedule_from_scheduler

    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    schedule = schedule_from_scheduler(sched)
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 3.0 and schedule.num_train_timesteps == 1000


def write_tiny_latent_dit_teacher(path):
    """A latent DiT teacher as DiT-XL-2 lays it out (transformer/ + vae/ + scheduler/): 4-channel 8x8
    latents of 8x8 grayscale images (a one-level VAE does not downsample)."""
    from diffusers import AutoencoderKL, DiTPipeline

    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=H)
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", set_alpha_to_one=True)
    DiTPipeline(transformer=tiny_dit(channels=4), vae=vae, scheduler=sched).save_pretrained(path)
    return path


def test_latent_dit_student_exports_a_dit_pipeline_that_reproduces_its_samples(tmp_path):
    from diffusers import DiffusionPipeline, DiTPipeline

    from lightning_distill.methods.consistency import ConsistencyDistillation

    teacher = load_teacher(str(write_tiny_latent_dit_teacher(tmp_path / "dit")))
    assert teacher.is_latent and teacher.in_channels == 4 and teacher.denoiser.clip_x0 is None
    model = ConsistencyDistillation(teacher=teacher, original_inference_steps=32, sample_steps=1)
    with torch.no_grad():  # a student that differs from the teacher, so the export is of the student
        for p in model.student.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = model.export(tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipe, DiTPipeline) and type(pipe.scheduler).__name__ == "LCMScheduler"
    for k, v in pipe.transformer.state_dict().items():
        _exact(v, model.student.unet.state_dict()[k])
    labels = [1, 4, 9]
    # DiTPipeline passes no generator to scheduler.step: 1-step LCM sampling (no fresh noise) reproduces
    for seed in (0, 7):
        ours = model.sample(3, 1, torch.Generator().manual_seed(seed), labels=torch.tensor(labels))
        ours = (teacher.decode_latents(ours) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        theirs = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=1,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images
        assert theirs.shape == ours.shape == (3, H, W, 1)
        torch.testing.assert_close(torch.from_numpy(theirs), torch.from_numpy(ours), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.sample(3, 1, torch.Generator().manual_seed(0), labels=torch.tensor(labels)),
                              model.sample(3, 1, torch.Generator().manual_seed(7), labels=torch.tensor(labels)))
    # and the folder reads back as a student / teacher
    from lightning_distill.export import load_student_state

    state, _ = load_student_state(folder)
    assert set(state) == set(model.student.unet.state_dict())
    assert type(load_teacher(str(folder)).unet).__name__ == "DiTTransformer2DModel"
