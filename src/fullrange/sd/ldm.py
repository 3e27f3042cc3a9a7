"""Names in the original LDM layout (A1111, ComfyUI, kohya) for diffusers' UNet, VAE and CLIP text encoders."""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."


# diffusers → LDM names. Resnets: the layer names inside; UNet / VAE blocks: computed from the config.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, blocks: dict[str, str], inner: dict[str, dict[str, str]]) -> str:
    """Replace the longest block prefix of ``key`` by its LDM name, and the layer name after it by ``inner``'s."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            rest = ".".join(parts[cut:-1])
            rest = inner.get(prefix, {}).get(rest, rest)
            return ".".join(p for p in (blocks[prefix], rest, parts[-1]) if p)
    return key


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in LDM names (``input_blocks`` / ``middle_block`` /
    ``output_blocks``), for any ``layers_per_block`` and depth."""
    n, levels = config.layers_per_block, len(config.block_out_channels)
    blocks = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(levels):
        for j in range(n):
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * (n + 1) + j}.0"
            blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * (n + 1) + j}.1"
        blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (n + 1)}.0.op"
        for j in range(n + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (n + 1) + j}.0"
            blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (n + 1) + j}.1"
        has_attention = "CrossAttn" in config.up_block_types[i]
        blocks[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (n + 1) + n}.{2 if has_attention else 1}"
    inner = {prefix: _UNET_RESNET for prefix in blocks if ".resnets." in prefix}
    return {UNET_PREFIX + _rename(k, blocks, inner): v for k, v in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in LDM names; attention projections become 1×1 convolutions."""
    levels, n = len(config.block_out_channels), config.layers_per_block
    blocks = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for side in ("encoder", "decoder"):
        blocks |= {
            f"{side}.mid_block.resnets.0": f"{side}.mid.block_1",
            f"{side}.mid_block.resnets.1": f"{side}.mid.block_2",
            f"{side}.mid_block.attentions.0": f"{side}.mid.attn_1",
        }
    for i in range(levels):
        for j in range(n + 1):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            blocks[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
        blocks[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        blocks[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{levels - 1 - i}.upsample"
    inner = {p: {"conv_shortcut": "nin_shortcut"} for p in blocks if ".resnets." in p}
    inner |= {p: _VAE_ATTENTION for p in blocks if p.endswith("attentions.0")}
    out = {}
    for key, value in state.items():
        name = _rename(key, blocks, inner)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + name] = value
    return out


def _text_model_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights under the names inside ``text_model`` (CLIPTextModel is flat in
    recent transformers, CLIPTextModelWithProjection is not), without the ``position_ids`` buffer."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict as LDM files keep CLIP ViT-L: its own names under ``prefix``."""
    state = _text_model_names(state)
    return {prefix + k: v for k, v in state.items() if not k.startswith("text_projection")}


def openclip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict in OpenCLIP's names under ``prefix`` (q/k/v stacked in
    ``in_proj``, ``text_projection`` transposed), as SD 2.x and SDXL files keep their OpenCLIP encoder."""
    state = _text_model_names(state)
    renames = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    out = {}
    for key, value in state.items():
        if key in renames:
            out[prefix + renames[key]] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        _, _, index, *rest = key.split(".")  # encoder.layers.{i}.{module...}.{param}
        module, param = ".".join(rest[:-1]), rest[-1]
        base = f"{prefix}transformer.resblocks.{index}."
        if module == "self_attn.q_proj":
            stacked = [state[f"encoder.layers.{index}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"{base}attn.in_proj_{param}"] = torch.cat(stacked)
        elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
            out[f"{base}{layer[module]}.{param}"] = value
    return out


def text_encoders_to_ldm(
    name: str, first: dict[str, torch.Tensor], second: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The text encoders' state dicts in the layout of family ``name``: CLIP under ``cond_stage_model.transformer``
    (SD 1.x), OpenCLIP under ``cond_stage_model.model`` (SD 2.x), both under ``conditioner.embedders`` (SDXL, whose
    ``second`` is OpenCLIP ViT-bigG)."""
    if name == "sd1":
        return clip_to_ldm(first, CLIP_PREFIX)
    if name == "sd2":
        return openclip_to_ldm(first, OPENCLIP_PREFIX)
    if second is None:
        raise ValueError("the SDXL layout needs both text encoders")
    return {**clip_to_ldm(first, XL_CLIP_PREFIX), **openclip_to_ldm(second, XL_OPENCLIP_PREFIX)}
