"""Command line: thin commands that parse, validate and call the library, one module per command.

| command | module |
|---|---|
| ``schedule`` | :mod:`.schedule` |
| ``reproduce`` | :mod:`.reproduce` (the main job) |
| ``train`` | :mod:`.train` (flags made from the config tables) |
| ``sample`` | :mod:`.sample` (sampling flags made from :class:`~fullrange.sd.sample.SampleSettings`) |
| ``tone-stats`` | :mod:`.tone_stats` |
| ``inspect`` | :mod:`.inspect` |
| ``eval brightness`` | :mod:`.eval` |
| ``export`` | :mod:`.export` |

Options shared by several commands are declared once, in :mod:`._options`; how commands fail, in :mod:`._errors`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from . import eval, export, inspect, reproduce, sample, schedule, tone_stats, train
from ._errors import DEBUG_ENV, OneLineErrors

COMMANDS = {
    "schedule": schedule.schedule_command,
    "reproduce": reproduce.reproduce_command,
    "train": train.train_command,
    "sample": sample.sample_command,
    "tone-stats": tone_stats.tone_stats_command,
    "inspect": inspect.inspect_command,
    "export": export.export_command,
}

app = typer.Typer(
    cls=OneLineErrors,
    help="fullrange: diffusion models whose outputs reach the full brightness range.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: Rich markup would eat "[default: …]" and "[model]"
)
for name, function in COMMANDS.items():
    app.command(name)(function)
app.add_typer(eval.app, name="eval")


def _print_version(given: bool) -> None:
    if given:
        from importlib.metadata import version

        typer.echo(f"fullrange {version('fullrange')}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show stack traces (also: {DEBUG_ENV}=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version.")
    ] = False,
) -> None:
    """fullrange: diffusion models whose outputs reach the full brightness range."""
    quiet_libraries()


def quiet_libraries() -> None:
    """Silence what diffusers, transformers and the hub print that a user cannot act on (their loading bars, "modules
    … should be kept in float32: []", advice about their own APIs); fullrange says what matters in its own lines."""
    import warnings

    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for library in ("diffusers", "transformers", "huggingface_hub", "accelerate"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{library}(\.|$)")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported before these settings could reach it
        sys.modules["transformers"].utils.logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        sys.modules["diffusers"].utils.logging.set_verbosity_error()
        sys.modules["diffusers"].utils.logging.disable_progress_bar()
