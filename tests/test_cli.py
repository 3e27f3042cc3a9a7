import json

import pytest
from typer.testing import CliRunner

from fullrange import schedules, timesteps
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
        (["--shift", "3"], "--shift applies to --schedule rectified_flow, not scaled_linear"),
        (["--schedule", "rectified_flow", "--shift", "-1"], "shift must be a positive number"),
        (["--schedule", "rectified_flow", "--spacing", "leading"], "trailing steps or a σ ladder"),
    ],
)
def test_schedule_bad_options_give_one_line_errors(args, message):
    result = runner.invoke(app, ["schedule", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def _help_of(command: str) -> str:
    result = runner.invoke(app, [*command.split(), "--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize(
    "command,config",
    [("train", "fullrange.sd.config:FinetuneConfig"), ("sample", "fullrange.sd.sample:SampleSettings")],
)
def test_every_config_field_is_a_flag_stating_its_default(command, config):
    """Every field of the config tables is a flag of its command, and its help states the default the field has."""
    import dataclasses
    import importlib
    import re

    from fullrange.cli._options import _leaves, flag

    module, _, name = config.partition(":")
    text = _help_of(command)
    checked = 0
    for field, f, _ in _leaves(getattr(importlib.import_module(module), name)):
        found = re.search(rf"{re.escape(flag(field))} <[^>]+> (.*?)(?= --[a-z]|$)", text) or re.search(
            rf"{re.escape(flag(field))} (.*?)(?= --[a-z]|$)", text
        )
        assert found, f"{flag(field)} is not in {command} --help"
        default = f.default
        if f.metadata.get("shown") is not None or any(default is v for v in (dataclasses.MISSING, None, False)):
            continue
        if default in ("", ()):
            continue
        stated = re.search(r"\[default: ([^\],]+)", found.group(1))
        assert stated, f"{flag(field)} does not state its default {default!r}: {found.group(1)!r}"
        if isinstance(default, int | float):
            assert float(stated.group(1)) == default, (field, stated.group(1), default)
        else:
            assert stated.group(1) == str(default), (field, stated.group(1), default)
        checked += 1
    assert checked >= {"train": 18, "sample": 6}[command]


def test_a_new_config_field_is_an_option_with_its_help_and_default():
    """A field declared with ``setting`` becomes an option: flag from its name (or the alias table), help and
    default from the field, other fields named in its help by their flags; given values reach the command as
    tables, and values not given leave the config's defaults."""
    import dataclasses

    import typer

    from fullrange.cli._options import tables, with_fields
    from fullrange.config import from_dict, setting

    @dataclasses.dataclass(frozen=True)
    class Knobs:
        cfg_decay: float = setting(0.25, "How fast it decays, after `warm_steps`.")
        warm_steps: int | None = setting(None, "Steps before it decays.", shown="a tenth of the run")
        tags: tuple[str, ...] = setting((), "A tag (repeatable).")
        loud: bool = setting(False, "Say more.")

    @dataclasses.dataclass(frozen=True)
    class Tables:
        knobs: Knobs = dataclasses.field(default_factory=Knobs)

    seen = []

    def command(**fields):
        seen.append(from_dict(Tables, tables(fields)))

    tool = typer.Typer(rich_markup_mode=None)
    tool.command()(with_fields(command, Tables))
    tool.command("other")(lambda: None)
    text = " ".join(runner.invoke(tool, ["command", "--help"], terminal_width=1000).output.split())
    assert "--cfg-decay <float> How fast it decays, after --warm-steps. [default: 0.25]" in text
    assert "--warm-steps <int> Steps before it decays. [default: a tenth of the run]" in text
    assert "--loud Say more." in text and "--tags" in text
    result = runner.invoke(tool, ["command", "--cfg-decay", "0.5", "--tags", "a", "--tags", "b", "--loud"])
    assert result.exit_code == 0, result.output
    assert seen[-1].knobs == Knobs(0.5, None, ("a", "b"), True)
    assert runner.invoke(tool, ["command"]).exit_code == 0 and seen[-1].knobs == Knobs()


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

    from fullrange.cli.reproduce import CONVERT_RUNTIME, QUICK_RUNTIME

    readme = " ".join(Path(__file__).parents[1].joinpath("README.md").read_text().split())
    first_screen = readme[: readme.index("## Three things to try")]
    assert f"({QUICK_RUNTIME} on 2 CPU cores shared with one other job" in first_screen
    assert f"`convert` alone {CONVERT_RUNTIME} beside the test suite" in first_screen
    assert f"beside the test suite only, took {QUICK_RUNTIME}; `convert` alone took {CONVERT_RUNTIME}" in readme
    result = runner.invoke(app, ["reproduce", "--help"], terminal_width=200)
    help_text = " ".join(result.output.split())
    assert f"quick ({QUICK_RUNTIME} on 2 CPU cores" in help_text and f"convert alone {CONVERT_RUNTIME}" in help_text


def test_schedule_rectified_flow_with_a_shift_is_the_library_plan():
    result = runner.invoke(app, ["schedule", "--schedule", "rectified_flow", "--shift", "3", "--steps", "4", "--json"])
    assert result.exit_code == 0, result.output
    plan = [row["t"] for row in json.loads(result.output)["plan"]]
    expected = timesteps.plan(schedules.rectified_flow(3.0), 4)
    assert plan == [round(float(t), 3) for t in expected] and plan[0] == 1000.0
