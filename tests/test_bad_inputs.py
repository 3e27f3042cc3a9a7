"""The bad-input corpus: bad or hostile input of many kinds, each made by the test, fed to the CLI as a user would.

Every kind must end in one line naming the option or file at fault (``error: ...``, exit 1 or 2, no stack trace)
or in a listed skip (``skipped PATH: reason``) with the run going on; results stay finite and nothing a user had is
overwritten. Kinds are grouped by the six root causes of the reliability issue:

1. numbers: non-finite or out-of-range options;
2. text: captions, prompts, metadata rows, TOML and JSON configs that are not UTF-8 or not well-formed;
3. the image scan: bombs, pipes, rotated photos, animations, formats without a decoder, broken files;
4. errors raised deep inside a library: damaged or mismatched models and adapters, a full disk;
5. checkpoints: resuming a run on another model, data or adapter, damaged checkpoints;
6. outputs: locks, inputs that would be overwritten, damaged caches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fullrange import data, files, images
from fullrange.cli import app
from fullrange.sd import load_stable_diffusion
from fullrange.sd.latents import encode_latents
from fullrange.sd.testing import save_tiny_stable_diffusion

runner = CliRunner()
KINDS: Counter = Counter()
"""Kinds of bad input checked in this run, by cause (counted as the tests run, reported at the end)."""


def cli(*args) -> object:
    """Run ``fullrange ARGS`` in this process; a hang (a pipe read, say) fails the test after 120 s."""

    def hung(signum, frame):
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line_error(result, *fragments: str) -> str:
    """The command stopped with exactly one ``error:`` line holding every fragment, and no stack trace escaped."""
    assert isinstance(result.exception, SystemExit), f"escaped: {result.exception!r}\n{result.output}"
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def digest(path: Path) -> str:
    """Content of a file, or of every file under a folder."""
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != files.LOCK)
    sha = hashlib.sha256()
    for p in paths:
        sha.update(str(p.relative_to(path) if p != path else p.name).encode() + p.read_bytes())
    return sha.hexdigest()


def image(path: Path, value: int = 128, size=(24, 20), caption: str | None = "a caption") -> Path:
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` × ``height`` grey pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny SD, a second one of the same shape, four captioned images, and a 2-step LoRA run on them."""
    root = tmp_path_factory.mktemp("bad")
    save_tiny_stable_diffusion(root / "sd")
    save_tiny_stable_diffusion(root / "sd_other", seed=1)
    (root / "data").mkdir()
    for i, value in enumerate((0, 255, 40, 215)):
        image(root / "data" / f"{i}.png", value, caption=f"image {i}")
    result = cli(*train_args(root, root / "run"), "--checkpoint-every", "1")
    assert result.exit_code == 0, result.output
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3, 3)}, root / "single.safetensors")
    return root


def train_args(ws: Path, out: Path, data_dir: Path | None = None) -> list:
    return [
        "train",
        "--model",
        ws / "sd",
        "--data",
        data_dir or ws / "data",
        "--out",
        out,
        "--resolution",
        "16",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ]


def sample_args(ws: Path, out: Path) -> list:
    return ["sample", "--model", ws / "sd", "--out", out, "--prompt", "a dark room", "--steps", "2"]


@dataclass(frozen=True)
class Kind:
    """One kind of bad input: ``make(ws, tmp)`` prepares it and returns the CLI arguments; the one error line must
    hold every fragment of ``expect`` (``{tmp}`` and ``{ws}`` are filled in)."""

    cause: int
    make: object
    expect: tuple[str, ...]


def option(command, *extra, expect):
    """A kind that is only options on a command that would otherwise work."""
    return lambda cause: Kind(cause, lambda ws, tmp: [*command(ws, tmp / "out"), *extra], expect)


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def damaged_model(change):
    """A copy of the tiny SD, ``change(folder)`` applied."""

    def make(ws, tmp):
        shutil.copytree(ws / "sd", tmp / "m")
        change(tmp / "m")
        return ["sample", "--model", tmp / "m", "--out", tmp / "out", "--prompt", "x", "--steps", "2"]

    return make


def truncate(path: Path, size: int = 2000) -> None:
    path.write_bytes(path.read_bytes()[:size])


def damaged_lora(change):
    """Sample with a copy of the fixture run's LoRA, ``change(folder)`` applied."""

    def make(ws, tmp):
        change(shutil.copytree(ws / "run" / "lora", tmp / "lora"))
        return [*sample_args(ws, tmp / "out"), "--adapter", tmp / "lora"]

    return make


def broken_oft(ws: Path, tmp: Path) -> list:
    write(tmp / "oft" / "adapter.json", "{")
    save_file({"w": torch.zeros(1)}, tmp / "oft" / "adapter_model.safetensors")
    return [*sample_args(ws, tmp / "out"), "--adapter", tmp / "oft"]


def with_config(text: str | bytes):
    def make(ws, tmp):
        return [*train_args(ws, tmp / "out"), "--config", write(tmp / "run.toml", text)]

    return make


def refused_resume(*extra, model="sd", data_change=None):
    """Continue the fixture's run (a copy) with other options, model or data."""

    def make(ws, tmp):
        shutil.copytree(ws / "run", tmp / "run")
        data_dir = ws / "data"
        if data_change is not None:
            data_dir = tmp / "data"
            shutil.copytree(ws / "data", data_dir)
            data_change(data_dir)
        args = train_args(ws, tmp / "run", data_dir)
        args[args.index("--model") + 1] = ws / model
        return [*args, "--resume", *extra]

    return make


