"""The optimizers a run may pick, and stepping them one trained tensor at a time: as soon as the tensor's gradient
is accumulated (a fused backward, which frees each gradient at once, so that at most one is alive), and for bf16
weights, whose update is computed in fp32 and rounded stochastically (:func:`~fullrange.precision.round_stochastic`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import ConfigError
from .precision import round_stochastic

OPTIMIZERS = ("adamw", "adafactor", "adamw8bit", "paged_adamw8bit", "lion8bit", "prodigy")
BITSANDBYTES = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit"}
"""The choices that are bitsandbytes' optimizers, and their class names there."""
PACKAGES = {"prodigy": "prodigyopt"} | dict.fromkeys(BITSANDBYTES, "bitsandbytes")
"""The package each optional optimizer needs."""
WHOLE = ("prodigy",)
"""Optimizers whose step depends on all trained tensors at once (Prodigy estimates one step size from them all), so
they cannot step one tensor at a time."""


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (no weight decay: adapters and fine-tunes do not need it). Adafactor
    takes the given learning rate (no relative step or parameter scaling, as kohya sets it); Prodigy's ``lr``
    multiplies the step size it estimates. Check bitsandbytes' with :func:`check_runs` first."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=0.0)
    import bitsandbytes

    return getattr(bitsandbytes.optim, BITSANDBYTES[name])(params, lr=lr, weight_decay=0.0)


def check_runs(name: str, device: torch.device) -> None:
    """Refuse (a ConfigError naming ``optimizer`` and the reason) a bitsandbytes optimizer that cannot step on
    ``device`` here, tried on one tensor before training starts."""
    if name not in BITSANDBYTES:
        return
    try:  # big enough for 8-bit state (bitsandbytes keeps tensors under 4096 values in 32 bits)
        probe = torch.zeros(4096, device=device, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        make_optimizer([probe], name, 1e-3).step()
    except Exception as err:  # bitsandbytes raises many kinds where its kernels are missing
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(
            "optimizer", f"{name} does not run on {device.type} here ({detail}); use adamw or adafactor"
        ) from None


class PerTensor:
    """One optimizer per trained tensor, stepped a tensor at a time, with the ``param_groups``, ``step``,
    ``zero_grad`` and ``state_dict`` of one optimizer over them all (its state dict is the one a single optimizer
    would write, so checkpoints keep their layout).

    ``bf16``: the tensors are bf16. Each step then runs on an fp32 copy of the tensor and of its gradient, made
    for that step only, and the result is rounded stochastically into the tensor; the optimizer's moments (state
    tensors of the tensor's shape) are kept in bf16 between steps. The rounding draws from a generator reseeded by
    :meth:`begin` at every step, so a resumed run rounds as the uninterrupted one did."""

    def __init__(self, params: list[torch.nn.Parameter], make: Callable[[list], torch.optim.Optimizer], bf16: bool):
        self.params, self.bf16 = params, bf16
        # With bf16, each optimizer holds an fp32 stand-in whose data is the tensor's only during its step.
        self.held = [torch.nn.Parameter(torch.empty(0, device=p.device)) if bf16 else p for p in params]
        self.optimizers = [make([q]) for q in self.held]
        self.generators: dict[torch.device, torch.Generator] = {}
        self.seed = 0

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def begin(self, seed: int) -> None:
        """Start an optimizer step whose stochastic rounding draws from ``seed``."""
        self.seed = seed
        self.generators.clear()

    def step_tensor(self, index: int) -> None:
        """Step tensor ``index`` with its gradient, then free the gradient."""
        p, optimizer = self.params[index], self.optimizers[index]
        if p.grad is None:
            return
        if not self.bf16:
            optimizer.step()
            p.grad = None
            return
        held = self.held[index]
        with torch.no_grad():
            held.data, held.grad = p.detach().float(), p.grad.float()
            self._moments(index, torch.float32)
            optimizer.step()
            self._moments(index, torch.bfloat16)
            p.copy_(round_stochastic(held.data, self._generator(p.device)))
            held.data, held.grad, p.grad = torch.empty(0, device=p.device), None, None

    def _moments(self, index: int, dtype: torch.dtype) -> None:
        """Cast tensor ``index``'s moments (its optimizer's state tensors of its shape) to ``dtype``."""
        state = self.optimizers[index].state.get(self.held[index], {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and value.shape == self.params[index].shape:
                state[key] = value.to(dtype)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[device]

    def step(self) -> None:
        """Step every tensor that has a gradient (what a fused backward has not stepped already)."""
        for index in range(len(self.params)):
            self.step_tensor(index)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """One optimizer's state dict over all the tensors: state by tensor index, one param group per tensor."""
        state, groups = {}, []
        for index, optimizer in enumerate(self.optimizers):
            saved = optimizer.state_dict()
            if 0 in saved["state"]:
                state[index] = saved["state"][0]
            groups += [{**group, "params": [index]} for group in saved["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        for index, optimizer in enumerate(self.optimizers):
            group = {**saved["param_groups"][index], "params": [0]}
            own = {0: saved["state"][index]} if index in saved["state"] else {}
            optimizer.load_state_dict({"state": own, "param_groups": [group]})
            if self.bf16:
                self._moments(index, torch.bfloat16)

    def fuse(self) -> None:
        """Step each tensor as soon as its gradient is accumulated (torch's post-accumulate-grad hook), until
        :meth:`unfuse`."""
        self.hooks = [
            p.register_post_accumulate_grad_hook(lambda _, index=index: self.step_tensor(index))
            for index, p in enumerate(self.params)
        ]

    def unfuse(self) -> None:
        for hook in getattr(self, "hooks", ()):
            hook.remove()
        self.hooks = []
