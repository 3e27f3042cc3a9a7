"""Load Stable Diffusion 1.x / 2.x / XL (base) from a local diffusers folder, a single checkpoint file or, only when
the path names nothing local but looks like a hub id, from the Hugging Face Hub; and load adapters onto it.

Every other load is ``local_files_only``. Only safetensors weights are read unless the caller opts in to pickle
files (``allow_pickle``). Errors name the option they come from in config terms (``model.path``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ..adapters import adapter_spec, kind_of
from ..config import ConfigError
from ..files import read_json
from ..scheduler_config import spec_from_config
from . import single_file
from .config import ModelConfig
from .model import StableDiffusion

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def load_stable_diffusion(
    model: ModelConfig | Path | str,
    *,
    dtype=torch.float32,
    prediction: str | None = None,
    zero_terminal_snr: bool | None = None,
) -> StableDiffusion:
    """The checkpoint a ``[model]`` table (or just a path) names: a diffusers folder, a single file (checked
    against ``sha256`` first if given; architecture from the bundled SD 1.x / 2.x / XL configs unless ``config``
    names a diffusers folder), or a hub id that names no local path (:func:`fetch`). ``prediction`` and
    ``zero_terminal_snr`` (not ``None``) override what the checkpoint says, before its sampling spec is made: a file
    whose markers cannot both hold (zero terminal SNR with epsilon) loads when they settle it."""
    if not isinstance(model, ModelConfig):
        model = ModelConfig(str(model))
    overrides = {"prediction_type": prediction, "rescale_betas_zero_snr": zero_terminal_snr}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    text, path = model.path, Path(model.path)  # the text as given: Path("./a/b") would read as the hub id "a/b"
    if path.is_file():
        return _load_single_file(path, model, dtype, overrides)
    if model.sha256 is not None:
        raise ConfigError("model.sha256", f"applies to a single checkpoint file, and {path} is a folder")
    if not path.is_dir():
        if not HUB_ID.fullmatch(text):
            raise ConfigError("model.path", f"{text}: no such file or directory")
        path = fetch(text)
    return _load_folder(path, model.allow_pickle, dtype, overrides)


def inference_device() -> torch.device:
    """Where fullrange samples: this process's device as accelerate sees it (its GPU under a launcher, the first
    CUDA device, else the CPU), the same the training loop uses."""
    from ..train import process_state

    return process_state().device


def load_controlnet(path: Path | str, model: StableDiffusion, allow_pickle: bool = False) -> torch.nn.Module:
    """A diffusers ControlNet folder, frozen, on ``model``'s UNet device and dtype (safetensors only unless pickle
    is allowed); errors name ``controlnet``."""
    from diffusers import ControlNetModel

    path = Path(path)
    if not path.is_dir():
        raise ConfigError("controlnet", f"{path}: not a folder (a diffusers ControlNet has config.json and weights)")
    try:
        controlnet = ControlNetModel.from_pretrained(path, use_safetensors=not allow_pickle)
    except (OSError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError("controlnet", f"{path}: not a loadable ControlNet ({detail})") from None
    mine, theirs = model.unet.config, controlnet.config
    for key in ("cross_attention_dim", "addition_embed_type", "block_out_channels"):
        if getattr(mine, key, None) != getattr(theirs, key, None):
            raise ConfigError(
                "controlnet",
                f"{path}: made for another model ({key} {getattr(theirs, key, None)}, this model's UNet has "
                f"{getattr(mine, key, None)}: an SDXL ControlNet on SD 1.x / 2.x, or the reverse?)",
            )
    stride = 2 ** (len(theirs.conditioning_embedding_out_channels) - 1)  # pixels per latent of its condition image
    if stride != model.vae_scale_factor:
        raise ConfigError(
            "controlnet",
            f"{path}: reads its condition image at 1/{stride} of the pixels, this model's latents are 1/"
            f"{model.vae_scale_factor}",
        )
    return controlnet.to(model.unet.device, model.unet.dtype).eval().requires_grad_(False)


def fetch(repo_id: str) -> Path:
    """Download what fullrange uses of a diffusers repository on the Hugging Face Hub into the hub cache: the
    configs, tokenizers and safetensors weights of ``HUB_PARTS``; no fp16 / non-EMA variants, no pickle files,
    no safety checker. Called only for a model path that is a hub id and no local path."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", *(f"{part}/*" for part in HUB_PARTS)]
    ignore = [*(f"*{suffix}" for suffix in PICKLE_SUFFIXES), "*fp16*", "*non_ema*", "*.msgpack", "*.onnx*", "*.h5"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore))
    except Exception as err:  # network, authentication, offline mode, unknown repository: all one message
        detail = str(err).splitlines()[0] if str(err) else "no detail"
        raise ConfigError(
            "model.path",
            f"{repo_id}: no such local path, and fetching it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {detail})",
        ) from None


