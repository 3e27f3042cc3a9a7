"""Two CPU processes (torchrun, gloo) train like one process with the same global batch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from fullrange import checkpoint

SCRIPT = """
import sys, torch
from fullrange import batches, losses, models, toy, train
images, labels = toy.synthetic_images(32, size=8, seed=0)
model = models.tiny_unet(8, 3, width=8)
config = train.TrainConfig(steps=3, batch_size=int(sys.argv[2]), lr=1e-3, warmup=1, checkpoint_every=2, ema_decay=0.5)
train.train(model, batches.labelled(images, labels, 5), losses.get_recipe("ztsnr"), config, sys.argv[1],
            progress=False)
"""


def free_port() -> int:
    """A TCP port on this machine that the OS says is free (bound to port 0, then released for the launcher)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun comes with torch")
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "8"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(script),
            str(tmp_path / "two"),
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a = checkpoint.Checkpoint(tmp_path / "one" / "checkpoint.safetensors")
    b = checkpoint.Checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    assert a.step == b.step == 3
    # The global-batch losses agree to float rounding.
    assert b.group("log")["loss"].tolist() == pytest.approx(a.group("log")["loss"].tolist(), rel=1e-5)
    # Weights: gradients agree to rounding; Adam turns rounding on near-zero gradients into updates of up to
    # lr per step, so a few percent of the weights differ by that much, the rest not at all.
    wa, wb = a.group("model"), b.group("model")
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diff.quantile(0.9).item() < 1e-6
    assert diff.max().item() < 3 * 1e-3 * 3


def test_accelerate_launch_two_cpu_processes_fine_tune_like_one(tmp_path, tiny_sd):
    """`fullrange train` (LoRA, zero terminal SNR) under `accelerate launch` with two CPU processes and batch 2
    each equals one process with batch 4. accelerate's `--cpu` launcher starts a single process unless it is
    given an MPI host file, so the processes come from its torchrun launcher with the CPU forced."""
    import numpy as np
    from PIL import Image

    (tmp_path / "data").mkdir()
    for i, value in enumerate((0, 255, 40, 215)):
        Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(tmp_path / "data" / f"{i}.png")
        (tmp_path / "data" / f"{i}.txt").write_text(f"flat grey {value}")
    args = ["train", "--model", str(tiny_sd), "--data", str(tmp_path / "data"), "--resolution", "16"]
    args += ["--max-steps", "3", "--lr", "1e-3", "--adapter", "lora", "--zero-terminal-snr", "--caption-dropout", "0"]
    args += ["--no-progress"]
    one = subprocess.run(
        [sys.executable, "-m", "fullrange", *args, "--out", str(tmp_path / "one"), "--batch-size", "4"],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    two = subprocess.run(
        [*launch, "-m", "fullrange", *args, "--out", str(tmp_path / "two"), "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ACCELERATE_USE_CPU": "true"},
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert "on 2 processes" in two.stderr and two.stderr.count("trainable parameters") == 1  # two ran, one spoke
    a = checkpoint.Checkpoint(tmp_path / "one" / "train" / "checkpoint.safetensors")
    b = checkpoint.Checkpoint(tmp_path / "two" / "train" / "checkpoint.safetensors")
    assert a.step == b.step == 3
    assert b.group("log")["loss"].tolist() == pytest.approx(a.group("log")["loss"].tolist(), rel=1e-5)
    wa, wb = a.group("model"), b.group("model")
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diff.quantile(0.9).item() < 1e-6 and diff.max().item() < 3 * 1e-3 * 3
    assert (tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors").is_file()
