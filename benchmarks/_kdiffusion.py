"""k-diffusion's samplers driven the way ComfyUI drives a zero-terminal-SNR v-prediction model (benchmark only).

k-diffusion 0.1.1's package ``__init__`` imports its training stack (torchvision, clean-fid, wandb), which does
not install beside the CPU torch here; its ``sampling`` module needs only ``utils.append_dims``. So this loads
that one file from the installed package, unchanged, beside a one-function stand-in for ``utils``. Install::

    pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq trampoline && pip install scipy

ComfyUI's side, from its ``model_sampling.py`` / ``samplers.py``: discrete sigmas ``sqrt((1 - ᾱ)/ᾱ)`` with the
zero-SNR ᾱ_T clamped to :data:`COMFY_ZSNR_ALPHA_CUMPROD`; the network sees the nearest integer timestep of σ
and the scaled input ``x / sqrt(σ² + 1)``; v becomes ``x/(σ² + 1) - v σ / sqrt(σ² + 1)``; txt2img noise is
scaled by ``sqrt(1 + σ_max²)``; schedulers "simple", "normal" and "karras".
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import torch

COMFY_ZSNR_ALPHA_CUMPROD = 4.8973451890853435e-08
"""ComfyUI's stand-in for ᾱ_T = 0 (σ_max ≈ 4518.8)."""

# Align Your Steps (Sabour et al. 2024), the published 10-step σ ladders for SD 1.5 and SDXL.
AYS = {
    "AYS SD1.5": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "AYS SDXL": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}
SAMPLERS = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m")


def load_sampling():
    """``k_diffusion.sampling`` from the installed package, without the package's ``__init__``."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("k-diffusion is not installed; see benchmarks/_kdiffusion.py for the command")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    sys.modules.setdefault("k_diffusion", package)
    sys.modules.setdefault("k_diffusion.utils", utils)
    file = spec.submodule_search_locations[0] + "/sampling.py"
    module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class ComfyModel:
    """ComfyUI's ``ModelSamplingDiscrete`` + v-prediction around a network ``network(x_in, t)`` returning v."""

    def __init__(self, alphas_cumprod: torch.Tensor, network):
        ac = alphas_cumprod.clone()
        ac[-1] = max(float(ac[-1]), COMFY_ZSNR_ALPHA_CUMPROD)
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.network = network

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: float) -> int:
        return int((math.log(sigma) - self.log_sigmas).abs().argmin())

    def sigma(self, t: float) -> float:
        low, high = math.floor(t), math.ceil(t)
        w = t - low
        return math.exp((1 - w) * float(self.log_sigmas[low]) + w * float(self.log_sigmas[high]))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        s = float(sigma.flatten()[0])
        v = self.network(x / math.sqrt(s**2 + 1), self.timestep(s))
        return x / (s**2 + 1) - v * s / math.sqrt(s**2 + 1)

    def schedule(self, kd, name: str, steps: int) -> torch.Tensor:
        """σ ladder of ComfyUI's scheduler ``name`` (simple / normal / karras / an AYS ladder), ending in 0."""
        if name == "simple":
            stride = len(self.sigmas) / steps
            sigmas = [float(self.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
        elif name == "normal":
            ts = torch.linspace(self.timestep(self.sigma_max), self.timestep(self.sigma_min), steps).tolist()
            sigmas = [self.sigma(t) for t in ts]
        elif name == "karras":
            return kd.get_sigmas_karras(steps, self.sigma_min, self.sigma_max).to(torch.float64)
        elif name in AYS:  # ComfyUI's AlignYourStepsScheduler: log-linear resampling to steps + 1 points
            ladder = torch.tensor(AYS[name], dtype=torch.float64).log()
            grid = torch.linspace(0, 1, len(ladder), dtype=torch.float64)
            at = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
            idx = torch.searchsorted(grid, at).clamp(1, len(grid) - 1)
            w = (at - grid[idx - 1]) / (grid[idx] - grid[idx - 1])
            sigmas = ((1 - w) * ladder[idx - 1] + w * ladder[idx]).exp().tolist()[:-1]
        else:
            raise ValueError(f"unknown scheduler {name!r}")
        return torch.tensor([*sigmas, 0.0], dtype=torch.float64)


def run(kd, model: ComfyModel, sampler: str, scheduler: str, noise: torch.Tensor, steps: int) -> torch.Tensor:
    sigmas = model.schedule(kd, scheduler, steps)
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    fn = getattr(kd, f"sample_{sampler}")
    with torch.no_grad():
        return fn(model, x, sigmas, disable=True)