def _load_single_file(path: Path, model: ModelConfig, dtype, overrides: dict) -> StableDiffusion:
    if path.suffix in PICKLE_SUFFIXES and not model.allow_pickle:
        raise ConfigError(
            "model.path",
            f"{path}: a pickle checkpoint, which can run code when loaded; convert it to safetensors or allow it "
            "with model.allow_pickle if you trust the source",
        )
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ConfigError(
            "model.path", f"{path}: not a checkpoint (.safetensors, or a pickle file with model.allow_pickle)"
        )
    if model.sha256 is not None:
        try:
            single_file.verify_sha256(path, model.sha256)
        except ValueError as err:
            raise ConfigError("model.sha256", str(err)) from None
    if model.config is not None and not (Path(model.config) / "model_index.json").is_file():
        raise ConfigError("model.config", f"{model.config}: no model_index.json, so not a diffusers folder")
    try:
        parts, scheduler_config = single_file.load(path, config=model.config, dtype=dtype)  # errors name the file
    except ValueError as err:
        raise ConfigError("model.path", str(err)) from None
    try:
        spec = spec_from_config(scheduler_config | overrides)
    except ValueError as err:
        raise ConfigError("model.path", f"{path}: {err}") from None
    return StableDiffusion(spec=spec, source=path, **parts)


