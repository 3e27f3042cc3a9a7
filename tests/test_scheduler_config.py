"""diffusers scheduler configs ↔ sampling specs, round trips checked against diffusers' own schedulers."""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from fullrange import schedules
from fullrange.sampling import SamplingSpec
from fullrange.scheduler_config import config_from_spec, spec_from_config

BUILDERS = {"linear": schedules.linear, "scaled_linear": schedules.scaled_linear, "cosine": schedules.cosine}
CASES = [
    case
    for case in itertools.product(
        BUILDERS, (False, True), ("epsilon", "v_prediction", "sample"), ("leading", "linspace", "trailing")
    )
    if not (case[1] and case[2] == "epsilon")  # refused: at SNR = 0 eps says nothing about x0
]


@pytest.mark.filterwarnings("ignore:zero terminal SNR with leading spacing")  # planned here only to compare
@pytest.mark.parametrize("name,zero_snr,prediction,spacing", CASES)
def test_round_trip_through_a_diffusers_config(name, zero_snr, prediction, spacing):
    """spec → config → spec keeps everything, and diffusers builds the same ᾱ and the same steps from the config."""
    schedule = BUILDERS[name]()
    schedule = schedules.rescale_zero_terminal_snr(schedule) if zero_snr else schedule
    spec = SamplingSpec(schedule, prediction, spacing, steps_offset=1 if spacing == "leading" else 0)
    config = config_from_spec(spec)
    back = spec_from_config(config)
    torch.testing.assert_close(back.schedule.alphas_cumprod, spec.schedule.alphas_cumprod, atol=0, rtol=0)
    assert (back.prediction, back.spacing, back.steps_offset) == (prediction, spacing, spec.steps_offset)
    assert config_from_spec(back) == config

    scheduler = DDIMScheduler.from_config(config)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), spec.schedule.alphas_cumprod, atol=1e-6, rtol=0)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == spec.plan(10).tolist()
    assert scheduler.config.prediction_type == prediction


@pytest.mark.parametrize("zero_snr,prediction", [(True, "v_prediction"), (False, "epsilon")])
def test_a_checkpoints_scheduler_config_reads_as_diffusers_reads_it(zero_snr, prediction):
    """Any scheduler class's config (here Euler's, as SD 2.x ships) gives the schedule diffusers computes."""
    config = dict(
        EulerDiscreteScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            rescale_betas_zero_snr=zero_snr,
            prediction_type=prediction,
            timestep_spacing="trailing" if zero_snr else "leading",
        ).config
    )
    spec = spec_from_config(config)
    ref = DDIMScheduler.from_config(config).alphas_cumprod.double()
    torch.testing.assert_close(spec.schedule.alphas_cumprod, ref, atol=1e-6, rtol=0)
    assert spec.prediction == prediction and spec.schedule.zero_terminal_snr == zero_snr


def test_missing_keys_take_diffusers_defaults_and_unknown_schedules_are_refused():
    spec = spec_from_config({})
    torch.testing.assert_close(spec.schedule.alphas_cumprod, DDIMScheduler().alphas_cumprod.double(), atol=1e-6, rtol=0)
    assert (spec.prediction, spec.spacing, spec.steps_offset) == ("epsilon", "leading", 0)
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid' is not supported"):
        spec_from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="trained_betas"):
        spec_from_config({"trained_betas": [0.1, 0.2]})
    with pytest.raises(ValueError, match="zero terminal SNR with epsilon"):
        spec_from_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="not built by name"):
        config_from_spec(SamplingSpec(schedules.shift_resolution(schedules.scaled_linear(), 64, 128), "epsilon"))
