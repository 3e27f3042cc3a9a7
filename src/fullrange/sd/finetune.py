"""Fine-tune Stable Diffusion with the fixes: load → batches → adapter → train → save.

The training itself is :func:`fullrange.train.train`; this module turns a :class:`FinetuneConfig` into its inputs,
and the result into files other tools load: a diffusers pipeline whose scheduler config says how the model must be
sampled (prediction type, zero terminal SNR, trailing steps), LoRA weights for ``load_lora_weights``, and for OFT
(which diffusers cannot load) the adapter plus a merged pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data, schedules
from ..adapters import ADAPTERS
from ..batches import Batches, with_prior
from ..config import ConfigError
from ..files import Busy, claim_output_folder, fingerprint, lock, real_folder, sha256, write_bytes
from ..images import save_png, to_uint8
from ..losses import Recipe
from ..precision import HALF
from ..sampling import SamplingSpec
from ..train import check_resume, process_state, train
from .card import write_model_card
from .config import DataConfig, FinetuneConfig, NoiseConfig
from .export import save_pipeline
from .latents import bucket_step, image_batches
from .load import load_adapter, load_stable_diffusion
from .model import StableDiffusion, TextConditionedUNet
from .sample import SampleSettings, generate, resolve, save_grid, save_images

RUN_FOLDERS = ("train", "cache", "lora", "oft", "pipeline", "checkpoints", "validation", "class_images")
"""The folders a run writes inside its output folder."""


def finetune(config: FinetuneConfig, *, progress: bool = True, log=print) -> dict[str, Path]:
    """Run a fine-tune end to end; returns the written outputs by kind (on the main process; ``{}`` elsewhere).

    The output folder is locked for the run (a second run into it is refused, naming the holder). An existing
    checkpoint there is continued only if it was made from the same base model, data, adapter and recipe
    (:func:`~fullrange.train.check_resume`), which is decided before anything is written."""
    inputs = {"data.path": config.data.path, "data.class_data": config.data.class_data}
    inputs |= {"model.path": config.model.path, "model.config": config.model.config}
    try:
        out = claim_output_folder(config.output.path, inputs)
        for name in RUN_FOLDERS:
            if (out / name).is_symlink():
                raise ValueError(f"{out / name}: is a symbolic link; fullrange does not write through links")
    except ValueError as err:
        raise ConfigError("output.path", str(err)) from None
    main = process_state().is_main_process
    try:
        with lock(out, "fullrange train") if main else contextlib.nullcontext():
            return _finetune(config, out, progress, log)
    except Busy as err:
        raise ConfigError("output.path", str(err)) from None


def _finetune(config: FinetuneConfig, out: Path, progress: bool, log) -> dict[str, Path]:
    if not process_state().is_main_process:  # one process speaks for a distributed run
        log = lambda line: None  # noqa: E731
    model = load_stable_diffusion(config.model)
    recipe = recipe_for(config.noise, model.spec)
    spec = recipe.spec
    log(f"recipe: {spec.prediction}, zero terminal SNR {spec.schedule.zero_terminal_snr}, noise {recipe.noise}")
    items = _scan(config.data.path, "data.path", _min_size(model, config.data), log, config.data)
    identity = {
        "model": {"path": str(model.source), "fingerprint": fingerprint(model.source)},
        "data": {"path": str(Path(config.data.path).resolve()), "fingerprint": data_fingerprint(items)},
        "adapter": asdict(config.adapter),
    }
    checkpoint = out / "train" / "checkpoint.safetensors"
    if checkpoint.exists():  # decided before anything is written
        try:
            check_resume(
                checkpoint, {"recipe": recipe.describe(), "train": asdict(config.train), **identity}, config.train.steps
            )
        except ValueError as err:
            raise ConfigError("resume", str(err)) from None
    write_bytes(
        out / "config.json", json.dumps({"config": asdict(config), "recipe": recipe.describe()}, indent=2).encode()
    )
    batches = training_batches(model, config.data, items, out, progress, log, token_ids=config.adapter.text_encoder)
    for part in frozen_encoders(model, config).values():  # off the training device once the caches are complete
        part.to("cpu")
    count = ADAPTERS[config.adapter.kind].attach(model, config.adapter, config.train.seed)
    where = " (UNet and text encoders)" if config.adapter.text_encoder else ""
    processes = process_state().num_processes
    where += f", on {processes} processes" if processes > 1 else ""
    log(f"{config.adapter.kind}: {count:,} trainable parameters{where}")
    tuned = replace(model, spec=recipe.spec)
    on_checkpoint = at_checkpoint(model, tuned, config, out, log)
    result = train(
        TextConditionedUNet(model) if config.adapter.text_encoder else model.unet,
        batches,
        recipe,
        config.train,
        out / "train",
        progress=progress,
        description="fine-tune",
        on_checkpoint=on_checkpoint,
        identity=identity,
        log=log,
    )
    if not process_state().is_main_process:  # under accelerate launch / torchrun, one process writes
        return {}
    if result.ema is not None:
        result.apply_ema()  # into tuned.unet, which is the model trained
    outputs = save_outputs(tuned, model, config, out, log)
    grids = sorted((out / "validation").glob("step_*/grid-*.png"))
    processes, validation = process_state().num_processes, grids[-1] if grids else None
    outputs["card"] = write_model_card(
        out / "README.md", config, model, tuned.spec, outputs, processes=processes, validation=validation
    )
    for kind, path in outputs.items():
        log(f"wrote {kind}: {path}")
    return outputs


def frozen_encoders(model: StableDiffusion, config: FinetuneConfig) -> dict[str, torch.nn.Module]:
    """The parts a run needs only to encode its data (then cached) and to sample: the VAE, and the text encoders
    unless they train."""
    return {"vae": model.vae} | ({} if config.adapter.text_encoder else model.text_encoders)


@contextlib.contextmanager
def on_device(parts, device: torch.device):
    """``parts`` (modules) on ``device`` for the block, and back where they were after it."""
    homes = [next(part.parameters()).device for part in parts]
    for part in parts:
        part.to(device)
    try:
        yield
    finally:
        for part, home in zip(parts, homes, strict=True):
            part.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def for_validation(model: StableDiffusion, config: FinetuneConfig):
    """``model`` as validation samples it, during the block: beside the UNet in training, copies of the frozen
    encoders (:func:`frozen_encoders`, kept on the CPU in their own type) on the UNet's device, in the half type
    of ``train.mixed_precision`` (the VAE only in bf16: SD's VAE overflows fp16), under autocast. Copies, so the
    encoders the run saves keep their precision."""
    device = next(model.unet.parameters()).device
    precision = config.train.mixed_precision
    copies = {}
    for name, part in frozen_encoders(model, config).items():
        half = precision == "bf16" or (precision == "fp16" and name != "vae")
        copies[name] = copy.deepcopy(part).to(device, HALF[precision] if half else None)
    autocast = torch.autocast(device.type, HALF[precision]) if precision != "no" else contextlib.nullcontext()
    try:
        with autocast:
            yield replace(model, **copies)
    finally:
        copies.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def recipe_for(noise: NoiseConfig, spec: SamplingSpec) -> Recipe:
    """The training recipe: the checkpoint's own schedule and target, changed as ``noise`` asks. Zero terminal SNR
    rescales that schedule, trains v-prediction unless told otherwise, and samples with trailing steps;
    ``flow_shift`` makes it rectified flow with that shift (SD3's training: logit-normal times)."""
    schedule = spec.schedule
    if noise.flow_shift:  # the conversion to rectified flow (the reproduction's convert experiment measures it)
        spec = SamplingSpec(schedules.rectified_flow(noise.flow_shift), "flow")
        schedule = spec.schedule
    if noise.zero_terminal_snr and not schedule.zero_terminal_snr:
        schedule = schedules.rescale_zero_terminal_snr(schedule)
    try:
        if schedule.zero_terminal_snr:
            prediction = noise.prediction or ("v_prediction" if spec.prediction == "epsilon" else spec.prediction)
            spec = SamplingSpec(schedule, prediction, "trailing", 0)
        else:
            spec = replace(spec, prediction=noise.prediction or spec.prediction)
    except ValueError as err:
        raise ConfigError("noise.prediction", str(err)) from None
    kind = "offset" if noise.offset else "pyramid" if noise.pyramid else "gaussian"
    return Recipe(
        name="finetune",
        spec=spec,
        noise=kind,
        offset_strength=noise.offset,
        pyramid_discount=noise.pyramid,
        input_perturbation=noise.input_perturbation,
        weighting="min_snr" if noise.min_snr_gamma else "none",
        snr_gamma=noise.min_snr_gamma or 5.0,
        weight_floor=noise.snr_weight_floor,
        timestep_draw="logit_normal" if isinstance(schedule, schedules.RectifiedFlow) else "uniform",
    )


def _min_size(model: StableDiffusion, config: DataConfig) -> int:
    """The shortest image side the data config can use (its resolution, or the smallest bucket's side)."""
    if not config.buckets:
        return config.resolution
    step = bucket_step(model)
    if config.resolution % step:
        raise ConfigError(
            "data.resolution",
            f"must be a multiple of {step} with buckets (the VAE's factor times the UNet's downsampling), "
            f"got {config.resolution}",
        )
    return min(min(wh) for wh in data.buckets(config.resolution, step))


def data_fingerprint(items: list[data.Item]) -> str:
    """What the data is: every usable image's name, content hash and caption."""
    digest = hashlib.sha256()
    for item in items:
        name = item.path.name if item.repeats == 1 else str(item.path.relative_to(item.path.parent.parent))
        repeats = [] if item.repeats == 1 else [item.repeats]  # a run of plain folders keeps its old fingerprint
        digest.update(json.dumps([name, sha256(item.path), item.caption, *repeats]).encode())
    return digest.hexdigest()[:16]


def training_batches(
    model: StableDiffusion,
    config: DataConfig,
    items: list[data.Item],
    out: Path,
    progress: bool,
    log,
    token_ids: bool = False,
) -> Batches:
    """The batches of the image folder's usable ``items`` (square or bucketed), paired with class images for prior
    preservation; captions as token ids when the text encoders train (see
    :func:`~fullrange.sd.latents.latent_batches`)."""
    log(f"{len(items)} images")
    batches = image_batches(model, items, config, out / "cache", progress, token_ids)
    if not config.class_prompt:
        return batches
    class_dir = Path(config.class_data) if config.class_data else out / "class_images"
    make_class_images(model, config, class_dir, progress)
    class_items = _scan(class_dir, "data.class_data", config.resolution, log, config, config.class_prompt)
    weight = config.prior_loss_weight
    log(f"prior preservation: {len(class_items)} class images of '{config.class_prompt}', weight {weight}")
    class_batches = image_batches(model, class_items, config, out / "cache", progress, token_ids)
    return with_prior(batches, class_batches, config.prior_loss_weight)


def _scan(folder, field: str, min_size: int, log, config: DataConfig, default_caption: str | None = None) -> list:
    """The usable images of ``folder`` (captions as ``config`` says), logging every skipped one with its reason."""
    default = default_caption or config.default_caption or ""
    try:
        items, problems = data.scan(folder, min_size, default, config.caption_extension)
    except data.DataError as err:
        raise ConfigError(field, str(err)) from None
    for problem in problems:
        log(f"skipped {problem.path}: {problem.reason}")
    return items


def make_class_images(model: StableDiffusion, config: DataConfig, folder: Path, progress: bool) -> None:
    """Generate class images with the base model until ``folder`` holds ``num_class_images`` (Dreambooth), each a PNG
    with its caption beside it under a name that neither file has yet: nothing there is replaced."""
    real_folder(folder)
    have = sum(1 for p in folder.iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES)
    missing = max(0, config.num_class_images - have)
    names = (f"class_{k:05d}" for k in itertools.count(have))
    free = (n for n in names if not any((folder / f"{n}{suffix}").exists() for suffix in (".png", ".txt")))
    parts = [model.unet, model.vae, *model.text_encoders.values()]
    with on_device(parts, process_state().device) if missing else contextlib.nullcontext():
        for start in tqdm(range(0, missing, 4), desc="class images", disable=not progress):
            count = min(4, missing - start)
            settings = SampleSettings(steps=25, seed=have + start, resolution=config.resolution)
            for array in to_uint8(generate(model, [config.class_prompt] * count, settings)):
                name = next(free)
                write_bytes(folder / f"{name}.txt", config.class_prompt.encode(), exclusive=True)
                save_png(folder / f"{name}.png", array, exclusive=True)


def at_checkpoint(base: StableDiffusion, model: StableDiffusion, config: FinetuneConfig, out: Path, log=print):
    """What runs at each checkpoint, as a callback for :func:`~fullrange.train.train` (which puts the EMA weights,
    if any, into the model's networks first): the adapter as it is then, in ``OUT/checkpoints/step_N/``
    (:func:`save_adapter`; a full fine-tune's weights are in the training checkpoint), and the validation prompts
    sampled into ``OUT/validation/step_N/``, whose images it returns for the trackers. ``model`` is the model in
    training (sharing ``base``'s networks, with the recipe's spec)."""
    prompts = list(config.validation.prompts)
    settings = SampleSettings(steps=25, seed=config.train.seed, resolution=config.data.resolution)

    def callback(step: int, _trained: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        folder = out / "checkpoints" / f"step_{step:06d}"
        save_adapter(model, base, config, folder, log=lambda _: None)  # a family it cannot tell is said at the end
        if not prompts:
            return None
        log(f"validation at step {step}: sampling {len(prompts)} prompt(s), {settings.steps} steps")
        began = time.perf_counter()
        with for_validation(model, config) as sampled:
            images = generate(sampled, prompts, settings)
        log(f"validation at step {step}: {time.perf_counter() - began:.0f} s")
        save_images(images, prompts, resolve(model, settings)[0], out / "validation" / f"step_{step:06d}")
        save_grid(images, out / "validation" / f"step_{step:06d}", settings.seed)
        return {"validation": images}

    return callback


def save_adapter(model: StableDiffusion, base: StableDiffusion, config: FinetuneConfig, folder: Path, log):
    """The adapter as it is now (:data:`~fullrange.adapters.ADAPTERS`' ``save``) in ``folder``, and the file other
    tools load beside it (a LoRA's kohya file, whose metadata says whether it changes ``base``'s sampling); returns
    the files written by kind. A file whose layout cannot be told is logged and left out."""
    kind = ADAPTERS[config.adapter.kind]
    outputs = kind.save(model, config.adapter, folder)
    if kind.tool_file is not None:
        key, name = kind.tool_file
        try:
            outputs[key] = kind.export(folder / name, outputs[kind.name], base, config.output.family)
        except ConfigError as err:
            log(f"{key} file not written: {err} (with --family, or [output] family)")
        except ValueError as err:  # a model no tool reads from an adapter file (a flow model)
            log(f"{key} file not written: {err}")
    return outputs


def save_outputs(
    model: StableDiffusion, base: StableDiffusion, config: FinetuneConfig, out: Path, log
) -> dict[str, Path]:
    """What the run leaves for other tools (:func:`save_adapter` in ``out``), and where the adapter cannot be loaded
    by them (full, OFT) the model merged, as a diffusers pipeline in ``pipeline/``."""
    outputs = save_adapter(model, base, config, out, log)
    kind = ADAPTERS[config.adapter.kind]
    if kind.pipeline:
        if kind.name != "full" and config.train.mixed_precision != "no":
            # The frozen base trained in the half type: the merged pipeline starts from the base as stored.
            model = load_adapter(load_stable_diffusion(config.model), outputs[kind.name])
        kind.merge(model)
        outputs["pipeline"] = save_pipeline(model, out / "pipeline")
    return outputs
