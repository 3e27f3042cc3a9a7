"""Stable Diffusion 1.x / 2.x / XL checkpoints: load from a local diffusers folder or single file, read the
schedule they need, build tiny ones.

Nothing is fetched from a hub unless ``--model`` is a hub id that names no local path (:func:`fetch`); every
other load is ``local_files_only``. Only safetensors weights are read unless the caller opts in to pickle files
(``allow_pickle``).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import schedules, single_file
from .single_file import bytes_to_unicode

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


@dataclass
class StableDiffusion:
    """The parts of an SD checkpoint fullrange uses, and the noise schedule its scheduler config describes.
    SDXL adds a second text encoder and tokenizer (``text_encoder_2``, ``tokenizer_2``)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: schedules.Schedule
    prediction: str
    scheduler_config: dict
    source: Path
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None

    def to(self, device: torch.device | str) -> StableDiffusion:
        """Move the networks (in place); returns self."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(device)
        return self

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The UNet's text conditions for ``prompts`` (padded to the tokenizers' max length): CLIP's last hidden
        states (SD 1.x / 2.x); for SDXL both encoders' penultimate states side by side and the second's pooled
        projection (``text_embeds``), as diffusers' SDXL pipeline builds them."""

        def ids(tokenizer, encoder):
            kwargs = {"padding": "max_length", "max_length": tokenizer.model_max_length, "truncation": True}
            return tokenizer(prompts, return_tensors="pt", **kwargs).input_ids.to(encoder.device)

        if not self.is_xl:
            return {"encoder_hidden_states": self.text_encoder(ids(self.tokenizer, self.text_encoder))[0]}
        first = self.text_encoder(ids(self.tokenizer, self.text_encoder), output_hidden_states=True)
        second = self.text_encoder_2(ids(self.tokenizer_2, self.text_encoder_2), output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2])], dim=-1)
        return {"encoder_hidden_states": states, "text_embeds": second.text_embeds}

    def size_cond(
        self, original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """SDXL's size and crop conditioning (``time_ids``: original (h, w), crop top-left, target (h, w), in
        pixels); nothing for SD 1.x / 2.x."""
        if not self.is_xl:
            return {}
        return {"time_ids": torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32)}


def _flat_added_cond(module, args, kwargs):
    """SDXL's UNet takes ``text_embeds`` and ``time_ids`` inside ``added_cond_kwargs``; this forward pre-hook
    lets it take them as plain keywords like ``encoder_hidden_states``, so guidance, sharding and prior mixing
    handle one flat dict of tensors for every model."""
    added = {k: kwargs.pop(k) for k in ("text_embeds", "time_ids") if k in kwargs}
    if added:
        kwargs["added_cond_kwargs"] = added
    return args, kwargs


def flat_conditioning(unet: torch.nn.Module) -> torch.nn.Module:
    """Let an SDXL UNet (``addition_embed_type = "text_time"``) take its added conditions as keywords."""
    if unet.config.get("addition_embed_type") == "text_time":
        unet.register_forward_pre_hook(_flat_added_cond, with_kwargs=True)
    return unet


def schedule_from_config(config: dict) -> tuple[schedules.Schedule, str]:
    """The schedule and prediction type of a diffusers scheduler config (``beta_schedule``, betas, T,
    ``rescale_betas_zero_snr``, ``prediction_type``)."""
    name = config.get("beta_schedule", "linear")
    T = int(config.get("num_train_timesteps", 1000))
    if name == "scaled_linear":
        sched = schedules.scaled_linear(T, config.get("beta_start", 0.00085), config.get("beta_end", 0.012))
    elif name == "linear":
        sched = schedules.linear(T, config.get("beta_start", 1e-4), config.get("beta_end", 0.02))
    elif name == "squaredcos_cap_v2":
        sched = schedules.cosine(T)
    else:
        raise ValueError(f"scheduler config: unsupported beta_schedule {name!r}")
    if config.get("rescale_betas_zero_snr"):
        sched = schedules.rescale_zero_terminal_snr(sched)
    prediction = config.get("prediction_type", "epsilon")
    return sched, prediction


