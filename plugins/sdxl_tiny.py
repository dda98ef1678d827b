"""SDXL-architecture pipelines built from configs: a tiny one for tests and CPU benchmarks, full size for timing.

Both are plain `StableDiffusionXLPipeline`s with random weights, saved with `save_pretrained`, so they
load through the same code a hub id or a downloaded folder uses. The tokenizers are real CLIP BPE
tokenizers built offline (`build_clip_tokenizer`).
"""

from __future__ import annotations

import os
import tempfile

import torch

TIME_EMBED_DIM = 8  # SDXL's micro-conditioning: 6 size/crop numbers, each embedded in this many dims


def _text_encoders(hidden: int, layers: int, heads: int, projection: int, full: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width: int, depth: int, n_heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                              num_attention_heads=n_heads, max_position_embeddings=77, hidden_act=act,
                              projection_dim=projection, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

    if full:  # CLIP ViT-L/14 text tower and OpenCLIP ViT-bigG/14 text tower
        return (CLIPTextModel(config(768, 12, 12, "quick_gelu")),
                CLIPTextModelWithProjection(config(1280, 32, 20, "gelu")))
    return (CLIPTextModel(config(hidden, layers, heads, "quick_gelu")),
            CLIPTextModelWithProjection(config(hidden, layers, heads, "gelu")))


def _models(full_size: bool):
    """(text_encoder, text_encoder_2, unet, vae), random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if full_size:
        text_encoder, text_encoder_2 = _text_encoders(0, 0, 0, 1280, full=True)
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + 1280, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        )
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, scaling_factor=0.13025, force_upcast=True)
    else:
        hidden = 32
        text_encoder, text_encoder_2 = _text_encoders(hidden, 2, 4, hidden, full=False)
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * hidden, attention_head_dim=(2, 4), use_linear_projection=True,
            transformer_layers_per_block=(1, 1), addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM, projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + hidden,
        )
        vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), latent_channels=4, sample_size=64, layers_per_block=1,
                            norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
    return text_encoder, text_encoder_2, unet, vae


def build_sdxl_pipeline(folder: str | None = None, full_size: bool = False, seed: int = 0,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A random-weight SDXL pipeline (tiny by default; `full_size` = SDXL base's architecture).

    Saved to `folder` when given (a diffusers pipeline folder). The tiny one has an 8x VAE like SDXL,
    so 64x64 images are 8x8 latents.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from fiftyone_diffusion.plugins.clip_tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):  # e.g. "cuda": initialise the full-size weights on the GPU, not in host memory
        text_encoder, text_encoder_2, unet, vae = _models(full_size)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    tok_dir = folder or tempfile.mkdtemp(prefix="sdxl-tokenizers-")
    tokenizer = build_clip_tokenizer(os.path.join(tok_dir, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer"), pad_token="!")  # as SDXL's
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    if folder:
        pipe.save_pretrained(folder)
    return pipe
