"""A tiny SANA-shaped text-to-image teacher built locally (no download), saved by ``SanaPipeline``.

transformer/ (SanaTransformer2DModel, one block, 8 x 8 latents of 4 channels, cross-attention to 16-wide captions,
``timestep_scale`` 1), vae/ (AutoencoderDC, three blocks: spatial compression 2 ** (3 - 1) = 4, SANA's scaling
factor, no shift), text_encoder/ (Gemma2Model, width 16: its last hidden state is ``encoder_hidden_states``),
tokenizer/ (a ``GemmaTokenizer``, transformers' tokenizers-backed BPE, over single characters plus merges for the
words of ``SanaPipeline``'s default ``complex_human_instruction`` and of the test prompts, so the instruction is
368 tokens rather than 1,057 characters: 666 tokens per prompt) and scheduler/ (FlowMatchEulerDiscreteScheduler,
shift 3). Images are 32 x 32 pixels, the smallest size ``SanaPipeline`` accepts (a multiple of 32).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

IMAGE_SIZE = 32  # pixels; latents are IMAGE_SIZE / 4
GEMMA_WIDTH = 16  # caption_channels
WORDS = "a red cat blue dog photo of digit the".split()


def _words() -> list[str]:
    import inspect

    from diffusers import SanaPipeline

    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    text = " ".join(instruction)
    return sorted({w for w in text.split(" ") + WORDS if len(w) > 1})


def tiny_gemma_tokenizer():
    """A ``GemmaTokenizer`` (tokenizers BPE with byte fallback, no sentencepiece): Gemma's <pad> 0, <eos> 1,
    <bos> 2, <unk> 3, <mask> 4; the printable characters and "\\n" (Gemma writes a space as "▁"); and, for every
    word w of :func:`_words`, left-to-right merges building "▁w" (and w), so any prompt tokenizes."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    chars = [c for c in string.printable if c not in " \t\r\x0b\x0c"] + ["\u2581"]
    for c in chars:
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in _words():
        for piece in ("\u2581" + word, word):
            token = piece[0]
            for c in piece[1:]:
                merged = token + c
                if merged not in vocab:
                    vocab[merged] = len(vocab)
                    merges.append((token, c))
                token = merged
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=8192)


def tiny_gemma(vocab_size: int, width: int = GEMMA_WIDTH, seed: int = 0):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    return Gemma2Model(Gemma2Config(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=2048,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ))


def tiny_sana_transformer(seed: int = 0):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=GEMMA_WIDTH,
        sample_size=IMAGE_SIZE // 4, patch_size=1,
    )


def tiny_dc_vae(seed: int = 0):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8), encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)), encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def write_tiny_sana(path: Path, seed: int = 0, scheduler=None) -> Path:
    """Build the tiny SANA stack and save it with ``SanaPipeline.save_pretrained``; returns ``path``.

    ``scheduler``: another scheduler instance (default FlowMatchEulerDiscreteScheduler, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    tokenizer = tiny_gemma_tokenizer()
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=tiny_gemma(len(tokenizer), seed=seed), vae=tiny_dc_vae(seed + 1),
        transformer=tiny_sana_transformer(seed + 2), scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(path)
    return Path(path)