NUMBERS = {
    "train --lr nan": option(train_args, "--lr", "nan", expect=("--lr must be a finite number",)),
    "train --lr inf": option(train_args, "--lr", "inf", expect=("--lr must be a finite number",)),
    "train --lr -1": option(train_args, "--lr", "-1", expect=("--lr must be positive",)),
    "train --offset-noise inf": option(
        train_args, "--offset-noise", "inf", expect=("--offset-noise must be a finite",)
    ),
    "train --offset-noise -0.1": option(
        train_args, "--offset-noise", "-0.1", expect=("--offset-noise must be at least",)
    ),
    "train --pyramid-noise nan": option(train_args, "--pyramid-noise", "nan", expect=("--pyramid-noise",)),
    "train --input-perturbation inf": option(
        train_args, "--input-perturbation", "inf", expect=("--input-perturbation",)
    ),
    "train --min-snr-gamma nan": option(
        train_args, "--min-snr-gamma", "nan", expect=("--min-snr-gamma must be a fin",)
    ),
    "train --min-snr-gamma -5": option(
        train_args, "--min-snr-gamma", "-5", expect=("--min-snr-gamma must be at least",)
    ),
    "train --caption-dropout nan": option(train_args, "--caption-dropout", "nan", expect=("--caption-dropout",)),
    "train --prior-loss-weight inf": option(train_args, "--prior-loss-weight", "inf", expect=("--prior-loss-weight",)),
    "train --snr-weight-floor -1": option(train_args, "--snr-weight-floor", "-1", expect=("--snr-weight-floor",)),
    "train --ema-decay 1.5": option(train_args, "--ema-decay", "1.5", expect=("--ema-decay must lie in [0, 1)",)),
    "train --max-steps -3": option(train_args, "--max-steps", "-3", expect=("--max-steps must be positive",)),
    "train --batch-size 0": option(train_args, "--batch-size", "0", expect=("--batch-size must be positive",)),
    "train --grad-accum 0": option(train_args, "--grad-accum", "0", expect=("--grad-accum must be positive",)),
    "train --seed -1": option(train_args, "--seed", "-1", expect=("--seed must be at least 0",)),
    "train --resolution 12": option(train_args, "--resolution", "12", expect=("--resolution must be a multiple of 8",)),
    "train --lora-rank 0": option(train_args, "--lora-rank", "0", expect=("--lora-rank must be positive",)),
    "TOML lr = nan": lambda c: Kind(c, with_config("lr = nan\n"), ("--lr must be a finite number",)),
    "TOML [train] lr = -inf": lambda c: Kind(c, with_config("[train]\nlr = -inf\n"), ("--lr must be a finite",)),
    "sample --guidance nan": option(sample_args, "--guidance", "nan", expect=("--guidance must be a finite number",)),
    "sample --guidance inf": option(sample_args, "--guidance", "inf", expect=("--guidance must be a finite number",)),
    "sample --guidance -1": option(sample_args, "--guidance", "-1", expect=("--guidance must be at least 0",)),
    "sample --guidance-rescale nan": option(sample_args, "--guidance-rescale", "nan", expect=("--guidance-rescale",)),
    "sample --guidance-rescale 1.5": option(sample_args, "--guidance-rescale", "1.5", expect=("--guidance-rescale",)),
    "sample --steps 0": option(sample_args, "--steps", "0", expect=("--steps must be positive",)),
    "sample --seed -1": option(sample_args, "--seed", "-1", expect=("--seed must be at least 0",)),
    "sample --num-images 0": option(sample_args, "--num-images", "0", expect=("--num-images must be positive",)),
    "sample --tone nan": option(sample_args, "--tone", "nan", expect=("--tone",)),
    "sample --tone 1.5": option(sample_args, "--tone", "1.5", expect=("--tone",)),
    "sample --adapter-strength nan": lambda c: Kind(
        c,
        lambda ws, tmp: [*sample_args(ws, tmp / "out"), "--adapter", ws / "run" / "lora", "--adapter-strength", "nan"],
        ("adapter_strength must be a finite number",),
    ),
    "export --adapter-strength inf": lambda c: Kind(
        c,
        lambda ws, tmp: [
            "export",
            *("--model", ws / "sd", "--out", tmp / "x.safetensors"),
            *("--adapter", ws / "run" / "lora", "--adapter-strength", "inf"),
        ],
        ("adapter_strength must be a finite number",),
    ),
    "eval --guidance inf": lambda c: Kind(
        c, lambda ws, tmp: ["eval", "brightness", "--model", ws / "sd", "--out", tmp, "--guidance", "inf"], ("--guid",)
    ),
    "schedule --steps 0": lambda c: Kind(
        c, lambda ws, tmp: ["schedule", "--steps", "0"], ("--steps must be positive",)
    ),
    "sample --seed of 20 digits": option(sample_args, "--seed", "1" * 20, expect=("--seed must be at most",)),
    "train --seed of 20 digits": option(train_args, "--seed", "1" * 20, expect=("--seed must be at most",)),
    "train --lr 1e30 diverges": option(
        train_args, "--lr", "1e30", "--checkpoint-every", "1", expect=("the loss is nan", "a lower --lr")
    ),
    "sample --adapter-strength 1e30": lambda c: Kind(
        c,
        lambda ws, tmp: [*sample_args(ws, tmp / "out"), "--adapter", ws / "run" / "lora", "--adapter-strength", "1e30"],
        ("not finite", "--adapter-strength"),
    ),
    "sample --control-scale 1e30": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *sample_args(ws, tmp / "out"),
            *("--controlnet", ws / "cn_sd", "--control-image", ws / "data" / "0.png", "--control-scale", "1e30"),
        ],
        ("not finite", "--control-scale"),
    ),
    "sample a tone-stats file of mean 1e30": lambda c: Kind(
        c,
        lambda ws, tmp: [*sample_args(ws, tmp / "out"), "--tone-stats", ws / "huge_tone.safetensors"],
        ("not finite", "--tone-stats"),
    ),
    "export --format kohya --family sdxl of an SD LoRA": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *("export", "--model", ws / "sd", "--adapter", ws / "run" / "lora", "--format", "kohya"),
            *("--family", "sdxl", "--out", tmp / "k.safetensors"),
        ],
        ("--family sdxl: the model is not SDXL",),
    ),
}

