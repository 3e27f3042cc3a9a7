"""What ``fullrange train`` takes: one frozen dataclass per TOML table, each validated when built, so a whole
:class:`FinetuneConfig` is checked before anything heavy runs.

```toml
[model]       # path, sha256, config, allow_pickle
[data]        # path, resolution, buckets, caption_dropout, class_prompt, class_data, num_class_images, ...
[noise]       # offset, pyramid, input_perturbation, zero_terminal_snr, prediction, min_snr_gamma, ...
[adapter]     # kind (full, lora, oft), rank, block_size, coft
[train]       # steps, batch_size, grad_accum, lr, warmup, ema_decay, checkpoint_every, ... (TrainConfig)
[validation]  # prompts
[output]      # path
```
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import AdapterConfig
from ..config import ConfigError, check_choice, check_finite, check_range, from_dict, setting
from ..files import read_text
from ..prediction import PREDICTIONS
from ..train import TrainConfig, memory_preset


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the checkpoint to start from: a diffusers folder, a single file, or a hub id. ``sha256``
    checks a single file before it is read; ``config`` is a diffusers folder describing a single file's
    architecture (default: bundled SD 1.x / 2.x / XL); pickle weights load only with ``allow_pickle``."""

    path: str = setting(
        help="Stable Diffusion 1.x / 2.x / XL: a diffusers folder (a checkpoint, or fullrange's output) or a single "
        ".safetensors file."
    )
    sha256: str | None = setting(None, "Expected SHA-256 of a single-file `model.path`, checked before loading.")
    config: str | None = setting(
        None, "Diffusers folder with the configs of a single-file `model.path`.", shown="bundled SD 1.x / 2.x / XL"
    )
    allow_pickle: bool = setting(False, "Allow pickle weights (they can run code when loaded).")

    def __post_init__(self) -> None:
        digest = self.sha256
        if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest)):
            raise ConfigError("sha256", f"{digest!r}: not 64 hex digits")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the image folder, its training resolution (square crops, or aspect-ratio ``buckets``),
    ``caption_dropout``, and Dreambooth's prior preservation (``class_prompt`` with ``class_data`` or
    ``num_class_images`` to generate, weighed ``prior_loss_weight``)."""

    path: str = setting(help="Folder of images with NAME.txt captions or a metadata.jsonl.")
    resolution: int = setting(512, "Training resolution in pixels.")
    buckets: bool = setting(False, "Aspect-ratio buckets instead of square crops.")
    caption_dropout: float = setting(0.1, "Probability of training on the empty caption.")
    caption_extension: str = setting(".txt", "The extension of caption files beside the images (kohya: .caption).")
    default_caption: str | None = setting(
        None,
        "The caption of images that have none (an instance prompt).",
        shown="none; a kohya folder N_name captions its images name",
    )
    class_prompt: str | None = setting(None, "Dreambooth prior preservation: the class prompt.")
    class_data: str | None = setting(None, "Folder of class images (captions default to `data.class_prompt`).")
    num_class_images: int = setting(0, "Class images to have; missing ones are generated.")
    prior_loss_weight: float = setting(1.0, "Weight of the class images' loss.")

    def __post_init__(self) -> None:
        check_finite(self)
        check_range("resolution", self.resolution, 0, open_low=True)
        if self.resolution % 8:
            raise ConfigError("resolution", f"must be a multiple of 8 (the VAE's factor), got {self.resolution}")
        if not (self.caption_extension.startswith(".") and "/" not in self.caption_extension):
            raise ConfigError("caption_extension", f"must be like .txt or .caption, got {self.caption_extension!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError("caption_dropout", f"must lie in [0, 1), got {self.caption_dropout}")
        check_range("num_class_images", self.num_class_images, 0)
        check_range("prior_loss_weight", self.prior_loss_weight, 0)
        if (self.class_data or self.num_class_images) and not self.class_prompt:
            raise ConfigError("class_prompt", "is needed for prior preservation (with class_data or num_class_images)")
        if self.class_prompt and not self.class_data and self.num_class_images <= 0:
            raise ConfigError("class_prompt", "needs class_data DIR, or num_class_images N to generate")
        if self.buckets and self.class_prompt:
            raise ConfigError(
                "buckets", "with prior preservation is not supported: class and instance batches must share a size"
            )


@dataclass(frozen=True)
class NoiseConfig:
    """``[noise]``: the fixes. Offset noise of strength ``offset`` or pyramid noise of discount ``pyramid``
    (one of them), input perturbation γ, zero terminal SNR (with v-prediction unless ``prediction`` says
    otherwise), min-SNR-γ weighting (0: off) with a floor."""

    offset: float = setting(0.0, "Offset-noise strength, e.g. 0.1 (Guttenberg 2023).", shown="0, off")
    pyramid: float = setting(0.0, "Pyramid-noise discount, e.g. 0.8.", shown="0, off")
    input_perturbation: float = setting(0.0, "Input perturbation γ, e.g. 0.1.", shown="0, off")
    zero_terminal_snr: bool = setting(False, "Rescale the schedule to zero terminal SNR (Lin et al. Alg. 1).")
    prediction: str | None = setting(
        None,
        "epsilon, v_prediction, sample, or flow (the velocity eps - x0 on the checkpoint's own timesteps: with "
        "`noise.zero_terminal_snr`, the aligned conversion to flow, which only fullrange samples).",
        shown="the checkpoint's; v_prediction with `noise.zero_terminal_snr`",
    )
    flow_shift: float = setting(
        0.0,
        "Turn the checkpoint into a rectified-flow model with this time shift (1: none; SD3 samples 1024² with 3): "
        "it then sees the flow interpolant at t = 1000 tau, learns the velocity eps - x0 at logit-normal times, and "
        "is sampled, exported and inspected as a flow model.",
        shown="0, off",
    )
    min_snr_gamma: float = setting(0.0, "Min-SNR-γ loss weighting, e.g. 5.", shown="0, off")
    snr_weight_floor: float = setting(0.0, "Floor on the min-SNR weight (keeps the steps at SNR = 0).")

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("offset", "input_perturbation", "min_snr_gamma", "snr_weight_floor"):
            check_range(name, getattr(self, name), 0)
        if not 0 <= self.pyramid < 1:
            raise ConfigError("pyramid", f"(the discount) must lie in [0, 1), got {self.pyramid}")
        if self.offset and self.pyramid:
            raise ConfigError("offset", "and noise.pyramid are alternatives; give one")
        if self.prediction is not None:
            check_choice("prediction", self.prediction, PREDICTIONS)
        check_range("flow_shift", self.flow_shift, 0)
        if self.flow_shift and (self.zero_terminal_snr or self.prediction not in (None, "flow")):
            raise ConfigError(
                "flow_shift",
                "turns the model into rectified flow, which has zero terminal SNR and predicts the flow velocity: "
                "leave noise.zero_terminal_snr and noise.prediction unset",
            )
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ConfigError(
                "prediction",
                "epsilon with zero terminal SNR: at SNR = 0 eps says nothing about x0; use v_prediction "
                "(Lin et al. §3.2)",
            )


@dataclass(frozen=True)
class ValidationConfig:
    """``[validation]``: prompts sampled at every checkpoint."""

    prompts: tuple[str, ...] = setting((), "Prompt sampled at each checkpoint (repeatable).")


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: the run's folder (checkpoints, caches, config.json, results), and the ``family`` (sd1, sd2,
    sdxl) of the kohya LoRA file a LoRA run writes beside its folder (default: from the model)."""

    path: str = setting(help="Output folder: checkpoints, cache, config.json, results.")
    family: str | None = setting(
        None,
        "sd1, sd2 or sdxl: the layout of the files written for other tools (kohya LoRA, single file).",
        shown="from the model",
    )

    def __post_init__(self) -> None:
        if self.family is not None:
            check_choice("family", self.family, ("sd1", "sd2", "sdxl"))


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``fullrange train`` takes, table by table."""

    model: ModelConfig
    data: DataConfig
    output: OutputConfig
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


TOML_LIMIT = 2**20
"""The largest config file read (1 MiB): a config is a few hundred bytes."""


def read_toml(path: Path | str) -> dict:
    """The tables of a TOML file, as a dict; a one-line error naming the file if it cannot be read, is larger than
    :data:`TOML_LIMIT` or nests deeper than the parser can follow."""
    try:
        return tomllib.loads(read_text(path, limit=TOML_LIMIT))
    except RecursionError:
        detail = "nested too deeply"
    except ValueError as err:  # TOMLDecodeError is one, and so are read_text's errors (which name the file)
        detail = str(err).removeprefix(f"{path}: ")
    raise ValueError(f"{path}: not a readable TOML file ({detail})")


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` laid over it, table by table."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def finetune_config(tables: dict) -> FinetuneConfig:
    """A checked :class:`FinetuneConfig` from nested tables (a TOML file's, perhaps merged with overrides), laid
    over the settings of its ``train.memory`` preset if it names one."""
    card = tables.get("train", {}).get("memory") if isinstance(tables.get("train"), dict) else None
    if isinstance(card, str):
        adapter = tables.get("adapter") if isinstance(tables.get("adapter"), dict) else {}
        full = adapter.get("kind", AdapterConfig.kind) == "full"
        tables = merge({"train": memory_preset(card, full)}, tables)
    return from_dict(FinetuneConfig, tables)
