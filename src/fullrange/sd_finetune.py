"""Fine-tune Stable Diffusion with the fixes: options, cached latents and text embeddings, batches, outputs.

The training itself is :func:`fullrange.train.train`; this module turns a checkpoint and an image folder into
its inputs, and the result into files other tools load: a diffusers pipeline whose scheduler config says what
the model needs (prediction type, zero terminal SNR, trailing steps), LoRA weights for ``load_lora_weights``,
and for OFT (which diffusers cannot load) the adapter plus a merged pipeline.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import adapters, data
from .checkpoint import atomic_write
from .sd import StableDiffusion, load_stable_diffusion
from .train import Batch, Batches, Recipe, TrainConfig, one_of, train, with_prior


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything ``fullrange train`` takes; a TOML file sets any of them, the command line overrides."""

    model: str
    data: str
    out: str
    adapter: str = "lora"
    resolution: int = 512
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    lr: float = 1e-4
    offset_noise: float = 0.0
    pyramid_noise: float = 0.0
    input_perturbation: float = 0.0
    zero_terminal_snr: bool = False
    prediction: str | None = None
    min_snr_gamma: float = 0.0
    snr_weight_floor: float = 0.0
    caption_dropout: float = 0.1
    class_prompt: str | None = None
    class_data: str | None = None
    num_class_images: int = 0
    prior_loss_weight: float = 1.0
    lora_rank: int = 4
    oft_block_size: int = 4
    oft_coft: bool = False
    buckets: bool = False
    ema_decay: float = 0.0
    checkpoint_every: int = 250
    validation_prompts: tuple[str, ...] = ()
    mixed_precision: str = "no"
    seed: int = 0
    allow_pickle: bool = False
    sha256: str | None = None
    model_config: str | None = None

    def validate(self) -> FinetuneOptions:
        if self.adapter not in adapters.ADAPTERS:
            raise ValueError(f"--adapter {self.adapter!r}: choose one of {', '.join(adapters.ADAPTERS)}")
        for name in ("resolution", "max_steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"--resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")
        if self.offset_noise and self.pyramid_noise:
            raise ValueError("--offset-noise and --pyramid-noise are alternatives; give one")
        if (self.class_data or self.num_class_images) and not self.class_prompt:
            raise ValueError("prior preservation needs --class-prompt (with --class-data or --num-class-images)")
        if self.buckets and self.class_prompt:
            raise ValueError(
                "--buckets with prior preservation is not supported: class and instance batches must share a size"
            )
        if self.class_prompt and not self.class_data and self.num_class_images <= 0:
            raise ValueError("--class-prompt needs --class-data DIR or --num-class-images N to generate")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"--caption-dropout must lie in [0, 1), got {self.caption_dropout}")
        return self


def read_options(config_file: Path | None, overrides: dict) -> FinetuneOptions:
    """Options from a TOML file (keys as the dataclass fields or the flags' names), then the overrides."""
    values: dict = {}
    if config_file is not None:
        try:
            raw = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"--config {config_file}: {err}") from None
        known = {f.name for f in fields(FinetuneOptions)}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"--config {config_file}: unknown option {key!r}")
            values[name] = value
    values |= {k: v for k, v in overrides.items() if v is not None}
    values["validation_prompts"] = tuple(values.get("validation_prompts", ()))
    for f in fields(FinetuneOptions):
        value, default = values.get(f.name), f.default
        expected = float if isinstance(default, float) else type(default)
        if value is None or default is None or default is MISSING or isinstance(default, tuple):
            continue
        accepted = (int, float) if expected is float else (expected,)
        if not isinstance(value, accepted) or (expected is not bool and isinstance(value, bool)):
            raise ValueError(f"option {f.name.replace('_', '-')} must be {expected.__name__}, got {value!r}")
        if expected is float:
            values[f.name] = float(value)
    missing = [name for name in ("model", "data", "out") if name not in values]
    if missing:
        raise ValueError(f"missing --{', --'.join(missing)} (on the command line or in --config)")
    return FinetuneOptions(**values).validate()


