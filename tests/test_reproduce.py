import json

import pytest
from typer.testing import CliRunner

from fullrange import reproduce
from fullrange.cli import app
from fullrange.losses import RECIPES, Recipe
from fullrange.reproduce.common import PRESETS, Context

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    lines = []
    report = reproduce.run(out, "micro", progress=False, log=lines.append)
    return out, report, lines


def test_every_experiment_writes_json_pngs_and_the_report(micro_run):
    out, report, _ = micro_run
    for name in reproduce.EXPERIMENTS:
        result = json.loads((out / name / "results.json").read_text())
        assert result["name"] == name and result["preset"]["name"] == "micro"
        assert result["findings"], name
        for finding in result["findings"]:
            assert finding["verdict"] in ("reproduced", "partly", "not reproduced"), finding
        for image in result["plots"] + result.get("grids", []):
            assert (out / name / image).read_bytes()[:8] == PNG, image
    text = report.read_text()
    assert "## Summary" in text and all(f"## {name}" in text for name in reproduce.EXPERIMENTS)
    assert not [line for line in text.splitlines() if line.startswith("    ")]  # no docstring indent read as code
    leak = json.loads((out / "training_free" / "results.json").read_text())["numbers"]
    assert sorted(leak) == ["baseline", "baseline + leak", "ztsnr"]
    assert sorted(leak["baseline + leak"]) == ["any", "solid black", "solid white"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,iVBOR") >= 6 and "<table>" in html


def test_a_second_run_resumes_instead_of_redoing(micro_run):
    out, _, _ = micro_run
    lines = []
    reproduce.run(out, "micro", progress=False, log=lines.append)
    assert sum("done before, kept" in line for line in lines) == len(reproduce.EXPERIMENTS)


def test_numbers_come_from_the_recipes(tmp_path):
    """Change a recipe and the measured numbers change: nothing in the report is typed in."""
    results = []
    for strength in (0.1, 2.0):
        recipes = {
            "baseline": RECIPES["baseline"],
            "offset": Recipe("offset", noise="offset", offset_strength=strength),
        }
        ctx = Context(tmp_path / str(strength), PRESETS["micro"], recipes=recipes, progress=False)
        reproduce.run(ctx.out, PRESETS["micro"], ["from_scratch"], progress=False, log=lambda _: None, ctx=ctx)
        results.append(json.loads((ctx.out / "from_scratch" / "results.json").read_text())["numbers"])
    assert results[0]["baseline"] == results[1]["baseline"]
    assert results[0]["offset"]["spread_ratio"] != results[1]["offset"]["spread_ratio"]


runner = CliRunner()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "huge"], "--preset 'huge' is unknown"),
        (["--only", "nonsense"], "--only nonsense: unknown experiment"),
    ],
)
def test_reproduce_bad_options(args, message, tmp_path):
    result = runner.invoke(app, ["reproduce", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in result.output


def test_reproduce_out_is_a_file_or_unusable(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = runner.invoke(app, ["reproduce", "--out", str(target), "--preset", "micro"])
    assert result.exit_code == 2 and "is a file, not a directory" in result.output
    result = runner.invoke(app, ["reproduce", "--out", str(target / "sub"), "--preset", "micro"])
    assert result.exit_code == 2 and "cannot create it" in result.output


def test_reproduce_cli_runs_one_experiment(tmp_path):
    result = runner.invoke(
        app, ["reproduce", "--out", str(tmp_path), "--preset", "micro", "--only", "schedule_facts", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").exists() and (tmp_path / "schedule_facts" / "schedules.png").exists()
