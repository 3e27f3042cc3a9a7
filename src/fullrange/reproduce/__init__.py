"""``fullrange reproduce``: each finding of the offset-noise article and the zero-terminal-SNR paper as an
experiment that writes JSON, PNGs and a report.

Each experiment returns ``{"numbers", "plots", "grids", "findings"}``; :func:`run` writes it to
``OUT/<name>/results.json`` and skips experiments already done with the same preset, so an interrupted run
picks up where it stopped (training resumes from its own checkpoints).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .common import PRESETS, Context, Preset, provenance, write_json
from .convert import convert_experiment
from .facts import exact_sweep, schedule_facts
from .finetune import finetune_experiment
from .report import write_report
from .trained import from_scratch, guidance_experiment, sample_steps, training_free

EXPERIMENTS: dict[str, Callable[[Context], dict]] = {
    "schedule_facts": schedule_facts,
    "exact_sweep": exact_sweep,
    "from_scratch": from_scratch,
    "finetune": finetune_experiment,
    "convert": convert_experiment,
    "guidance": guidance_experiment,
    "sample_steps": sample_steps,
    "training_free": training_free,
}


def check_out_dir(out: Path) -> Path:
    """The output folder, created; a clear error if it is a file or not writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create it ({err.strerror})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: not writable")
    return out


def run(
    out: Path | str,
    preset: str | Preset = "quick",
    only: list[str] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    ctx: Context | None = None,
) -> Path:
    """Run the experiments (all, or ``only``), then write ``report.md`` and ``report.html``; returns the report."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    names = only or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    out = check_out_dir(Path(out))
    ctx = ctx or Context(out, preset, progress=progress)
    preset_json = json.loads(json.dumps(asdict(preset)))
    for i, name in enumerate(names, start=1):
        path = out / name / "results.json"
        if path.exists() and json.loads(path.read_text()).get("preset") == preset_json:
            log(f"[{i}/{len(names)}] {name}: done before, kept ({path})")
            continue
        log(f"[{i}/{len(names)}] {name}: running")
        start = time.perf_counter()
        result = EXPERIMENTS[name](ctx)
        result |= {
            "name": name,
            "doc": EXPERIMENTS[name].__doc__,
            "preset": asdict(preset),
            "seconds": round(time.perf_counter() - start, 1),
            "provenance": provenance(),
        }
        write_json(path, result)
        log(f"[{i}/{len(names)}] {name}: {result['seconds']} s")
    report = write_report(out)
    log(f"report: {report} (and {report.with_suffix('.html')})")
    return report


__all__ = ["EXPERIMENTS", "PRESETS", "Context", "Preset", "run"]
