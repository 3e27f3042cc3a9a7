"""What a fine-tune trains: the whole UNet, LoRA (Hu et al. 2021) or OFT (Qiu et al. 2023). One record per kind
(:data:`ADAPTERS`) says how to attach it for training, save, load, merge, describe and export it; all peft calls
live in this module.

OFT is applied only to Linear and 1×1 convolution layers. peft's OFT on a k×k convolution rotates the
unfolded patches and folds the overlapping ones back by summing, which is not an orthogonal map of the
weights: an identity-initialised adapter already changes the output, and merged weights differ from the
unmerged adapter. fullrange refuses such targets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from .config import ConfigError, check_choice, check_range, setting

if TYPE_CHECKING:
    from .sampling import SamplingSpec
    from .sd.model import StableDiffusion

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention, as kohya and diffusers train it
OFT_TARGETS = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "conv_shortcut")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name in a LoRA folder
OFT_FILES = ("adapter.json", "adapter_model.safetensors")  # an OFT folder: its shape and its weights


@dataclass(frozen=True)
class AdapterConfig:
    """``[adapter]``: what is trained: the whole UNet (``full``), LoRA of ``rank``, or OFT of ``block_size``
    (``coft``: constrained); ``text_encoder``: LoRA of the same rank on the text encoder(s) too."""

    kind: str = setting("lora", "full, lora or oft.")
    rank: int = setting(4, "LoRA rank.")
    block_size: int = setting(4, "OFT block size.")
    coft: bool = setting(False, "Constrained OFT: ||R - I|| <= eps.")
    text_encoder: bool = setting(False, "Train a LoRA on the text encoder(s) too (with `adapter.kind` lora).")

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, tuple(ADAPTERS))
        check_range("rank", self.rank, 0, open_low=True)
        check_range("block_size", self.block_size, 0, open_low=True)
        if self.text_encoder and self.kind != "lora":
            raise ConfigError("text_encoder", f"is a LoRA on the text encoders: it needs kind lora, not {self.kind}")


def _matching(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and name.endswith(suffixes)
    ]


def add_lora(
    model: torch.nn.Module, rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] = LORA_TARGETS
) -> int:
    """Freeze ``model`` (a diffusers UNet, or a transformers text encoder with ``TEXT_LORA_TARGETS``) and add LoRA
    (B = 0 at init, so outputs are unchanged) to the matching layers, 3×3 convolutions included; returns the number
    of trainable parameters."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    names = [name for name, _ in _matching(model, targets)]
    if not names:
        raise ValueError(f"no layer of the model matches the LoRA targets {targets}")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=names)
    if hasattr(model, "set_adapters"):  # a diffusers model: its own bookkeeping, which its savers and loaders use
        model.add_adapter(config)
    else:  # peft's injection, as transformers' add_adapter does (which asks for a newer peft than it needs)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name="default")
    return trainable(model)


