"""Loading Stable Diffusion: diffusers folders offline, pickle refusals, hub ids only when no local path."""

import shutil

import pytest
import torch

from fullrange import schedules
from fullrange.sd import load_stable_diffusion
from fullrange.sd.config import ModelConfig


def test_tiny_sd_loads_offline_with_its_spec(tiny_sd):
    """The spec comes from the folder's scheduler config: SD's scaled_linear betas, epsilon, leading steps + 1."""
    model = load_stable_diffusion(tiny_sd)
    assert (model.spec.prediction, model.spec.spacing, model.spec.steps_offset) == ("epsilon", "leading", 1)
    torch.testing.assert_close(model.spec.schedule.alphas_cumprod, schedules.scaled_linear().alphas_cumprod)
    cond = model.condition(model.encode_prompts(["a dark alley", "solid black background"]))
    emb = cond["encoder_hidden_states"]
    assert list(cond) == ["encoder_hidden_states"] and emb.shape == (2, 16, 32) and not torch.equal(emb[0], emb[1])
    x = torch.randn(2, 4, 8, 8)
    assert model.unet(x, torch.tensor([10, 900]), **cond).sample.shape == x.shape


def test_pickle_weights_are_refused_unless_allowed(tiny_sd, tmp_path):
    copy = shutil.copytree(tiny_sd, tmp_path / "pickled")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match=r"pickle files \(diffusion_pytorch_model.bin\).*model\.allow_pickle"):
        load_stable_diffusion(copy)
    assert load_stable_diffusion(ModelConfig(str(copy), allow_pickle=True)).unet is not None


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
        load_stable_diffusion(target)


def test_a_hub_id_is_fetched_only_when_no_local_path_has_that_name(tiny_sd, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns, ignore_patterns):
        calls.append((repo_id, allow_patterns, ignore_patterns))
        return str(tiny_sd)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = load_stable_diffusion("someone/tiny-sd")
    assert model.source == tiny_sd and len(calls) == 1
    _, allow, ignore = calls[0]
    assert "model_index.json" in allow and "unet/*" in allow and not any("safety_checker" in p for p in allow)
    assert {"*.bin", "*.ckpt", "*fp16*"} <= set(ignore)
    with pytest.raises(ValueError, match="no such file or directory"):
        load_stable_diffusion("./someone/tiny-sd")  # a path, not an id: never fetched
    assert len(calls) == 1


def test_a_hub_fetch_that_fails_says_so_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"^model\.path nobody/no-such-model: no such local path, and fetching") as err:
        load_stable_diffusion("nobody/no-such-model")
    assert "\n" not in str(err.value)
