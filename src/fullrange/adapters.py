"""LoRA (Hu et al. 2021) and OFT (Qiu et al. 2023) adapters on a diffusers UNet, through peft. All peft calls
live here.

OFT is applied only to Linear and 1×1 convolution layers. peft's OFT on a k×k convolution rotates the
unfolded patches and folds the overlapping ones back by summing, which is not an orthogonal map of the
weights: an identity-initialised adapter already changes the output, and merged weights differ from the
unmerged adapter. fullrange refuses such targets.
"""

from __future__ import annotations

import torch

ADAPTERS = ("full", "lora", "oft")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention, as kohya and diffusers train it
OFT_TARGETS = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "conv_shortcut")


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
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def _in_features(module: torch.nn.Module) -> int:
    return module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels


def adapter_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own weights (peft names), for saving."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every adapter layer of ``model`` into the layer it adapts and put that plain layer back in its place,
    in place (no copy of the model): afterwards ``model`` has its original architecture and names. Returns it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # diffusers' record of its adapters, as its unload_lora clears it
        del model.peft_config
        model._hf_peft_config_loaded = None
    return model


def load_oft(
    unet: torch.nn.Module, weights: dict[str, torch.Tensor], block_size: int, coft: bool = False, strength: float = 1.0
) -> None:
    """Add an OFT adapter saved by :func:`adapter_state_dict` to ``unet``. ``strength`` scales the skew-symmetric
    generator Q: 0 is the identity (no change), 1 the trained rotation, in between a rotation along the way."""
    from peft import set_peft_model_state_dict

    add_oft(unet, block_size=block_size, coft=coft)
    set_peft_model_state_dict(unet, {k: v * strength for k, v in weights.items()})
