"""``fullrange sample``: its sampling flags are the fields of :class:`fullrange.sd.sample.SampleSettings`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ..config import from_dict
from ..files import read_text
from ..sd.sample import SampleSettings
from ._errors import fail, library_errors, warnings_as_lines
from ._options import (
    MODEL_FLAGS,
    Adapter,
    AdapterStrength,
    AllowPickle,
    Dtype,
    Model,
    ModelConfigDir,
    Progress,
    Sha256,
    dtype_of,
    field_flags,
    load_model,
    tables,
    with_fields,
)

ERROR_NAMES = MODEL_FLAGS | field_flags(SampleSettings)
ERROR_NAMES |= {name: "--" + name.replace("_", "-") for name in ("adapter", "controlnet", "num_images", "batch_size")}
"""How the fields the library names in its errors are spelled here."""


def read_prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The ``--prompt`` values, then the non-empty lines of ``--prompts-file``; at least one."""
    prompts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            fail(f"--prompts-file {prompts_file}: no such file")
        try:
            prompts += [line.strip() for line in read_text(prompts_file).splitlines() if line.strip()]
        except ValueError as err:
            fail(f"--prompts-file {err}")
    if not prompts:
        fail("give at least one --prompt or a --prompts-file")
    return prompts


def sample_command(
    model: Model,
    out: Annotated[
        Path, typer.Option(help="Output folder for the PNGs (SEED-PROMPT.png) and a grid; nothing is overwritten.")
    ],
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt (repeatable).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="A text file with one prompt per line.")] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Images sampled at once (image i keeps seed + i; stochastic samplers' noise depends on the batch)."
        ),
    ] = 1,
    adapter: Adapter = None,
    adapter_strength: AdapterStrength = 1.0,
    controlnet: Annotated[Path | None, typer.Option(help="A ControlNet (diffusers folder) to condition on.")] = None,
    prediction: Annotated[
        str | None,
        typer.Option(
            help="What the model predicts: epsilon, v_prediction or sample [default: its markers' or config's]."
        ),
    ] = None,
    zero_terminal_snr: Annotated[
        bool | None,
        typer.Option(help="Whether it was trained with zero terminal SNR [default: its markers' or config's]."),
    ] = None,
    dtype: Dtype = "fp32",
    sha256: Sha256 = None,
    model_config: ModelConfigDir = None,
    allow_pickle: AllowPickle = False,
    progress: Progress = True,
    **fields,
) -> None:
    """Sample Stable Diffusion with fullrange's samplers; PNGs carry their settings."""
    from ..sampling import retrained
    from ..sd import load_adapter
    from ..sd.load import load_controlnet
    from ..sd.pnginfo import source
    from ..sd.sample import check_counts, sample_to_folder

    prompts = read_prompts(prompt, prompts_file)
    weights = dtype_of(dtype)
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file, not a directory")
    with library_errors(ERROR_NAMES), warnings_as_lines():
        check_counts(num_images, batch_size)
        settings = from_dict(SampleSettings, tables(fields))
        if (controlnet is None) != (settings.control_image is None):
            fail("--controlnet and --control-image go together: give both or neither")
        sd_model = load_model(model, sha256, model_config, allow_pickle)
        control = None if controlnet is None else load_controlnet(controlnet, sd_model, allow_pickle)
        if adapter is not None:
            sd_model = load_adapter(sd_model, adapter, adapter_strength)
        if prediction is not None or zero_terminal_snr is not None:
            try:
                spec = retrained(sd_model.spec, prediction, zero_terminal_snr)
            except ValueError as err:
                fail(f"--prediction / --zero-terminal-snr: {err}")
            sd_model = dataclasses.replace(sd_model, spec=spec)
        sd_model.to(dtype=weights)
        if control is not None:
            control.to(dtype=weights)
        paths, grid = sample_to_folder(
            sd_model,
            prompts,
            settings,
            out,
            num_images=num_images,
            batch_size=batch_size,
            controlnet=control,
            source=source(sd_model, adapter, adapter_strength, dtype),
            progress=progress,
        )
    typer.echo(f"wrote {len(paths)} images ({paths[0].name} …) and {grid}", err=True)


sample_command = with_fields(sample_command, SampleSettings)
