"""Stable Diffusion checkpoints: load from a local diffusers folder or single file, read the schedule they need,
build tiny ones.

Nothing is fetched from a hub: every load is ``local_files_only``. Only safetensors weights are read unless the
caller opts in to pickle files (``allow_pickle``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import schedules, single_file
from .single_file import bytes_to_unicode

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")


@dataclass
class StableDiffusion:
    """The parts of an SD checkpoint fullrange uses, and the noise schedule its scheduler config describes."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: schedules.Schedule
    prediction: str
    scheduler_config: dict
    source: Path

    def to(self, device: torch.device | str) -> StableDiffusion:
        """Move the networks (in place); returns self."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP hidden states for ``prompts`` (padded to the tokenizer's max length), as SD conditions on them."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


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
    """Load SD 1.x / 2.x from a local diffusers folder or a single checkpoint file.

    Pickle weights are refused unless ``allow_pickle``; ``sha256`` checks a single file before anything is read
    from it; ``config`` is a diffusers folder describing a single file's architecture (default: bundled SD 1.x /
    2.x configs, see ``single_file.load``).
    """
    path = Path(path)
    if path.is_file():
        return _load_single_file(path, allow_pickle=allow_pickle, sha256=sha256, config=config, dtype=dtype)
    if sha256 is not None:
        raise ValueError(f"--sha256: {path} is a folder; a checksum applies to a single checkpoint file")
    if not path.is_dir():
        raise ValueError(f"--model {path}: no such file or directory")
    return _load_folder(path, allow_pickle=allow_pickle, dtype=dtype)


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
    unet, vae, text_encoder, tokenizer, scheduler_config = single_file.load(path, config=config, dtype=dtype)
    schedule, prediction = schedule_from_config(scheduler_config)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, schedule, prediction, scheduler_config, path)


def _load_folder(path: Path, *, allow_pickle: bool, dtype) -> StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (path / "model_index.json").is_file():
        raise ValueError(f"--model {path}: no model_index.json, so not a diffusers pipeline folder")
    pipeline_class = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    if "XL" in pipeline_class:
        raise ValueError(f"--model {path}: a {pipeline_class} (SDXL); fullrange supports SD 1.x and 2.x only")
    missing = [c for c in (*COMPONENTS, "scheduler") if not (path / c).is_dir()]
    if missing:
        raise ValueError(f"--model {path}: missing component folder(s) {', '.join(missing)}")
    for component in ("unet", "vae", "text_encoder"):
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
    return StableDiffusion(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
        schedule=schedule,
        prediction=prediction,
        scheduler_config=config,
        source=path,
    )


def save_tiny_stable_diffusion(path: Path | str, *, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny SD pipeline (UNet, VAE, CLIP text encoder and a character-level tokenizer), built from
    configs with random weights, as a diffusers folder: for tests and benchmarks, no download."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
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
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
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
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