TEXT = {
    "prompts file not UTF-8": lambda c: Kind(
        c,
        lambda ws, tmp: [*sample_args(ws, tmp / "out"), "--prompts-file", write(tmp / "p.txt", b"caf\xe9\n")],
        ("--prompts-file", "p.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
    ),
    "prompts file missing": lambda c: Kind(
        c, lambda ws, tmp: [*sample_args(ws, tmp / "out"), "--prompts-file", tmp / "none.txt"], ("none.txt: no such",)
    ),
    "prompts file empty": lambda c: Kind(
        c,
        lambda ws, tmp: ["sample", "--model", ws / "sd", "--out", tmp / "o", "--prompts-file", write(tmp / "p", "\n")],
        ("give at least one --prompt",),
    ),
    "TOML not UTF-8": lambda c: Kind(c, with_config(b"lr = 1e-4 # caf\xe9\n"), ("run.toml: not a readable TOML",)),
    "TOML malformed": lambda c: Kind(c, with_config("[train\nsteps = 2\n"), ("run.toml: not a readable TOML",)),
    "TOML unknown key": lambda c: Kind(c, with_config("stepz = 2\n"), ("run.toml: unknown option 'stepz'",)),
    "TOML wrong type": lambda c: Kind(c, with_config('[train]\ngrad_accum = "two"\n'), ("--grad-accum must be int",)),
    "TOML unknown table": lambda c: Kind(
        c, with_config("[optimizer]\nname = 'adam'\n"), ("optimizer is not an option",)
    ),
    "model_index.json malformed": lambda c: Kind(
        c,
        damaged_model(lambda m: write(m / "model_index.json", "{bad")),
        ("--model", "model_index.json: not valid JSON"),
    ),
    "scheduler config not UTF-8": lambda c: Kind(
        c,
        damaged_model(lambda m: write(m / "scheduler" / "scheduler_config.json", b'{"a": "\xff"}')),
        ("--model", "scheduler_config.json: not UTF-8"),
    ),
    "UNet config malformed": lambda c: Kind(
        c, damaged_model(lambda m: write(m / "unet" / "config.json", "{")), ("--model", "unet cannot be loaded")
    ),
    "adapter scheduler config malformed": lambda c: Kind(
        c, damaged_lora(lambda lora: write(lora / "scheduler_config.json", "[")), ("--adapter", "not valid JSON")
    ),
    "OFT adapter.json malformed": lambda c: Kind(c, broken_oft, ("--adapter", "adapter.json: not valid JSON")),
    "prompt not UTF-8": lambda c: Kind(
        c,
        lambda ws, tmp: ["sample", "--model", ws / "sd", "--out", tmp / "o", "--prompt", "caf\udce9"],
        ("not UTF-8 text (byte 0xe9 at offset 3)",),
    ),
    "TOML nested too deeply": lambda c: Kind(
        c, with_config("a = " + "[" * 50000 + "]" * 50000 + "\n"), ("run.toml: not a readable TOML", "too deeply")
    ),
    "TOML of 2 MB": lambda c: Kind(c, with_config("# " + "x" * 2_000_000 + "\n"), ("run.toml: not a readable TOML",)),
    "scheduler config nested too deeply": lambda c: Kind(
        c,
        damaged_model(lambda m: write(m / "scheduler" / "scheduler_config.json", "[" * 50000 + "]" * 50000)),
        ("--model", "scheduler_config.json: not valid JSON (nested too deeply)"),
    ),
}

LIBRARY = {
    "model missing": lambda c: Kind(
        c, lambda ws, tmp: ["sample", "--model", tmp / "none", "--out", tmp / "o", "--prompt", "x"], ("none: no such",)
    ),
    "UNet weights truncated": lambda c: Kind(
        c,
        damaged_model(lambda m: truncate(m / "unet" / "diffusion_pytorch_model.safetensors")),
        ("--model", "unet cannot be loaded"),
    ),
    "text encoder truncated": lambda c: Kind(
        c, damaged_model(lambda m: truncate(m / "text_encoder" / "model.safetensors")), ("text_encoder cannot be",)
    ),
    "VAE weights missing": lambda c: Kind(
        c,
        damaged_model(lambda m: (m / "vae" / "diffusion_pytorch_model.safetensors").unlink()),
        ("--model", "vae: no weight file"),
    ),
    "UNet folder missing": lambda c: Kind(
        c, damaged_model(lambda m: shutil.rmtree(m / "unet")), ("--model", "missing component folder(s) unet")
    ),
    "tokenizer folder empty": lambda c: Kind(
        c,
        damaged_model(lambda m: [p.unlink() for p in (m / "tokenizer").iterdir()]),
        ("--model", "tokenizer: no vocabulary"),
    ),
    "UNet config of another shape": lambda c: Kind(
        c,
        damaged_model(
            lambda m: write(
                m / "unet" / "config.json",
                json.dumps(json.loads((m / "unet" / "config.json").read_text()) | {"block_out_channels": [16, 32]}),
            )
        ),
        ("--model", "unet cannot be loaded"),
    ),
    "single file of random bytes": lambda c: Kind(
        c,
        lambda ws, tmp: [
            "sample",
            "--model",
            write(tmp / "r.safetensors", os.urandom(3000)),
            *("--out", tmp / "o", "--prompt", "x"),
        ],
        ("--model", "r.safetensors: not a safetensors file"),
    ),
    "single file of another architecture": lambda c: Kind(
        c,
        lambda ws, tmp: ["sample", "--model", ws / "single.safetensors", "--out", tmp / "o", "--prompt", "x"],
        ("--model", "single.safetensors"),
    ),
    "pickle checkpoint": lambda c: Kind(
        c,
        lambda ws, tmp: [
            "sample",
            "--model",
            write(tmp / "m.ckpt", b"\x80\x04K\x01."),
            "--out",
            tmp / "o",
            "--prompt",
            "x",
        ],
        ("--model", "m.ckpt: a pickle checkpoint", "--allow-pickle"),
    ),
    "model is a text file": lambda c: Kind(
        c,
        lambda ws, tmp: ["sample", "--model", write(tmp / "m.txt", "hi"), "--out", tmp / "o", "--prompt", "x"],
        ("--model", "m.txt: not a checkpoint"),
    ),
    "sha256 mismatch": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *("sample", "--model", ws / "single.safetensors", "--out", tmp / "o", "--prompt", "x"),
            *("--sha256", "0" * 64),
        ],
        ("--sha256",),
    ),
    "sha256 not hex": lambda c: Kind(
        c, lambda ws, tmp: [*sample_args(ws, tmp / "o"), "--sha256", "xyz"], ("--sha256",)
    ),
    "model config folder not diffusers": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *("sample", "--model", ws / "single.safetensors", "--out", tmp / "o", "--prompt", "x"),
            *("--model-config", ws / "data"),
        ],
        ("--model-config", "no model_index.json"),
    ),
    "export of a layout it cannot tell": lambda c: Kind(
        c,
        lambda ws, tmp: ["export", "--model", ws / "sd", "--out", tmp / "x.safetensors"],
        ("--family is needed", "give sd1 or sd2"),
    ),
    "adapter missing": lambda c: Kind(
        c, lambda ws, tmp: [*sample_args(ws, tmp / "o"), "--adapter", tmp / "none"], ("--adapter", "none: no such")
    ),
    "adapter folder of something else": lambda c: Kind(
        c, lambda ws, tmp: [*sample_args(ws, tmp / "o"), "--adapter", ws / "data"], ("--adapter", "neither a LoRA")
    ),
    "adapter file without LoRA weights": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *sample_args(ws, tmp / "o"),
            *("--adapter", ws / "sd" / "unet" / "diffusion_pytorch_model.safetensors"),
        ],
        ("--adapter", "diffusion_pytorch_model.safetensors"),
    ),
    "adapter weights truncated": lambda c: Kind(
        c,
        damaged_lora(lambda lora: truncate(lora / "pytorch_lora_weights.safetensors")),
        ("--adapter", "does not fit this model"),
    ),
    "an inpainting UNet without --mask": lambda c: Kind(
        c,
        lambda ws, tmp: ["sample", "--model", ws / "inpaint", "--out", tmp / "o", "--prompt", "x", "--steps", "2"],
        ("--mask is needed", "this UNet inpaints"),
    ),
    "an SDXL ControlNet on SD": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *sample_args(ws, tmp / "o"),
            *("--controlnet", ws / "cn_xl", "--control-image", ws / "data" / "0.png"),
        ],
        ("--controlnet", "made for another model"),
    ),
    "LoRA of SD on SDXL": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *("sample", "--model", ws / "xl", "--out", tmp / "o", "--prompt", "x", "--steps", "1"),
            *("--adapter", ws / "run" / "lora"),
        ],
        ("--adapter", "does not fit this model"),
    ),
}

