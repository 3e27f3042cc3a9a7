import pytest
import torch

MEASURED: list[str] = []


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def report():
    """Record a measured figure; all of them are printed at the end of the run (never hard-coded)."""
    return MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured in this run")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture
def diffusers_images():
    """Images in [0, 1] from a diffusers pipeline at 16×16 pixels, with the latents fullrange's sampling draws
    for seeds 0, 1, ... (one per prompt)."""

    def run(pipe, prompts, steps, guidance, negative_prompt=None):
        noise = [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(len(prompts))]
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompts,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.stack(noise),
            height=16,
            width=16,
            output_type="pt",
        ).images

    return run
