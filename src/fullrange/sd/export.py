"""Export a Stable Diffusion model as one single-file checkpoint in the LDM layout (A1111, ComfyUI), marked with
how it must be sampled."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..adapters import merge_adapters
from ..files import save_safetensors, staged_folder
from .ldm import text_encoders_to_ldm, unet_to_ldm, vae_to_ldm
from .markers import MODELSPEC_ARCHITECTURE
from .model import FAMILIES, StableDiffusion, as_pipeline

__all__ = ["FAMILIES", "export", "export_diffusers", "save_pipeline"]


def export(path: Path | str, model: StableDiffusion, *, family: str | None = None, dtype=torch.float16) -> Path:
    """Write ``model`` (UNet with any adapter merged in, VAE, text encoders) as one LDM-layout ``.safetensors``
    file, atomically, that A1111 / ComfyUI load. Every convention says what its spec says about prediction type
    and zero terminal SNR: ComfyUI's ``v_pred`` / ``ztsnr`` marker keys, kohya's ``ss_*`` metadata and
    ``modelspec.prediction_type``. ``family``: ``sd1`` / ``sd2`` / ``sdxl`` layout
    (default: the model's, :meth:`~fullrange.sd.model.StableDiffusion.layout`). An adapter is merged into the UNet's
    weights in place."""
    family = model.layout(family)
    merge_adapters(model.unet)
    second = model.text_encoder_2.state_dict() if model.is_xl else None
    ldm = {
        **unet_to_ldm(model.unet.state_dict(), model.unet.config),
        **vae_to_ldm(model.vae.state_dict(), model.vae.config),
        **text_encoders_to_ldm(family, model.text_encoder.state_dict(), second),
    }
    # In the file's dtype: an fp16 export of fp32 weights holds a half-size copy while the file is written.
    state = {k: v.detach().to("cpu", dtype) for k, v in ldm.items()}
    v = model.spec.prediction == "v_prediction"
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family].removesuffix("/lora"),
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if v:
        state["v_pred"] = torch.tensor([])
        metadata["ss_v_parameterization"] = "true"
    if model.spec.schedule.zero_terminal_snr:
        state["ztsnr"] = torch.tensor([])
        metadata["ss_zero_terminal_snr"] = "true"
    save_safetensors(path, state, metadata)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_diffusers(path: Path | str, model: StableDiffusion, *, dtype=torch.float32, replace: bool = False) -> Path:
    """Write ``model`` (any adapter merged into its UNet, in place) as a new diffusers pipeline folder in ``dtype``,
    its scheduler config saying how it must be sampled; built in a temporary folder beside it, then renamed, so a
    failure leaves no half-written folder. ``replace``: an existing folder at ``path`` is swapped out only once the
    new one is whole."""
    import shutil
    import tempfile

    path = Path(path)
    merge_adapters(model.unet)
    for module in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        if module is not None:
            module.to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    old = None  # where a replaced folder waits until the new one is in place
    try:
        save_pipeline(model, tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700, as a new folder would be
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            path.rename(old / path.name)
        tmp.rename(path)
    except BaseException:
        if old is not None and not path.exists():
            (old / path.name).rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_pipeline(model: StableDiffusion, path: Path) -> Path:
    """A diffusers pipeline folder (safetensors) of ``model``, its scheduler configured by its spec."""
    with staged_folder(path) as tmp:  # diffusers' savers open their files by name
        as_pipeline(model).save_pretrained(tmp, safe_serialization=True)
    return path
