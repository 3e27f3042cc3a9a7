"""The number formats of training: frozen weights stored in the half type, and bf16 weights updated with stochastic
rounding (so that updates smaller than bf16's spacing are kept in expectation instead of rounded away)."""

from __future__ import annotations

import torch

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
"""The half types of ``train.mixed_precision``."""


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype, trained: bool = False) -> None:
    """Store every floating-point parameter of ``module`` that does not require grad (with ``trained``, every one)
    in ``dtype``, in place: under mixed precision the frozen parts are stored in the half type, as diffusers'
    training scripts do, while trained parameters keep fp32 masters. Parameters are replaced, not converted with
    ``Module.to`` (which fake tensors refuse), so call it before an optimizer holds them."""
    for child in module.modules():
        for name, p in list(child._parameters.items()):
            if p is None or not p.is_floating_point() or p.dtype == dtype or (p.requires_grad and not trained):
                continue
            child._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)


def round_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 stochastically: up with probability equal to the distance to the value below, in
    units of bf16's spacing, so that ``E[round(x)] = x`` (Gupta et al. 2015). bf16 is fp32's upper 16 bits: add a
    uniform 16-bit integer to the low bits and truncate. On the bit pattern this rounds the magnitude, which is what
    sign-magnitude floats need."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # -65536 is 0xFFFF0000: keep the upper 16 bits, which bf16 holds exactly.
    return (bits + noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)
