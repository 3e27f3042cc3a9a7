import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from fullrange import adapters


@pytest.fixture(scope="module")
def unet(tiny_sd):
    return UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 16, 32, generator=g)


def _run(model):
    x, t, e = _inputs()
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=e).sample


def _perturb(model, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["lora", "oft"])
def test_identity_init_then_merged_equals_unmerged(unet, kind):
    reference = _run(unet)
    model = copy.deepcopy(unet)
    count = adapters.add_lora(model) if kind == "lora" else adapters.add_oft(model, block_size=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert count > 0 and all(("lora_" in n) or ("oft_" in n) for n in trainable)
    adapted = {n.split(".lora_")[0].split(".oft_")[0] for n in trainable}
    assert any(n.endswith("attn1.to_q") for n in adapted)  # attention
    if kind == "lora":
        assert any(n.endswith("resnets.0.conv1") for n in adapted)  # a 3×3 convolution
    else:
        assert any(n.endswith("conv_shortcut") for n in adapted)  # a 1×1 convolution
    torch.testing.assert_close(_run(model), reference, atol=1e-6, rtol=0)

    _perturb(model)
    unmerged = _run(model)
    assert (unmerged - reference).abs().max() > 1e-3
    merged = adapters.merge_adapters(model)
    assert merged is model and set(model.state_dict()) == set(unet.state_dict())  # the plain UNet's names
    assert not hasattr(model, "peft_config")
    torch.testing.assert_close(_run(model), unmerged, atol=1e-4, rtol=1e-4)


def test_oft_refuses_wide_convolutions(unet):
    with pytest.raises(ValueError, match="OFT on k×k convolutions is not orthogonal"):
        adapters.add_oft(copy.deepcopy(unet), targets=("conv1",))


def test_bad_adapter_options(unet):
    with pytest.raises(ValueError, match="LoRA rank must be positive"):
        adapters.add_lora(copy.deepcopy(unet), rank=0)
    with pytest.raises(ValueError, match="no layer of the model matches"):
        adapters.add_lora(copy.deepcopy(unet), targets=("nothing_here",))
    with pytest.raises(ValueError, match="OFT block size must be positive"):
        adapters.add_oft(copy.deepcopy(unet), block_size=0)