SCAN = {
    "data folder missing": lambda c: Kind(
        c, lambda ws, tmp: train_args(ws, tmp / "out", tmp / "none"), ("--data", "none: not a directory")
    ),
    "data folder with nothing usable": lambda c: Kind(
        c,
        lambda ws, tmp: train_args(ws, tmp / "out", write(tmp / "d" / "a.png", b"not an image").parent),
        ("--data", "no usable image", "a.png"),
    ),
    "a decompression bomb as --image": lambda c: Kind(
        c, lambda ws, tmp: [*sample_args(ws, tmp / "o"), "--image", ws / "bomb.png"], ("--image", "decompression bomb")
    ),
    "a decompression bomb as --tone-image": lambda c: Kind(
        c,
        lambda ws, tmp: [*sample_args(ws, tmp / "o"), "--tone-image", ws / "bomb.png"],
        ("--tone-image", "decompression bomb"),
    ),
    "a decompression bomb as --mask": lambda c: Kind(
        c,
        lambda ws, tmp: [*sample_args(ws, tmp / "o"), "--image", ws / "data" / "0.png", "--mask", ws / "bomb.png"],
        ("--mask", "decompression bomb"),
    ),
    "data images all too small": lambda c: Kind(
        c,
        lambda ws, tmp: [*train_args(ws, tmp / "out"), "--resolution", "64"],
        ("--data", "too small: 24x20"),
    ),
}

