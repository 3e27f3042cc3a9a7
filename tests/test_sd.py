import shutil

import pytest
import torch
from diffusers import DDIMScheduler

from fullrange import schedules, sd


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return sd.save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny")


def test_tiny_sd_loads_offline_with_its_schedule(tiny_sd):
    model = sd.load_stable_diffusion(tiny_sd)
    assert model.prediction == "epsilon"
    torch.testing.assert_close(model.schedule.alphas_cumprod, schedules.scaled_linear().alphas_cumprod)
    emb = model.encode_prompts(["a dark alley", "solid black background"])["encoder_hidden_states"]
    assert emb.shape == (2, 16, 32) and not torch.equal(emb[0], emb[1])
    x = torch.randn(2, 4, 8, 8)
    assert model.unet(x, torch.tensor([10, 900]), encoder_hidden_states=emb).sample.shape == x.shape


@pytest.mark.parametrize("zero_snr,prediction", [(True, "v_prediction"), (False, "epsilon")])
def test_schedule_from_scheduler_config_matches_diffusers(zero_snr, prediction):
    config = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=zero_snr,
        prediction_type=prediction,
    ).config
    sched, pred = sd.schedule_from_config(dict(config))
    ref = DDIMScheduler.from_config(config).alphas_cumprod.double()
    torch.testing.assert_close(sched.alphas_cumprod, ref, atol=1e-6, rtol=0)
    assert pred == prediction and sched.zero_terminal_snr == zero_snr


def test_pickle_weights_are_refused_unless_allowed(tiny_sd, tmp_path):
    copy = shutil.copytree(tiny_sd, tmp_path / "pickled")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match=r"pickle files \(diffusion_pytorch_model.bin\).*--allow-pickle"):
        sd.load_stable_diffusion(copy)


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: p.write_text("x"), "not a checkpoint"),
        (lambda p: p.mkdir(), "no model_index.json"),
    ],
)
def test_bad_model_paths(tmp_path, setup, match):
    target = tmp_path / "model"
    setup(target)
    with pytest.raises(ValueError, match=match):
        sd.load_stable_diffusion(target)


def test_a_hub_id_is_fetched_only_when_no_local_path_has_that_name(tiny_sd, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns, ignore_patterns):
        calls.append((repo_id, allow_patterns, ignore_patterns))
        return str(tiny_sd)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = sd.load_stable_diffusion("someone/tiny-sd")
    assert model.source == tiny_sd and len(calls) == 1
    _, allow, ignore = calls[0]
    assert "model_index.json" in allow and "unet/*" in allow and not any("safety_checker" in p for p in allow)
    assert {"*.bin", "*.ckpt", "*fp16*"} <= set(ignore)
    with pytest.raises(ValueError, match="no such file or directory"):
        sd.load_stable_diffusion("./someone/tiny-sd")  # a path, not an id: never fetched
    assert len(calls) == 1


def test_a_hub_fetch_that_fails_says_so_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"^--model nobody/no-such-model: no such local path, and fetching") as err:
        sd.load_stable_diffusion("nobody/no-such-model")
    assert "\n" not in str(err.value)
