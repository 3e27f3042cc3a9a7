"""Export a Stable Diffusion model as one single-file checkpoint in the LDM layout (A1111, ComfyUI), marked with
how it must be sampled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..adapters import merge_all, refuse_unmerged
from ..files import save_safetensors, staged_folder, write_bytes
from .ldm import text_encoders_to_ldm, unet_to_ldm, vae_to_ldm
from .markers import MODELSPEC_ARCHITECTURE
from .model import FAMILIES, StableDiffusion, as_pipeline

__all__ = ["FAMILIES", "export", "export_diffusers", "save_pipeline"]


FLOW_SHIFT_KEY = "fullrange.flow_shift"
"""Metadata key of a rectified-flow single file: its time shift (fullrange's; ``modelspec.prediction_type`` is
``flow``)."""


def refuse_aligned_flow(spec) -> bool:
    """Whether ``spec`` is rectified flow (exportable: ComfyUI's ModelSamplingSD3 samples it); a ValueError for flow
    prediction on a VP timestep table (the aligned conversion), which only fullrange samples."""
    if spec.prediction != "flow":
        return False
    if spec.schedule.coordinates != "flow":
        raise ValueError(
            "a flow-prediction model on SD's own timesteps (the aligned conversion) is sampled by fullrange only: "
            "no tool feeds it those timesteps, so it is not exported"
        )
    return True


def checkpoint_state(model: StableDiffusion, family: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """What a single file of ``model`` holds: its networks' tensors in the LDM layout of ``family`` (every adapter
    merged in place first; a name still an adapter's is refused), on their own device and dtype (the meta device
    too: shapes and names without memory), ComfyUI's ``v_pred`` / ``ztsnr`` marker tensors, and the metadata
    (kohya's ``ss_*``, ``modelspec.*``) that say how it must be sampled."""
    family = model.layout(family)
    flow = refuse_aligned_flow(model.spec)
    merge_all(model)
    second = model.text_encoder_2.state_dict() if model.is_xl else None
    state = {
        **unet_to_ldm(model.unet.state_dict(), model.unet.config),
        **vae_to_ldm(model.vae.state_dict(), model.vae.config),
        **text_encoders_to_ldm(family, model.text_encoder.state_dict(), second),
    }
    refuse_unmerged(state)
    v = model.spec.prediction == "v_prediction"
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family].removesuffix("/lora"),
        "modelspec.prediction_type": "flow" if flow else "v" if v else "epsilon",
    }
    if flow:  # no tool reads a flow marker in an SD / SDXL file: the workflow beside it says ModelSamplingSD3
        metadata[FLOW_SHIFT_KEY] = f"{model.spec.schedule.shift:g}"
        return state, metadata
    if v:
        state["v_pred"] = torch.tensor([])
        metadata["ss_v_parameterization"] = "true"
    if model.spec.schedule.zero_terminal_snr:
        state["ztsnr"] = torch.tensor([])
        metadata["ss_zero_terminal_snr"] = "true"
    return state, metadata


def export(path: Path | str, model: StableDiffusion, *, family: str | None = None, dtype=torch.float16) -> list[Path]:
    """Write ``model`` as one LDM-layout ``.safetensors`` file (:func:`checkpoint_state`), atomically, that A1111 and
    ComfyUI load, and beside it what makes them sample it right where the file's markers are not read
    (:func:`companions`). Returns the paths written, the checkpoint first."""
    state, metadata = checkpoint_state(model, family)
    # In the file's dtype: an fp16 export of fp32 weights holds a half-size copy while the file is written.
    save_safetensors(path, {k: v.detach().to("cpu", dtype) for k, v in state.items()}, metadata)
    return [Path(path), *companions(path, model, model.layout(family))]


def companions(path: Path | str, model: StableDiffusion, family: str) -> list[Path]:
    """What a checkpoint at ``path`` needs beside it to be sampled right by tools that ignore its markers:

    - ComfyUI reads ``v_pred`` / ``ztsnr`` only for SDXL: for a v-prediction or zero-terminal-SNR model, a workflow in
      ComfyUI's API format (``NAME.comfyui.json``: the loader, *ModelSamplingDiscrete* with the prediction type and
      zsnr, *RescaleCFG* 0.7 at zero terminal SNR, a sampler from the top of the schedule);
    - A1111 takes an SD 1.x / 2.x model's prediction type only from a config of the same name: for v-prediction,
      ``NAME.yaml`` (LDM's inference config with ``parameterization: v``, its UNet as the model's own).
    """
    v, ztsnr = model.spec.prediction == "v_prediction", model.spec.schedule.zero_terminal_snr
    path, written = Path(path), []
    side = model.unet.config.sample_size * model.vae_scale_factor
    if refuse_aligned_flow(model.spec):
        workflow = comfyui_workflow(path.name, False, False, side, shift=model.spec.schedule.shift)
        write_bytes(path.with_suffix(".comfyui.json"), json.dumps(workflow, indent=2).encode())
        return [path.with_suffix(".comfyui.json")]
    if v or ztsnr:
        workflow = comfyui_workflow(path.name, v, ztsnr, side)
        write_bytes(path.with_suffix(".comfyui.json"), json.dumps(workflow, indent=2).encode())
        written.append(path.with_suffix(".comfyui.json"))
    if v and family in ("sd1", "sd2"):
        # JSON is YAML: A1111 reads the file with OmegaConf, and fullrange needs no YAML writer for it.
        write_bytes(path.with_suffix(".yaml"), json.dumps(a1111_config(model, family), indent=2).encode())
        written.append(path.with_suffix(".yaml"))
    return written


