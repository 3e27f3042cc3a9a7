"""``fullrange inspect``: markers in every convention, their disagreements, and the probe, on tiny SD models trained
briefly as epsilon and as v, saved as diffusers folders and single files with right, wrong and missing markers."""

import json
import shlex
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fullrange import prediction as targets
from fullrange.cli import app
from fullrange.sampling import retrained
from fullrange.sd import load_stable_diffusion, markers
from fullrange.sd.config import ModelConfig
from fullrange.sd.export import export
from fullrange.sd.inspection import inspect
from fullrange.sd.testing import save_tiny_stable_diffusion
from fullrange.sd.tools import settings_for

runner = CliRunner()


def train_briefly(folder, kind: str, steps: int = 80) -> None:
    """80 Adam steps of the tiny UNet as an epsilon or a v model, on latents with per-channel means (as SD's VAE
    latents have) plus per-image and per-value variation; saved in place, with a scheduler config that says so."""
    model = load_stable_diffusion(folder)
    unet, schedule = model.unet, model.spec.schedule
    cond = model.condition(model.encode_prompts([""] * 8))
    optimizer = torch.optim.Adam(unet.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    channel_means = torch.tensor([0.8, -0.5, 0.3, 0.6]).view(1, 4, 1, 1)
    for _ in range(steps):
        x0 = channel_means + 0.3 * torch.randn(8, 4, 1, 1, generator=g) + 0.3 * torch.randn(8, 4, 8, 8, generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        ac = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = torch.randn(8, 4, 8, 8, generator=g)
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
        target = eps if kind == "epsilon" else targets.to_v(x0, x_t, ac)
        loss = ((unet(x_t, t, **cond).sample - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.save_pretrained(folder / "unet")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prediction_type": kind}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    folders = {}
    for kind in ("epsilon", "v_prediction"):
        folders[kind] = save_tiny_stable_diffusion(root / kind)
        train_briefly(folders[kind], kind)
    return folders


def single_file(folder, path, metadata=None, tensors=()):
    """The model as one file without markers, then with the given metadata and marker tensors."""
    model = load_stable_diffusion(folder)
    export(path, replace(model, spec=replace(model.spec, prediction="epsilon")), family="sd1", dtype=torch.float32)
    state = load_file(path)
    for name in tensors:
        state[name] = torch.tensor([])
    save_file(state, path, {"format": "pt", **(metadata or {})})
    return path


def test_markers_of_every_convention_and_their_disagreements():
    header = {
        "v_pred": {},
        "__metadata__": {
            "ss_v_parameterization": "False",
            "modelspec.prediction_type": "v",
            "ss_zero_terminal_snr": "1",
        },
    }
    found = markers.from_header(header, "m.safetensors")
    assert [(m.convention, m.prediction, m.zero_terminal_snr) for m in found] == [
        ("comfyui", "v_prediction", None),
        ("kohya", "epsilon", None),
        ("kohya", None, True),
        ("modelspec", "v_prediction", None),
    ]
    decision = markers.decide(found)
    assert (decision.prediction, decision.zero_terminal_snr) == ("v_prediction", True)  # comfyui outranks kohya
    assert decision.conflicts == (
        "prediction: comfyui v_pred = tensor present (m.safetensors); kohya ss_v_parameterization = False "
        "(m.safetensors); modelspec modelspec.prediction_type = v (m.safetensors)",
    )
    config = markers.from_config({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, "s.json")
    assert markers.decide(config + found).conflicts[0].startswith("prediction: diffusers prediction_type")
    assert markers.decide([]) == markers.Decision(None, None, ())


def test_the_probe_tells_epsilon_from_v_on_models_trained_briefly(trained, report):
    for kind, folder in trained.items():
        found = inspect(str(folder), always_probe=True)
        report(f"inspect probe, tiny SD trained 80 steps as {kind}: cos(output, input) {found.probe.cosine:.3f}")
        assert found.probe.prediction == kind and found.prediction == kind and found.how["prediction"] == "probe"
        assert found.scheduler_config["prediction_type"] == kind and found.family.startswith("unknown (UNet cross")


@pytest.mark.parametrize("ztsnr", [False, True])
def test_inspect_recommends_what_sample_picks(trained, tmp_path, ztsnr):
    """`inspect`'s settings are `fullrange sample`'s defaults for the model, written out: the same sampler, spacing
    and guidance rescale (0.7 at zero terminal SNR, Lin et al.), on leaky and zero-SNR models alike."""
    from fullrange.sd.sample import SampleSettings, resolve

    path = single_file(trained["v_prediction"], tmp_path / "m.safetensors", {}, ("v_pred", "ztsnr") if ztsnr else ())
    config = ModelConfig(str(path), config=str(trained["v_prediction"]))
    found = inspect(config)
    picked, _ = resolve(load_stable_diffusion(config), SampleSettings())
    assert found.settings == {
        "sampler": picked.sampler,
        "steps": picked.steps,
        "spacing": picked.spacing,
        "guidance_rescale": picked.guidance_rescale,
    }
    assert (picked.spacing, picked.guidance_rescale) == (("trailing", 0.7) if ztsnr else ("trailing", 0.0))


def test_markers_decide_without_a_probe_when_they_agree(trained):
    found = inspect(str(trained["v_prediction"]))
    assert found.probe is None and found.prediction == "v_prediction" and found.how["prediction"] == "markers"
    assert found.scheduler_config["timestep_spacing"] == "trailing" and found.settings["spacing"] == "trailing"


def test_a_folder_without_a_prediction_type_is_probed(trained, tmp_path):
    folder = tmp_path / "silent"
    shutil.copytree(trained["v_prediction"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "prediction_type"}))
    found = inspect(str(folder))
    assert found.probe is not None and found.prediction == "v_prediction"
    # fullrange's loader takes diffusers' default (epsilon) for it: the settings say how to sample it right.
    assert found.settings["prediction"] == "v_prediction" and any("--prediction" in n for n in found.notes)


@pytest.mark.parametrize(
    "kind, metadata, tensors, expected, how",
    [
        ("v_prediction", {}, (), "v_prediction", "probe"),  # no marker at all
        ("v_prediction", {}, ("v_pred",), "v_prediction", "markers"),  # ComfyUI's only
        ("v_prediction", {"ss_v_parameterization": "true"}, (), "v_prediction", "markers"),  # kohya's only
        ("v_prediction", {"modelspec.prediction_type": "v"}, (), "v_prediction", "markers"),  # modelspec only
        ("epsilon", {"modelspec.prediction_type": "epsilon"}, (), "epsilon", "markers"),
        ("epsilon", {}, (), "epsilon", "probe"),
        ("epsilon", {"ss_v_parameterization": "False"}, ("v_pred",), "epsilon", "probe"),  # disagree: probed
        (
            "v_prediction",
            {"ss_v_parameterization": "True", "modelspec.prediction_type": "epsilon"},
            (),
            "v_prediction",
            "probe",
        ),
    ],
)
def test_single_files_with_right_wrong_and_missing_markers(trained, tmp_path, kind, metadata, tensors, expected, how):
    path = single_file(trained[kind], tmp_path / "m.safetensors", metadata, tensors)
    found = inspect(ModelConfig(str(path), config=str(trained[kind])))
    assert (found.prediction, found.how["prediction"]) == (expected, how), found.probe
    assert found.family == "sd1"
    assert bool(found.decision.conflicts) == (how == "probe" and bool(metadata or tensors))


def test_markers_that_agree_on_the_wrong_type_are_caught_by_a_forced_probe(trained, tmp_path):
    path = single_file(trained["epsilon"], tmp_path / "m.safetensors", {"ss_v_parameterization": "true"}, ("v_pred",))
    assert inspect(ModelConfig(str(path), config=str(trained["epsilon"]))).prediction == "v_prediction"  # trusted
    found = inspect(ModelConfig(str(path), config=str(trained["epsilon"])), always_probe=True)
    assert found.prediction == "epsilon" and "the markers say v_prediction but the probe says epsilon" in found.notes


def test_zero_terminal_snr_markers_and_an_adapter_that_changes_the_prediction(trained, tmp_path):
    path = single_file(trained["v_prediction"], tmp_path / "m.safetensors", {}, ("v_pred", "ztsnr"))
    found = inspect(ModelConfig(str(path), config=str(trained["v_prediction"])))
    assert found.zero_terminal_snr and found.scheduler_config["rescale_betas_zero_snr"]
    assert found.settings["guidance_rescale"] == 0.7
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    base = tmp_path / "base"
    shutil.copytree(trained["v_prediction"], base)
    with pytest.raises(ValueError, match="neither a LoRA"):  # markers only: not an adapter fullrange can load
        inspect(str(base), str(adapter))
    assert markers.decide(markers.from_config({"prediction_type": "epsilon"}, "a")).prediction == "epsilon"


def test_cli_inspect_prints_the_settings_and_a_config_to_copy(trained, tmp_path):
    folder = tmp_path / "silent"
    shutil.copytree(trained["v_prediction"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "prediction_type"}))
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert "probe: cos(output, input) at t = T-1 is" in result.output
    assert "prediction: v_prediction (from the probe)" in result.output
    assert "--prediction v_prediction --no-zero-terminal-snr" in result.output
    as_json = json.loads(runner.invoke(app, ["inspect", str(folder), "--json"]).stdout)
    assert as_json["scheduler_config"]["prediction_type"] == "v_prediction"
    # The printed command samples it as inspected.
    sample = ["sample", "--model", str(folder), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "s")]
    result = runner.invoke(app, [*sample, "--prediction", "v_prediction", "--no-zero-terminal-snr"])
    assert result.exit_code == 0, result.output
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "MODEL " in missing.output and "no such file or directory" in missing.output


def test_retrained_rebuilds_the_schedule(trained):
    spec = load_stable_diffusion(trained["epsilon"]).spec
    fixed = retrained(spec, "v_prediction", True)
    assert fixed.schedule.zero_terminal_snr and fixed.spacing == "trailing" and fixed.prediction == "v_prediction"
    assert float(fixed.schedule.alphas_cumprod[-1]) == 0.0
    with pytest.raises(ValueError, match="zero terminal SNR with epsilon"):
        retrained(spec, "epsilon", True)


def test_impossible_markers_are_diagnosed_and_overridden(trained, tmp_path):
    """A file marked zero terminal SNR with epsilon (kohya's key, no prediction marker) cannot be sampled as it says:
    ``inspect`` reports it and lets the probe decide; ``sample --prediction --zero-terminal-snr`` loads it as told."""
    path = single_file(trained["v_prediction"], tmp_path / "ztsnr.safetensors", {"ss_zero_terminal_snr": "true"})
    found = inspect(ModelConfig(str(path), config=str(trained["v_prediction"])))
    assert any("zero terminal SNR with epsilon prediction, which cannot be sampled" in n for n in found.notes)
    assert (found.prediction, found.zero_terminal_snr, found.how["prediction"]) == ("v_prediction", True, "probe")
    out = runner.invoke(app, ["inspect", str(path), "--model-config", str(trained["v_prediction"])]).output
    command = next(line for line in out.splitlines() if line.startswith("sample with: "))
    words = shlex.split(command.removeprefix("sample with: "))
    assert words[words.index("--model") + 1] == str(path) and "--model-config" in words
    args = [*words[2:], "--steps", "2"]  # the printed command, as a shell would split it
    args[args.index("--prompt") + 1], args[args.index("--out") + 1] = "x", str(tmp_path / "s")
    result = runner.invoke(app, ["sample", *args])
    assert result.exit_code == 0, result.output


def test_inspect_reads_damaged_and_hostile_configs_as_findings(trained, tmp_path):
    """A scheduler config that is a list, or nested past the parser's depth, is a finding; a marker value holding a
    terminal's escape sequence is printed escaped; a path with shell syntax is quoted in the advice."""
    folder = shutil.copytree(trained["epsilon"], tmp_path / "$(touch pwned) model")
    (folder / "scheduler_config.json").write_text("[" * 50000 + "]" * 50000)
    found = inspect(str(folder), always_probe=True)
    assert any("nested too deeply" in n for n in found.notes) and found.prediction == "epsilon"
    path = single_file(trained["epsilon"], tmp_path / "m.safetensors", {"ss_v_parameterization": "\x1b[2Jfalse"})
    out = runner.invoke(app, ["inspect", str(path), "--model-config", str(trained["epsilon"])]).output
    assert "\x1b" not in out and "\\x1b[2Jfalse" in out
    out = runner.invoke(app, ["inspect", str(folder)]).output
    command = next(line for line in out.splitlines() if line.startswith("sample with: "))
    assert shlex.split(command)[shlex.split(command).index("--model") + 1] == str(folder)
    assert not (tmp_path / "pwned").exists()


def test_a_unet_with_a_flow_matching_config_is_inspected_and_sampled_as_rectified_flow(tmp_path):
    """A diffusers folder whose scheduler is flow-matching (an SD model converted to rectified flow, say): inspect
    reads it as flow prediction at SNR = 0 and writes the config back; sample takes its shift and says so."""
    folder = save_tiny_stable_diffusion(tmp_path / "m")
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    found = inspect(str(folder))
    assert (found.prediction, found.zero_terminal_snr, found.how["prediction"]) == ("flow", True, "markers")
    assert found.probe is None and found.scheduler_config == config
    assert found.settings["guidance_rescale"] == 0.0 and found.settings["spacing"] == "trailing"
    out = runner.invoke(
        app, ["sample", "--model", str(folder), "--prompt", "a", "--steps", "3", "--out", str(tmp_path / "o")]
    )
    assert out.exit_code == 0, out.output
    assert "rectified flow: trailing steps with the model's time shift 3" in out.output
    comfy = settings_for("comfyui", found, folder)
    assert comfy.settings[0].startswith("ModelSamplingSD3: shift = 3 ")
    assert "samples it as epsilon" in comfy.warnings[-1]
    assert "FlowMatchEulerDiscreteScheduler', 'shift': 3}" in settings_for("diffusers", found, folder).settings[0]
    assert "no flow sampling" in settings_for("a1111", found, folder).warnings[-1]


def test_a_diffusers_sd_pipeline_samples_a_flow_unet_with_fullranges_scheduler(tmp_path):
    """What ``inspect --for diffusers`` says for a flow UNet works: StableDiffusionPipeline with
    ``FullrangeScheduler.from_config(a flow-matching config)`` equals ``fullrange.sample`` with the flow spec."""
    from diffusers import StableDiffusionPipeline

    from fullrange import sampling, schedules
    from fullrange.diffusers import FullrangeScheduler, guide
    from fullrange.guidance import Shaping

    folder = save_tiny_stable_diffusion(tmp_path / "m")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    pipe.scheduler = FullrangeScheduler.from_config(config, sampler="dpmpp_2m")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    embeds = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=g)
    out = pipe(
        prompt_embeds=embeds, latents=latents, num_inference_steps=5, guidance_scale=1.0, output_type="latent"
    ).images
    spec = sampling.SamplingSpec(schedules.rectified_flow(3.0), "flow")
    ours = sampling.sample(
        pipe.unet, latents, spec, sampler="dpmpp_2m", steps=5, cond={"encoder_hidden_states": embeds}
    )
    torch.testing.assert_close(out, ours, rtol=0, atol=1e-5)
    # fullrange's guidance inside the same pipeline (guide): the hook reads the flow UNet's input as the interpolant
    negative = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=g)
    shaping = Shaping(zero_star=True, eta=0.0, momentum=-0.5)
    guided = {"latents": latents, "num_inference_steps": 5, "guidance_scale": 3.0, "output_type": "latent"}
    plain = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **guided).images
    handle = guide(pipe, shaping)
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **guided).images
    handle.remove()
    ours = sampling.sample(
        pipe.unet,
        latents,
        spec,
        sampler="dpmpp_2m",
        steps=5,
        cond={"encoder_hidden_states": embeds},
        uncond={"encoder_hidden_states": negative},
        guidance_scale=3.0,
        shaping=shaping,
    )
    assert (out - plain).abs().max() > 1e-3
    torch.testing.assert_close(out, ours, rtol=0, atol=1e-5)