def _load_folder(path: Path, allow_pickle: bool, dtype, overrides: dict) -> StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def bad(message: str) -> ConfigError:
        return ConfigError("model.path", f"{path}: {message}")

    if not (path / "model_index.json").is_file():
        raise bad("no model_index.json, so not a diffusers pipeline folder")
    index = _json(path / "model_index.json", "model.path")
    pipeline_class = index.get("_class_name", "") if isinstance(index, dict) else ""
    xl = pipeline_class == "StableDiffusionXLPipeline"
    if not xl and pipeline_class != "StableDiffusionPipeline":
        raise bad(
            f"a {pipeline_class or 'pipeline of unknown class'}; fullrange loads StableDiffusionPipeline "
            "(SD 1.x / 2.x) and StableDiffusionXLPipeline (SDXL base)"
        )
    networks = ("unet", "vae", "text_encoder", *(("text_encoder_2",) if xl else ()))
    tokenizers = ("tokenizer", *(("tokenizer_2",) if xl else ()))
    missing = [c for c in (*networks, *tokenizers, "scheduler") if not (path / c).is_dir()]
    if missing:
        raise bad(f"missing component folder(s) {', '.join(missing)}")
    for component in networks:
        files = [p for p in (path / component).iterdir() if p.is_file()]
        has_safetensors = any(p.suffix == ".safetensors" for p in files)
        pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if not has_safetensors and pickles and not allow_pickle:
            raise bad(
                f"{component} weights are pickle files ({', '.join(pickles)}), which can run code when loaded; "
                "convert them to safetensors or allow them with model.allow_pickle if you trust the source"
            )
        if not has_safetensors and not pickles:
            raise bad(f"{component}: no weight file")
    scheduler_config = _json(path / "scheduler" / "scheduler_config.json", "model.path")
    try:
        spec = spec_from_config(scheduler_config | overrides)
    except (ValueError, TypeError) as err:
        raise bad(f"scheduler: {err}") from None
    # use_safetensors=None takes safetensors where a component has them and pickle files elsewhere (allowed here).
    kwargs = {"local_files_only": True, "use_safetensors": None if allow_pickle else True, "torch_dtype": dtype}
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    classes |= {"text_encoder_2": CLIPTextModelWithProjection} if xl else {}
    parts = {
        name: _component(path, name, lambda c=cls, n=name: c.from_pretrained(path, subfolder=n, **kwargs))
        for name, cls in classes.items()
    }
    for name, encoder in zip(tokenizers, ("text_encoder", "text_encoder_2"), strict=False):
        if not any((path / name / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise bad(f"{name}: no vocabulary (vocab.json or tokenizer.json)")
        tokenizer = _component(
            path, name, lambda n=name: CLIPTokenizer.from_pretrained(path, subfolder=n, local_files_only=True)
        )
        positions = parts[encoder].config.max_position_embeddings
        if tokenizer.model_max_length > positions:
            raise bad(f"{name}: pads prompts to {tokenizer.model_max_length} tokens; {encoder} takes {positions}")
        parts[name] = tokenizer
    return StableDiffusion(spec=spec, source=path, **parts)


def _component(path: Path, name: str, load):
    """``load()``, whatever a library raises for a broken component folder turned into one line naming it."""
    try:
        return load()
    except Exception as err:  # diffusers, transformers and safetensors raise many kinds for a broken folder
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError("model.path", f"{path}: {name} cannot be loaded ({type(err).__name__}: {detail})") from None


def _json(path: Path, field: str):
    try:
        return read_json(path)
    except ValueError as err:
        raise ConfigError(field, str(err)) from None


def load_adapter(model: StableDiffusion, path: Path | str, strength: float = 1.0) -> StableDiffusion:
    """``model`` with an adapter added at ``strength``: a LoRA folder (diffusers' ``save_lora_weights`` format, UNet
    and text encoders), a LoRA file (``.safetensors`` in diffusers', kohya's or peft's names, as diffusers' loader
    reads them), or an OFT folder written by ``fullrange train`` (:func:`fullrange.adapters.kind_of`). How the
    result must be sampled (prediction type, zero terminal SNR) comes from a scheduler config beside a folder's
    weights, or from a file's metadata (kohya's ``ss_*``, ``modelspec.*``); at strength 0 the model is the base and
    keeps the base's spec. An adapter that changes the prediction type or the terminal SNR has no meaning at another
    strength (it mixes two targets): that is warned about.

    The networks are shared, not copied: the adapter's layers are added to them in place, so ``model`` itself
    should not be sampled afterwards.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError("adapter", f"{path}: no such file or directory")
    if not math.isfinite(strength):
        raise ConfigError("adapter_strength", f"must be a finite number, got {strength}")
    kind = kind_of(path)
    try:
        kind.load(model, path, strength)
    except ConfigError:
        raise
    except Exception as err:  # shape mismatches, missing keys, damaged files: peft, diffusers, safetensors raise many
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError("adapter", f"{path}: does not fit this model ({type(err).__name__}: {detail})") from None
    spec = adapter_spec(path, model.spec)
    ztsnr = spec.schedule.zero_terminal_snr
    if strength == 0:
        return model
    if strength != 1 and (spec.prediction != model.spec.prediction or ztsnr != model.spec.schedule.zero_terminal_snr):
        warnings.warn(
            f"{path} was trained as {spec.prediction}{' with zero terminal SNR' if ztsnr else ''} on a "
            f"{model.spec.prediction} base: at strength {strength:g} it mixes two prediction types, and no sampling "
            "setting is right for the result; use strength 1 (or 0 for the base)",
            stacklevel=2,
        )
    return replace(model, spec=spec)
