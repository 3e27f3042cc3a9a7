"""Peak host memory (RSS) of fine-tuning an SD-shaped UNet: fullrange against a minimal diffusers + AdamW loop.

The UNet is SD 1.5's config with narrower channels (192, 384, 768, 768: 314 M parameters, 1.26 GB in fp32),
random weights, 32×32 latents, batch 1, on the CPU. Each scenario runs in a fresh process that reports its own
peak RSS; figures are printed as multiples of the UNet's fp32 bytes, from one run:

- full / LoRA (rank 4) fine-tune: two steps, a checkpoint after each;
- resume: a fresh process resumes the checkpoint written after step 1, trains step 2 and checkpoints;
- the same with a minimal loop: forward, backward, clip, AdamW, and ``safetensors.save_file`` of the weights and
  the optimizer's moments (the floor: weights, gradients and two moments are 4× the weights for AdamW);
- ``fullrange train --adapter full`` end to end, on a pipeline folder with that UNet (and a tiny VAE and text
  encoder): loading, latents, training, checkpoints and the saved pipeline;
- imports and the UNet alone, the baseline every scenario starts from.

    python benchmarks/sd_memory.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHANNELS = (192, 384, 768, 768)
LATENT = 32
SCENARIOS = ("baseline", "full", "full_resume", "lora", "lora_resume")
SCENARIOS += ("minimal_full", "minimal_full_resume", "minimal_lora", "minimal_lora_resume", "cli_full")


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build():
    """The SD-shaped UNet (random weights, seeded), latents and text states of 4 samples."""
    import torch
    from diffusers import UNet2DConditionModel

    from fullrange.models import seeded
    from fullrange.sd.testing import sd15_unet_config

    with seeded(0):
        unet = UNet2DConditionModel(**sd15_unet_config(block_out_channels=CHANNELS, sample_size=LATENT))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, LATENT, LATENT, generator=g)
    text = torch.randn(4, 77, 768, generator=g)
    return unet, latents, text


def fullrange_run(unet, latents, text, work: Path, lora: bool, resume: bool) -> None:
    """``fullrange.train`` on the UNet: two steps with a checkpoint after each; the step-1 checkpoint is kept for
    the resume scenario, which continues it for one step in a fresh process."""
    import shutil

    from fullrange import adapters, batches, losses, models, train

    if lora:
        with models.seeded(0):
            adapters.add_lora(unet, rank=4)
    else:
        unet.requires_grad_(True)

    def draw(batch_size, generator):
        import torch

        index = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
        return batches.Batch(latents[index], {"encoder_hidden_states": text[index]})

    out = work / ("lora" if lora else "full")
    kept = work / f"{out.name}_step1"

    def keep(step, model):
        if step == 1 and not resume:
            kept.mkdir(exist_ok=True)
            shutil.copy(out / "checkpoint.safetensors", kept / "checkpoint.safetensors")

    config = train.TrainConfig(steps=2, batch_size=1, lr=1e-4, warmup=1, checkpoint_every=1)
    train.train(unet, draw, losses.get_recipe("baseline"), config, kept if resume else out, on_checkpoint=keep)


def minimal_run(unet, latents, text, work: Path, lora: bool, resume: bool) -> None:
    """The diffusers examples' step, reduced: forward, MSE to eps, backward, clip, AdamW, zero_grad; after each
    step the trained weights and the optimizer's moments are saved with safetensors' ``save_file``. Resuming
    reads them back one tensor at a time into the model and a fresh optimizer state."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fullrange import adapters, models, prediction, schedules

    if lora:
        with models.seeded(0):
            adapters.add_lora(unet, rank=4)
    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    params = list(trained.values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    alphas_cumprod = schedules.scaled_linear().alphas_cumprod.float()
    path = work / f"minimal_{'lora' if lora else 'full'}_step1.safetensors"
    first = 1 if resume else 0
    if resume:
        with safe_open(path, "pt") as f, torch.no_grad():
            for name, p in trained.items():
                p.copy_(f.get_tensor(f"model.{name}"))
            state = {
                i: {k: f.get_tensor(f"optimizer.{i}.{k}") for k in ("step", "exp_avg", "exp_avg_sq")}
                for i in range(len(params))
            }
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        del state
    g = torch.Generator().manual_seed(0)
    for step in range(first, 2):
        x0, cond = latents[:1], text[:1]
        t = torch.randint(0, 1000, (1,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        out = unet(prediction.add_noise(x0, eps, alphas_cumprod[t]), t, encoder_hidden_states=cond).sample
        torch.nn.functional.mse_loss(out, eps).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tensors = {f"model.{n}": p.detach() for n, p in trained.items()}
        for i, s in optimizer.state_dict()["state"].items():
            tensors |= {f"optimizer.{i}.{k}": v for k, v in s.items()}
        save_file(tensors, path if step == 0 else work / "minimal_last.safetensors")


def cli_full(work: Path) -> None:
    """``fullrange train --adapter full`` end to end on a pipeline folder with the SD-shaped UNet."""
    from typer.main import get_command

    from fullrange.cli import app

    args = ["train", "--model", str(work / "pipeline"), "--data", str(work / "data"), "--out", str(work / "cli")]
    args += ["--adapter", "full", "--resolution", str(2 * LATENT), "--max-steps", "2", "--checkpoint-every", "1"]
    get_command(app).main([*args, "--no-progress"], standalone_mode=False)


def setup(work: Path) -> None:
    """The pipeline folder (SD-shaped UNet, tiny VAE and text encoder) and four captioned images."""
    import numpy as np
    from PIL import Image

    from fullrange.sd.testing import save_tiny_stable_diffusion, sd15_unet_config

    if not (work / "pipeline").is_dir():
        config = sd15_unet_config(block_out_channels=CHANNELS, sample_size=LATENT)
        save_tiny_stable_diffusion(work / "pipeline", unet_config=config)
    (work / "data").mkdir(exist_ok=True)
    for i, value in enumerate((0, 255, 40, 215)):
        Image.fromarray(np.full((2 * LATENT, 2 * LATENT, 3), value, dtype=np.uint8)).save(work / "data" / f"{i}.png")
        (work / "data" / f"{i}.txt").write_text(f"flat grey {value}")


def child(name: str, work: Path) -> dict:
    """Run one scenario in this (fresh) process; returns its peak RSS and the UNet's fp32 bytes."""
    unet_bytes = None
    start = time.perf_counter()
    if name == "cli_full":
        cli_full(work)
    else:
        unet, latents, text = build()
        unet_bytes = sum(p.numel() * 4 for p in unet.parameters())
        if name != "baseline":
            run = minimal_run if name.startswith("minimal") else fullrange_run
            run(unet, latents, text, work, lora="lora" in name, resume=name.endswith("resume"))
    return {"peak": peak_rss(), "unet_bytes": unet_bytes, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="Folder for checkpoints and the pipeline [default: a temporary one].")
    parser.add_argument("--child", choices=(*SCENARIOS, "setup"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "setup":
        setup(args.work)
        return
    if args.child is not None:
        print(json.dumps(child(args.child, args.work)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--child", "setup", "--work", str(work)], check=True)
        results = {}
        for name in SCENARIOS:
            env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
            run = subprocess.run(
                [sys.executable, __file__, "--child", name, "--work", str(work)],
                capture_output=True,
                text=True,
                env=env,
            )
            if run.returncode != 0:
                sys.exit(f"{name} failed:\n{run.stderr[-3000:]}")
            results[name] = json.loads(run.stdout.strip().splitlines()[-1])
            print(
                f"  {name}: peak {results[name]['peak'] / 2**30:.2f} GiB ({results[name]['seconds']:.0f} s)", flush=True
            )
    unet_bytes = results["baseline"]["unet_bytes"]
    import torch

    print(
        f"\nSD-shaped UNet {unet_bytes / 4 / 1e6:.1f} M parameters ({unet_bytes / 1e9:.2f} GB fp32), "
        f"{LATENT}x{LATENT} latents, batch 1, CPU, torch {torch.__version__}; peak RSS as multiples of the UNet's bytes"
    )
    print(f"{'scenario':<44} {'fullrange':>10} {'minimal':>10} {'ratio':>7}")
    rows = [
        ("imports + UNet built (baseline)", "baseline", None),
        ("full fine-tune, 2 steps, checkpoint after each", "full", "minimal_full"),
        ("full: resume, 1 step, checkpoint", "full_resume", "minimal_full_resume"),
        ("LoRA rank 4, 2 steps, checkpoint after each", "lora", "minimal_lora"),
        ("LoRA: resume, 1 step, checkpoint", "lora_resume", "minimal_lora_resume"),
        ("fullrange train --adapter full, end to end", "cli_full", None),
    ]
    for label, ours, theirs in rows:
        a = results[ours]["peak"] / unet_bytes
        if theirs is None:
            print(f"{label:<44} {a:>9.2f}x {'':>10} {'':>7}")
        else:
            b = results[theirs]["peak"] / unet_bytes
            print(f"{label:<44} {a:>9.2f}x {b:>9.2f}x {a / b:>7.3f}")


if __name__ == "__main__":
    main()
