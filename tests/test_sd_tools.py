"""``fullrange inspect --for TOOL``: the settings per tool, and warnings exactly where the tool misreads the file
(what each tool reads is measured by its own code in test_interop)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from fullrange.cli import app
from fullrange.sampling import retrained
from fullrange.sd import load_stable_diffusion, tools
from fullrange.sd.export import export
from fullrange.sd.inspection import inspect


@pytest.fixture(scope="module")
def exports(tiny_sd, tiny_sdxl, tmp_path_factory):
    """v + zero-SNR single files of the tiny SD 1.x and SDXL models, with their companions, by family."""
    root = tmp_path_factory.mktemp("tools")
    files = {}
    for family, folder in (("sd1", tiny_sd), ("sdxl", tiny_sdxl)):
        base = load_stable_diffusion(folder)
        model = replace(base, spec=retrained(base.spec, "v_prediction", zero_terminal_snr=True))
        files[family] = export(root / f"{family}.safetensors", model, family=family, dtype=torch.float32)[0]
    return files


def _for(tool, file, folder):
    from fullrange.sd.config import ModelConfig

    return tools.settings_for(tool, inspect(ModelConfig(str(file), config=str(folder))), file)


def test_comfyui_needs_model_sampling_for_sd1_and_reads_the_sdxl_markers_itself(exports, tiny_sd, tiny_sdxl):
    sd1 = _for("comfyui", exports["sd1"], tiny_sd)
    assert "ModelSamplingDiscrete: sampling = v_prediction, zsnr = true" in sd1.settings
    assert "RescaleCFG: multiplier = 0.7" in sd1.settings and "sd1.comfyui.json" in sd1.settings[-1]
    assert any(f"epsilon on SD's ladder (σ_max {tools.SD_SIGMA_MAX})" in w for w in sd1.warnings)
    xl = _for("comfyui", exports["sdxl"], tiny_sdxl)
    assert xl.settings[1].endswith("(optional: ComfyUI reads this file's v_pred / ztsnr markers)")
    assert not any("SD's ladder" in w for w in xl.warnings)
    assert any(str(tools.COMFYUI_ZSNR_SIGMA_MAX) in w for w in xl.warnings)  # its cap, for both


def test_a1111_is_pointed_at_the_yaml_and_warned_without_it(exports, tiny_sd, tiny_sdxl, tmp_path):
    sd1 = _for("a1111", exports["sd1"], tiny_sd)
    assert sd1.settings[0] == "keep sd1.yaml beside the checkpoint: A1111 reads the prediction type from it"
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(exports["sd1"].read_bytes())  # no .yaml beside it
    assert any("only from a same-name .yaml" in w for w in _for("a1111", alone, tiny_sd).warnings)
    assert any("builds SDXL as epsilon" in w for w in _for("a1111", exports["sdxl"], tiny_sdxl).warnings)
    forge = _for("forge", exports["sd1"], tiny_sd)
    assert any("reads v_pred for SDXL only" in w for w in forge.warnings)
    assert not any("reads v_pred for SDXL only" in w for w in _for("forge", exports["sdxl"], tiny_sdxl).warnings)


def test_a_diffusers_folder_is_sent_to_export_for_the_single_file_tools(tiny_sd):
    for tool in ("comfyui", "a1111", "forge", "invokeai"):
        warning = _for(tool, tiny_sd, tiny_sd).warnings[0]
        assert warning.startswith(f"{tools.TOOLS[tool]} loads single files") and "fullrange export" in warning
    advice = _for("diffusers", tiny_sd, tiny_sd)
    assert advice.warnings == () and "timestep_spacing='trailing'" in advice.settings[0]


def test_cli_inspect_for_prints_the_block_and_json_and_refuses_an_unknown_tool(exports, tiny_sd):
    args = ["inspect", str(exports["sd1"]), "--model-config", str(tiny_sd)]
    result = CliRunner().invoke(app, [*args, "--for", "comfyui"])
    assert result.exit_code == 0, result.output
    block = result.output.split("for comfyui:\n", 1)[1].splitlines()
    assert block[1] == "  ModelSamplingDiscrete: sampling = v_prediction, zsnr = true"
    assert any(line.startswith("warning: ComfyUI reads v_pred / ztsnr only in SDXL") for line in block)
    result = CliRunner().invoke(app, [*args, "--for", "a1111", "--json"])
    assert json.loads(result.output)["for"]["tool"] == "a1111"
    result = CliRunner().invoke(app, [*args, "--for", "photoshop"])
    assert result.exit_code != 0 and result.output.strip().splitlines()[-1] == (
        "error: --for photoshop: not one of comfyui, a1111, forge, diffusers, invokeai"
    )
