import json

import pytest
from typer.testing import CliRunner

from fullrange import reproduce
from fullrange.cli import app
from fullrange.losses import RECIPES, Recipe
from fullrange.reproduce.common import PRESETS, Context
from fullrange.reproduce.report import MARKS

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
    assert all(f"## {name}" in text for name in reproduce.EXPERIMENTS)
    assert not [line for line in text.splitlines() if line.startswith("    ")]  # no docstring indent read as code
    leak = json.loads((out / "training_free" / "results.json").read_text())["numbers"]
    assert sorted(leak) == ["baseline", "baseline + leak", "ztsnr", "ztsnr + tone"]
    assert sorted(leak["ztsnr + tone"]) == ["solid black", "solid white"]
    methods = json.loads((out / "guidance" / "results.json").read_text())["numbers"]
    assert {"w=1", "w=7.5, CFG", "w=12, APG η=0", "w=3, FDG low=1"} <= set(methods)
    assert sorted(leak["baseline + leak"]) == ["any", "solid black", "solid white"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,iVBOR") >= 6 and "<table>" in html


def test_the_micro_preset_is_a_smoke_test_without_verdicts(micro_run):
    _, report, _ = micro_run
    text = report.read_text()
    assert "The micro preset is a smoke test of the code" in text and "— (smoke test)" in text
    assert not any(f"**{verdict}**" in text for verdict in MARKS)


def test_the_report_opens_with_the_verdicts_and_closes_with_provenance(micro_run, tmp_path):
    """The report of a preset that gives verdicts (the micro run's results, renamed from micro): verdicts first."""
    import shutil

    from fullrange.reproduce.report import write_report

    out = shutil.copytree(micro_run[0], tmp_path / "run")
    for path in out.glob("*/results.json"):
        result = json.loads(path.read_text())
        path.write_text(json.dumps(result | {"preset": result["preset"] | {"name": "renamed"}}))
    report = write_report(out)
    text = report.read_text()
    order = ["## TL;DR", "## Contents", "## How to read this", "## schedule_facts", "## training_free", "## Provenance"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    tldr = text[text.index("## TL;DR") : text.index("## Contents")]
    assert "![before_after.png](from_scratch/before_after.png)" in tldr
    assert "![per_label_brightness.png](from_scratch/per_label_brightness.png)" in tldr
    findings = [
        f for name in reproduce.EXPERIMENTS for f in json.loads((out / name / "results.json").read_text())["findings"]
    ]
    assert tldr.count("\n| ") == len(findings) + 1  # header, then one row per finding
    for f in findings:
        assert f"{MARKS[f['verdict']]} **{f['verdict']}**" in tldr and f["rule"]
    provenance = text[text.index("## Provenance") :]
    assert all(f"| {name} |" in provenance for name in reproduce.EXPERIMENTS) and "torch 2." in provenance
    html = (out / "report.html").read_text()
    assert 'id="from_scratch"' in html and 'href="#from_scratch"' in html
    coloured = sum(html.count(f'class="{c}"') for c in ("reproduced", "partly", "not-reproduced"))
    # a dot and the word in the TL;DR's table, in each section and in the legend of "How to read"; a dot by each count
    assert coloured == 2 * (2 * len(findings) + len(MARKS)) + len(MARKS)
    assert not any(mark in html for mark in MARKS.values())  # emoji need a font: the HTML draws the dot itself


def test_trained_figures_carry_every_seed_and_their_range(micro_run):
    out, _, _ = micro_run
    seeds = PRESETS["micro"].seeds
    assert len(seeds) >= 2
    scratch = json.loads((out / "from_scratch" / "results.json").read_text())
    assert scratch["preset"]["seeds"] == list(seeds)
    for recipe, numbers in scratch["numbers"].items():
        assert len(numbers["per_seed"]) == len(seeds), recipe
        for key in ("spread_ratio", "wasserstein"):
            cell, values = numbers[key], [run[key] for run in numbers["per_seed"]]
            assert cell["values"] == values and cell["low"] == min(values) and cell["high"] == max(values)
            assert cell["mean"] == pytest.approx(sum(values) / len(values))
        assert len(set(numbers["wasserstein"]["values"])) == len(seeds)  # each seed is its own model and noise
    steps = json.loads((out / "sample_steps" / "results.json").read_text())["numbers"]
    assert len(steps["ztsnr"]["trailing"][str(min(PRESETS["micro"].spacing_steps))]["wasserstein"]["values"]) == len(
        seeds
    )
    finetune = json.loads((out / "finetune" / "results.json").read_text())["numbers"]
    assert len(finetune["final"]["solid black"]["baseline"]["values"]) == len(seeds)
    leak = json.loads((out / "training_free" / "results.json").read_text())["numbers"]
    assert len(leak["baseline + leak"]["solid black"]["per_seed"]) == len(seeds)


def test_grids_are_labelled_rows_of_data_then_samples(micro_run):
    from PIL import Image

    out, _, _ = micro_run
    p = PRESETS["micro"]
    with Image.open(out / "from_scratch" / "samples_baseline.png") as grid:
        side = p.size * 4
        per_label = -(-p.num_samples // 5)
        # label column 120, two data tiles, a gap of 16, the samples; gutters of 4; a header of 18
        assert grid.size == (120 + 2 * (side + 4) + 16 + per_label * (side + 4) + 4, 18 + 5 * (side + 4) + 4)
        assert grid.getpixel((0, 0)) == (40, 40, 40) and grid.getpixel((3, 3)) == (150, 150, 150)
        assert grid.getpixel((120 + side // 2, 18 + side // 2)) == (0, 0, 0)  # 'solid black' data
        assert grid.getpixel((120 + side // 2, 18 + side + 4 + side // 2)) == (255, 255, 255)  # 'solid white'


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


def test_a_sections_introduction_is_one_paragraph_in_the_html(micro_run):
    import html as escape
    import inspect as docs

    out, _, _ = micro_run
    page = (out / "report.html").read_text()
    doc = docs.cleandoc(reproduce.EXPERIMENTS["from_scratch"].__doc__)
    first_paragraph = doc.split("\n\n")[0].replace("\n", " ")
    assert escape.escape(first_paragraph.split("`")[0]) in page
    assert "\n" not in page[page.index('<h2 id="from_scratch">') :].split("<p>")[1].split("</p>")[0]


def test_the_conversion_stops_when_w1_has_not_improved_for_two_evaluations():
    """The stopping rule of ``convert``: a gain is a W1 at least 5% below the best so far; two evaluations in a row
    without one stop it, and the best evaluation up to the stop is the model kept."""
    from fullrange.reproduce.convert import best_step, stop_step

    curve = {0: 0.22, 25: 0.09, 50: 0.071, 75: 0.075, 100: 0.035, 125: 0.063, 150: 0.034, 175: 0.01}
    assert stop_step(curve) == 150  # 0.034 is not 5% below 0.035: the second evaluation without a gain
    assert best_step(curve, stop_step(curve)) == 150 and best_step(curve) == 175
    assert stop_step({0: 0.2, 25: 0.1, 50: 0.05, 75: 0.025}) is None  # still halving: it runs on
    assert stop_step({0: 0.2, 25: 0.2, 50: 0.2}, patience=3) is None
