"""A tiny Flux-shaped text-to-image teacher built locally (no download), saved by ``FluxPipeline``.

transformer/ (FluxTransformer2DModel, one double- and one single-stream block, 8 x 8 latents of 4 channels packed
2 x 2, ``sample_size`` 8 recorded in its config), vae/ (AutoencoderKL, factor 2, Flux's scaling and shift
factors), text_encoder/ (CLIPTextModel, width 12: its pooled output is ``pooled_projections``), tokenizer/ (the
character-level CLIPTokenizer of tests/test_lcm.py, 8 tokens), text_encoder_2/ (T5EncoderModel, width 20: its
sequence is ``encoder_hidden_states``; different widths, so a swapped encoder shows), tokenizer_2/ (a
``T5TokenizerFast`` over a small Unigram vocabulary, built without sentencepiece) and scheduler/
(FlowMatchEulerDiscreteScheduler with Flux's dynamic shifting). Images are 16 x 16 pixels.

``guidance_embeds=True`` builds a guidance-distilled network (Flux-dev), False one without the input (schnell).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

IMAGE_SIZE = 16  # pixels; latents are IMAGE_SIZE / 2
CLIP_WIDTH = 12  # pooled_projection_dim
T5_WIDTH = 20  # joint_attention_dim
WORDS = "a red cat blue dog photo of digit the".split()


def tiny_t5_tokenizer():
    """A ``T5TokenizerFast`` (the ``tokenizers`` Unigram model, no sentencepiece): T5's ids <pad> 0, </s> 1,
    <unk> 2, whole words of :data:`WORDS`, then single characters so that any lower-case prompt tokenizes."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_t5(vocab_size: int, width: int = T5_WIDTH, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    ))


def tiny_flux_transformer(guidance_embeds: bool = True, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    # Flux configs carry no resolution; this one records its 8 x 8 latents (backbones.FluxBackbone.sample_shape).
    # diffusers warns on loading that the key is unexpected, and keeps it.
    model.register_to_config(sample_size=IMAGE_SIZE // 2)
    return model


def write_tiny_flux(path: Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Build the tiny Flux stack and save it with ``FluxPipeline.save_pretrained``; returns ``path``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from test_lcm import write_tiny_tokenizer

    path = Path(path)
    tok_dir = path.parent / f"{path.name}-tokenizer"
    vocab_size = write_tiny_tokenizer(tok_dir)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    t5_tokenizer = tiny_t5_tokenizer()
    t5 = tiny_t5(len(t5_tokenizer), seed=seed + 1)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.3611, shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=tiny_flux_transformer(guidance_embeds, seed + 3), scheduler=scheduler, vae=vae,
        text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(tok_dir), text_encoder_2=t5, tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(path)
    return path