def recipe_for(options: FinetuneOptions, model: StableDiffusion) -> Recipe:
    """The training recipe: the checkpoint's schedule and target unless the options change them."""
    config = model.scheduler_config
    betas = (config.get("beta_start", 0.00085), config.get("beta_end", 0.012))
    if config.get("beta_schedule") != "scaled_linear" or betas != (0.00085, 0.012):
        raise ValueError(f"--model {options.model}: only SD's scaled_linear schedule (0.00085 to 0.012) is supported")
    zero_snr = options.zero_terminal_snr or bool(config.get("rescale_betas_zero_snr"))
    prediction = options.prediction or ("v_prediction" if zero_snr else model.prediction)
    noise = "offset" if options.offset_noise else "pyramid" if options.pyramid_noise else "gaussian"
    return Recipe(
        name="finetune",
        schedule="scaled_linear",
        zero_terminal_snr=zero_snr,
        prediction=prediction,
        noise=noise,
        offset_strength=options.offset_noise,
        pyramid_discount=options.pyramid_noise,
        input_perturbation=options.input_perturbation,
        weighting="min_snr" if options.min_snr_gamma else "none",
        snr_gamma=options.min_snr_gamma or 5.0,
        weight_floor=options.snr_weight_floor,
        spacing="trailing" if zero_snr else "leading",
    ).validate()


def _model_id(model: StableDiffusion) -> str:
    """Identifies the VAE and text encoder whose outputs are cached (their weight files' names, sizes, times; the
    single file's for a single-file checkpoint)."""
    digest = hashlib.sha256()
    if model.source.is_file():
        files = [model.source]
    else:
        parts = ("vae", "text_encoder", "text_encoder_2")
        files = [p for c in parts for p in sorted((model.source / c).glob("*.safetensors"))]
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_latents(
    model: StableDiffusion, items: list[data.Item], size: int | tuple[int, int], cache: Path, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the VAE latents of every image at ``size`` (side or (width, height)), from
    ``cache`` where already encoded."""
    model_id = _model_id(model)
    means, stds = [], []
    for item in tqdm(items, desc="encode images", disable=not progress):
        path = cache / f"latent_{data.cache_key(item.path, model_id, size)}.safetensors"
        if path.exists():
            stored = load_file(path)
        else:
            pixels = data.load_image(item.path, size).unsqueeze(0).to(model.vae.device, model.vae.dtype)
            dist = model.vae.encode(pixels).latent_dist
            stored = {"mean": dist.mean[0].float().cpu(), "std": dist.std[0].float().cpu()}
            cache.mkdir(parents=True, exist_ok=True)
            save_file(stored, path)
        means.append(stored["mean"])
        stds.append(stored["std"])
    return torch.stack(means), torch.stack(stds)


@torch.no_grad()
def encode_captions(model: StableDiffusion, captions: list[str], cache: Path) -> dict[str, torch.Tensor]:
    """Text conditions of ``captions`` followed by the empty caption's, from ``cache`` when seen before."""
    texts = [*captions, ""]
    key = hashlib.sha256(json.dumps([_model_id(model), texts]).encode()).hexdigest()[:32]
    path = cache / f"text_{key}.safetensors"
    if path.exists():
        return load_file(path)
    states = {k: v.float().cpu().contiguous() for k, v in model.encode_prompts(texts).items()}
    cache.mkdir(parents=True, exist_ok=True)
    save_file(states, path)
    return states


def latent_batches(
    model: StableDiffusion,
    means: torch.Tensor,
    stds: torch.Tensor,
    captions: list[str],
    dropout: float,
    cache: Path,
    sizes: dict[str, torch.Tensor] | None = None,
) -> Batches:
    """Batches of VAE latents (a fresh posterior draw, times the VAE's scaling factor) with their caption
    conditions, each replaced by the empty caption's with probability ``dropout``; ``sizes``: per-image size
    conditions (SDXL's ``time_ids``)."""
    states = encode_captions(model, captions, cache)
    scale = model.vae.config.scaling_factor

    def draw(batch_size: int, generator: torch.Generator) -> Batch:
        index = torch.randint(0, means.shape[0], (batch_size,), generator=generator)
        z = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        drop = torch.rand(batch_size, generator=generator) < dropout
        cond = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), v[-1:], v[:-1][index]) for k, v in states.items()}
        return Batch(z * scale, cond | {k: v[index] for k, v in (sizes or {}).items()})

    return draw


def _bucket_step(model: StableDiffusion) -> int:
    """Bucket sides are multiples of this: the VAE's factor times the UNet's total downsampling (64 for SD)."""
    return model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)


