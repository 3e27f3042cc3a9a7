import pytest
import torch

from fullrange.optimizers import PerTensor, make_optimizer


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(make, fused: bool | None, steps: int = 5) -> torch.nn.Module:
    """``steps`` steps with one optimizer over all parameters (``fused=None``), or one per tensor stepped after the
    backward pass or inside it."""
    model = _model()
    params = list(model.parameters())
    optimizer = make(params) if fused is None else PerTensor(params, make, bf16=False)
    if fused:
        optimizer.fuse()
    for step in range(steps):
        _loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_per_tensor_steps_equal_one_optimizer_exactly_for_sgd_and_closely_for_adamw(fused):
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    adamw = lambda ps: make_optimizer(ps, "adamw", 1e-2)  # noqa: E731
    for make, exact in ((sgd, True), (adamw, False)):
        one, each = _train(make, None), _train(make, fused)
        for a, b in zip(one.parameters(), each.parameters(), strict=True):
            if exact:
                assert torch.equal(a, b)
            else:  # AdamW over one tensor takes another kernel path (foreach vs single): float rounding only
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(one[0].weight, _model()[0].weight)  # it trained


def test_fused_backward_frees_each_gradient_as_it_steps():
    model = _model()
    stepper = PerTensor(list(model.parameters()), lambda ps: torch.optim.SGD(ps, lr=0.1), bf16=False)
    stepper.fuse()
    alive = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(q.grad is not None for q in model.parameters()))
        )
    _loss(model, 0).backward()
    assert all(p.grad is None for p in model.parameters())
    assert max(alive) <= 1  # never more than the one being stepped
    stepper.unfuse()
    _loss(model, 1).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_steps_keep_updates_smaller_than_bf16_spacing_in_expectation():
    """SGD steps of a tenth of bf16's spacing: round-to-nearest loses every one of them; stochastic rounding moves
    the weight by their sum in expectation."""
    start = torch.full((4096,), 1.0)
    spacing = 2**-7  # bf16's spacing in [1, 2)
    steps = 50

    def run(bf16_stepper: bool) -> torch.Tensor:
        p = torch.nn.Parameter(start.to(torch.bfloat16))
        if bf16_stepper:
            stepper = PerTensor([p], lambda ps: torch.optim.SGD(ps, lr=1.0), bf16=True)
        else:
            stepper = torch.optim.SGD([p], lr=1.0)
        for step in range(steps):
            if bf16_stepper:
                stepper.begin(step)
            p.grad = torch.full_like(p, -spacing / 10)
            stepper.step()
        return p.detach().float()

    assert torch.equal(run(False), start)  # nearest rounding: nothing moved
    moved = run(True) - start
    expected = steps * spacing / 10
    assert abs(moved.mean().item() - expected) < 0.05 * expected


def test_per_tensor_state_dict_is_one_optimizers_and_round_trips():
    make = lambda ps: make_optimizer(ps, "adamw", 1e-2)  # noqa: E731
    model = _model()
    one = make(list(model.parameters()))
    each = PerTensor(list(model.parameters()), make, bf16=False)
    for optimizer in (one, each):
        _loss(model, 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = each.state_dict()
    assert sorted(saved["state"]) == sorted(one.state_dict()["state"]) == list(range(4))
    assert [g["params"] for g in saved["param_groups"]] == [[i] for i in range(4)]
    again = PerTensor(list(model.parameters()), make, bf16=False)
    again.load_state_dict(saved)
    for a, b in zip(again.optimizers, each.optimizers, strict=True):
        for key, value in a.state_dict()["state"][0].items():
            assert torch.equal(value, b.state_dict()["state"][0][key])


def test_bf16_moments_are_stored_in_bf16_between_steps():
    p = torch.nn.Parameter(torch.randn(16, 4).to(torch.bfloat16))
    stepper = PerTensor([p], lambda ps: make_optimizer(ps, "adamw", 1e-3), bf16=True)
    p.grad = torch.randn_like(p)
    stepper.begin(0)
    stepper.step()
    state = stepper.optimizers[0].state[stepper.held[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert p.dtype == torch.bfloat16 and p.grad is None and stepper.held[0].numel() == 0
