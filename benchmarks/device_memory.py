"""Peak device memory of one training step, projected from the CPU: real-shaped SD 1.5 and SDXL, no real memory.

Each profile's UNet (and, where a run keeps them there, its VAE and text encoders) is built from fullrange's bundled
configs on the meta device, given its adapter by fullrange's own code, then turned into fake CPU tensors: torch's
``FakeTensorMode`` runs every kernel on shapes and dtypes only. One training step, fullrange's own (``prepare``,
``make_stepper``, ``train_step``: forward under autocast, backward, optimizer step), runs under torch's
``MemTracker``, which sorts every live tensor by kind; the peak and its breakdown are printed in GB (10^9 bytes).
Beside it the same step as diffusers' training scripts take it (``train_text_to_image_lora.py`` and
``train_text_to_image.py``): frozen weights in the half type, the VAE and text encoders on the device encoding
each batch, trained weights fp32, AdamW.

Profiles, batch 1: SD 1.5 at 512² (64² latents), SDXL at 1024² (128² latents), LoRA (rank 16, fullrange's targets)
and full fine-tunes; settings: ``minimal`` (diffusers' choices), ``fp32`` (fullrange's defaults: no mixed
precision) and ``--memory`` presets. Left out, as by any projection: the CUDA context (~0.3-0.5 GB), the caching
allocator's slack and fragmentation, and kernel workspaces (cuBLAS, cuDNN); the CPU's attention kernel stands in for
CUDA's flash / memory-efficient ones (neither keeps the attention matrix).

    python benchmarks/device_memory.py [--profiles sd1-lora,...] [--settings minimal,8gb,...] [--jobs 2]
    python benchmarks/device_memory.py --cuda    # on a CUDA machine: the same steps for real, max_memory_allocated

Two caveats of the tracker are worked around here: it hooks every parameter's gradient, which fails on frozen ones
(they get none), and it updates every module's own peak on every operation (only the step's peak is kept here,
which takes SDXL's step from hours to minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import torch

PROFILES = {
    "sd1-lora": ("sd1", "lora", 512),
    "sd1-full": ("sd1", "full", 512),
    "sdxl-lora": ("sdxl", "lora", 1024),
    "sdxl-full": ("sdxl", "full", 1024),
}
SETTINGS = ("minimal", "minimal-gc", "fp32", "24gb", "16gb", "12gb", "8gb")
KINDS = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer", "Activation": "activations"}
KINDS |= {"Temp": "temporaries", "Buffer": "buffers", "Other": "other"}
RANK = 16
GB = 1e9


def configs(family: str) -> dict:
    return json.loads(resources.files("fullrange").joinpath(f"configs/{family}.json").read_text())


def build(family: str, encoders: bool):
    """The UNet (and the VAE and text encoders) of ``family`` on the meta device, from the bundled configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = configs(family)
    clean = {k: v for k, v in parts["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**clean)
        if not encoders:
            return unet, None, []
        vae = AutoencoderKL(**{k: v for k, v in parts["vae"].items() if not k.startswith("_")})
        texts = [CLIPTextModel(CLIPTextConfig(**parts["text_encoder"]))]
        if "text_encoder_2" in parts:
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**parts["text_encoder_2"])))
    return unet, vae, texts


def fakeify(module: torch.nn.Module, mode) -> None:
    """Every meta parameter and buffer of ``module`` as a fake CPU tensor of ``mode`` (same object layout)."""
    from torch._subclasses.fake_tensor import FakeTensor

    for child in module.modules():
        for name, p in list(child._parameters.items()):
            if p is not None:
                fake = FakeTensor(mode, p.data, torch.device("cpu"))
                child._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in list(child._buffers.items()):
            if b is not None:
                child._buffers[name] = FakeTensor(mode, b, torch.device("cpu"))


def tracker():
    """torch's MemTracker, with frozen parameters left without a gradient hook and only the whole step's peak kept."""
    from torch.distributed._tools.mem_tracker import MemTracker

    no_hook = types.SimpleNamespace(remove=lambda: None)

    class StepTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad:  # torch refuses a gradient hook on it; it never has a gradient
                    self._param_to_grad_hook_handles.setdefault(p, (no_hook, no_hook))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state) -> None:
            for device, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snap["Total"]:
                    self._peak_mem[device] = snap["Total"]
                    self._peak_mem_snap[device] = dict(snap)

    return StepTracker()


class Environment:
    """What the training step asks of accelerate, for one process on ``device``: autocast in ``dtype``, backward,
    and a reduce whose value (a fake tensor has none) is zero."""

    num_processes, process_index = 1, 0

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype

    def autocast(self):
        from fullrange.train import AUTOCAST

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.dtype, cache_enabled=AUTOCAST.cache_enabled)

    def backward(self, loss):
        loss.backward()

    def reduce(self, value, reduction="mean"):
        return 0.0

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def no_sync(self, model):
        return contextlib.nullcontext()