CHECKPOINTS = {
    "resume with another LoRA rank": lambda c: Kind(
        c, refused_resume("--lora-rank", "8"), ("cannot resume", "--lora-rank (4 in the checkpoint, 8 now)")
    ),
    "resume with another adapter": lambda c: Kind(
        c, refused_resume("--adapter", "oft"), ("cannot resume", "--adapter ('lora' in the checkpoint, 'oft' now)")
    ),
    "resume with another learning rate": lambda c: Kind(c, refused_resume("--lr", "0.5"), ("cannot resume", "--lr")),
    "resume with another recipe": lambda c: Kind(
        c, refused_resume("--offset-noise", "0.1"), ("cannot resume", "recipe.offset_strength")
    ),
    "resume on another base model of the same shape": lambda c: Kind(
        c, refused_resume(model="sd_other"), ("cannot resume", "the --model weights (", "--model (")
    ),
    "resume on changed data": lambda c: Kind(
        c,
        refused_resume(data_change=lambda d: image(d / "0.png", 99, caption=None)),
        ("cannot resume", "the --data images and captions ("),
    ),
    "resume on a damaged checkpoint": lambda c: Kind(
        c, damaged_checkpoint, ("--resume", "checkpoint.safetensors: not a readable safetensors checkpoint")
    ),
    "a second run into a run's folder": lambda c: Kind(
        c,
        lambda ws, tmp: train_args(ws, shutil.copytree(ws / "run", tmp / "run")),
        ("holds a checkpoint: pass --resume",),
    ),
    "resume to fewer steps than done": lambda c: Kind(
        c, refused_resume("--max-steps", "1"), ("at step 2, beyond the 1 steps asked for",)
    ),
}


def damaged_checkpoint(ws: Path, tmp: Path) -> list:
    args = refused_resume()(ws, tmp)
    truncate(tmp / "run" / "train" / "checkpoint.safetensors")
    return args


OUTPUTS = {
    "export over its own single-file model": lambda c: Kind(
        c,
        lambda ws, tmp: ["export", "--model", ws / "single.safetensors", "--out", ws / "single.safetensors"],
        ("would overwrite --model",),
    ),
    "export into the model's weights": lambda c: Kind(
        c,
        lambda ws, tmp: [
            "export",
            "--model",
            ws / "sd",
            "--out",
            ws / "sd" / "unet" / "diffusion_pytorch_model.safetensors",
        ],
        ("would overwrite --model",),
    ),
    "export over the adapter": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *("export", "--model", ws / "sd", "--adapter", ws / "run" / "lora"),
            *("--out", ws / "run" / "lora" / "pytorch_lora_weights.safetensors"),
        ],
        ("would overwrite --adapter",),
    ),
    "tone-stats over the model's VAE": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *("tone-stats", "--model", ws / "sd", "--data", ws / "data"),
            *("--out", ws / "sd" / "vae" / "diffusion_pytorch_model.safetensors"),
        ],
        ("would overwrite --model",),
    ),
    "train into the folder holding its model": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *train_args(ws, tmp)[:1],
            *("--model", shutil.copytree(ws / "sd", tmp / "sd"), "--data", ws / "data", "--out", tmp),
            *("--resolution", "16"),
        ],
        ("--out", "holds --model", "could overwrite"),
    ),
    "sample into a file": lambda c: Kind(
        c, lambda ws, tmp: sample_args(ws, write(tmp / "f", "x")), ("--out", "is a file, not a directory")
    ),
    "train into a file": lambda c: Kind(
        c, lambda ws, tmp: train_args(ws, write(tmp / "f", "x")), ("--out", "is a file, not a directory")
    ),
    "eval into a file": lambda c: Kind(
        c,
        lambda ws, tmp: ["eval", "brightness", "--model", ws / "sd", "--out", write(tmp / "f", "x")],
        ("--out", "is a file"),
    ),
    "reproduce into a file": lambda c: Kind(
        c, lambda ws, tmp: ["reproduce", "--out", write(tmp / "f", "x")], ("--out", "is a file")
    ),
    "export to a folder": lambda c: Kind(
        c, lambda ws, tmp: ["export", "--model", ws / "sd", "--out", tmp], ("--out", "must end in .safetensors")
    ),
    "train --out ''": lambda c: Kind(c, lambda ws, tmp: train_args(ws, ""), ("--out is empty",)),
    "train --out the data folder": lambda c: Kind(
        c, lambda ws, tmp: train_args(ws, ws / "data"), ("--out", "holds --data", "could overwrite")
    ),
    "train --out inside the data folder": lambda c: Kind(
        c, lambda ws, tmp: train_args(ws, ws / "data" / "run"), ("--out", "holds --data")
    ),
    "train --out the class images": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *train_args(ws, ws / "data"),
            *("--class-prompt", "a photo", "--class-data", ws / "data"),
        ],
        ("--out", "holds --data"),
    ),
    "train --out a folder of other files": lambda c: Kind(
        c,
        lambda ws, tmp: train_args(ws, write(tmp / "mine" / "README.md", "my notes").parent),
        ("--out", "holds files that are not a fullrange run's"),
    ),
    "train --out with a planted lock link": lambda c: Kind(c, planted_lock, ("fullrange.lock: is a symbolic link",)),
    "train --out with a planted folder link": lambda c: Kind(
        c, planted_train_folder, ("--out", "train: is a symbolic link")
    ),
    "export over an existing file": lambda c: Kind(
        c,
        lambda ws, tmp: [
            "export",
            "--model",
            ws / "sd",
            "--out",
            write(tmp / "x.safetensors", "mine"),
            "--family",
            "sd1",
        ],
        ("--out", "already exists; give --overwrite"),
    ),
    "tone-stats over an existing file": lambda c: Kind(
        c,
        lambda ws, tmp: [
            *("tone-stats", "--model", ws / "sd", "--data", ws / "data"),
            *("--out", write(tmp / "stats.safetensors", "mine")),
        ],
        ("--out", "already exists; give --overwrite"),
    ),
}


