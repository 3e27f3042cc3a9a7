"""A training process stopped by a signal writes a checkpoint; one killed outright keeps the last good one."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fullrange import batches, checkpoint, losses, models, toy, train

SCRIPT = """
import sys, torch
from fullrange import batches, losses, models, toy, train
images, labels = toy.synthetic_images(32, size=8, seed=0)
model = models.tiny_unet(8, 3, width=8)
config = train.TrainConfig(steps=int(sys.argv[2]), batch_size=4, lr=1e-3, warmup=2, checkpoint_every=int(sys.argv[3]))
try:
    train.train(model, batches.labelled(images, labels, 5), losses.get_recipe("baseline"), config, sys.argv[1],
                progress=False)
except train.TrainingInterrupted as err:
    print(err, flush=True)
    sys.exit(130)
"""


def _launch(tmp_path, steps, every):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(steps), str(every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "loss.json").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"training did not start: {proc.communicate()}")
        time.sleep(0.05)
    return proc, out


def _in_process(out, steps, every):
    images, labels = toy.synthetic_images(32, size=8, seed=0)
    model = models.tiny_unet(8, 3, width=8)
    config = train.TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup=2, checkpoint_every=every)
    return train.train(
        model, batches.labelled(images, labels, 5), losses.get_recipe("baseline"), config, out, progress=False
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    """SIGHUP (a closed terminal or SSH session) is SIGTERM's case: a checkpoint, then exit 130."""
    proc, out = _launch(tmp_path, steps=3000, every=5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stdout
    saved = checkpoint.Checkpoint(out / "checkpoint.safetensors")
    assert 5 <= saved.step < 3000 and len(saved.group("log")["loss"]) == saved.step
    assert saved.optimizer_state() is not None and saved.group("rng")["generator"].dtype == torch.uint8


def _past_step(path, step: int) -> bool:
    try:
        return checkpoint.Checkpoint(path).step > step
    except (OSError, ValueError):
        return False


def test_kill_9_while_checkpointing_leaves_a_loadable_checkpoint(tmp_path):
    proc, out = _launch(tmp_path, steps=100_000, every=1)  # a checkpoint every step
    deadline = time.monotonic() + 120  # past step 10, however busy the machine (killed mid-write, most likely)
    while time.monotonic() < deadline and not _past_step(out / "checkpoint.safetensors", 10):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = checkpoint.Checkpoint(out / "checkpoint.safetensors")
    assert saved.step >= 1 and len(saved.group("log")["loss"]) == saved.step
    # A temporary file from the killed write may remain; the next run removes it and resumes.
    (out / ".checkpoint.safetensors.stale.tmp").write_bytes(b"partial")
    with pytest.raises(ValueError, match="beyond the 10 steps asked for"):
        _in_process(out, steps=10, every=1)
    assert not list(out.glob(".checkpoint.safetensors.*.tmp"))


def test_a_signal_during_a_write_leaves_no_temporary_file(tmp_path):
    """Any command stops on SIGTERM / SIGHUP with its atomic writes unwound: the temporary file beside the target is
    removed and the target keeps what it had (here the signal arrives while a file is being written)."""
    from fullrange import files
    from fullrange.cli._errors import Stopped, stop_on_signals

    target = tmp_path / "out.bin"
    target.write_bytes(b"before")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(Stopped), stop_on_signals(), files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs at once, in this thread
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"] and target.read_bytes() == b"before"
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the handlers before, restored
