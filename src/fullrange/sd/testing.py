"""Tiny Stable Diffusion models built from configs with random weights (no download), for tests and benchmarks;
and the published SD 1.5 UNet config fullrange bundles, for memory and speed benchmarks at real sizes."""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path

from ..models import seeded
from .tokenizer import bytes_to_unicode


def sd15_unet_config(**changes) -> dict:
    """The SD 1.5 UNet's config (859.52 M parameters) as fullrange bundles it for single files, with ``changes``."""
    configs = json.loads(resources.files("fullrange").joinpath("configs/sd1.json").read_text())
    return {k: v for k, v in configs["unet"].items() if not k.startswith("_")} | changes


def twin_unet_config(family: str) -> dict:
    """A narrow UNet with the block layout of SD 1.5 (``sd1``) or SDXL (``sdxl``): the same blocks, layers per block
    and transformer depths, so the same modules under the same names as the real one (258 / 773 LoRA targets), at a
    few channels. Other tools map names by that layout (A1111 assumes two layers per block, kohya and ComfyUI build
    their tables from it), so their loaders can be tested on it without the real model's gigabytes."""
    # 32 groups as SD's: ComfyUI's LDM blocks always normalise in 32 groups.
    common = {"sample_size": 8, "layers_per_block": 2, "norm_num_groups": 32}
    if family == "sd1":
        return common | {
            "block_out_channels": (32, 32, 64, 64),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
        }
    if family == "sdxl":
        return common | {
            "block_out_channels": (32, 64, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "cross_attention_dim": 32 + 48,
            "attention_head_dim": (2, 4, 8),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 48,
        }
    raise ValueError(f"no twin of {family!r}: sd1 or sdxl")


TWIN_TEXT_LAYERS = {"sd1": (12,), "sdxl": (12, 32)}
"""The twins' text encoders have CLIP-L's 12 layers and OpenCLIP-bigG's 32, at the tiny widths."""


TWIN_VAE = {
    "block_out_channels": (32, 32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
"""The twins' VAE: SD's (four levels, 8× down, two layers per block, 32 groups) at a few channels."""
SDXL_VAE_SCALE = 0.13025


def save_twin(path: Path | str, family: str, seed: int = 0) -> Path:
    """A tiny pipeline with the real family's module tree (:func:`twin_unet_config`, :data:`TWIN_TEXT_LAYERS`,
    :data:`TWIN_VAE`, SDXL's latent scale)."""
    vae = TWIN_VAE | ({"scaling_factor": SDXL_VAE_SCALE} if family == "sdxl" else {})
    return save_tiny_stable_diffusion(
        path,
        seed=seed,
        xl=family == "sdxl",
        unet_config=twin_unet_config(family),
        text_layers=TWIN_TEXT_LAYERS[family],
        clip_tables=True,
        vae_config=vae,
    )


def save_tiny_stable_diffusion(
    path: Path | str,
    *,
    seed: int = 0,
    sample_size: int = 8,
    xl: bool = False,
    unet_config: dict | None = None,
    in_channels: int = 4,
    text_layers: tuple[int, ...] = (2, 2),
    clip_tables: bool = False,
    vae_config: dict | None = None,
) -> Path:
    """Write a tiny SD pipeline (UNet, VAE, CLIP text encoder and a character-level tokenizer; with ``xl`` an
    SDXL-shaped one: two text encoders, size conditioning, several transformer layers per block), built from
    configs with random weights, as a diffusers folder: for tests and benchmarks, no download. ``unet_config``
    replaces the UNet by one of that config (e.g. :func:`sd15_unet_config`), the SD text encoder as wide as its
    cross-attention; ``in_channels`` 9 makes the SD UNet an inpainting one (latents, mask, masked image);
    ``text_layers``: each text encoder's number of layers; ``clip_tables``: CLIP's 49408 token and 77 position
    embeddings (ComfyUI builds that many token rows whatever the config says, and tokenizes to 77); ``vae_config``
    replaces the VAE's layout."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizers = [
            CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16, **extra)
            for extra in ({}, {"pad_token": "!"})
        ]
    text_config = CLIPTextConfig(
        vocab_size=49408 if clip_tables else len(vocab),
        hidden_size=unet_config["cross_attention_dim"] if unet_config and not xl else 32,
        intermediate_size=64,
        num_hidden_layers=text_layers[0],
        num_attention_heads=4,
        max_position_embeddings=77 if clip_tables else 16,
        projection_dim=32,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    with seeded(seed):
        text_encoder = CLIPTextModel(text_config)
        # SDXL's second encoder is wider than the first (1280 vs 768), which is how loaders tell them apart, and its
        # pooled output is projected to its own width (ComfyUI builds that projection square).
        wide = {"hidden_size": 48, "intermediate_size": 96, "projection_dim": 48, "num_hidden_layers": text_layers[-1]}
        text_config_2 = CLIPTextConfig(**{**text_config.to_dict(), **wide})
        if unet_config is not None:
            unet = UNet2DConditionModel(**unet_config)
        elif xl:
            unet = UNet2DConditionModel(
                sample_size=sample_size,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2),
                cross_attention_dim=32 + 48,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 48,
                norm_num_groups=8,
            )
        else:
            unet = UNet2DConditionModel(
                sample_size=sample_size,
                in_channels=in_channels,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                norm_num_groups=8,
                attention_head_dim=8,
            )
        tiny_vae = {
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "block_out_channels": (8, 16),
            "norm_num_groups": 8,
        }
        vae_layout = vae_config or tiny_vae
        factor = 2 ** (len(vae_layout["block_out_channels"]) - 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=factor * sample_size, **vae_layout
        )
        scheduler = DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        parts = {
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizers[0],
            "unet": unet,
            "scheduler": scheduler,
        }
        if xl:
            second = CLIPTextModelWithProjection(text_config_2)
            pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=second, tokenizer_2=tokenizers[1])
        else:
            pipe = StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