def train_config(setting: str, kind: str):
    """fullrange's TrainConfig for ``setting``: its defaults (``fp32``) or a ``--memory`` preset as ``fullrange
    train`` resolves it for an adapter of ``kind``."""
    from fullrange.sd.config import finetune_config

    tables = {"model": {"path": "m"}, "data": {"path": "d"}, "output": {"path": "o"}, "adapter": {"kind": kind}}
    if setting != "fp32":
        tables["train"] = {"memory": setting}
    return finetune_config(tables).train


def sd_spec(family: str):
    """The family's own sampling spec (its bundled scheduler config)."""
    from fullrange.scheduler_config import spec_from_config

    return spec_from_config(configs(family)["scheduler"])


def step_inputs(family: str, unet, resolution: int):
    """One batch of zero latents and text states at ``resolution`` (CPU tensors, as the run's cached batches are),
    and the fine-tuning recipe of the family's own spec."""
    from fullrange.batches import Batch
    from fullrange.sd.config import NoiseConfig
    from fullrange.sd.finetune import recipe_for

    latent = resolution // 8
    cond = {"encoder_hidden_states": torch.zeros(1, 77, unet.config.cross_attention_dim)} | sdxl_cond(1, family)
    return Batch(torch.zeros(1, 4, latent, latent), cond), recipe_for(NoiseConfig(), sd_spec(family))


def sdxl_cond(batch: int, family: str) -> dict:
    if family != "sdxl":
        return {}
    return {"added_cond_kwargs": {"text_embeds": torch.zeros(batch, 1280), "time_ids": torch.zeros(batch, 6)}}


def fullrange_step(family: str, kind: str, resolution: int, setting: str) -> dict:
    """fullrange's own step on the profile, tracked; returns GB by kind, the peak and the settings."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fullrange.adapters import ADAPTERS, AdapterConfig
    from fullrange.precision import HALF
    from fullrange.train import make_stepper, prepare, train_step

    config = train_config(setting, kind)
    unet, _, _ = build(family, encoders=False)
    model = types.SimpleNamespace(unet=unet, text_encoders={})
    ADAPTERS[kind].attach(model, AdapterConfig(kind=kind, rank=RANK), config.seed)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakeify(unet, mode)
    batch, recipe = step_inputs(family, unet, resolution)
    dtype = HALF.get(config.mixed_precision)
    with mode:
        trainable = prepare(unet, config)
        params = list(trainable.values())
        stepper = make_stepper(params, config, torch.device("cpu"))
        mt = tracker()
        optimizers = getattr(stepper, "optimizers", [stepper])
        if getattr(stepper, "bf16", False):  # its moments, cast after each step, are optimizer state
            moments = stepper._moments

            def tracked(index, dtype):
                moments(index, dtype)
                mt._track_optimizer_states(mt._ref_class.OPT, stepper.optimizers[index])

            stepper._moments = tracked
        mt.track_external(unet, *optimizers)
        unet.train()
        with mt:
            environment = Environment(torch.device("cpu"), dtype)
            args = (unet, lambda n, g: batch, recipe, config, torch.Generator(), environment, stepper, params)
            train_step(*args, lambda loss: None)
    summary = {k: v for k, v in vars(config).items() if k in SHOWN and v != SHOWN[k]}
    return breakdown(mt) | {"settings": summary, "trained": sum(p.numel() for p in params)}


SHOWN = {"mixed_precision": "no", "gradient_checkpointing": False, "optimizer": "adamw", "full_bf16": False}
SHOWN |= {"fused_backward": False, "grad_clip": 1.0}
"""The TrainConfig fields that decide memory, and their defaults (the table shows those that differ)."""


def minimal_step(family: str, kind: str, resolution: int, checkpointing: bool) -> dict:
    """The step of diffusers' training scripts under bf16 mixed precision: frozen weights (VAE, text encoders, a
    LoRA's UNet) in bf16 on the device, the batch encoded by them, the trained weights fp32, AdamW; LoRA by peft
    on the attention projections, as the scripts target them."""
    from peft import LoraConfig
    from torch._subclasses.fake_tensor import FakeTensorMode

    unet, vae, texts = build(family, encoders=True)
    for part in (unet, vae, *texts):
        part.requires_grad_(False)
    if kind == "lora":
        targets = ["to_k", "to_q", "to_v", "to_out.0"]
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets))
    else:
        unet.requires_grad_(True)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for part in (unet, vae, *texts):
        fakeify(part, mode)
    with mode:
        from fullrange.precision import cast_parameters

        for part in (unet, vae, *texts):
            cast_parameters(part, torch.bfloat16)  # the frozen ones: `.to(weight_dtype)` in the scripts
        if checkpointing:
            unet.enable_gradient_checkpointing()
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        mt = tracker()
        mt.track_external(unet, vae, *texts, optimizer)
        pixels = torch.zeros(1, 3, resolution, resolution)
        ids = torch.zeros(1, 77, dtype=torch.long)
        unet.train()
        with mt:
            with torch.no_grad():
                latents = vae.encode(pixels.to(torch.bfloat16)).latent_dist.sample() * 0.13025
                if family == "sdxl":
                    first = texts[0](ids, output_hidden_states=True).hidden_states[-2]
                    second = texts[1](ids, output_hidden_states=True)
                    states = torch.cat([first, second.hidden_states[-2]], dim=-1)
                    extra = {"added_cond_kwargs": {"text_embeds": second.text_embeds, "time_ids": torch.zeros(1, 6)}}
                else:
                    states, extra = texts[0](ids)[0], {}
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (1,))
            with torch.autocast("cpu", torch.bfloat16):
                output = unet(latents + noise, t, states, **extra).sample
            loss = torch.nn.functional.mse_loss(output.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    settings = {"mixed_precision": "bf16"} | ({"gradient_checkpointing": True} if checkpointing else {})
    return breakdown(mt) | {"settings": settings, "trained": sum(p.numel() for p in params)}


def breakdown(mt) -> dict:
    """The tracker's peak, by kind, in GB."""
    snap = next(iter(mt.get_tracker_snapshot("peak").values()))
    out = {KINDS[k]: snap.get(k, 0) / GB for k in KINDS}
    return out | {"peak": snap["Total"] / GB}


