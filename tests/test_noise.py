import torch

from fullrange import noise


def test_offset_noise_added_part_is_constant_per_channel():
    shape = (512, 4, 8, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g2)
    per_channel = torch.randn((*shape[:2], 1, 1), generator=g2)
    drawn = noise.offset(shape, strength=0.3, generator=g1)
    added = drawn - base
    torch.testing.assert_close(added, (0.3 * per_channel).expand(shape))
    # The added part is constant over H, W and has std = strength across (sample, channel).
    assert added.flatten(2).std(-1).max() < 1e-6
    assert abs(added[:, :, 0, 0].std().item() - 0.3) < 0.02
    # Total variance 1 + strength² (seed 000: 1.01 for 0.1).
    assert abs(drawn.var().item() - 1.09) < 0.03


def test_pyramid_noise_unit_std_per_sample_and_low_frequency():
    shape = (64, 3, 32, 32)
    p = noise.pyramid(shape, discount=0.8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.flatten(1).std(1), torch.ones(64), atol=1e-5, rtol=0)
    # More power in the image means than iid noise has (whose mean std is 1/sqrt(3072) = 0.018).
    assert p.flatten(1).mean(1).std().item() > 5 / (3 * 32 * 32) ** 0.5
    # A zero discount leaves plain gaussian noise (renormalised).
    flat = noise.pyramid(shape, discount=0.0, generator=torch.Generator().manual_seed(0))
    assert flat.flatten(1).mean(1).std().item() < 2 / (3 * 32 * 32) ** 0.5


def test_every_draw_reproducible_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for fn in (
        lambda g: noise.gaussian((2, 3, 8, 8), generator=g),
        lambda g: noise.offset((2, 3, 8, 8), generator=g),
        lambda g: noise.pyramid((2, 3, 8, 8), generator=g),
        lambda g: noise.perturb(torch.zeros(2, 3, 8, 8), 0.1, generator=g),
    ):
        a = fn(torch.Generator().manual_seed(7))
        b = fn(torch.Generator().manual_seed(7))
        c = fn(torch.Generator().manual_seed(8))
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_input_perturbation_scale():
    eps = torch.zeros(256, 4, 16, 16)
    out = noise.perturb(eps, gamma=0.1, generator=torch.Generator().manual_seed(0))
    assert abs(out.std().item() - 0.1) < 0.002
