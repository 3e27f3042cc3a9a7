"""The other side's own code, for the interop tests: ComfyUI, A1111's LoRA extension, Forge's detector and kohya
sd-scripts, as pinned in ``../shared/oracles`` (never copied into fullrange: GPL / AGPL / Apache). Each is imported
once per session, the way its README says, and undone where it touches the process (``sys.argv``, logging,
warnings, a placeholder torchvision that must not stay visible to transformers)."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ORACLES = Path(os.environ.get("FULLRANGE_ORACLES", Path(__file__).resolve().parents[2] / "shared" / "oracles"))
KOHYA_PYTHON = os.environ.get("FULLRANGE_KOHYA_PYTHON")
"""The Python of the environment ``.ci/kohya-env`` makes for sd-scripts (it pins transformers 4.54, diffusers 0.32)."""
REQUIRED = bool(os.environ.get("FULLRANGE_REQUIRE_ORACLES"))
"""Set by CI: a missing oracle fails its tests instead of skipping them."""


def _missing(why: str):
    (pytest.fail if REQUIRED else pytest.skip)(why)


def _need(folder: str) -> Path:
    path = ORACLES / folder
    if not path.is_dir():
        _missing(f"{path} is not here (the pinned oracles live in ../shared/oracles beside the clone)")
    return path


class _Undone:
    """Puts back what importing a tool changes in the process: argv, the root logger's handlers and level, the
    warning filters, sys.path, and the placeholder modules it imported."""

    def __init__(self, *paths: Path, placeholders: tuple[str, ...] = ()):
        self.paths, self.placeholders = [str(p) for p in paths], placeholders

    def __enter__(self):
        root = logging.getLogger()
        self.saved = (list(sys.argv), list(root.handlers), root.level, list(warnings.filters))
        sys.path[:0] = self.paths
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        sys.argv[:], root.handlers[:], level, warnings.filters[:] = self.saved[0], self.saved[1], *self.saved[2:]
        root.setLevel(level)
        for path in self.paths:
            sys.path.remove(path)
        for name in [m for m in sys.modules if m.split(".")[0] in self.placeholders]:
            del sys.modules[name]


def _heavy_first() -> None:
    """Import what the tools' placeholders would shadow (torchvision) before they are on the path."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.clip  # noqa: F401


@functools.cache
def comfyui() -> SimpleNamespace:
    """ComfyUI's modules on the CPU (``--cpu``), with its placeholder torchvision only while importing."""
    root = _need("ComfyUI")
    _heavy_first()
    with _Undone(root, ORACLES / "stubs", placeholders=("torchvision",)):
        sys.argv[:] = [sys.argv[0], "--cpu"]
        options = importlib.import_module("comfy.options")
        options.enable_args_parsing()
        names = [
            "comfy.sd", "comfy.utils", "comfy.lora", "comfy.model_detection", "comfy.supported_models",
            "comfy.model_patcher", "comfy.model_management", "comfy.model_sampling", "comfy.sample",
            "comfy.samplers", "comfy.sd1_clip", "comfy.sdxl_clip", "comfy.model_base", "comfy.ops",
            "comfy_extras.nodes_model_advanced",
            "comfy_extras.nodes_custom_sampler", "nodes",
        ]  # fmt: skip
        modules = {name.rpartition(".")[2]: importlib.import_module(name) for name in names}
    return SimpleNamespace(**modules)


@functools.cache
def a1111() -> SimpleNamespace:
    """A1111's built-in LoRA extension (``networks``, ``network``) and its config picker, with its placeholders for
    the web UI's ``modules`` and ``gradio``."""
    root = _need("a1111-lora")
    _heavy_first()
    with _Undone(root / "stubs", root):
        modules = {name: importlib.import_module(name) for name in ("networks", "network", "sd_models_config")}
        modules["shared"] = importlib.import_module("modules.shared")
        hashes = importlib.import_module("modules.hashes")
    if not hasattr(hashes, "sha256_from_cache"):  # the web UI's hash cache, which the placeholders lack
        hashes.sha256_from_cache = lambda *args, **kwargs: None
    return SimpleNamespace(**modules)