def planted_lock(ws: Path, tmp: Path) -> list:
    """Another user's file, and a link to it planted at the lock's name in the output folder."""
    write(tmp / "victim.txt", "another user's file")
    (tmp / "out").mkdir()
    os.symlink(tmp / "victim.txt", tmp / "out" / files.LOCK)
    return train_args(ws, tmp / "out")


def planted_train_folder(ws: Path, tmp: Path) -> list:
    """A run folder whose ``train`` subfolder is a link to another user's folder."""
    write(tmp / "elsewhere" / "loss.json", "another user's file")
    write(tmp / "out" / files.LOCK, "")
    os.symlink(tmp / "elsewhere", tmp / "out" / "train")
    return train_args(ws, tmp / "out")


CAUSES = {1: NUMBERS, 2: TEXT, 3: SCAN, 4: LIBRARY, 5: CHECKPOINTS, 6: OUTPUTS}
CORPUS = [(cause, name, build(cause)) for cause, table in CAUSES.items() for name, build in table.items()]


@pytest.fixture(scope="module")
def ws_xl(ws, tiny_sdxl):
    """The workspace with the tiny SDXL beside the tiny SD, as ``xl``; an inpainting SD (9 input channels), a
    ControlNet of each, a decompression bomb and a tone-stats file whose mean is 1e30."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from fullrange.leak import ToneStats
    from fullrange.sd.tone import STATS_FORMAT

    (ws / "xl").symlink_to(tiny_sdxl)
    save_tiny_stable_diffusion(ws / "inpaint", in_channels=9)
    for name, folder in (("cn_sd", ws / "sd"), ("cn_xl", tiny_sdxl)):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        with torch.no_grad():  # a trained ControlNet's output convolutions are not its initial zeros
            for block in (controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
                for param in block.parameters():
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
        controlnet.save_pretrained(ws / name)
    write(ws / "bomb.png", png_claiming(30000, 30000))
    stats = ToneStats(torch.full((4 * 9,), 1e30, dtype=torch.float64), torch.eye(4 * 9, dtype=torch.float64), 4, 3)
    meta = {"format": STATS_FORMAT, "k": "3", "channels": "4", "images": "1", "model": "x"}
    save_file({"mean": stats.mean, "covariance": stats.covariance}, ws / "huge_tone.safetensors", metadata=meta)
    return ws


@pytest.mark.parametrize("cause,name,kind", CORPUS, ids=[f"{c}:{n}" for c, n, _ in CORPUS])
def test_bad_input_is_one_line_and_overwrites_nothing(ws_xl, tmp_path, cause, name, kind):
    ws = ws_xl
    args = kind.make(ws, tmp_path)
    protected = {p: digest(p) for p in (ws / "sd", ws / "run", ws / "single.safetensors", ws / "data")}
    inside = {p: digest(p) for p in tmp_path.iterdir()}
    result = cli(*args)
    assert_one_line_error(result, *kind.expect)
    assert protected == {p: digest(p) for p in protected}
    # A refused command leaves what it was given as it was (a refused resume has not rewritten config.json).
    assert {p: digest(p) for p in inside if p.exists()} == inside
    KINDS[cause] += 1


def messy_folder(folder: Path) -> dict[str, str]:
    """Good images among bad files of causes 2 (text) and 3 (the image scan); returns each bad file's name, cause and
    a fragment of the reason it must be listed with."""
    folder.mkdir()
    for i, value in enumerate((0, 255, 40, 215)):
        image(folder / f"good{i}.png", value)
    write(folder / "bom.txt", b"\xef\xbb\xbfa caption after a byte-order mark")
    image(folder / "bom.png", 90, caption=None)
    rotated = Image.fromarray(np.zeros((24, 40, 3), dtype=np.uint8))  # stored 40 wide, 24 high
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display
    rotated.save(folder / "rotated.jpg", exif=exif)
    write(folder / "rotated.txt", "a rotated photo")
    frames = [Image.new("RGB", (20, 20), (0, 0, 0)), Image.new("RGB", (20, 20), (255, 255, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    write(folder / "anim.txt", "an animation")
    image(folder / "meta.png", 150, caption=None)
    image(folder / "nulltext.png", 160, caption=None)
    rows = [
        {"file_name": "meta.png", "text": "captioned by metadata"},
        {"file_name": "nulltext.png", "text": None},
        "not json at all",
        [1, 2],
        {"file_name": 7, "text": "a number as a name"},
    ]
    write(folder / "metadata.jsonl", "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    bad = {  # file: (cause, a fragment of the reason it is listed with)
        "latin1.png": (2, "not UTF-8 text (byte 0xe9"),
        "uncaptioned.png": (2, "no caption"),
        "nulltext.png": (2, "no caption"),
        "metadata.jsonl": (2, "line 3: not JSON"),
        "bomb.png": (3, "decompression bomb"),
        "pipe.png": (3, "not a regular file"),
        "folder.png": (3, "not a regular file"),
        "dangling.png": (3, "not a regular file"),
        "photo.heic": (3, "heic"),
        "truncated.png": (3, "unreadable or truncated"),
        "empty.png": (3, "unreadable"),
        "text.jpg": (3, "unreadable"),
        "tiny.png": (3, "too small: 4x4"),
    }
    image(folder / "latin1.png", 10, caption=None)
    write(folder / "latin1.txt", b"caf\xe9")
    write(folder / "bomb.png", png_claiming(30000, 30000))
    write(folder / "bomb.txt", "a bomb")
    os.mkfifo(folder / "pipe.png")
    write(folder / "pipe.txt", "a pipe")
    (folder / "folder.png").mkdir()
    os.symlink(folder / "nowhere.png", folder / "dangling.png")
    write(folder / "photo.heic", b"\0\0\0\x18ftypheic" + os.urandom(200))
    write(folder / "photo.txt", "a phone photo")
    image(folder / "truncated.png", 30)
    truncate(folder / "truncated.png", 60)
    write(folder / "empty.png", b"")
    write(folder / "empty.txt", "empty")
    write(folder / "text.jpg", "this is not a JPEG")
    write(folder / "text.txt", "text")
    image(folder / "tiny.png", 50, size=(4, 4))
    image(folder / "uncaptioned.png", 70, caption=None)
    return bad


def test_a_messy_folder_trains_on_the_good_images_and_lists_the_bad(ws, tmp_path):
    """Bad files among good ones are listed with their reasons; the run trains on the rest, its loss finite."""
    bad = messy_folder(tmp_path / "data")
    result = cli(*train_args(ws, tmp_path / "out", tmp_path / "data"))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    skipped = {}
    for line in result.output.splitlines():
        if line.startswith("skipped "):
            path, reason = line.removeprefix("skipped ").split(": ", 1)
            skipped.setdefault(Path(path).name, []).append(reason)
    for name, (_, fragment) in bad.items():
        assert any(fragment in reason for reason in skipped.get(name, [])), (name, skipped.get(name))
    metadata = " ".join(skipped["metadata.jsonl"])
    rows = {2: "null text (not the caption 'None')", 4: "a list", 5: "a number as a file name"}
    assert all(f"line {n}:" in metadata for n in rows), metadata
    # good0-3, bom, rotated, anim, meta: 8 usable images.
    assert "8 images" in result.output
    losses = json.loads((tmp_path / "out" / "train" / "loss.json").read_text())
    assert losses and all(math.isfinite(v) for v in losses)
    items, _ = data.scan(tmp_path / "data", min_size=16)
    by_name = {item.path.name: item for item in items}
    assert by_name["bom.png"].caption == "a caption after a byte-order mark"
    assert by_name["meta.png"].caption == "captioned by metadata"
    assert by_name["rotated.jpg"].size == (24, 40)  # EXIF orientation applied: trained upright
    assert np.asarray(images.open_rgb(tmp_path / "data" / "anim.gif")).max() == 0  # the first (black) frame
    handled = {"bom.png": 2, "meta.png": 2, "rotated.jpg": 3, "anim.gif": 3}  # the checks just above
    KINDS.update([cause for cause, _ in bad.values()] + [2] * len(rows) + list(handled.values()))


def test_metadata_file_not_utf8_is_listed_and_sidecars_still_serve(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    image(folder / "a.png")
    write(folder / "metadata.jsonl", b'{"file_name": "b.png", "text": "caf\xe9"}\n')
    items, problems = data.scan(folder, min_size=16)
    assert [i.path.name for i in items] == ["a.png"]
    assert any(p.path.name == "metadata.jsonl" and "not UTF-8" in p.reason for p in problems)
    KINDS[2] += 1


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(ws, tmp_path):
    """Writing past a file-size limit (EFBIG, as a full disk gives ENOSPC) in a real process: one line on stderr,
    no stack trace, no partial or temporary file left."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    env = os.environ | {"TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "fullrange", "export", "--model", ws / "sd", "--out", out, "--family", "sd1"]
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit, env=env, timeout=300)
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0], done.stderr
    assert list(out.parent.iterdir()) == []
    KINDS[4] += 1