def load_stable_diffusion(
    path: Path | str,
    *,
    allow_pickle: bool = False,
    sha256: str | None = None,
    config: Path | str | None = None,
    dtype=torch.float32,
) -> StableDiffusion:
    """Load SD 1.x / 2.x / XL (base) from a local diffusers folder or a single checkpoint file, or, only when
    ``path`` is no local path but a hub id (``owner/name``), from the Hugging Face Hub (:func:`fetch`).

    Pickle weights are refused unless ``allow_pickle``; ``sha256`` checks a single file before anything is read
    from it; ``config`` is a diffusers folder describing a single file's architecture (default: bundled SD 1.x /
    2.x / XL configs, see ``single_file.load``).
    """
    text, path = str(path), Path(path)  # the text as given: Path("./a/b") would read as the hub id "a/b"
    if path.is_file():
        return _load_single_file(path, allow_pickle=allow_pickle, sha256=sha256, config=config, dtype=dtype)
    if sha256 is not None:
        raise ValueError(f"--sha256: {path} is a folder; a checksum applies to a single checkpoint file")
    if not path.is_dir():
        if not HUB_ID.fullmatch(text):
            raise ValueError(f"--model {text}: no such file or directory")
        path = fetch(text)
    return _load_folder(path, allow_pickle=allow_pickle, dtype=dtype)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def fetch(repo_id: str) -> Path:
    """Download what fullrange uses of a diffusers repository on the Hugging Face Hub into the hub cache: the
    configs, tokenizers and safetensors weights of ``HUB_PARTS``; no fp16 / non-EMA variants, no pickle files,
    no safety checker. Called only for a ``--model`` that is a hub id and no local path."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", *(f"{part}/*" for part in HUB_PARTS)]
    ignore = [*(f"*{suffix}" for suffix in PICKLE_SUFFIXES), "*fp16*", "*non_ema*", "*.msgpack", "*.onnx*", "*.h5"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore))
    except Exception as err:  # network, authentication, offline mode, unknown repository: all one message
        raise ValueError(
            f"--model {repo_id}: no such local path, and fetching it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from None


def _load_single_file(path: Path, *, allow_pickle: bool, sha256: str | None, config, dtype) -> StableDiffusion:
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(
            f"--model {path}: a pickle checkpoint, which can run code when loaded; convert it to safetensors or "
            "pass --allow-pickle if you trust the source"
        )
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ValueError(f"--model {path}: not a checkpoint (.safetensors, or a pickle file with --allow-pickle)")
    if sha256 is not None:
        single_file.verify_sha256(path, sha256)
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise ValueError(f"--model-config {config}: no model_index.json, so not a diffusers folder")
    parts, scheduler_config = single_file.load(path, config=config, dtype=dtype)
    schedule, prediction = schedule_from_config(scheduler_config)
    flat_conditioning(parts["unet"])
    return StableDiffusion(
        schedule=schedule, prediction=prediction, scheduler_config=scheduler_config, source=path, **parts
    )


def _load_folder(path: Path, *, allow_pickle: bool, dtype) -> StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not (path / "model_index.json").is_file():
        raise ValueError(f"--model {path}: no model_index.json, so not a diffusers pipeline folder")
    pipeline_class = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    xl = pipeline_class == "StableDiffusionXLPipeline"
    if not xl and pipeline_class != "StableDiffusionPipeline":
        raise ValueError(
            f"--model {path}: a {pipeline_class or 'pipeline of unknown class'}; fullrange loads "
            "StableDiffusionPipeline (SD 1.x / 2.x) and StableDiffusionXLPipeline (SDXL base)"
        )
    networks = ("unet", "vae", "text_encoder", *(("text_encoder_2",) if xl else ()))
    tokenizers = ("tokenizer", *(("tokenizer_2",) if xl else ()))
    missing = [c for c in (*networks, *tokenizers, "scheduler") if not (path / c).is_dir()]
    if missing:
        raise ValueError(f"--model {path}: missing component folder(s) {', '.join(missing)}")
    for component in networks:
        files = [p for p in (path / component).iterdir() if p.is_file()]
        has_safetensors = any(p.suffix == ".safetensors" for p in files)
        pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if not has_safetensors and pickles and not allow_pickle:
            raise ValueError(
                f"--model {path / component}: weights are pickle files ({', '.join(pickles)}), which can run code "
                "when loaded; convert them to safetensors or pass --allow-pickle if you trust the source"
            )
        if not has_safetensors and not pickles:
            raise ValueError(f"--model {path / component}: no weight file")
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    schedule, prediction = schedule_from_config(config)
    kwargs = {"local_files_only": True, "use_safetensors": not allow_pickle, "torch_dtype": dtype}
    second = {}
    if xl:
        second = {
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kwargs),
            "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True),
        }
    return StableDiffusion(
        unet=flat_conditioning(UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
        schedule=schedule,
        prediction=prediction,
        scheduler_config=config,
        source=path,
        **second,
    )


def save_tiny_stable_diffusion(path: Path | str, *, seed: int = 0, sample_size: int = 8, xl: bool = False) -> Path:
    """Write a tiny SD pipeline (UNet, VAE, CLIP text encoder and a character-level tokenizer; with ``xl`` an
    SDXL-shaped one: two text encoders, size conditioning, several transformer layers per block), built from
    configs with random weights, as a diffusers folder: for tests and benchmarks, no download."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
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
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    text_encoder = CLIPTextModel(text_config)
    # SDXL's second encoder is wider than the first (1280 vs 768), which is how loaders tell them apart.
    text_config_2 = CLIPTextConfig(**{**text_config.to_dict(), "hidden_size": 48, "intermediate_size": 96})
    if xl:
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
            projection_class_embeddings_input_dim=6 * 8 + 32,
            norm_num_groups=8,
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
            attention_head_dim=8,
        )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * sample_size,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizers[0], "unet": unet, "scheduler": scheduler}
    if xl:
        second = CLIPTextModelWithProjection(text_config_2)
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=second, tokenizer_2=tokenizers[1])
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
