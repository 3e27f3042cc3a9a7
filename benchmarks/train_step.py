"""Time of one training step of ``fullrange.train`` against a minimal hand-written PyTorch loop.

Same tiny UNet, batch, optimizer (AdamW) and gradient clipping; ``fullrange.train`` also does label
dropout, the lr schedule and EMA. Per-step time is measured as (T(n2) - T(n1)) / (n2 - n1) so set-up and
the final checkpoint cancel out. Prints both and their ratio from one run.

    python benchmarks/train_step.py [--size 16] [--batch 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from fullrange import batches, losses, models, prediction, toy, train


def fullrange_run(images, labels, steps: int, batch: int, size: int) -> float:
    model = models.tiny_unet(size, 3)
    config = train.TrainConfig(
        steps=steps, batch_size=batch, lr=1e-3, warmup=1, ema_decay=0.999, checkpoint_every=10**9
    )
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train.train(
            model,
            batches.labelled(images, labels, len(toy.LABELS)),
            losses.get_recipe("baseline"),
            config,
            out,
            progress=False,
            resume=False,
        )
        return time.perf_counter() - start


def minimal_run(images, labels, steps: int, batch: int, size: int) -> float:
    model = models.tiny_unet(size, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    alphas_cumprod = losses.get_recipe("baseline").spec.schedule.alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, images.shape[0], (batch,), generator=g)
        x0, cond = images[index], labels[index]
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = prediction.add_noise(x0, eps, alphas_cumprod[t])
        loss = torch.nn.functional.mse_loss(model(x_t, t, class_labels=cond).sample, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def per_step(fn, images, labels, args) -> float:
    fn(images, labels, 2, args.batch, args.size)  # warm-up
    t1 = min(fn(images, labels, args.steps, args.batch, args.size) for _ in range(2))
    t2 = min(fn(images, labels, 2 * args.steps, args.batch, args.size) for _ in range(2))
    return (t2 - t1) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    images, labels = toy.synthetic_images(256, args.size, 3)
    ours = per_step(fullrange_run, images, labels, args)
    minimal = per_step(minimal_run, images, labels, args)
    print(
        f"tiny UNet, 3x{args.size}x{args.size}, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"fullrange.train  {ours * 1000:8.1f} ms/step")
    print(f"minimal loop     {minimal * 1000:8.1f} ms/step")
    print(f"ratio            {ours / minimal:8.3f}")


if __name__ == "__main__":
    main()
