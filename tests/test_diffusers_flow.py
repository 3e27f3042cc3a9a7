"""Rectified flow in diffusers: fullrange's flow scheduler against FlowMatchEulerDiscreteScheduler, and tiny SD3 / Flux
pipelines (transformers built from configs) driven by it, which must equal ``fullrange.sample``."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fullrange import prediction, sampling, schedules, toy
from fullrange.diffusers import FullrangeFlowScheduler, FullrangeScheduler
from fullrange.scheduler_config import spec_from_config


def _toy_velocity(flow: schedules.RectifiedFlow):
    """The exact mixture's flow velocity ``u = eps - x0`` as a network in flow coordinates, ``net(x, t)``."""

    def net(x: torch.Tensor, t) -> torch.Tensor:
        t = float(torch.as_tensor(t).flatten()[0])
        ac = float(flow.alphas_cumprod_at(t))
        x_vp = prediction.from_flow_input(x.double(), ac)
        return prediction.from_x0("flow", toy.MixtureToy().denoise(x_vp, t, ac), x_vp, ac).to(x.dtype)

    return net


def _run(scheduler, net, x, **plan):
    scheduler.set_timesteps(**plan)
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize(
    ("config", "plan"),
    [
        ({"shift": 1.0}, {"num_inference_steps": 9}),
        ({"shift": 3.0}, {"sigmas": np.linspace(1.0, 1 / 9, 9).tolist()}),
        ({"use_dynamic_shifting": True}, {"sigmas": np.linspace(1.0, 1 / 9, 9).tolist(), "mu": 0.93}),
        ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"sigmas": [1.0, 0.7, 0.4, 0.1], "mu": 2.0}),
    ],
    ids=["plain", "shift3", "flux-mu", "linear-mu"],
)
def test_flow_scheduler_ddim_equals_flow_match_euler(config, plan):
    """DDIM in VP coordinates is diffusers' flow-matching Euler step, shift and dynamic shift included: the same
    timesteps and the same latents (flow coordinates) at every step, from pure noise at t = T."""
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = FullrangeScheduler.from_config(ref.config)
    assert isinstance(ours, FullrangeFlowScheduler) and ours.sampler == "ddim"
    net = _toy_velocity(schedules.rectified_flow())
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out_ref = _run(ref, net, x, **plan)
    if "num_inference_steps" in plan:  # diffusers' own default ends at tau = 1/T (fullrange's at 1/S): take its steps
        plan = {"timesteps": ref.timesteps.tolist()}
    out = _run(ours, net, x, **plan)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=1e-6, atol=1e-3)
    assert float(ours.timesteps[0]) == 1000.0
    torch.testing.assert_close(out, out_ref, rtol=0, atol=2e-5)


def test_flow_configs_read_and_refused():
    spec = spec_from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert spec.prediction == "flow" and spec.schedule.shift == 3.0 and spec.schedule.coordinates == "flow"
    sana = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=4.0, prediction_type="flow_prediction")
    assert spec_from_config(sana.config).schedule.shift == 4.0
    with pytest.raises(ValueError, match="use_karras_sigmas is not supported"):
        FullrangeScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).config)
    with pytest.raises(ValueError, match="use_dynamic_shifting sets the shift per image size"):
        spec_from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    dynamic = FullrangeScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="give mu"):
        dynamic.set_timesteps(4)


def test_scale_noise_is_the_flow_interpolant():
    sched = FullrangeFlowScheduler()
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(sched.scale_noise(x0, torch.tensor([250.0]), noise), 0.75 * x0 + 0.25 * noise)


def _recorded(transformer):
    """The keyword arguments of the transformer's first call (the pipeline's conditioning, ids, guidance)."""
    seen = {}

    def pre(module, args, kwargs):
        seen.setdefault("kwargs", dict(kwargs))

    return seen, transformer.register_forward_pre_hook(pre, with_kwargs=True)


def _sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    scheduler = FullrangeScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, sampler="unipc")
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, **none, text_encoder_3=None, tokenizer_3=None
    )


def _flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FullrangeScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    return FluxPipeline(transformer=transformer, scheduler=scheduler, **none)


def test_sd3_pipeline_with_fullrange_scheduler_equals_fullrange_sample():
    """SD3 with classifier-free guidance: the pipeline's loop (UniPC, shift 3, its own u + w (c - u)) gives what
    ``fullrange.sample`` gives on the same transformer, noise and embeddings."""
    pipe = _sd3()
    g = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(1, 5, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 8, generator=g),
    }
    negative = {
        "negative_prompt_embeds": torch.randn(1, 5, 16, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, 8, generator=g),
    }
    latents = torch.randn(1, 4, 8, 8, generator=g)
    seen, handle = _recorded(pipe.transformer)
    out = pipe(
        **embeds,
        **negative,
        latents=latents,
        guidance_scale=4.0,
        num_inference_steps=6,
        height=64,
        width=64,
        output_type="latent",
    ).images
    handle.remove()
    assert seen["kwargs"]["hidden_states"].shape[0] == 2  # guided: negative and positive batched

    def net(x, t, encoder_hidden_states, pooled_projections):
        return pipe.transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
        ).sample

    spec = sampling.SamplingSpec(schedules.rectified_flow(3.0), "flow")
    cond = {"encoder_hidden_states": embeds["prompt_embeds"], "pooled_projections": embeds["pooled_prompt_embeds"]}
    uncond = {
        "encoder_hidden_states": negative["negative_prompt_embeds"],
        "pooled_projections": negative["negative_pooled_prompt_embeds"],
    }
    ours = sampling.sample(net, latents, spec, sampler="unipc", steps=6, cond=cond, uncond=uncond, guidance_scale=4.0)
    torch.testing.assert_close(out, ours, rtol=0, atol=2e-5)


def test_flux_pipeline_with_fullrange_scheduler_equals_fullrange_sample():
    """Flux with its dynamic shift: the pipeline passes sigmas ``linspace(1, 1/S, S)`` and ``mu`` for the packed
    sequence length; ``fullrange.sample`` with the static shift ``exp(mu)`` (schedules.flux_shift) is the same."""
    pipe = _flux()
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 16, generator=g)  # 4×4 latent of 4 channels, packed into 16 tokens of 2×2×4
    embeds = {
        "prompt_embeds": torch.randn(1, 5, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 8, generator=g),
    }
    seen, handle = _recorded(pipe.transformer)
    out = pipe(**embeds, latents=latents, num_inference_steps=5, height=64, width=64, output_type="latent").images
    handle.remove()
    kwargs = seen["kwargs"]

    def net(x, t):
        call = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep", "return_dict")}
        return pipe.transformer(hidden_states=x, timestep=t / 1000, **call).sample  # Flux takes tau, not tau · T

    flow = schedules.rectified_flow(schedules.flux_shift(latents.shape[1]))
    assert flow.shift == pytest.approx(math.exp(calculate_shift(16)), rel=1e-12)
    ours = sampling.sample(net, latents, sampling.SamplingSpec(flow, "flow"), steps=5)
    torch.testing.assert_close(out, ours, rtol=0, atol=2e-5)
