"""kohya sd-scripts' own code on fullrange's files, run in sd-scripts' environment (transformers 4.54, diffusers
0.32: ``.ci/run`` makes it) by ``test_interop``; never imported by fullrange. Prints one JSON line.

``lora FAMILY LORA TWIN OUT``: ``networks.lora.create_network_from_weights`` on kohya's own UNet class (built on
the meta device: its layout is fixed at the real size) and the twin's text encoders; each module kohya made is
merged by its own ``merge_to`` into a zero layer of the file's shape, so the layer becomes the change kohya
applies; the changes go to OUT (safetensors, by the file's module names).

``checkpoint FAMILY SHAPES``: kohya's checkpoint loader (``load_models_from_stable_diffusion_checkpoint`` /
``load_models_from_sdxl_checkpoint``, strict) on a real-shaped single file given as names and shapes (SHAPES,
JSON), as meta tensors: the missing and unexpected keys it reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def lora(family: str, file: str, twin: str, out: str) -> dict:
    from networks import lora as kohya_lora
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if family == "sdxl":
            from library.sdxl_original_unet import SdxlUNet2DConditionModel

            unet = SdxlUNet2DConditionModel()
        else:
            from library.original_unet import UNet2DConditionModel

            unet = UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768)
    encoders = [CLIPTextModel.from_pretrained(Path(twin) / "text_encoder")]
    if family == "sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(Path(twin) / "text_encoder_2"))
    weights = load_file(file)
    original = {id(t): k.split(".")[0] for k, t in weights.items()}  # kohya renames SDXL's keys in place
    network, weights = kohya_lora.create_network_from_weights(
        1.0,
        file,
        None,
        encoders if family == "sdxl" else encoders[0],
        unet,
        weights_sd=dict(weights),
        for_inference=True,
    )
    made = network.text_encoder_loras + network.unet_loras
    stems = {k.split(".")[0] for k in weights}
    changes = {}
    for module in made:
        own = {k[len(module.lora_name) + 1 :]: v for k, v in weights.items() if k.startswith(module.lora_name + ".")}
        down, up = own["lora_down.weight"], own["lora_up.weight"]
        if down.dim() == 2:
            layer = torch.nn.Linear(down.shape[1], up.shape[0], bias=False)
        else:
            layer = torch.nn.Conv2d(down.shape[1], up.shape[0], down.shape[2:], bias=False)
        torch.nn.init.zeros_(layer.weight)
        module.org_module = layer
        module.merge_to(own, torch.float32, "cpu")
        changes[original[id(down)]] = layer.weight.detach().contiguous()
    save_file(changes, out)
    return {"modules": len(made), "stems": len(stems), "unmapped": sorted(stems - {m.lora_name for m in made})}


def checkpoint(family: str, shapes: str) -> dict:
    from library import model_util, sdxl_model_util

    names = json.loads(Path(shapes).read_text())
    state = {k: torch.empty(shape, device="meta") for k, shape in names.items()}
    model_util.load_file = sdxl_model_util.load_file = lambda *args, **kwargs: dict(state)
    try:
        with torch.device("meta"):
            if family == "sdxl":
                sdxl_model_util.load_models_from_sdxl_checkpoint(None, "x.safetensors", "meta")
            else:
                model_util.load_models_from_stable_diffusion_checkpoint(False, "x.safetensors", device="meta")
    except RuntimeError as error:  # its strict loading: the missing and unexpected keys
        return {"loaded": False, "error": str(error)[:2000]}
    return {"loaded": True, "tensors": len(state)}


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    result = {"lora": lora, "checkpoint": checkpoint}[mode](*args)
    print(json.dumps(result))
