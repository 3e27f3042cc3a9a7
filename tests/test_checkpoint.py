"""Checkpoints (fullrange.checkpoint): one safetensors file, read lazily, damaged files named."""

import os

import pytest
import torch

from fullrange import checkpoint


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        checkpoint.Checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        checkpoint.Checkpoint(tmp_path / "missing.safetensors")


def test_outputs_take_the_umask_and_load_lazily(tmp_path):
    """Checkpoints are readable by others where the umask allows (mkstemp would leave 0600), and read back exactly,
    into existing tensors in place."""
    old = os.umask(0o022)
    try:
        weights = {"a": torch.randn(3, 4), "b": torch.arange(5.0)}
        path = tmp_path / "c.safetensors"
        checkpoint.save_checkpoint(path, step=7, model=weights, meta={"x": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    saved = checkpoint.Checkpoint(path)
    assert saved.step == 7 and saved.meta == {"x": 1} and saved.optimizer_state() is None
    targets = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    pointers = {k: v.data_ptr() for k, v in targets.items()}
    saved.load_into("model", targets)
    assert all(torch.equal(targets[k], weights[k]) and targets[k].data_ptr() == pointers[k] for k in weights)
    with pytest.raises(ValueError, match="not this model's"):
        saved.load_into("model", {"a": torch.zeros(3, 4)})
