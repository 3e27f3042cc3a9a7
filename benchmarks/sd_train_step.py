"""Training-step time (and peak GPU memory) of ``fullrange.train`` against a minimal diffusers loop, LoRA.

Same UNet, LoRA adapter, batch and optimizer. On a GPU the UNet is SD 1.5-shaped (its public config, random
weights) at 512×512 (64×64 latents), batch 1, bf16; on a CPU a small SD-like UNet at 32×32 latents, fp32.
Per-step time is (T(2n) - T(n)) / n, each the minimum of interleaved repeats, so set-up cancels;
prints both, their ratio and it/s, from one run.

    python benchmarks/sd_train_step.py [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from diffusers import UNet2DConditionModel

from fullrange import adapters, batches, losses, models, prediction, schedules, train
from fullrange.sd.testing import sd15_unet_config

SD15 = sd15_unet_config()  # the SD 1.5 UNet config fullrange loads single files with
SMALL = sd15_unet_config(
    sample_size=32, block_out_channels=(64, 128, 128, 128), cross_attention_dim=128, layers_per_block=1
)


def build(cuda: bool) -> tuple[UNet2DConditionModel, torch.Tensor, torch.Tensor]:
    config = SD15 if cuda else SMALL
    with models.seeded(0):
        unet = UNet2DConditionModel(**config)
        adapters.add_lora(unet, rank=4)
    size = config["sample_size"]
    latents = torch.randn(8, 4, size, size)
    text = torch.randn(8, 77, config["cross_attention_dim"])
    return unet, latents, text


def fullrange_run(unet, latents, text, steps, mixed) -> float:
    def draw(batch_size, generator):
        index = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
        return batches.Batch(latents[index], {"encoder_hidden_states": text[index]})

    config = train.TrainConfig(
        steps=steps, batch_size=1, lr=1e-4, warmup=1, checkpoint_every=10**9, mixed_precision=mixed
    )
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train.train(unet, draw, losses.get_recipe("baseline"), config, out, progress=False, resume=False)
        _sync()
        return time.perf_counter() - start


def minimal_run(unet, latents, text, steps, mixed) -> float:
    """The diffusers example's LoRA loop, reduced to its step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = unet.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    alphas_cumprod = schedules.scaled_linear().alphas_cumprod.float().to(device)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if mixed == "bf16" else torch.float32
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, latents.shape[0], (1,), generator=g)
        x0, cond = latents[index].to(device), text[index].to(device)
        t = torch.randint(0, 1000, (1,), generator=g).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        with torch.autocast(device, dtype=dtype, enabled=mixed == "bf16"):
            out = unet(prediction.add_noise(x0, eps, alphas_cumprod[t]), t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(out.float(), eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fns, unet, latents, text, steps, mixed, repeats: int = 3) -> list[tuple[float, float | None]]:
    """Per-step time (min over interleaved repeats of T(n) and T(2n)) and peak GPU memory of each loop."""
    times = {fn: ([], []) for fn in fns}
    peaks = {}
    for fn in fns:
        fn(copy.deepcopy(unet), latents, text, 2, mixed)  # warm-up
    for _ in range(repeats):
        for fn in fns:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times[fn][0].append(fn(copy.deepcopy(unet), latents, text, steps, mixed))
            times[fn][1].append(fn(copy.deepcopy(unet), latents, text, 2 * steps, mixed))
            peaks[fn] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return [((min(times[fn][1]) - min(times[fn][0])) / steps, peaks[fn]) for fn in fns]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    mixed = "bf16" if cuda else "no"
    unet, latents, text = build(cuda)
    (ours, ours_mem), (theirs, theirs_mem) = measure(
        [fullrange_run, minimal_run], unet, latents, text, args.steps, mixed
    )
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    shape = "SD 1.5 UNet, 512x512" if cuda else "small SD-like UNet, 32x32 latents"
    print(f"LoRA rank 4, {shape}, batch 1, {mixed}, {where}, torch {torch.__version__}")
    for name, step, mem in (("fullrange.train", ours, ours_mem), ("minimal loop", theirs, theirs_mem)):
        memory = f", peak {mem:.2f} GiB" if mem is not None else ""
        print(f"{name:<16} {step * 1000:8.1f} ms/step  {1 / step:6.2f} it/s{memory}")
    print(f"ratio (fullrange / minimal) {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
