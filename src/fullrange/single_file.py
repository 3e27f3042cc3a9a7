"""Single-file Stable Diffusion checkpoints, the original LDM layout that A1111, ComfyUI and kohya read and write.

Verify (SHA-256), recognise the family from the header, load offline with bundled SD 1.x / 2.x / XL configs and CLIP
tokenizer (diffusers' loader would fetch them from a hub), read the ``v_pred`` / ``ztsnr`` markers diffusers
ignores, and export a diffusers model back to one file that carries those markers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .sd import StableDiffusion

FAMILIES = ("sd1", "sd2", "sdxl")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."


def sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path | str, expected: str) -> None:
    """Raise ``ValueError`` unless the file's SHA-256 is ``expected`` (hex, any case)."""
    expected = expected.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"--sha256 {expected!r}: not 64 hex digits")
    actual = sha256(path)
    if actual != expected:
        raise ValueError(f"--model {path}: SHA-256 is {actual}, not the expected {expected}; refusing to load it")


def read_header(path: Path | str) -> dict:
    """The JSON header of a safetensors file (tensor names, shapes, ``__metadata__``), without reading weights."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(path.stat().st_size, 100 * 2**20):
                raise ValueError
            return json.loads(f.read(length))
        except (struct.error, ValueError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None


def _pickle_header(path: Path) -> dict:
    """Tensor names and shapes of a pickle checkpoint (``.ckpt``; the caller has allowed pickle), read with
    ``torch.load(weights_only=True)`` through diffusers, as a safetensors header would give them. A pickle has
    no header, so the file is read twice (here, then by ``from_single_file``, which takes only a path)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        state = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as err:  # torch.load raises many kinds for a bad file
        raise ValueError(f"--model {path}: not a readable checkpoint ({type(err).__name__})") from None
    return {k: {"shape": list(v.shape)} for k, v in state.items() if isinstance(v, torch.Tensor)}


def markers(header: dict) -> dict[str, bool]:
    """What a single file says about its sampling: ``v_pred`` / ``ztsnr`` keys (ComfyUI) and kohya's
    ``ss_v_parameterization`` / ``ss_zero_terminal_snr`` metadata; diffusers' own loader ignores both."""
    meta = header.get("__metadata__", {}) or {}

    def truthy(value) -> bool:
        return str(value).strip().lower() in ("true", "1", "yes")

    return {
        "v_prediction": "v_pred" in header or truthy(meta.get("ss_v_parameterization")),
        "zero_terminal_snr": "ztsnr" in header or truthy(meta.get("ss_zero_terminal_snr")),
    }


