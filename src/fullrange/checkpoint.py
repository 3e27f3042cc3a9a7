"""Checkpoints: one safetensors file, written atomically and streamed, read lazily, that resumes training exactly.

Layout: tensors ``model.*``, ``ema.*``, ``optimizer.<param index>.<key>``, ``rng.*``, ``log.*``; the metadata
holds ``step``, the optimizer's param groups and scalars, and any caller's JSON. Only safetensors are read or
written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .files import save_safetensors


def save_checkpoint(
    path: Path | str,
    *,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None = None,
    optimizer: dict | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    log: dict[str, torch.Tensor] | None = None,
    meta: dict | None = None,
) -> None:
    """Save a training state (dicts of tensors, an optimizer ``state_dict()``) atomically, without copying it."""
    tensors = {f"model.{k}": v for k, v in model.items()}
    tensors |= {f"ema.{k}": v for k, v in (ema or {}).items()}
    tensors |= {f"rng.{k}": v for k, v in (rng or {}).items()}
    tensors |= {f"log.{k}": v for k, v in (log or {}).items()}
    scalars: dict[str, dict] = {}
    if optimizer is not None:
        for index, state in optimizer["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
    metadata = {
        "step": str(step),
        "meta": json.dumps(meta or {}),
        "optimizer_groups": json.dumps(optimizer["param_groups"]) if optimizer is not None else "",
        "optimizer_scalars": json.dumps(scalars),
    }
    save_safetensors(path, tensors, metadata)


class Checkpoint:
    """A checkpoint file opened for reading: its metadata at once, its tensors when asked for, one at a time
    (read with ``pread``, so a tensor costs its own memory only while it is being used)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no checkpoint there")
        try:
            with self._open() as f:
                self.keys = list(f.keys())
                metadata = f.metadata() or {}
            self.step = int(metadata.get("step", 0))
            self.meta = json.loads(metadata.get("meta", "{}"))
            self._groups = json.loads(metadata["optimizer_groups"]) if metadata.get("optimizer_groups") else None
            self._scalars = json.loads(metadata.get("optimizer_scalars", "{}"))
        except (SafetensorError, ValueError, OSError) as err:
            raise ValueError(f"{self.path}: not a readable safetensors checkpoint ({err})") from None

    def _open(self):
        return safe_open(self.path, framework="pt", backend="pread")

    def names(self, group: str) -> list[str]:
        """The tensor names in ``group`` (``model``, ``ema``, ``optimizer``, ``rng``, ``log``), prefix removed."""
        return [k.partition(".")[2] for k in self.keys if k.partition(".")[0] == group]

    def group(self, group: str) -> dict[str, torch.Tensor]:
        """All tensors of ``group``, loaded."""
        with self._open() as f:
            return {name: f.get_tensor(f"{group}.{name}") for name in self.names(group)}

    def load_into(self, group: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``group`` into ``tensors`` in place (same names, any device or dtype), one tensor at a time."""
        names = set(self.names(group))
        if names != set(tensors):
            raise ValueError(f"{self.path}: the checkpoint's {group} tensors are not this model's")
        with self._open() as f, torch.no_grad():
            for name, target in tensors.items():
                target.copy_(f.get_tensor(f"{group}.{name}"))

    def optimizer_state(self) -> dict | None:
        """The optimizer's ``state_dict()`` as saved (its state tensors loaded), or ``None`` if none was."""
        if self._groups is None:
            return None
        state: dict[int, dict] = {}
        for key, value in self.group("optimizer").items():
            index, _, name = key.partition(".")
            state.setdefault(int(index), {})[name] = value
        for index, values in self._scalars.items():
            state.setdefault(int(index), {}).update(values)
        return {"state": state, "param_groups": self._groups}
