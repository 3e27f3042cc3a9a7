import pytest
import torch

from fullrange.precision import cast_parameters, round_stochastic


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above ``x`` in magnitude (truncation, and one step up)."""
    bits = x.view(torch.int32) & -65536
    below = bits.view(torch.float32)
    above = (bits + 65536).view(torch.float32)
    return below, above


@pytest.mark.parametrize("value", [1.0 + 2**-10, -3.7, 1e-30, 12345.678])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(value):
    """E[round(x)] = x (Gupta et al. 2015): over 200k draws the mean is x within 5 standard errors, and every draw is
    one of the two bf16 values around x, up with probability equal to x's distance from the one below."""
    x = torch.full((200_000,), value, dtype=torch.float32)
    rounded = round_stochastic(x, torch.Generator().manual_seed(0)).float()
    below, above = _bf16_neighbours(x[:1])
    assert set(rounded.unique().tolist()) <= {below.item(), above.item()}
    p_up = ((x[0] - below) / (above - below)).abs().item()
    spacing = (above - below).abs().item()
    standard_error = spacing * (p_up * (1 - p_up) / x.numel()) ** 0.5
    assert abs(rounded.double().mean().item() - value) <= 5 * standard_error + 1e-12 * abs(value)
    # Round-to-nearest is biased by up to half a spacing: the comparison that makes this test able to fail.
    if 0.1 < p_up < 0.4:
        assert abs(x.to(torch.bfloat16).float().double().mean().item() - value) > 5 * standard_error


def test_values_bf16_holds_are_kept_exactly():
    x = torch.tensor([0.0, 1.0, -2.5, 0.15625, float("inf")]).to(torch.bfloat16).float()
    assert torch.equal(round_stochastic(x, torch.Generator().manual_seed(1)).float(), x)


def test_cast_parameters_stores_frozen_weights_in_half_and_keeps_trained_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cast_parameters(model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes == {
        "0.weight": torch.bfloat16,
        "0.bias": torch.bfloat16,
        "1.weight": torch.float32,
        "1.bias": torch.float32,
    }
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    torch.testing.assert_close(model[0].weight.float(), before["0.weight"], rtol=2**-8, atol=0)
    cast_parameters(model, torch.bfloat16, trained=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model[1].weight.requires_grad