def test_a_locked_output_folder_is_refused_naming_the_holder(ws, tmp_path):
    with files.lock(tmp_path / "out", "fullrange train (another)"):
        result = cli(*train_args(ws, tmp_path / "out"))
    line = assert_one_line_error(result, "--out", "in use by another fullrange run", f"pid {os.getpid()}")
    assert "fullrange train (another)" in line
    assert not (tmp_path / "out" / "config.json").exists()
    KINDS[6] += 1


def test_sample_twice_into_one_folder_overwrites_nothing(ws, tmp_path):
    first = cli(*sample_args(ws, tmp_path / "out"))
    assert first.exit_code == 0, first.output
    before = {p.name: digest(p) for p in (tmp_path / "out").iterdir()}
    second = cli(*sample_args(ws, tmp_path / "out"))
    assert second.exit_code == 0, second.output
    after = {p.name: digest(p) for p in (tmp_path / "out").iterdir()}
    assert {k: after[k] for k in before} == before and len(after) == 2 * len(before)
    pixels = np.asarray(Image.open(tmp_path / "out" / "000000-a-dark-room.png"))
    assert pixels.std() > 0  # a finite image, not one colour from NaN latents
    KINDS[6] += 1


@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "not finite"])
def test_a_damaged_latent_cache_entry_is_encoded_again(ws, tmp_path, damage):
    model = load_stable_diffusion(ws / "sd")
    items, _ = data.scan(ws / "data", min_size=16)
    cache = tmp_path / "cache"
    means, _ = encode_latents(model, items, 16, cache, progress=False)
    entries = sorted(cache.iterdir())
    assert len(entries) == len(items) and not [p for p in entries if p.name.startswith(".")]  # no temp files left
    victim = entries[0]
    if damage == "truncated":
        truncate(victim, 40)
    else:
        stored = load_file(victim)
        stored["mean"] = stored["mean"][:2] if damage == "wrong shape" else stored["mean"] * math.inf
        save_file(stored, victim)
    again, _ = encode_latents(model, items, 16, cache, progress=False)
    torch.testing.assert_close(again, means)
    assert load_file(victim)["mean"].isfinite().all() and load_file(victim)["mean"].shape == means.shape[1:]
    KINDS[6] += 1


