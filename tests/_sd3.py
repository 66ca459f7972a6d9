"""A tiny Stable-Diffusion-3-shaped teacher built locally (no download), saved by ``StableDiffusion3Pipeline``.

transformer/ (SD3Transformer2DModel, 2 layers, 8x8 latents, patch 2), vae/ (AutoencoderKL, factor 2, SD3's
scaling and shift factors), text_encoder/ + text_encoder_2/ (CLIPTextModelWithProjection of different widths,
16 and 24, so a swapped or mis-concatenated encoder shows), tokenizer/ + tokenizer_2/ (the character-level
CLIPTokenizer of tests/test_lcm.py), text_encoder_3 / tokenizer_3 absent (None, as the pipeline allows; with
``t5=True`` a T5EncoderModel of width joint_attention_dim and the tiny T5TokenizerFast of tests/_flux.py) and
scheduler/ (FlowMatchEulerDiscreteScheduler, shift 3 as SD3). The CLIP features concatenate to 16 + 24 = 40,
zero-padded to joint_attention_dim 48; the pooled projections to 8 + 12 = 20 = pooled_projection_dim.
Images are 16 x 16 pixels (latents 4 x 8 x 8).
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 16  # pixels; latents are IMAGE_SIZE / 2
JOINT_ATTENTION_DIM = 48
TEXT_WIDTHS = (16, 24)  # hidden sizes of text_encoder and text_encoder_2
PROJECTION_DIMS = (8, 12)  # their text_projection widths (the pooled embeddings)


def tiny_clip_with_projection(vocab_size: int, hidden: int, projection: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=8, projection_dim=projection, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT_ATTENTION_DIM, caption_projection_dim=16,
        pooled_projection_dim=sum(PROJECTION_DIMS), pos_embed_max_size=IMAGE_SIZE // 2,
    )


def write_tiny_sd3(path: Path, seed: int = 0, t5: bool = False) -> Path:
    """Build the tiny SD3 stack and save it with ``StableDiffusion3Pipeline.save_pretrained``; returns ``path``.
    ``t5``: with a tiny T5 ``text_encoder_3`` / ``tokenizer_3`` (SD3.5's third encoder)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from test_lcm import write_tiny_tokenizer

    path = Path(path)
    tok_dir = path.parent / f"{path.name}-tokenizer"
    vocab_size = write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    encoders = [tiny_clip_with_projection(vocab_size, h, p, seed + i)
                for i, (h, p) in enumerate(zip(TEXT_WIDTHS, PROJECTION_DIMS))]
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=1.5305, shift_factor=0.0609,
    )
    text_encoder_3 = tokenizer_3 = None
    if t5:
        from _flux import tiny_t5, tiny_t5_tokenizer

        tokenizer_3 = tiny_t5_tokenizer()
        text_encoder_3 = tiny_t5(len(tokenizer_3), width=JOINT_ATTENTION_DIM, seed=seed + 4)
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed + 3), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)
    return path