def family(header: dict, path: Path | str = "checkpoint") -> str:
    """``sd1`` (CLIP ViT-L text encoder), ``sd2`` (OpenCLIP ViT-H) or ``sdxl`` (both, CLIP ViT-L and OpenCLIP
    ViT-bigG), from tensor names and shapes."""
    keys = header.keys()
    xl = any(k.startswith(XL_OPENCLIP_PREFIX) for k in keys)
    if not xl and any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError(f"--model {path}: an SDXL refiner checkpoint; fullrange supports SDXL base, SD 1.x and 2.x")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ValueError(f"--model {path}: no UNet weights ({UNET_PREFIX}*), not a Stable Diffusion checkpoint")
    conv_in = header.get(UNET_PREFIX + "input_blocks.0.0.weight", {}).get("shape", [0, 4])
    if conv_in[1] != 4:
        raise ValueError(f"--model {path}: UNet takes {conv_in[1]} input channels (inpainting?); 4 are supported")
    text_prefix = "conditioner." if xl else "cond_stage_model."
    missing = [
        name
        for name, prefix in (("VAE", VAE_PREFIX), ("text encoder", text_prefix))
        if not any(k.startswith(prefix) for k in keys)
    ]
    if missing:
        raise ValueError(f"--model {path}: no {' and no '.join(missing)} weights in the file (a UNet-only file?)")
    if xl:
        return "sdxl"
    return "sd2" if any(k.startswith(OPENCLIP_PREFIX) for k in keys) else "sd1"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte → printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_tokenizer_files(folder: Path, config: dict) -> None:
    """Write CLIP's BPE tokenizer (``vocab.json``, ``merges.txt``) and its ``config`` into ``folder``.

    The vocabulary is rebuilt from the 48,894 merges as CLIP does: 256 byte symbols, the same with ``</w>``, one
    token per merge, then the start and end tokens (49,408 in all). The merges ship with fullrange (MIT, from
    OpenAI's CLIP via open_clip; see NOTICE).
    """
    data = resources.files("fullrange").joinpath("configs/clip_merges.txt.gz").read_bytes()
    merges = gzip.decompress(data).decode("utf-8").splitlines()
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_config_folder(name: str, folder: Path) -> Path:
    """A diffusers folder holding only the configs (and tokenizers) of family ``name``: what diffusers'
    ``from_single_file`` needs besides the weights."""
    configs = json.loads(resources.files("fullrange").joinpath(f"configs/{name}.json").read_text())
    index = {
        "_class_name": "StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if name == "sdxl":
        index |= {
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    for component, config in configs.items():
        (folder / component).mkdir(parents=True, exist_ok=True)
        if component.startswith("tokenizer"):
            clip_tokenizer_files(folder / component, config)
        else:
            file = "scheduler_config.json" if component == "scheduler" else "config.json"
            (folder / component / file).write_text(json.dumps(config))
    return folder


def load(path: Path | str, *, config: Path | str | None = None, dtype=torch.float32) -> tuple[dict, dict]:
    """The networks and tokenizers (as ``StableDiffusion`` names them) and the scheduler config of a single
    checkpoint file (``.safetensors``, or a pickle file the caller has allowed), offline.

    ``config`` is a diffusers folder describing the architecture; by default the bundled SD 1.x, 2.x or SDXL
    configs, picked from the weights (SD 2.x files are taken as 768-v, v-prediction, as diffusers does). The
    file's ``v_pred`` / ``ztsnr`` markers then set the prediction type and zero terminal SNR (trailing steps).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    header = read_header(path) if path.suffix == ".safetensors" else _pickle_header(path)
    name = family(header, path)
    pipeline_class = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(config) if config is not None else write_config_folder(name, Path(tmp))
        cast = None if dtype == torch.float32 else dtype  # None: float32 without diffusers' warning about casting
        try:
            pipe = pipeline_class.from_single_file(
                str(path), config=str(folder), local_files_only=True, torch_dtype=cast
            )
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            first = str(err).split(". ")[0].strip()
            raise ValueError(
                f"--model {path}: the weights do not fit the {'given' if config else 'bundled ' + name} config "
                f"({first}); give the architecture's diffusers folder with --model-config"
            ) from None
    networks = ("unet", "vae", "text_encoder", *(("text_encoder_2",) if name == "sdxl" else ()))
    empty = [
        f"{component}.{key}"
        for component in networks
        for key, tensor in getattr(pipe, component).state_dict().items()
        if tensor.is_meta
    ]
    if empty:
        raise ValueError(f"--model {path}: {len(empty)} tensors missing from the file, e.g. {empty[0]}")
    parts = {k: getattr(pipe, k) for k in (*networks, "tokenizer", *(("tokenizer_2",) if name == "sdxl" else ()))}
    scheduler_config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    found = markers(header)
    if found["v_prediction"]:
        scheduler_config["prediction_type"] = "v_prediction"
    if found["zero_terminal_snr"]:
        scheduler_config |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 0}
    return parts, scheduler_config


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


def text_encoders_to_ldm(model: StableDiffusion, name: str) -> dict[str, torch.Tensor]:
    """The text encoder(s) in the layout of family ``name``: CLIP under ``cond_stage_model.transformer`` (SD 1.x),
    OpenCLIP under ``cond_stage_model.model`` (SD 2.x), both under ``conditioner.embedders`` (SDXL)."""
    state = model.text_encoder.state_dict()
    if name == "sd1":
        return clip_to_ldm(state, CLIP_PREFIX)
    if name == "sd2":
        return openclip_to_ldm(state, OPENCLIP_PREFIX)
    return {
        **clip_to_ldm(state, XL_CLIP_PREFIX),
        **openclip_to_ldm(model.text_encoder_2.state_dict(), XL_OPENCLIP_PREFIX),
    }


def default_family(model: StableDiffusion) -> str:
    """``sdxl`` for SDXL, else ``sd1`` or ``sd2`` from the UNet's cross-attention width (768: CLIP ViT-L, 1024:
    OpenCLIP ViT-H)."""
    if model.is_xl:
        return "sdxl"
    unet_config = model.unet.config
    names = {768: "sd1", 1024: "sd2"}
    if unet_config.cross_attention_dim not in names:
        raise ValueError(
            f"cross_attention_dim {unet_config.cross_attention_dim} is neither SD 1.x's 768 nor SD 2.x's 1024: "
            "give the layout (--family sd1 or sd2)"
        )
    return names[unet_config.cross_attention_dim]


def export(path: Path | str, model: StableDiffusion, *, name: str | None = None, dtype=torch.float16) -> Path:
    """Write ``model`` (UNet with any adapter merged, VAE, text encoders) as one LDM-layout ``.safetensors``
    file, atomically, that A1111 / ComfyUI load; ``v_pred`` / ``ztsnr`` marker keys and kohya's metadata say what
    its scheduler config says about prediction type and zero terminal SNR. ``name``: ``sd1`` / ``sd2`` / ``sdxl``
    layout (default: :func:`default_family`)."""
    from safetensors.torch import save

    from .adapters import merged_state_dict
    from .checkpoint import atomic_write

    name = name or default_family(model)
    if name not in FAMILIES:
        raise ValueError(f"--family {name!r}: choose one of {', '.join(FAMILIES)}")
    if (name == "sdxl") != model.is_xl:
        raise ValueError(f"--family {name}: the model is {'' if model.is_xl else 'not '}SDXL")
    ldm = {
        **unet_to_ldm(merged_state_dict(model.unet), model.unet.config),
        **vae_to_ldm(model.vae.state_dict(), model.vae.config),
        **text_encoders_to_ldm(model, name),
    }
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in ldm.items()}
    metadata = {"format": "pt"}
    if model.prediction == "v_prediction":
        state["v_pred"] = torch.tensor([])
        metadata["ss_v_parameterization"] = "true"
    if model.scheduler_config.get("rescale_betas_zero_snr"):
        state["ztsnr"] = torch.tensor([])
        metadata["ss_zero_terminal_snr"] = "true"
    atomic_write(Path(path), save(state, metadata))
    return Path(path)
