import json

import pytest
from typer.testing import CliRunner

from fullrange import schedules
from fullrange.cli import app

runner = CliRunner()


def test_schedule_json_matches_the_library():
    result = runner.invoke(
        app,
        [
            "schedule",
            "--steps",
            "10",
            "--spacing",
            "leading",
            "--steps-offset",
            "1",
            "--resolution",
            "64x64x4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [row["t"] for row in data["plan"]] == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    sd = schedules.scaled_linear()
    assert data["plan"][0]["alphas_cumprod"] == pytest.approx(sd.alphas_cumprod[901].item(), rel=1e-12)
    # Seed 000 / REFERENCE: N = 4·64·64, the terminal mean leak is sqrt(0.0046819 · 16384) = 8.76.
    assert data["num_values"] == 16384
    assert data["terminal_mean_leak"] == pytest.approx((0.0046819 * 16384) ** 0.5, rel=1e-4)


def test_schedule_zero_terminal_snr_table_and_plot(tmp_path):
    plot = tmp_path / "plots" / "schedule.png"
    result = runner.invoke(
        app, ["schedule", "--zero-terminal-snr", "--spacing", "karras", "--steps", "12", "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    assert "inf" in result.output and "999" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(runner.invoke(app, ["schedule", "--zero-terminal-snr", "--json"]).output)
    assert data["plan"][0]["sigma"] is None and data["terminal_mean_leak"] == 0.0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--resolution", "64xx4"], "--resolution '64xx4' is not like 64x64x4"),
        (["--resolution", "0x64"], "--resolution '0x64'"),
        (["--spacing", "uniform"], "--spacing 'uniform' is unknown"),
        (["--steps", "0"], "--steps must be positive"),
        (["--steps", "2000"], "steps must be between 1 and num_train_timesteps=1000"),
        (["--schedule", "quadratic"], "unknown schedule 'quadratic'"),
        (["--plot", "out.jpg"], "must name a .png file"),
    ],
)
def test_schedule_bad_options_give_one_line_errors(args, message):
    result = runner.invoke(app, ["schedule", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_train_help_states_the_defaults_the_config_uses():
    """Every ``fullrange train`` option whose config field has a default says it in its help, the same value."""
    import dataclasses
    import re

    import typer

    from fullrange.cli import TRAIN_FLAGS
    from fullrange.sd import config as sd_config

    # the tables' classes, named as strings (``from __future__ import annotations``) in the config module
    classes = {f.name: getattr(sd_config, f.type) for f in dataclasses.fields(sd_config.FinetuneConfig)}
    defaults = {}
    for table, cls in classes.items():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f"{table}.{f.name}"] = f.default
    command = typer.main.get_command(app).commands["train"]
    helps = {p.opts[0].removeprefix("--"): p.help or "" for p in command.params if p.opts}
    checked = 0
    for flag, field in TRAIN_FLAGS.items():
        default = defaults.get(field)
        if default is None or isinstance(default, bool) or default == ():
            continue  # required, a flag that is off unless given, or empty
        found = re.search(r"\[default: ([^\],]+)", helps[flag])
        assert found, f"--{flag} does not state its default {default!r}: {helps[flag]!r}"
        stated = found.group(1)
        if isinstance(default, int | float):
            assert float(stated.split()[0]) == default, (flag, stated, default)
        else:
            assert stated == str(default), (flag, stated, default)
        checked += 1
    assert checked >= 15


def test_help_shows_brackets_and_version():
    """Rich markup ate ``[default: …]`` and ``[model]``; the help is plain text now."""
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert "[default: 512]" in result.output and "[model], [data]" in result.output
    result = runner.invoke(app, ["sample", "--help"], terminal_width=200)
    assert "[default: 25]" in result.output
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fullrange {version('fullrange')}"


def test_one_runtime_for_the_main_job_everywhere():
    """The README's set-up line, its reproduction section and ``reproduce --help`` state the same measured time."""
    from pathlib import Path

    from fullrange.cli import QUICK_RUNTIME

    readme = Path(__file__).parents[1].joinpath("README.md").read_text()
    first_screen = readme[: readme.index("## Three things to try")]
    assert f"({QUICK_RUNTIME} on 2 CPU cores in the last measured run" in first_screen
    assert f"One run of the quick preset on 2 CPU cores, {QUICK_RUNTIME}" in readme
    result = runner.invoke(app, ["reproduce", "--help"], terminal_width=200)
    assert f"quick ({QUICK_RUNTIME} on 2 CPU cores" in " ".join(result.output.split())
