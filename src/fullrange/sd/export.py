"""Export a Stable Diffusion model as one single-file checkpoint in the LDM layout (A1111, ComfyUI), marked with
how it must be sampled."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..adapters import merge_adapters, merged_differences
from ..config import ConfigError
from ..files import save_safetensors, share_like_new_files
from .ldm import text_encoders_to_ldm, unet_to_ldm, vae_to_ldm
from .model import StableDiffusion, as_pipeline

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
    file, atomically, that A1111 / ComfyUI load. Every convention says what its spec says about prediction type
    and zero terminal SNR: ComfyUI's ``v_pred`` / ``ztsnr`` marker keys, kohya's ``ss_*`` metadata and
    ``modelspec.prediction_type``. ``family``: ``sd1`` / ``sd2`` / ``sdxl`` layout
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


KOHYA_BASE_MODEL = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


def export_kohya_lora(path: Path | str, lora: Path | str, model: StableDiffusion, *, family: str | None = None) -> Path:
    """Write the LoRA folder ``lora`` (``fullrange train``'s, diffusers' format) as one kohya-format ``.safetensors``
    file, atomically: ``lora_unet_…`` names (``lora_te_…``, SDXL's ``lora_te1_…`` / ``lora_te2_…``, for text
    encoders) with ``.lora_down`` / ``.lora_up`` / ``.alpha``, and kohya's ``ss_*``
    and ``modelspec.*`` metadata, so A1111, ComfyUI and diffusers' kohya loader take it. ``model`` is the base it
    was trained on; the spec the LoRA's folder records (prediction type, zero terminal SNR) goes into the metadata.

    ``.alpha`` is the trained alpha: the one in the file's metadata if it has one, else the rank, which is what
    ``fullrange train`` uses.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya

    from .load import adapter_spec

    family = _family(model, family)
    lora = Path(lora)
    if not (lora / "pytorch_lora_weights.safetensors").is_file():
        raise ConfigError("adapter", f"{lora}: not a LoRA folder (no pytorch_lora_weights.safetensors)")
    state, _, metadata = StableDiffusionPipeline.lora_state_dict(lora, return_lora_metadata=True)
    alpha = (metadata or {}).get("lora_alpha")
    kohya = convert_state_dict_to_kohya(state)
    if family != "sdxl":  # kohya names SD 1.x / 2.x's one text encoder lora_te_, SDXL's two lora_te1_ / lora_te2_
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        rank = kohya[key.removesuffix(".alpha") + ".lora_down.weight"].shape[0]
        kohya[key] = torch.tensor(float(alpha if alpha is not None else rank))
    rank = max(int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight"))
    meta = _adapter_metadata(adapter_spec(lora, model.spec), model.spec, family, lora.name) | {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha if alpha is not None else rank),
    }
    save_safetensors(path, {k: t.detach().to("cpu").contiguous() for k, t in kohya.items()}, meta)
    return Path(path)


def export_lycoris_oft(path: Path | str, oft: Path | str, model: StableDiffusion, *, family: str | None = None) -> Path:
    """Write the OFT folder ``oft`` (``fullrange train``'s) as one LyCORIS-format ``.safetensors`` file of weight
    differences (LyCORIS' "full" algorithm: ``lora_unet_<module>.diff`` = the merged weight − the base's), which
    LyCORIS, A1111 and ComfyUI apply exactly. Not LyCORIS' own OFT: peft rotates the other side of the weight, so
    its rotation would not carry over; the difference is exact. ``model`` is the base; the adapter is merged into
    its UNet in place."""
    from .load import adapter_spec, load_adapter

    family = _family(model, family)
    oft = Path(oft)
    if not (oft / "adapter.json").is_file():
        raise ConfigError("adapter", f"{oft}: not an OFT folder (no adapter.json)")
    load_adapter(model, oft)
    diffs = {f"lora_unet_{name.replace('.', '_')}.diff": d for name, d in merged_differences(model.unet).items()}
    meta = _adapter_metadata(adapter_spec(oft, model.spec), model.spec, family, oft.name) | {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": '{"algo": "full"}',
    }
    save_safetensors(path, diffs, meta)
    return Path(path)


def _family(model: StableDiffusion, family: str | None) -> str:
    family = family or default_family(model)
    if family not in FAMILIES:
        raise ConfigError("family", f"{family!r} is not one of {', '.join(FAMILIES)}")
    return family


def _adapter_metadata(spec, base, family: str, title: str) -> dict[str, str]:
    """kohya's ``ss_*`` and ``modelspec.*`` keys for an adapter trained as ``spec`` on a ``base`` of ``family``, and
    a description when the adapter changes the base's prediction type or terminal SNR."""
    v = spec.prediction == "v_prediction"
    ztsnr = spec.schedule.zero_terminal_snr
    meta = {
        "ss_base_model_version": KOHYA_BASE_MODEL[family],
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(v),
        "ss_zero_terminal_snr": str(ztsnr),  # fullrange's; kohya has no key for it
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family],
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if spec.prediction != base.prediction or ztsnr != base.schedule.zero_terminal_snr:
        meta["modelspec.description"] = (
            f"Trained as {spec.prediction}{' with zero terminal SNR' if ztsnr else ''} on a {base.prediction} "
            "base: sample it at strength 1 with those settings; a lower strength or another adapter on top mixes "
            "two prediction types and has no meaning."
        )
    return meta


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_diffusers(path: Path | str, model: StableDiffusion, *, dtype=torch.float16) -> Path:
    """Write ``model`` (any adapter merged into its UNet, in place) as a new diffusers pipeline folder in ``dtype``,
    its scheduler config saying how it must be sampled; built in a temporary folder beside it, then renamed, so a
    failure leaves no half-written folder."""
    import shutil
    import tempfile

    path = Path(path)
    merge_adapters(model.unet)
    for module in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        if module is not None:
            module.to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        save_pipeline(model, tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700, as a new folder would be
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_pipeline(model: StableDiffusion, path: Path) -> Path:
    """A diffusers pipeline folder (safetensors) of ``model``, its scheduler configured by its spec."""
    as_pipeline(model).save_pretrained(path, safe_serialization=True)
    share_like_new_files(path)
    return path