def test_resume_may_extend_max_steps_and_trains_on(ws, tmp_path):
    shutil.copytree(ws / "run", tmp_path / "run")
    args = train_args(ws, tmp_path / "run")
    args[args.index("--max-steps") + 1] = "3"
    result = cli(*args, "--resume", "--checkpoint-every", "1")
    assert result.exit_code == 0, result.output
    losses = json.loads((tmp_path / "run" / "train" / "loss.json").read_text())
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    KINDS[5] += 1


def test_a_link_planted_in_a_run_folder_is_replaced_never_followed(ws, tmp_path):
    """A link at a file name a run writes (diffusers' scheduler config, the loss log): the run replaces the link with
    its own file, and the link's target, another user's file, is unchanged."""
    run = shutil.copytree(ws / "run", tmp_path / "run")
    victim = write(tmp_path / "victim.json", "another user's file")
    for name in ("lora/scheduler_config.json", "train/loss.json"):
        (run / name).unlink()
        os.symlink(victim, run / name)
    args = train_args(ws, run)
    args[args.index("--max-steps") + 1] = "3"
    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "another user's file"
    for name in ("lora/scheduler_config.json", "train/loss.json"):
        assert not (run / name).is_symlink() and json.loads((run / name).read_text())
    KINDS[6] += 1


def test_class_images_never_replace_a_users_files(ws, tmp_path):
    """Class images are named by count; a user's class_00001.png and its caption keep their bytes, and the images
    made are new names with their captions."""
    classes = tmp_path / "classes"
    classes.mkdir()
    image(classes / "class_00001.png", 77, caption="the user's own caption")
    before = {p.name: p.read_bytes() for p in classes.iterdir()}
    args = [*train_args(ws, tmp_path / "out"), "--class-prompt", "a photo", "--class-data", classes]
    result = cli(*args, "--num-class-images", "3", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert {n: (classes / n).read_bytes() for n in before} == before
    made = sorted(p.name for p in classes.iterdir() if p.name not in before)
    assert made == ["class_00002.png", "class_00002.txt", "class_00003.png", "class_00003.txt"]
    KINDS[6] += 1


def test_a_run_resumes_from_another_working_directory(ws, tmp_path, monkeypatch):
    """The model and data are the same files named by other relative paths: their fingerprints decide."""
    shutil.copytree(ws / "run", tmp_path / "run")
    monkeypatch.chdir(ws)
    args = ["train", "--model", "sd", "--data", "data", "--out", tmp_path / "run", "--resolution", "16"]
    result = cli(*args, "--max-steps", "3", "--batch-size", "2", "--no-progress", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from step 2 of 3" in result.output
    KINDS[5] += 1


def test_a_full_disk_while_checkpointing_names_the_checkpoint(ws, tmp_path):
    """Training that cannot write its checkpoint (a file-size limit, as a full disk) says which file, in one line."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    env = os.environ | {"TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "fullrange", *map(str, train_args(ws, tmp_path / "out"))]
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit, env=env, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode in (1, 2) and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "File too large" in errors[0] and str(tmp_path / "out") in errors[0], errors[0]
    assert not [p for p in (tmp_path / "out").rglob(".*.tmp")]
    KINDS[4] += 1


def test_zz_corpus_counts(report):
    """At least 60 kinds across the six causes were checked in this run (the corpus tests above count them)."""
    if sum(KINDS.values()) < len(CORPUS):
        pytest.skip("run with the whole module to count the corpus")
    counts = ", ".join(f"cause {c}: {KINDS[c]}" for c in sorted(KINDS))
    report(f"bad-input corpus: {sum(KINDS.values())} kinds ({counts})")
    assert sum(KINDS.values()) >= 60 and set(KINDS) == {1, 2, 3, 4, 5, 6}
