"""Export a Stable Diffusion model as one single-file checkpoint in the LDM layout (A1111, ComfyUI), marked with
how it must be sampled."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters import merge_adapters
from ..config import ConfigError
from ..files import save_safetensors
from .ldm import text_encoders_to_ldm, unet_to_ldm, vae_to_ldm
from .model import StableDiffusion

FAMILIES = ("sd1", "sd2", "sdxl")


def default_family(model: StableDiffusion) -> str:
    """``sdxl`` for SDXL, else ``sd1`` or ``sd2`` from the UNet's cross-attention width (768: CLIP ViT-L, 1024:
    OpenCLIP ViT-H)."""
    if model.is_xl:
        return "sdxl"
    names = {768: "sd1", 1024: "sd2"}
    width = model.unet.config.cross_attention_dim
    if width not in names:
        raise ConfigError(
            "family",
            f"is needed: cross_attention_dim {width} is neither SD 1.x's 768 nor SD 2.x's 1024; give sd1 or sd2",
        )
    return names[width]


def export(path: Path | str, model: StableDiffusion, *, family: str | None = None, dtype=torch.float16) -> Path:
    """Write ``model`` (UNet with any adapter merged in, VAE, text encoders) as one LDM-layout ``.safetensors``
    file, atomically, that A1111 / ComfyUI load. ``v_pred`` / ``ztsnr`` marker keys and kohya's metadata say what
    its spec says about prediction type and zero terminal SNR. ``family``: ``sd1`` / ``sd2`` / ``sdxl`` layout
    (default: :func:`default_family`). An adapter is merged into the UNet's weights in place."""
    family = family or default_family(model)
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    if (family == "sdxl") != model.is_xl:
        raise ValueError(f"family {family}: the model is {'' if model.is_xl else 'not '}SDXL")
    merge_adapters(model.unet)
    second = model.text_encoder_2.state_dict() if model.is_xl else None
    ldm = {
        **unet_to_ldm(model.unet.state_dict(), model.unet.config),
        **vae_to_ldm(model.vae.state_dict(), model.vae.config),
        **text_encoders_to_ldm(family, model.text_encoder.state_dict(), second),
    }
    # In the file's dtype: an fp16 export of fp32 weights holds a half-size copy while the file is written.
    state = {k: v.detach().to("cpu", dtype) for k, v in ldm.items()}
    metadata = {"format": "pt"}
    if model.spec.prediction == "v_prediction":
        state["v_pred"] = torch.tensor([])
        metadata["ss_v_parameterization"] = "true"
    if model.spec.schedule.zero_terminal_snr:
        state["ztsnr"] = torch.tensor([])
        metadata["ss_zero_terminal_snr"] = "true"
    save_safetensors(path, state, metadata)
    return Path(path)