@functools.cache
def huggingface_guess():
    """Forge's checkpoint detector."""
    root = _need("huggingface_guess")
    with _Undone(root):
        return importlib.import_module("huggingface_guess")


def kohya_python() -> str:
    """The sd-scripts environment's Python, or a skip saying how to make one."""
    _need("sd-scripts")
    if not KOHYA_PYTHON:
        _missing('FULLRANGE_KOHYA_PYTHON is not set: export FULLRANGE_KOHYA_PYTHON="$(.ci/kohya-env)"')
    return KOHYA_PYTHON


def no_grad_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def kohya(*args) -> dict:
    """``tests/kohya_oracle.py`` with ``args`` in sd-scripts' environment; its JSON answer."""
    import json
    import subprocess

    python = kohya_python()
    path = os.pathsep.join([str(ORACLES / "sd-scripts"), str(ORACLES / "stubs")])
    script = Path(__file__).with_name("kohya_oracle.py")
    env = {**os.environ, "PYTHONPATH": path}
    run = subprocess.run([python, str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# --- fullrange's twins as ComfyUI loads them ------------------------------------------------------------------------


def _comfy_text_config(folder, subfolder: str) -> dict:
    config = json.loads((folder / subfolder / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    return {k: config[k] for k in keys} | {
        "max_position_embeddings": config["max_position_embeddings"],
        "projection_dim": config.get("projection_dim", config["hidden_size"]),
        "hidden_act": config["hidden_act"],
    }


def comfyui_load(comfy, checkpoint, folder, family: str):
    """A single file loaded the way ComfyUI's CheckpointLoaderSimple does (``load_state_dict_guess_config``), with
    the model class named rather than detected (a twin is too narrow for detection): ComfyUI's UNet config read
    from the file, its model and CLIP classes, their state-dict processing. Returns the model patcher, the CLIP
    and each part's (missing, unexpected) keys."""
    sd = comfy.utils.load_torch_file(str(checkpoint))
    prefix = "model.diffusion_model."
    unet_config = comfy.model_detection.detect_unet_config(sd, prefix)
    config = {"sd1": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family](unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, prefix)
    unet_sd = config.process_unet_state_dict({k[len(prefix) :]: sd.pop(k) for k in list(sd) if k.startswith(prefix)})
    unet_missing, unet_unexpected = model.diffusion_model.load_state_dict(unet_sd, strict=False)
    # fp32 as ComfyUI's --fp32-text-enc makes it (on a CPU it would pick fp16), so changes compare exactly.
    te_options = {"dtype": torch.float32, "clip_l_model_config": _comfy_text_config(folder, "text_encoder")}
    if family == "sdxl":
        te_options["clip_g_model_config"] = _comfy_text_config(folder, "text_encoder_2")
    clip_sd = config.process_clip_state_dict(sd)
    clip = comfy.sd.CLIP(config.clip_target(state_dict=sd), tokenizer_data=clip_sd, model_options=te_options)
    clip_missing, clip_unexpected = clip.load_sd(clip_sd, full_model=True)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    counts = {"unet": (unet_missing, unet_unexpected), "clip": (clip_missing, clip_unexpected)}
    return patcher, clip, counts


def comfyui_vae(comfy, checkpoint, folder):
    """The twin's VAE as ComfyUI's ``VAE`` (fp32), from the file's ``first_stage_model.*`` tensors: built from the
    twin's config, since ComfyUI builds SD's VAE at its real width only (the layout is SD's: ``TWIN_VAE``)."""
    config = json.loads((Path(folder) / "vae" / "config.json").read_text())
    widths = config["block_out_channels"]
    ddconfig = {
        "double_z": True, "z_channels": config["latent_channels"], "resolution": 256, "in_channels": 3,
        "out_ch": 3, "ch": widths[0], "ch_mult": [w // widths[0] for w in widths],
        "num_res_blocks": config["layers_per_block"], "attn_resolutions": [], "dropout": 0.0,
    }  # fmt: skip
    prefix = "first_stage_model."
    tensors = comfy.utils.load_torch_file(str(checkpoint))
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    params = {"embed_dim": config["latent_channels"], "ddconfig": ddconfig}
    return comfy.sd.VAE(sd=state, config={"params": params}, dtype=torch.float32)