def add_oft(
    unet: torch.nn.Module,
    block_size: int = 4,
    coft: bool = False,
    eps: float = 6e-5,
    targets: tuple[str, ...] = OFT_TARGETS,
) -> int:
    """Freeze ``unet`` and add OFT (``W' = R W``, R block-diagonal orthogonal by the Cayley transform, identity
    at init) to the matching Linear and 1×1 conv layers; ``coft`` keeps ``||R - I|| <= eps``."""
    from peft import OFTConfig

    if block_size <= 0:
        raise ValueError(f"OFT block size must be positive, got {block_size}")
    layers = _matching(unet, targets)
    wide = [name for name, m in layers if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    if wide:
        raise ValueError(
            f"OFT on k×k convolutions is not orthogonal (overlapping patches are summed); "
            f"refusing {wide[0]}: target Linear or 1×1 layers"
        )
    names = [name for name, m in layers if _in_features(m) % block_size == 0]
    if not names:
        raise ValueError(f"no Linear or 1×1 layer has an input size divisible by the OFT block size {block_size}")
    unet.requires_grad_(False)
    unet.add_adapter(
        OFTConfig(
            r=0,
            oft_block_size=block_size,
            target_modules=names,
            coft=coft,
            eps=eps,
            init_weights=True,
            use_cayley_neumann=False,
        )
    )
    return trainable(unet)


def _in_features(module: torch.nn.Module) -> int:
    return module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels


def trainable(model: torch.nn.Module) -> int:
    """The number of ``model``'s parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapted(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` carries an adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own weights (peft names), for saving."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def with_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's tensors named as CLIP names them, under ``text_model.``: transformers 5's
    ``CLIPTextModel`` drops that level, and ComfyUI, A1111 and kohya find its LoRA only under it."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every adapter layer of ``model`` into the layer it adapts and put that plain layer back in its place,
    in place (no copy of the model): afterwards ``model`` has its original architecture and names. Returns it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted_layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted_layers:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # diffusers' record of its adapters, as its unload_lora clears it
        del model.peft_config
        model._hf_peft_config_loaded = None
    return model


def merge_all(model: StableDiffusion) -> None:
    """Merge every adapter of ``model``'s networks (UNet and text encoders) into their weights, in place."""
    for network in (model.unet, *model.text_encoders.values()):
        merge_adapters(network)


PEFT_NAMES = ("base_layer", "lora_A", "lora_B", "lora_embedding_", "oft_r", "oft_R", "hada_", "lokr_")
"""Parts of tensor names that only an unmerged adapter has (peft's layers)."""


def refuse_unmerged(names) -> None:
    """A ``ValueError`` if a tensor name is an adapter's (a checkpoint must hold plain, merged weights)."""
    found = next((n for n in names if any(part in n for part in PEFT_NAMES)), None)
    if found is not None:
        raise ValueError(f"an adapter is not merged into the weights ({found}); merge it before writing a checkpoint")


def merged_differences(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Merge every adapter layer of ``model`` into its base layer, in place, one layer at a time; returns each adapted
    layer's weight change (merged − base) by module name, on the CPU."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    diffs = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            before = base.weight.detach().clone()
            module.merge()
            diffs[name] = (base.weight.detach() - before).cpu().contiguous()
    return diffs


class Full:
    """The whole UNet is trained; its weights are the training checkpoint's, and the run leaves a pipeline."""

    name: ClassVar[str] = "full"
    pipeline: ClassVar[bool] = True  # what the run leaves for other tools is a whole pipeline
    tool_file: ClassVar[tuple[str, str] | None] = None

    def describe(self, config: AdapterConfig) -> str:
        return "the whole UNet"

    def attach(self, model: StableDiffusion, config: AdapterConfig, seed: int) -> int:
        """Make the UNet trainable; returns its number of parameters."""
        model.unet.requires_grad_(True)
        return trainable(model.unet)

    def save(self, model: StableDiffusion, config: AdapterConfig, folder: Path) -> dict[str, Path]:
        """Nothing beside the training checkpoint, which holds the weights."""
        return {}

    def merge(self, model: StableDiffusion) -> None:
        """Nothing to merge."""


class LoRA:
    """LoRA on the UNet (and with ``text_encoder`` on the text encoders), saved as diffusers saves it (peft's
    ``lora_A`` / ``lora_B`` names) with the scheduler config that says how to sample the result; exported as a kohya
    file for A1111 and ComfyUI."""

    name: ClassVar[str] = "lora"
    pipeline: ClassVar[bool] = False
    tool_file: ClassVar[tuple[str, str] | None] = ("kohya", "lora_kohya.safetensors")
    """What a run writes beside the adapter's folder for A1111 and ComfyUI (:meth:`export`): its kind and name."""

    def describe(self, config: AdapterConfig) -> str:
        return f"a LoRA of rank {config.rank}"

    def attach(self, model: StableDiffusion, config: AdapterConfig, seed: int) -> int:
        """Add LoRA of ``config.rank`` to the UNet (and the text encoders), its random init drawn from ``seed`` (the
        same in every process and run); returns the number of trainable parameters."""
        from .models import seeded

        with seeded(seed):
            count = add_lora(model.unet, rank=config.rank)
            for encoder in model.text_encoders.values() if config.text_encoder else ():
                count += add_lora(encoder, rank=config.rank, targets=TEXT_LORA_TARGETS)
        return count

    def save(self, model: StableDiffusion, config: AdapterConfig, folder: Path) -> dict[str, Path]:
        """``folder/lora``: the weights as diffusers' ``save_lora_weights`` writes them and the scheduler config.
        Not peft's older "lora.down" names: converted, attention layers get them and ResNet layers keep lora_A,
        and diffusers' loader, which tells the format from the first key, then skips the attention ones."""
        from .files import staged_folder
        from .scheduler_config import ddim_scheduler
        from .sd.model import pipeline_class

        layers = {"unet_lora_layers": adapter_state_dict(model.unet)}
        for name, encoder in model.text_encoders.items():
            if adapted(encoder):
                layers[f"{name}_lora_layers"] = with_text_model(adapter_state_dict(encoder))
        with staged_folder(folder / "lora") as tmp:  # diffusers' savers open their files by name
            pipeline_class(model).save_lora_weights(tmp, **layers, safe_serialization=True)
            ddim_scheduler(model.spec).save_config(tmp)
        return {"lora": folder / "lora"}

    def export(self, path: Path, saved: Path, base: StableDiffusion, family: str | None = None) -> Path:
        """The LoRA folder ``saved`` (diffusers' format) as one kohya-format ``.safetensors`` file, atomically:
        ``lora_unet_…`` names (``lora_te_…``, SDXL's ``lora_te1_…`` / ``lora_te2_…``, for text encoders) with
        ``.lora_down`` / ``.lora_up`` / ``.alpha``, and kohya's ``ss_*`` and ``modelspec.*`` metadata, so A1111,
        ComfyUI and diffusers' kohya loader take it. ``base`` is the model it was trained on; the spec the folder
        records (prediction type, zero terminal SNR) goes into the metadata. ``.alpha`` is the trained alpha: the
        one in the file's metadata if it has one, else the rank, which is what ``fullrange train`` uses."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_kohya

        from .files import save_safetensors
        from .sd.markers import adapter_metadata

        family = base.layout(family)
        saved = Path(saved)
        if not (saved / LORA_FILE).is_file():
            raise ConfigError("adapter", f"{saved}: not a LoRA folder (no {LORA_FILE})")
        state, _, metadata = StableDiffusionPipeline.lora_state_dict(saved, return_lora_metadata=True)
        alpha = (metadata or {}).get("lora_alpha")
        kohya = convert_state_dict_to_kohya(state)
        # CLIP's modules under text_model (folders saved before fullrange wrote the prefix lack it), and kohya's
        # prefix: lora_te_ for SD 1.x / 2.x's one text encoder, lora_te1_ / lora_te2_ for SDXL's two.
        kohya = {re.sub(r"^lora_te(\d?)_(?!text_model_)", r"lora_te\1_text_model_", k): v for k, v in kohya.items()}
        if family != "sdxl":
            kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
        for key in [k for k in kohya if k.endswith(".alpha")]:
            rank = kohya[key.removesuffix(".alpha") + ".lora_down.weight"].shape[0]
            kohya[key] = torch.tensor(float(alpha if alpha is not None else rank))
        rank = max(int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight"))
        meta = adapter_metadata(adapter_spec(saved, base.spec), base.spec, family, saved.name) | {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha if alpha is not None else rank),
        }
        save_safetensors(path, {k: t.detach().to("cpu").contiguous() for k, t in kohya.items()}, meta)
        return Path(path)

    def load(self, model: StableDiffusion, path: Path, strength: float) -> None:
        """A LoRA folder or file (diffusers', kohya's or peft's names, as diffusers' loader reads them) onto the UNet
        and text encoders, at ``strength``."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        from .sd.model import as_pipeline

        file = path / LORA_FILE if path.is_dir() else path
        pipe = as_pipeline(model)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="fullrange")
        networks = [model.unet, *model.text_encoders.values()]
        layers = [m for net in networks for m in net.modules() if isinstance(m, BaseTunerLayer)]
        if not any("fullrange" in layer.lora_A for layer in layers if hasattr(layer, "lora_A")):
            raise ConfigError("adapter", f"{file}: holds no LoRA weight for this model's layers")
        pipe.set_adapters(["fullrange"], adapter_weights=[strength])

    def merge(self, model: StableDiffusion) -> None:
        merge_all(model)


class OFT:
    """OFT on the UNet's Linear and 1×1 layers, saved as its shape (``adapter.json``), its weights and the scheduler
    config; diffusers cannot load it, so the run also leaves the merged pipeline. Exported as LyCORIS weight
    differences."""

    name: ClassVar[str] = "oft"
    pipeline: ClassVar[bool] = True
    tool_file: ClassVar[tuple[str, str] | None] = None  # the merged pipeline serves them (the LyCORIS file: export)

    def describe(self, config: AdapterConfig) -> str:
        return f"OFT, block size {config.block_size}"

    def attach(self, model: StableDiffusion, config: AdapterConfig, seed: int) -> int:
        """Add OFT of ``config.block_size`` to the UNet (identity at init: no random draw)."""
        return add_oft(model.unet, block_size=config.block_size, coft=config.coft)

    def save(self, model: StableDiffusion, config: AdapterConfig, folder: Path) -> dict[str, Path]:
        """``folder/oft``: the adapter's shape and weights, and the scheduler config."""
        from .files import save_safetensors, staged_folder, write_bytes
        from .scheduler_config import ddim_scheduler

        shape = {"block_size": config.block_size, "coft": config.coft}
        with staged_folder(folder / "oft") as tmp:
            write_bytes(tmp / OFT_FILES[0], json.dumps(shape).encode())
            save_safetensors(tmp / OFT_FILES[1], adapter_state_dict(model.unet))
            ddim_scheduler(model.spec).save_config(tmp)
        return {"oft": folder / "oft"}

    def export(self, path: Path, saved: Path, base: StableDiffusion, family: str | None = None) -> Path:
        """The OFT folder ``saved`` as one LyCORIS-format ``.safetensors`` file of weight differences (LyCORIS' "full"
        algorithm: ``lora_unet_<module>.diff`` = the merged weight − the base's), which LyCORIS, A1111 and ComfyUI
        apply exactly. Not LyCORIS' own OFT: peft rotates the other side of the weight, so its rotation would not
        carry over; the difference is exact. ``base`` is the model it was trained on; the adapter is merged into
        its UNet in place."""
        from .files import save_safetensors
        from .sd.markers import adapter_metadata

        family = base.layout(family)
        saved = Path(saved)
        if not (saved / OFT_FILES[0]).is_file():
            raise ConfigError("adapter", f"{saved}: not an OFT folder (no {OFT_FILES[0]})")
        self.load(base, saved, 1.0)
        diffs = {f"lora_unet_{name.replace('.', '_')}.diff": d for name, d in merged_differences(base.unet).items()}
        meta = adapter_metadata(adapter_spec(saved, base.spec), base.spec, family, saved.name) | {
            "ss_network_module": "lycoris.kohya",
            "ss_network_args": '{"algo": "full"}',
        }
        save_safetensors(path, diffs, meta)
        return Path(path)

    def load(self, model: StableDiffusion, path: Path, strength: float) -> None:
        """An OFT folder onto the UNet. ``strength`` scales the skew-symmetric generator Q: 0 is the identity (no
        change), 1 the trained rotation, in between a rotation along the way."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from .files import read_json

        try:
            shape = read_json(path / OFT_FILES[0])
        except ValueError as err:
            raise ConfigError("adapter", str(err)) from None
        if not isinstance(shape, dict) or not {"block_size", "coft"} <= set(shape):
            raise ConfigError("adapter", f"{path / OFT_FILES[0]}: needs block_size and coft")
        weights = load_file(path / OFT_FILES[1])
        add_oft(model.unet, block_size=shape["block_size"], coft=shape["coft"])
        set_peft_model_state_dict(model.unet, {k: v * strength for k, v in weights.items()})

    def merge(self, model: StableDiffusion) -> None:
        merge_adapters(model.unet)


ADAPTERS: dict[str, Full | LoRA | OFT] = {"full": Full(), "lora": LoRA(), "oft": OFT()}


def adapter_spec(path: Path, base: SamplingSpec) -> SamplingSpec:
    """How a model with the adapter at ``path`` must be sampled: the spec a folder's scheduler config records, or
    what a file's metadata says (prediction type, zero terminal SNR) applied to ``base``; ``base`` when neither
    says anything. Errors name ``adapter``."""
    from .files import read_json
    from .sampling import retrained
    from .scheduler_config import spec_from_config
    from .sd.markers import decide, from_header
    from .sd.single_file import read_header

    path = Path(path)
    if path.is_file():
        decision = decide(from_header(read_header(path), str(path)))
        try:
            return retrained(base, decision.prediction, decision.zero_terminal_snr)
        except ValueError as err:
            raise ConfigError("adapter", f"{path}: {err}") from None
    config_path = path / "scheduler_config.json"
    if not config_path.is_file():
        return base
    try:
        config = read_json(config_path)
    except ValueError as err:
        raise ConfigError("adapter", str(err)) from None
    try:
        return spec_from_config(config)
    except (ValueError, TypeError) as err:
        raise ConfigError("adapter", f"{config_path}: {err}") from None


def kind_of(path: Path | str) -> LoRA | OFT:
    """Which adapter a saved one at ``path`` is: a LoRA (a ``.safetensors`` file, or a folder with diffusers' LoRA
    file) or an OFT folder (:data:`OFT_FILES`); a ConfigError naming ``adapter`` otherwise."""
    path = Path(path)
    if (path.is_file() and path.suffix == ".safetensors") or (path / LORA_FILE).is_file():
        return ADAPTERS["lora"]
    if path.is_dir() and all((path / name).is_file() for name in OFT_FILES):
        return ADAPTERS["oft"]
    raise ConfigError(
        "adapter",
        f"{path}: neither a LoRA (a .safetensors file, or a folder with {LORA_FILE}) nor an OFT folder "
        f"({', '.join(OFT_FILES)})",
    )
