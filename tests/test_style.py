import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed with the [test] extra")
def test_ruff_clean():
    result = subprocess.run(["ruff", "check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_imports_only_torch():
    """ARCHITECTURE: the core never imports diffusers, transformers or peft."""
    core = ["schedules", "timesteps", "prediction", "denoiser", "guidance", "noise", "losses", "toy", "metrics"]
    files = [ROOT / "src" / "fullrange" / f"{name}.py" for name in core]
    files += sorted((ROOT / "src" / "fullrange" / "samplers").glob("*.py"))
    for path in files:
        text = path.read_text()
        for banned in ("diffusers", "transformers", "peft", "accelerate"):
            assert f"import {banned}" not in text and f"from {banned}" not in text, (path.name, banned)