def one(profile: str, setting: str) -> dict:
    family, kind, resolution = PROFILES[profile]
    began = time.process_time()
    if setting.startswith("minimal"):
        result = minimal_step(family, kind, resolution, setting == "minimal-gc")
    else:
        result = fullrange_step(family, kind, resolution, setting)
    return result | {"cpu_seconds": time.process_time() - began}


def cuda_step(profile: str, setting: str) -> float:
    """On a CUDA device: fullrange's step for real (random weights), returns ``max_memory_allocated`` in GB. Never
    run where this was written (no GPU)."""
    from fullrange.adapters import ADAPTERS, AdapterConfig
    from fullrange.precision import HALF
    from fullrange.train import make_stepper, prepare, train_step

    family, kind, resolution = PROFILES[profile]
    config = train_config(setting, kind)
    device = torch.device("cuda")
    from diffusers import UNet2DConditionModel

    clean = {k: v for k, v in configs(family)["unet"].items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**clean)
    ADAPTERS[kind].attach(types.SimpleNamespace(unet=unet, text_encoders={}), AdapterConfig(kind=kind, rank=RANK), 0)
    trainable = prepare(unet, config)
    unet.to(device)
    torch.cuda.reset_peak_memory_stats()
    params = list(trainable.values())
    stepper = make_stepper(params, config, device)
    batch, recipe = step_inputs(family, unet, resolution)
    environment = Environment(device, HALF.get(config.mixed_precision))
    environment.reduce = lambda value, reduction="mean": value
    unet.train()
    train_step(unet, lambda n, g: batch, recipe, config, torch.Generator(), environment, stepper, params, lambda _: 0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GB


def table(results: dict) -> str:
    head = "| profile | setting | peak | parameters | gradients | optimizer | activations | temporaries | settings |"
    rows = [head, "|" + "---|" * 9]
    for (profile, setting), r in results.items():
        if "error" in r:
            rows.append(f"| {profile} | {setting} | {r['error']} |" + " |" * 7)
            continue
        shown = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        kinds = " | ".join(f"{r[k]:.2f}" for k in list(KINDS.values())[:5])
        rows.append(f"| {profile} | {setting} | **{r['peak']:.2f}** | {kinds} | {shown} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--jobs", type=int, default=2, help="Steps projected at once (each in its own process).")
    parser.add_argument("--one", nargs=2, metavar=("PROFILE", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help="Measure on the CUDA device instead of projecting.")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    runs = [(p, s) for p in args.profiles.split(",") for s in args.settings.split(",")]
    if args.cuda:
        for profile, setting in runs:
            if not setting.startswith("minimal"):
                print(f"{profile} {setting}: max_memory_allocated {cuda_step(profile, setting):.2f} GB", flush=True)
        return

    def child(run):
        done = subprocess.run([sys.executable, __file__, "--one", *run], capture_output=True, text=True)
        if done.returncode:
            return run, {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]}
        return run, json.loads(done.stdout.strip().splitlines()[-1])

    began = time.time()
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for run, result in pool.map(child, runs):
            results[run] = result
            seconds = result.get("cpu_seconds", 0)
            print(f"{run[0]} {run[1]}: {result.get('peak', result.get('error'))} ({seconds:.0f} CPU-s)", flush=True)
    print(f"\n{len(runs)} steps projected in {time.time() - began:.0f} s with {args.jobs} at once\n")
    print(table(results))


if __name__ == "__main__":
    main()
