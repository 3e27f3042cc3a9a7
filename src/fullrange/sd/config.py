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

from ..adapters import ADAPTERS
from ..config import ConfigError, check_choice, check_finite, check_range, from_dict
from ..prediction import PREDICTIONS
from ..train import TrainConfig


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the checkpoint to start from: a diffusers folder, a single file, or a hub id. ``sha256``
    checks a single file before it is read; ``config`` is a diffusers folder describing a single file's
    architecture (default: bundled SD 1.x / 2.x / XL); pickle weights load only with ``allow_pickle``."""

    path: str
    sha256: str | None = None
    config: str | None = None
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        digest = self.sha256
        if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest)):
            raise ConfigError("sha256", f"{digest!r}: not 64 hex digits")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the image folder, its training resolution (square crops, or aspect-ratio ``buckets``),
    ``caption_dropout``, and Dreambooth's prior preservation (``class_prompt`` with ``class_data`` or
    ``num_class_images`` to generate, weighed ``prior_loss_weight``)."""

    path: str
    resolution: int = 512
    buckets: bool = False
    caption_dropout: float = 0.1
    class_prompt: str | None = None
    class_data: str | None = None
    num_class_images: int = 0
    prior_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check_finite(self)
        check_range("resolution", self.resolution, 0, open_low=True)
        if self.resolution % 8:
            raise ConfigError("resolution", f"must be a multiple of 8 (the VAE's factor), got {self.resolution}")
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

    offset: float = 0.0
    pyramid: float = 0.0
    input_perturbation: float = 0.0
    zero_terminal_snr: bool = False
    prediction: str | None = None
    min_snr_gamma: float = 0.0
    snr_weight_floor: float = 0.0

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
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ConfigError(
                "prediction",
                "epsilon with zero terminal SNR: at SNR = 0 eps says nothing about x0; use v_prediction "
                "(Lin et al. §3.2)",
            )


@dataclass(frozen=True)
class AdapterConfig:
    """``[adapter]``: what is trained: the whole UNet (``full``), LoRA of ``rank``, or OFT of ``block_size``
    (``coft``: constrained); ``text_encoder``: LoRA of the same rank on the text encoder(s) too."""

    kind: str = "lora"
    rank: int = 4
    block_size: int = 4
    coft: bool = False
    text_encoder: bool = False

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, ADAPTERS)
        check_range("rank", self.rank, 0, open_low=True)
        check_range("block_size", self.block_size, 0, open_low=True)
        if self.text_encoder and self.kind != "lora":
            raise ConfigError("text_encoder", f"is a LoRA on the text encoders: it needs kind lora, not {self.kind}")


@dataclass(frozen=True)
class ValidationConfig:
    """``[validation]``: prompts sampled at every checkpoint."""

    prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: the run's folder (checkpoints, caches, config.json, results), and the ``family`` (sd1, sd2,
    sdxl) of the kohya LoRA file a LoRA run writes beside its folder (default: from the model)."""

    path: str
    family: str | None = None

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


def read_toml(path: Path | str) -> dict:
    """The tables of a TOML file, as a dict; a one-line error naming the file if it cannot be read."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: not a readable TOML file ({err})") from None


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` laid over it, table by table."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def finetune_config(tables: dict) -> FinetuneConfig:
    """A checked :class:`FinetuneConfig` from nested tables (a TOML file's, perhaps merged with overrides)."""
    return from_dict(FinetuneConfig, tables)
