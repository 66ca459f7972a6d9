"""Parameter memory that ``data.release_encoders`` frees (#23 item 4): text encoders + the VAE's encoder.

Counted on the tiny SD3 stack of tests/_sd3.py (built here, released through the data module) and, as a
calculation, for SD3-medium (CLIP-L + CLIP-G + T5-XXL) and Flux (CLIP-L + T5-XXL): the published
architectures are built on the meta device from their configs (written out below; no weights, no download)
and their parameters counted. Bytes at 2 per parameter (the fp16 / bf16 the checkpoints ship in).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/text_encoder_memory.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# text_config of openai/clip-vit-large-patch14 (SD3 text_encoder, Flux text_encoder) and of
# laion/CLIP-ViT-bigG-14 (SD3 text_encoder_2), as in the pipelines' text_encoder*/config.json
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
# google/t5-v1_1-xxl encoder (SD3 text_encoder_3, Flux text_encoder_2)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
# SD3 / Flux vae/config.json (16 latent channels, no quant convs)
VAE_16 = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def published() -> dict[str, int]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "clip_l_with_projection": count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))),
            "clip_l": count(CLIPTextModel(CLIPTextConfig(**CLIP_L))),
            "clip_g_with_projection": count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
            "t5_xxl_encoder": count(T5EncoderModel(T5Config(**T5_XXL))),
            "vae16_encoder": count(AutoencoderKL(**VAE_16).encoder),
        }


def tiny() -> dict:
    """Release the tiny SD3 stack's encoders; bytes as counted by text_cache.Released."""
    from _sd3 import write_tiny_sd3
    from lightning_distill.teacher import load_teacher
    from lightning_distill.text_cache import parameter_bytes, release_encoders, remember_prompts

    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_teacher(str(write_tiny_sd3(Path(tmp) / "sd3")))
        before = parameter_bytes(teacher)
        remember_prompts(teacher, [""])
        rel = release_encoders(teacher)
        return {"teacher_bytes_before": before, "released_bytes": rel.nbytes, "released": list(rel.modules),
                "teacher_bytes_after": parameter_bytes(teacher)}


def main() -> None:
    n = published()
    gib = lambda params: round(2 * params / 2**30, 2)  # noqa: E731
    sd3 = n["clip_l_with_projection"] + n["clip_g_with_projection"] + n["t5_xxl_encoder"]
    flux = n["clip_l"] + n["t5_xxl_encoder"]
    out = {
        "parameters": n,
        "sd3_medium": {"text_encoders_gib": gib(sd3), "clip_only_gib": gib(sd3 - n["t5_xxl_encoder"]),
                       "vae_encoder_gib": gib(n["vae16_encoder"])},
        "flux": {"text_encoders_gib": gib(flux), "vae_encoder_gib": gib(n["vae16_encoder"])},
        "tiny_sd3": tiny(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