def image_batches(
    model: StableDiffusion, items: list[data.Item], options: FinetuneOptions, cache: Path, progress: bool
) -> Batches:
    """Batches of an image folder: square at ``--resolution``, or with ``--buckets`` one aspect-ratio bucket per
    batch, buckets drawn in proportion to their images."""
    if not options.buckets:
        sizes = [options.resolution] * len(items)
    else:
        choices = data.buckets(options.resolution, step=_bucket_step(model))
        sizes = [data.nearest_bucket(*item.size, choices) for item in items]
    sources = []
    for size in dict.fromkeys(sizes):
        group = [item for item, s in zip(items, sizes, strict=True) if s == size]
        means, stds = encode_latents(model, group, size, cache, progress)
        target = (size, size) if isinstance(size, int) else size
        conds = [model.size_cond(i.size[::-1], data.cover_crop(i.size, target)[1][::-1], target[::-1]) for i in group]
        size_conds = {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
        captions = [i.caption for i in group]
        batches = latent_batches(model, means, stds, captions, options.caption_dropout, cache, size_conds)
        sources.append((batches, len(group)))
    return sources[0][0] if len(sources) == 1 else one_of(sources)


def scheduler_for(model: StableDiffusion, recipe: Recipe):
    """A DDIM scheduler config that samples the trained model correctly in plain diffusers."""
    from diffusers import DDIMScheduler

    # set_alpha_to_one: the last DDIM step returns x0, as fullrange's samplers do.
    overrides = {
        "prediction_type": recipe.prediction,
        "rescale_betas_zero_snr": recipe.zero_terminal_snr,
        "clip_sample": False,
        "set_alpha_to_one": True,
    }
    if recipe.zero_terminal_snr:
        overrides |= {"timestep_spacing": "trailing", "steps_offset": 0}
    base = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    return DDIMScheduler.from_config({**base, **overrides})


def pipeline_class(model: StableDiffusion):
    """diffusers' pipeline class for ``model``: ``StableDiffusionXLPipeline`` or ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if model.is_xl else StableDiffusionPipeline


def save_pipeline(model: StableDiffusion, unet, recipe: Recipe, path: Path) -> Path:
    """A diffusers pipeline folder (safetensors) with the fine-tuned UNet and a matching scheduler."""
    parts = {"vae": model.vae, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer, "unet": unet}
    parts["scheduler"] = scheduler_for(model, recipe)
    if model.is_xl:
        parts |= {"text_encoder_2": model.text_encoder_2, "tokenizer_2": model.tokenizer_2}
    else:
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline_class(model)(**parts).save_pretrained(path, safe_serialization=True)
    return path


def make_class_images(model: StableDiffusion, options: FinetuneOptions, folder: Path, progress: bool) -> None:
    """Generate class images with the base model until ``folder`` holds ``num_class_images`` (Dreambooth)."""
    from PIL import Image

    from .sd_sample import SampleSettings, generate

    folder.mkdir(parents=True, exist_ok=True)
    have = sum(1 for p in folder.iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES)
    missing = max(0, options.num_class_images - have)
    for start in tqdm(range(0, missing, 4), desc="class images", disable=not progress):
        count = min(4, missing - start)
        settings = SampleSettings(steps=25, seed=options.seed + have + start, resolution=options.resolution)
        images = generate(model, [options.class_prompt] * count, settings)
        for k, image in enumerate(images):
            name = folder / f"class_{have + start + k:05d}"
            array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(array).save(name.with_suffix(".png"))
            name.with_suffix(".txt").write_text(options.class_prompt)


def _validator(model: StableDiffusion, recipe: Recipe, options: FinetuneOptions, out: Path):
    """Validation images at each checkpoint, sampled as the trained model will be (its scheduler config)."""
    from .sd_sample import SampleSettings, generate, save_images

    scheduler_config = dict(scheduler_for(model, recipe).config)
    settings = SampleSettings(steps=25, seed=options.seed, resolution=options.resolution)

    def validate(step: int, unet: torch.nn.Module) -> None:
        view = replace(
            model,
            unet=unet,
            schedule=recipe.build_schedule(),
            prediction=recipe.prediction,
            scheduler_config=scheduler_config,
        )
        prompts = list(options.validation_prompts)
        save_images(generate(view, prompts, settings), prompts, settings, out / f"step_{step:06d}")

    return validate


def finetune(options: FinetuneOptions, progress: bool = True, log=print) -> dict[str, Path]:
    """Run a fine-tune end to end; returns the written outputs by kind."""
    from accelerate import PartialState

    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    model = load_stable_diffusion(
        options.model, allow_pickle=options.allow_pickle, sha256=options.sha256, config=options.model_config
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for encoder in (model.vae, model.text_encoder, model.text_encoder_2):  # the UNet goes where accelerate says
        if encoder is not None:
            encoder.to(device)
    recipe = recipe_for(options, model)
    min_size = (
        min(min(wh) for wh in data.buckets(options.resolution, step=_bucket_step(model)))
        if options.buckets
        else options.resolution
    )
    items, problems = data.scan(options.data, min_size=min_size)
    for problem in problems:
        log(f"skipped {problem.path}: {problem.reason}")
    log(
        f"{len(items)} images; recipe: {recipe.prediction}, zero terminal SNR {recipe.zero_terminal_snr}, "
        f"noise {recipe.noise}"
    )
    (out / "config.json").write_text(json.dumps({"options": asdict(options), "recipe": asdict(recipe)}, indent=2))
    batches = image_batches(model, items, options, out / "cache", progress)
    if options.class_prompt:
        class_dir = Path(options.class_data) if options.class_data else out / "class_images"
        make_class_images(model, options, class_dir, progress)
        class_items, _ = data.scan(class_dir, min_size=options.resolution, default_caption=options.class_prompt)
        batches = with_prior(
            batches, image_batches(model, class_items, options, out / "cache", progress), options.prior_loss_weight
        )
        log(
            f"prior preservation: {len(class_items)} class images of '{options.class_prompt}', "
            f"weight {options.prior_loss_weight}"
        )

    unet = model.unet
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(options.seed)  # the adapter's random init: the same in every process and run
    if options.adapter == "lora":
        count = adapters.add_lora(unet, rank=options.lora_rank)
    elif options.adapter == "oft":
        count = adapters.add_oft(unet, block_size=options.oft_block_size, coft=options.oft_coft)
    else:
        count = sum(p.numel() for p in unet.parameters())
    log(f"{options.adapter}: {count:,} trainable parameters")
    config = TrainConfig(
        steps=options.max_steps,
        batch_size=options.batch_size,
        grad_accum=options.grad_accum,
        lr=options.lr,
        warmup=min(100, max(1, options.max_steps // 10)),
        ema_decay=options.ema_decay,
        checkpoint_every=options.checkpoint_every,
        seed=options.seed,
        mixed_precision=options.mixed_precision,
    )
    validate = _validator(model, recipe, options, out / "validation") if options.validation_prompts else None
    result = train(
        unet, batches, recipe, config, out / "train", progress=progress, description="fine-tune", on_checkpoint=validate
    )
    if not PartialState().is_main_process:  # under accelerate launch / torchrun, one process writes
        return {}
    trained = result.ema_model() if options.ema_decay > 0 else result.model.eval()

    outputs = {}
    if options.adapter == "lora":
        # peft's names (lora_A / lora_B), which diffusers loads as they are. Not its older "lora.down" names:
        # converted, attention layers get them and ResNet layers keep lora_A, and diffusers' loader, which
        # tells the format from the first key, then skips the attention ones.
        layers = adapters.adapter_state_dict(trained)
        pipeline_class(model).save_lora_weights(out / "lora", unet_lora_layers=layers, safe_serialization=True)
        scheduler_for(model, recipe).save_config(out / "lora")
        outputs["lora"] = out / "lora"
    elif options.adapter == "oft":
        oft_dir = out / "oft"
        oft_dir.mkdir(exist_ok=True)
        atomic_write(
            oft_dir / "adapter.json",
            json.dumps({"block_size": options.oft_block_size, "coft": options.oft_coft}).encode(),
        )
        save_file(adapters.adapter_state_dict(trained), oft_dir / "adapter_model.safetensors")
        scheduler_for(model, recipe).save_config(oft_dir)
        outputs["oft"] = oft_dir
    if options.adapter in ("full", "oft"):
        if options.adapter == "oft":
            merged = type(trained).from_config(trained.config)  # a plain UNet for the rotated weights
            merged.load_state_dict(adapters.merged_state_dict(trained))
            trained = merged
        outputs["pipeline"] = save_pipeline(model, trained, recipe, out / "pipeline")
    for kind, path in outputs.items():
        log(f"wrote {kind}: {path}")
    return outputs
