import pytest
import torch

from fullrange import metrics, toy


def test_built_in_data_brightness_per_label():
    images, labels = toy.synthetic_images(600, size=16, channels=3, seed=0)
    assert images.shape == (600, 3, 16, 16) and labels.shape == (600,)
    assert images.min() >= -1 and images.max() <= 1
    b = metrics.brightness(images)
    for k, name in enumerate(toy.LABELS):
        mine = b[labels == k]
        assert len(mine) > 20, name
        if name == "solid black":
            assert mine.max().item() == 0.0
        elif name == "solid white":
            assert mine.min().item() == 1.0
        else:
            low, high = toy.BRIGHTNESS_RANGE[name]
            # Clipping to [0, 1] moves a scene's mean by a little at most.
            assert mine.min().item() > low - 0.03 and mine.max().item() < high + 0.03, name
    # Wide: from near-black to near-white, with a spread well beyond SD's "middle".
    assert b.quantile(0.05).item() < 0.1 and b.quantile(0.95).item() > 0.9
    assert b.std().item() > 0.3
    # Label frequencies follow LABEL_WEIGHTS.
    freq = torch.bincount(labels, minlength=len(toy.LABELS)).double() / 600
    torch.testing.assert_close(freq, torch.tensor(toy.LABEL_WEIGHTS, dtype=torch.float64), atol=0.06, rtol=0)


def test_scenes_have_structure():
    images, labels = toy.synthetic_images(50, size=32, channels=3, seed=1)
    scenes = images[labels >= 2]
    # Not flat: shapes, gradients and texture give spatial variation inside each scene.
    assert scenes.flatten(1).std(1).min().item() > 0.02


def test_image_depends_only_on_seed_and_index():
    a, la = toy.synthetic_images(10, size=16, channels=4, seed=3)
    b, lb = toy.synthetic_images(20, size=16, channels=4, seed=3)
    torch.testing.assert_close(a, b[:10])
    assert torch.equal(la, lb[:10])
    c, _ = toy.synthetic_images(10, size=16, channels=4, seed=4)
    assert not torch.equal(a, c)
    assert a.shape[1] == 4


@pytest.mark.parametrize("args", [(0, 16, 3), (10, 2, 3), (10, 16, 0)])
def test_bad_sizes(args):
    with pytest.raises(ValueError, match="need num_images > 0"):
        toy.synthetic_images(*args)
