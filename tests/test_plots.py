"""Plots (fullrange.plots): written atomically as PNG; the one module that imports matplotlib."""

import torch

from fullrange import plots, schedules, timesteps


def test_schedule_and_brightness_plots_are_pngs_left_whole(tmp_path):
    schedule = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    t = timesteps.plan(schedule, 8, "karras", num_values=4 * 64 * 64).double()
    assert plots.schedule_plot(schedule, t, 4 * 64 * 64, tmp_path / "a" / "s.png", "ztsnr") == "s.png"
    results = {"m": {"dark": {"mean_brightness": 0.2}, "bright": {"mean_brightness": 0.8}}}
    plots.brightness_per_prompt(results, tmp_path / "a" / "b.png")
    for name in ("s.png", "b.png"):
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.png", "s.png"]  # no temporary file left
    assert torch.isfinite(t).all()
