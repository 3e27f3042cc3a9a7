"""``fullrange tone-stats``: the tones of a folder of images, for ``sample --tone-stats``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import from_dict
from ..sd.sample import SampleSettings
from ._errors import fail, library_errors, refuse_overwrite
from ._options import (
    MODEL_FLAGS,
    AllowPickle,
    Model,
    ModelConfigDir,
    Overwrite,
    Progress,
    Sha256,
    load_model,
    tables,
    with_fields,
)


def tone_stats_command(
    model: Model,
    data: Annotated[Path, typer.Option(help="A folder of images (captions are not needed).")],
    out: Annotated[Path, typer.Option(help="The .safetensors file to write, for sample --tone-stats.")],
    overwrite: Overwrite = False,
    sha256: Sha256 = None,
    model_config: ModelConfigDir = None,
    allow_pickle: AllowPickle = False,
    progress: Progress = True,
    **fields,
) -> None:
    """Measure the tones of a folder of images (Everaert et al.'s joint Gaussian of the latents' lowest
    frequencies), to start samples from: fullrange sample --tone-stats FILE."""
    from ..sd.tone import fit_stats, save_stats

    if out.suffix != ".safetensors":
        fail(f"--out {out}: the file name must end in .safetensors")
    if out.is_dir():
        fail(f"--out {out}: is a directory, not a file name")
    refuse_overwrite(out, {"--model": model, "--model-config": model_config})
    if out.exists() and not overwrite:
        fail(f"--out {out}: already exists; give --overwrite to replace it")
    with library_errors(MODEL_FLAGS | {"resolution": "--resolution", "data": "--data"}):
        resolution = from_dict(SampleSettings, tables(fields)).resolution
        sd_model = load_model(model, sha256, model_config, allow_pickle)
        side = resolution or sd_model.unet.config.sample_size * sd_model.vae_scale_factor
        stats, count, skipped = fit_stats(sd_model, data, side, progress=progress)
        save_stats(out, stats, sd_model, count)
    for problem in skipped:
        typer.echo(f"skipped {problem.path}: {problem.reason}", err=True)
    brightness = stats.mean.view(stats.channels, stats.k, stats.k)[:, 0, 0] / sd_model.vae.config.scaling_factor
    typer.echo(
        f"wrote {out}: {count} images at {side} px, {stats.k}×{stats.k} DCT coefficients of {stats.channels} latent "
        f"channels; channel means (unscaled) {', '.join(f'{v:.3f}' for v in brightness.tolist())}",
        err=True,
    )


tone_stats_command = with_fields(tone_stats_command, SampleSettings, only=("resolution",))
