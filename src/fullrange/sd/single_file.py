"""Reading single-file Stable Diffusion checkpoints, the original LDM layout that A1111, ComfyUI and kohya use.

Verify (SHA-256), recognise the family from the header, load offline with bundled SD 1.x / 2.x / XL configs and CLIP
tokenizer (diffusers' loader would fetch them from a hub), and read the markers of prediction type and zero terminal
SNR that diffusers ignores. Errors name the file; :mod:`fullrange.sd.load` says which option it came from.
"""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

from ..files import sha256
from . import markers
from .ldm import OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, XL_OPENCLIP_PREFIX
from .tokenizer import clip_tokenizer_files


@contextlib.contextmanager
def _bars_as_the_hub_says():
    """diffusers' loading bar off while the hub's switch (``HF_HUB_DISABLE_PROGRESS_BARS``, which the CLI sets) says
    so, restored after: diffusers reads that switch for downloads, not for its own bar."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    shown = diffusers_logging.is_progress_bar_enabled()
    if are_progress_bars_disabled():
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()


def verify_sha256(path: Path | str, expected: str) -> None:
    """Raise ``ValueError`` unless the file's SHA-256 is ``expected`` (64 hex digits, any case)."""
    actual = sha256(path)
    if actual != expected.strip().lower():
        raise ValueError(f"{path}: SHA-256 is {actual}, not the expected {expected}; refusing to load it")


def read_header(path: Path | str) -> dict:
    """The JSON header of a safetensors file (tensor names, shapes, ``__metadata__``), without reading weights."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(path.stat().st_size, 100 * 2**20):
                raise ValueError
            return json.loads(f.read(length))
        except (struct.error, ValueError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None


def _pickle_header(path: Path) -> dict:
    """Tensor names and shapes of a pickle checkpoint (``.ckpt``; the caller has allowed pickle), read with
    ``torch.load(weights_only=True)`` through diffusers, as a safetensors header would give them. A pickle has
    no header, so the file is read twice (here, then by ``from_single_file``, which takes only a path)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        state = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as err:  # torch.load raises many kinds for a bad file
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    return {k: {"shape": list(v.shape)} for k, v in state.items() if isinstance(v, torch.Tensor)}


def family(header: dict, path: Path | str = "checkpoint") -> str:
    """``sd1`` (CLIP ViT-L text encoder), ``sd2`` (OpenCLIP ViT-H) or ``sdxl`` (both, CLIP ViT-L and OpenCLIP
    ViT-bigG), from tensor names and shapes."""
    keys = header.keys()
    xl = any(k.startswith(XL_OPENCLIP_PREFIX) for k in keys)
    if not xl and any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError(f"{path}: an SDXL refiner checkpoint; fullrange supports SDXL base, SD 1.x and 2.x")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ValueError(f"{path}: no UNet weights ({UNET_PREFIX}*), not a Stable Diffusion checkpoint")
    conv_in = header.get(UNET_PREFIX + "input_blocks.0.0.weight", {}).get("shape", [0, 4])
    if conv_in[1] != 4:
        raise ValueError(f"{path}: UNet takes {conv_in[1]} input channels (inpainting?); 4 are supported")
    text_prefix = "conditioner." if xl else "cond_stage_model."
    missing = [
        name
        for name, prefix in (("VAE", VAE_PREFIX), ("text encoder", text_prefix))
        if not any(k.startswith(prefix) for k in keys)
    ]
    if missing:
        raise ValueError(f"{path}: no {' and no '.join(missing)} weights in the file (a UNet-only file?)")
    if xl:
        return "sdxl"
    return "sd2" if any(k.startswith(OPENCLIP_PREFIX) for k in keys) else "sd1"


def write_config_folder(name: str, folder: Path) -> Path:
    """A diffusers folder holding only the configs (and tokenizers) of family ``name``: what diffusers'
    ``from_single_file`` needs besides the weights."""
    configs = json.loads(resources.files("fullrange").joinpath(f"configs/{name}.json").read_text())
    index = {
        "_class_name": "StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if name == "sdxl":
        index |= {
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    for component, config in configs.items():
        (folder / component).mkdir(parents=True, exist_ok=True)
        if component.startswith("tokenizer"):
            clip_tokenizer_files(folder / component, config)
        else:
            file = "scheduler_config.json" if component == "scheduler" else "config.json"
            (folder / component / file).write_text(json.dumps(config))
    return folder


def load(path: Path | str, *, config: Path | str | None = None, dtype=torch.float32) -> tuple[dict, dict]:
    """The networks and tokenizers (as :class:`~fullrange.sd.model.StableDiffusion` names them) and the scheduler
    config of a single checkpoint file (``.safetensors``, or a pickle file the caller has allowed), offline.

    ``config`` is a diffusers folder describing the architecture; by default the bundled SD 1.x, 2.x or SDXL
    configs, picked from the weights (SD 2.x files are taken as 768-v, v-prediction, as diffusers does). The
    file's markers in every convention (:mod:`fullrange.sd.markers`) then set the prediction type and zero terminal
    SNR (trailing steps); where they disagree, a warning says so.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    header = read_header(path) if path.suffix == ".safetensors" else _pickle_header(path)
    name = family(header, path)
    pipeline_class = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(config) if config is not None else write_config_folder(name, Path(tmp))
        cast = None if dtype == torch.float32 else dtype  # None: float32 without diffusers' warning about casting
        try:
            with _bars_as_the_hub_says():
                pipe = pipeline_class.from_single_file(
                    str(path), config=str(folder), local_files_only=True, torch_dtype=cast
                )
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            first = str(err).split(". ")[0].strip()
            raise ValueError(
                f"{path}: the weights do not fit the {'given' if config else 'bundled ' + name} config "
                f"({first}); give the architecture's diffusers folder as model.config"
            ) from None
    networks = ("unet", "vae", "text_encoder", *(("text_encoder_2",) if name == "sdxl" else ()))
    empty = [
        f"{component}.{key}"
        for component in networks
        for key, tensor in getattr(pipe, component).state_dict().items()
        if tensor.is_meta
    ]
    if empty:
        raise ValueError(f"{path}: {len(empty)} tensors missing from the file, e.g. {empty[0]}")
    parts = {k: getattr(pipe, k) for k in (*networks, "tokenizer", *(("tokenizer_2",) if name == "sdxl" else ()))}
    scheduler_config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    decision = markers.decide(markers.from_header(header, str(path)))
    if decision.conflicts:
        warnings.warn(
            f"{path}: its markers disagree ({'; '.join(decision.conflicts)}); sampling it as {decision.prediction}, "
            f"zero terminal SNR {bool(decision.zero_terminal_snr)} (fullrange inspect probes it)",
            stacklevel=2,
        )
    if decision.prediction == "flow":  # a rectified-flow UNet (fullrange's export): its shift in the metadata
        shift = float((header.get("__metadata__") or {}).get("fullrange.flow_shift", 1.0))
        return parts, {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}
    if decision.prediction is not None:
        scheduler_config["prediction_type"] = decision.prediction
    if decision.zero_terminal_snr:
        scheduler_config |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 0}
    return parts, scheduler_config