def comfyui_workflow(
    checkpoint: str,
    v: bool,
    ztsnr: bool,
    side: int,
    prompt: str = "a city street at night",
    shift: float | None = None,
) -> dict:
    """A ComfyUI workflow (API format) that samples ``checkpoint`` right: ModelSamplingDiscrete sets the prediction
    type and zero terminal SNR (ComfyUI caps its top at σ ≈ 4519, not σ = ∞), RescaleCFG 0.7 at zero terminal SNR,
    and the "simple" scheduler starts at the schedule's last step, as trailing spacing does. With ``shift``, a
    rectified-flow UNet: ModelSamplingSD3 with that shift (flow sampling, exactly fullrange's: tests/test_comfyui)."""
    model = ["2", 0]
    sampling = (
        {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": shift}}
        if shift is not None
        else {
            "class_type": "ModelSamplingDiscrete",
            "inputs": {"model": ["1", 0], "sampling": "v_prediction" if v else "eps", "zsnr": ztsnr},
        }
    )
    nodes = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}, "2": sampling}
    if ztsnr:
        nodes["3"] = {"class_type": "RescaleCFG", "inputs": {"model": ["2", 0], "multiplier": 0.7}}
        model = ["3", 0]
    name = "euler" if shift is not None else "dpmpp_2m"
    sampler = {"seed": 0, "steps": 25, "cfg": 7.5, "sampler_name": name, "scheduler": "simple", "denoise": 1.0}
    return nodes | {
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "7": {
            "class_type": "KSampler",
            "inputs": {"model": model, "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], **sampler},
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "fullrange"}},
    }


def a1111_config(model: StableDiffusion, family: str) -> dict:
    """LDM's inference config for an SD 1.x / 2.x ``model`` (what A1111 builds it from), v-prediction, with the
    model's own UNet and schedule."""
    unet, origin = model.unet.config, model.spec.schedule.origin
    base = unet.block_out_channels[0]
    heads = unet.attention_head_dim
    unet_params = {
        "use_checkpoint": True,
        "image_size": 32,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": base,
        "attention_resolutions": [2**i for i, kind in enumerate(unet.down_block_types) if "CrossAttn" in kind],
        "num_res_blocks": unet.layers_per_block,
        "channel_mult": [c // base for c in unet.block_out_channels],
        "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(unet.use_linear_projection),
        "transformer_depth": 1,
        "context_dim": unet.cross_attention_dim,
        "legacy": False,
    }
    # SD 1.x names its attention by heads (8), SD 2.x by channels per head (64), as their configs do.
    unet_params |= {"num_heads": heads} if family == "sd1" else {"num_head_channels": heads}
    encoder = {
        "sd1": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "sd2": {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        },
    }[family]
    params = {
        "parameterization": "v",
        "linear_start": origin.beta_start if origin is not None and origin.beta_start else 0.00085,
        "linear_end": origin.beta_end if origin is not None and origin.beta_end else 0.012,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": model.spec.schedule.num_train_timesteps,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": unet.sample_size,
        "channels": unet.out_channels,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": model.vae.config.scaling_factor,
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": _first_stage(model),
        "cond_stage_config": encoder,
    }
    return {
        "model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}
    }


def _first_stage(model: StableDiffusion) -> dict:
    vae = model.vae.config
    base = vae.block_out_channels[0]
    ddconfig = {
        "double_z": True,
        "z_channels": vae.latent_channels,
        "resolution": 256,
        "in_channels": vae.in_channels,
        "out_ch": vae.out_channels,
        "ch": base,
        "ch_mult": [c // base for c in vae.block_out_channels],
        "num_res_blocks": vae.layers_per_block,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    params = {"embed_dim": vae.latent_channels, "monitor": "val/rec_loss", "ddconfig": ddconfig}
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": params | {"lossconfig": {"target": "torch.nn.Identity"}},
    }


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
    merge_all(model)
    for network in (model.unet, model.vae, *model.text_encoders.values()):
        refuse_unmerged(network.state_dict())
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
