"""The method of benchmarks/device_memory.py, on a narrow UNet with SD 1.5's layout: fake tensors tracked by torch's
MemTracker must count what a real step holds."""

import importlib.util
from pathlib import Path

import pytest

from fullrange.sd.testing import twin_unet_config


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parent.parent / "benchmarks" / "device_memory.py"
    spec = importlib.util.spec_from_file_location("device_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = module.configs

    def narrow(family):  # the real scheduler and encoders, a narrow UNet
        return real(family) | {"unet": twin_unet_config(family)}

    module.configs = narrow
    return module


def _counts(kind: str):
    """The trained and frozen parameters the step holds, from a real (not fake) build of the same UNet."""
    from diffusers import UNet2DConditionModel

    from fullrange.adapters import ADAPTERS, AdapterConfig

    unet = UNet2DConditionModel(**twin_unet_config("sd1"))
    ADAPTERS[kind].attach(type("M", (), {"unet": unet, "text_encoders": {}})(), AdapterConfig(kind=kind, rank=16), 0)
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in unet.parameters()) - trained


@pytest.mark.parametrize(
    "kind,setting,frozen_bytes,trained_bytes",
    [("lora", "12gb", 2, 4), ("full", "8gb", 2, 2)],
)
def test_the_projection_counts_every_parameter_in_the_type_the_step_holds_it(
    bench, kind, setting, frozen_bytes, trained_bytes
):
    result = bench.fullrange_step("sd1", kind, 64, setting)
    trained, frozen = _counts(kind)
    assert result["trained"] == trained
    assert result["parameters"] * bench.GB == pytest.approx(trained * trained_bytes + frozen * frozen_bytes, abs=1)
    assert result["peak"] >= result["parameters"] + result["activations"]


def test_a_full_fp32_step_peaks_with_weights_gradients_and_adams_two_moments(bench):
    """AdamW's first step: the weights, their gradients and two moments of the weights' size, all fp32 (the
    activations are gone by then)."""
    result = bench.fullrange_step("sd1", "full", 64, "fp32")
    weights = result["trained"] * 4 / bench.GB
    assert result["parameters"] == pytest.approx(weights)
    assert result["gradients"] == pytest.approx(weights)
    # Two moments, and what the tracker counts as the optimizer's while it steps (step counts, foreach temporaries).
    assert 2 * weights <= result["optimizer"] <= 2.1 * weights
