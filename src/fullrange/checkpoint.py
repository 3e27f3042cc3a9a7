"""Checkpoints: one safetensors file, written atomically, that resumes training exactly.

Layout: tensors ``model.*``, ``ema.*``, ``optimizer.<param index>.<key>``, ``rng.*``, ``log.*``; the metadata
holds ``step``, the optimizer's param groups and any caller's JSON. Only safetensors are read or written.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict | None
    rng: dict[str, torch.Tensor]
    log: dict[str, torch.Tensor]
    meta: dict


def save_checkpoint(
    path: Path,
    *,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None = None,
    optimizer: dict | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    log: dict[str, torch.Tensor] | None = None,
    meta: dict | None = None,
) -> None:
    """Save a training state (state dicts of tensors, an optimizer ``state_dict()``) atomically."""
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
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(Path(path), save(tensors, metadata=metadata))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    raw = path.read_bytes()
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        groups.setdefault(prefix, {})[rest] = value
    optimizer = None
    if metadata.get("optimizer_groups"):
        state: dict[int, dict] = {}
        for key, value in groups.get("optimizer", {}).items():
            index, _, name = key.partition(".")
            state.setdefault(int(index), {})[name] = value
        for index, values in json.loads(metadata["optimizer_scalars"]).items():
            state.setdefault(int(index), {}).update(values)
        optimizer = {"state": state, "param_groups": json.loads(metadata["optimizer_groups"])}
    return Checkpoint(
        step=int(metadata.get("step", 0)),
        model=groups.get("model", {}),
        ema=groups.get("ema", {}),
        optimizer=optimizer,
        rng=groups.get("rng", {}),
        log=groups.get("log", {}),
        meta=json.loads(metadata.get("meta", "{}")),
    )
