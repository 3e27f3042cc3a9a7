"""``fullrange reproduce``: the article's and the paper's findings on the built-in data set, on the CPU, as a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._errors import INTERRUPTED, fail
from ._options import Progress

QUICK_RUNTIME = "25 min 18 s"  # the quick preset's last full run, measured; the README states the same (a test)
CONVERT_RUNTIME = "34 min 31 s"  # `--only convert`, measured (2070.8 s); not yet in a full run


def reproduce_command(
    out: Annotated[Path, typer.Option(help="Output folder: results, plots, report.md/html.")] = Path(
        "fullrange-report"
    ),
    preset: Annotated[
        str,
        typer.Option(
            help="micro (a smoke test of the code: about half a minute, no verdicts), quick "
            f"({QUICK_RUNTIME} on 2 CPU cores shared with one other job before the flow recipe and the convert "
            f"experiment were added, convert alone {CONVERT_RUNTIME} beside the test suite; 3 seeds), full (for a GPU: "
            "about 216 h of training on a 2-core CPU)."
        ),
    ] = "quick",
    only: Annotated[list[str] | None, typer.Option(help="Run only this experiment (repeatable).")] = None,
    progress: Progress = True,
) -> None:
    """Reproduce the findings of the offset-noise article and the zero-terminal-SNR paper on the built-in data set, on
    the CPU, and write a report (report.md, report.html)."""
    from .. import reproduce
    from ..train import TrainingInterrupted

    if preset not in reproduce.PRESETS:
        fail(f"--preset {preset!r} is unknown; choose one of {', '.join(reproduce.PRESETS)}")
    unknown = [name for name in only or [] if name not in reproduce.EXPERIMENTS]
    if unknown:
        fail(f"--only {', '.join(unknown)}: unknown experiment; choose from {', '.join(reproduce.EXPERIMENTS)}")
    try:
        reproduce.check_out_dir(out)
        reproduce.run(out, preset, only, progress=progress, log=lambda line: typer.echo(line, err=True))
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(INTERRUPTED) from None
    except ValueError as err:
        fail(str(err))
