"""fullrange's files read by the other side's own code (``oracles``): ComfyUI, A1111's LoRA extension, Forge's
detector and kohya sd-scripts load the kohya LoRA, the single file and its companions; every tensor is counted
(mapped, missing, unexpected, unmapped) and the weight change they apply is compared with fullrange's own merge.

The models are the structural twins of SD 1.5 and SDXL (``fullrange.sd.testing.save_twin``): the real module tree
(258 / 773 UNet LoRA targets, 12 / 32 text-encoder layers) at a few channels. Where a tool only detects real
widths, the real-shaped model is built on the meta device (names and shapes, no memory)."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import oracles
import pytest
import torch
from safetensors.torch import load_file

from fullrange import adapters
from fullrange.adapters import AdapterConfig, merged_differences
from fullrange.sd import load_adapter, load_stable_diffusion, tools
from fullrange.sd.export import export
from fullrange.sd.testing import save_twin

FAMILIES = ("sd1", "sdxl")
TEXT_PREFIXES = {"sd1": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}


@pytest.fixture(scope="module", params=FAMILIES)
def twin(request, tmp_path_factory):
    """One family's twin, a LoRA of it on the UNet and both text encoders (random, non-zero: as if trained), that
    LoRA as fullrange's kohya file, and the weight change fullrange's own merge makes, by kohya module name."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = save_twin(root / "base", family)
    model = load_stable_diffusion(folder)
    config = AdapterConfig("lora", rank=2, text_encoder=True)
    adapters.LoRA().attach(model, config, seed=0)
    with torch.no_grad():
        for network in (model.unet, *model.text_encoders.values()):
            for i, (_, p) in enumerate((n, p) for n, p in network.named_parameters() if "lora_" in n):
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    lora = adapters.LoRA().save(model, config, root)["lora"]
    base = load_stable_diffusion(folder)
    kohya = adapters.LoRA().export(root / "lora_kohya.safetensors", lora, base, family)
    checkpoint = export(root / "base.safetensors", base, family=family, dtype=torch.float32)[0]
    merged_file = export(root / "merged.safetensors", load_adapter(base, lora), family=family, dtype=torch.float32)[0]
    merged = load_adapter(load_stable_diffusion(folder), lora)
    changes = {f"lora_unet_{k}": v for k, v in merged_differences(merged.unet).items()}
    for prefix, encoder in zip(TEXT_PREFIXES[family], merged.text_encoders.values(), strict=True):
        changes |= {
            f"{prefix}_text_model_{k.removeprefix('text_model.')}": v for k, v in merged_differences(encoder).items()
        }
    changes = {k.replace(".", "_"): v for k, v in changes.items()}
    return SimpleNamespace(
        family=family, folder=folder, lora=lora, kohya=kohya, checkpoint=checkpoint, merged=merged_file, changes=changes
    )


class Warnings(logging.Handler):
    """The warnings a tool logs while it loads (ComfyUI names each key it could not use this way)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self.lines

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


def _counts(report, tool: str, family: str, modules: dict[str, torch.Tensor] | None = None, **counts) -> None:
    """Report a tool's counts for one family; ``modules``: the file's modules it applied, counted by network."""
    if modules is not None:
        unet = sum(1 for k in modules if k.startswith("lora_unet"))
        counts = {"UNet modules": unet, "text-encoder modules": len(modules) - unet} | counts
    report(f"{tool} {family}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _assert_same_changes(theirs: dict, ours: dict, family: str) -> float:
    """Every module's applied change equals fullrange's merge; returns the largest relative difference."""
    assert theirs.keys() == ours.keys()
    worst = 0.0
    for name, change in ours.items():
        theirs_ = theirs[name].reshape(change.shape).to(change.dtype)
        torch.testing.assert_close(theirs_, change, atol=1e-6, rtol=1e-5, msg=f"{family} {name}")
        worst = max(worst, ((theirs_ - change).abs().max() / change.abs().max().clamp_min(1e-12)).item())
    return worst


# --- ComfyUI ---------------------------------------------------------------------------------------------------


def test_comfyui_applies_every_tensor_of_the_kohya_lora_as_fullrange_merges_it(twin, report):
    """ComfyUI's LoraLoader path (``load_lora_for_models``, then patching the weights) maps every tensor of the
    kohya file, UNet and text encoders, and changes each weight by what fullrange's merge does."""
    comfy = oracles.comfyui()
    patcher, clip, _ = oracles.comfyui_load(comfy, twin.checkpoint, twin.folder, twin.family)
    lora = comfy.utils.load_torch_file(str(twin.kohya))
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(patcher.model))
    with Warnings() as lines:
        new_model, new_clip = comfy.sd.load_lora_for_models(patcher, clip, lora, 1.0, 1.0)
    not_loaded = [line for line in lines if "not loaded" in line.lower()]
    assert not_loaded == []
    before = {"model": oracles.no_grad_copy(patcher.model), "clip": oracles.no_grad_copy(clip.cond_stage_model)}
    comfy.model_management.load_models_gpu([new_model, new_clip.patcher])  # what sampling and encoding do
    after = {"model": new_model.model.state_dict(), "clip": new_clip.cond_stage_model.state_dict()}
    theirs = {}
    for name in {k.rsplit(".", 2)[0] for k in lora}:
        target = key_map[name]
        part = "model" if name.startswith("lora_unet") else "clip"
        theirs[name] = after[part][target] - before[part][target]
    worst = _assert_same_changes(theirs, twin.changes, twin.family)
    counts = {"tensors mapped": f"{len(lora) - len(not_loaded)} of {len(lora)}", "worst relative": f"{worst:.1e}"}
    _counts(report, "ComfyUI LoRA", twin.family, theirs, **counts)


COMFY_NEVER_IN_A_FILE = (".logit_scale", ".transformer.text_projection.weight")
"""What ComfyUI's checkpoint loader expects to be missing from an SD 1.x file (it logs them at debug level only)."""


def test_comfyui_loads_the_single_file_with_a_text_encoder_lora_and_nothing_missing_or_unexpected(twin, report):
    """The single file of the twin with its LoRA merged (UNet and text encoders): ComfyUI's loader finds every tensor
    it needs and none it does not know, and the weights it loads are what ComfyUI's own LoRA loader makes of the base
    file and the kohya LoRA."""
    comfy = oracles.comfyui()
    patcher, clip, counts = oracles.comfyui_load(comfy, twin.merged, twin.folder, twin.family)
    missing = [k for part in counts.values() for k in part[0] if not k.endswith(COMFY_NEVER_IN_A_FILE)]
    unexpected = [k for part in counts.values() for k in part[1]]
    assert missing == [] and unexpected == []
    base, base_clip, _ = oracles.comfyui_load(comfy, twin.checkpoint, twin.folder, twin.family)
    lora = comfy.utils.load_torch_file(str(twin.kohya))
    with_lora, clip_with_lora = comfy.sd.load_lora_for_models(base, base_clip, lora, 1.0, 1.0)
    comfy.model_management.load_models_gpu([with_lora, clip_with_lora.patcher])
    for ours, theirs in ((patcher.model, with_lora.model), (clip.cond_stage_model, clip_with_lora.cond_stage_model)):
        theirs = theirs.state_dict()
        for k, v in ours.state_dict().items():
            if not k.endswith(COMFY_NEVER_IN_A_FILE):  # uninitialised in both
                torch.testing.assert_close(v, theirs[k], atol=1e-6, rtol=1e-5, msg=k)
    total = len(load_file(twin.merged))
    _counts(report, "ComfyUI single file", twin.family, tensors=total, missing=len(missing), unexpected=len(unexpected))


# --- A1111 -------------------------------------------------------------------------------------------------------


class _OpenClipTwin(torch.nn.Module):
    """The module tree of OpenCLIP's text transformer as A1111 holds SDXL's second encoder
    (``model.transformer.resblocks.N.attn``: one ``MultiheadAttention`` with q, k, v stacked; ``mlp.c_fc`` /
    ``mlp.c_proj``), at ``width``, with zero weights: only the change A1111 applies is read."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        blocks = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.attn = torch.nn.MultiheadAttention(width, 4)
            block.mlp = torch.nn.Sequential()
            block.mlp.add_module("c_fc", torch.nn.Linear(width, 4 * width))
            block.mlp.add_module("c_proj", torch.nn.Linear(4 * width, width))
            blocks.append(block)
        self.model = torch.nn.Module()
        self.model.transformer = torch.nn.Module()
        self.model.transformer.resblocks = blocks
        for p in self.parameters():
            torch.nn.init.zeros_(p)


def a1111_model(comfy, twin):
    """An object with the module names A1111 gives a loaded checkpoint (``model.diffusion_model.…``; SD 1.x's
    ``cond_stage_model.wrapped.transformer.text_model.…``; SDXL's ``conditioner.embedders[0 / 1].wrapped``): the
    UNet and CLIP-L are ComfyUI's (the same LDM / CLIP names) with plain torch layers, as A1111's are (its LoRA code
    checks the exact class), SDXL's OpenCLIP-bigG the tree above."""
    patcher, clip, _ = oracles.comfyui_load(comfy, twin.checkpoint, twin.folder, twin.family)
    for network in (patcher.model, clip.cond_stage_model):
        for layer in network.modules():
            plain = next(c for c in type(layer).__mro__ if c.__module__.startswith("torch.nn"))
            if plain in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
                layer.__class__ = plain  # ComfyUI's subclasses only add dtype casts to forward
    clip_l = SimpleNamespace(wrapped=clip.cond_stage_model.clip_l)
    if twin.family == "sd1":
        return SimpleNamespace(is_sdxl=False, model=patcher.model, cond_stage_model=clip_l)
    layers = len(clip.cond_stage_model.clip_g.transformer.text_model.encoder.layers)
    bigg = SimpleNamespace(wrapped=_OpenClipTwin(48, layers))
    return SimpleNamespace(is_sdxl=True, model=patcher.model, conditioner=SimpleNamespace(embedders=[clip_l, bigg]))


def _a1111_changes(net) -> dict[str, torch.Tensor]:
    """Each file module's weight change after A1111 applied the network: the weight minus A1111's own backup of it;
    a MultiheadAttention's stacked in-projection split back into q, k, v, its out-projection read from it."""
    layers = [m.sd_module for m in net.modules.values()]
    attention = {id(m.out_proj): m for m in layers if isinstance(m, torch.nn.MultiheadAttention)}
    changes = {}
    for module in net.modules.values():
        layer, stem = module.sd_module, module.network_key.partition(".")[0]
        if id(layer) in attention:
            owner = attention[id(layer)]
            changes[stem] = owner.out_proj.weight - owner.network_weights_backup[1]
        elif isinstance(layer, torch.nn.MultiheadAttention):
            in_proj = layer.in_proj_weight - layer.network_weights_backup[0]
            changes[stem] = in_proj.chunk(3)["qkv".index(stem[-6])]  # …_q_proj / _k_proj / _v_proj
        else:
            changes[stem] = layer.weight - layer.network_weights_backup
    return changes


def test_a1111_applies_every_tensor_of_the_kohya_lora_as_fullrange_merges_it(twin, report):
    """A1111's LoRA extension (``load_network``, then ``network_apply_weights`` on each layer its forward hooks
    reach) maps every module of the kohya file, UNet and text encoders, with no layer error, and changes each weight
    by what fullrange's merge does."""
    comfy, a1111 = oracles.comfyui(), oracles.a1111()
    a1111.shared.sd_model = sd_model = a1111_model(comfy, twin)
    a1111.networks.assign_network_names_to_compvis_modules(sd_model)
    net = a1111.networks.load_network("fullrange", a1111.network.NetworkOnDisk("fullrange", str(twin.kohya)))
    stems = {k.split(".")[0] for k in load_file(twin.kohya)}
    assert {m.network_key.partition(".")[0] for m in net.modules.values()} == stems  # every module matched
    net.te_multiplier = net.unet_multiplier = 1.0
    a1111.networks.extra_network_lora = SimpleNamespace(errors={})
    a1111.networks.loaded_networks[:] = [net]
    try:
        layers = {id(m.sd_module): m.sd_module for m in net.modules.values()}
        inside_attention = {id(m.out_proj) for m in layers.values() if isinstance(m, torch.nn.MultiheadAttention)}
        with torch.no_grad():  # as A1111 samples
            for key, layer in layers.items():
                if key not in inside_attention:  # never called on its own: MultiheadAttention reads its weight
                    a1111.networks.network_apply_weights(layer)
    finally:
        a1111.networks.loaded_networks[:] = []
    assert a1111.networks.extra_network_lora.errors == {}
    changes = _a1111_changes(net)
    worst = _assert_same_changes(changes, twin.changes, twin.family)
    counts = {"modules matched": f"{len(net.modules)} of {len(stems)}", "worst relative": f"{worst:.1e}"}
    _counts(report, "A1111 LoRA", twin.family, changes, **counts)


# --- kohya sd-scripts (its own environment) ----------------------------------------------------------------------


def test_kohya_merges_every_module_of_the_kohya_lora_as_fullrange_does(twin, tmp_path, report):
    """sd-scripts' ``create_network_from_weights`` makes a module for every one in the file (SDXL's diffusers names
    converted by its own table onto its own SDXL UNet), and its ``merge_to`` changes each weight by what
    fullrange's merge does."""
    out = tmp_path / "kohya_changes.safetensors"
    result = oracles.kohya("lora", twin.family, twin.kohya, twin.folder, out)
    assert result["unmapped"] == [] and result["modules"] == result["stems"]
    changes = load_file(out)
    worst = _assert_same_changes(changes, twin.changes, twin.family)
    counts = {"modules made": f"{result['modules']} of {result['stems']}", "worst relative": f"{worst:.1e}"}
    _counts(report, "kohya LoRA", twin.family, changes, **counts)


# --- Real-shaped single files on the meta device: detection -------------------------------------------------------


@pytest.fixture(scope="module")
def real_shaped(bundled, meta_models):
    """``real_shaped(family)``: what the single file of a real-shaped model holds (names, shapes, markers; meta
    tensors, no memory): v-prediction, zero terminal SNR, a LoRA on the UNet and text encoders merged."""
    import json

    from fullrange.sampling import retrained
    from fullrange.scheduler_config import spec_from_config
    from fullrange.sd.export import checkpoint_state
    from fullrange.sd.model import StableDiffusion

    @functools.cache
    def build(family: str) -> dict[str, torch.Tensor]:
        folder = bundled[family]
        parts = meta_models(folder)
        spec = spec_from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
        spec = retrained(spec, "v_prediction", zero_terminal_snr=True)
        second = getattr(parts, "text_encoder_2", None)
        model = StableDiffusion(parts.unet, parts.vae, parts.text_encoder, None, spec, folder, second)
        adapters.LoRA().attach(model, AdapterConfig("lora", rank=4, text_encoder=True), seed=0)
        return checkpoint_state(model, family)[0]

    return build


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_loads_a_real_shaped_single_file_with_a_text_encoder_lora_strictly(real_shaped, family, tmp_path, report):
    """sd-scripts' checkpoint loaders (strict: a missing or unexpected key is an error) take every tensor of a
    real-shaped SD 1.5 / SDXL single file with a text-encoder LoRA merged."""
    import json

    state = real_shaped(family)
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({k: list(v.shape) for k, v in state.items()}))
    result = oracles.kohya("checkpoint", family, shapes)
    assert result == {"loaded": True, "tensors": len(state)}
    _counts(report, "kohya single file (real shapes)", family, tensors=len(state), missing=0, unexpected=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_detects_the_real_shaped_export_and_reads_its_markers_only_for_sdxl(real_shaped, family):
    """ComfyUI's detection on a real-shaped v + zero-SNR export: the right model class; for SDXL it reads the
    ``v_pred`` / ``ztsnr`` markers (v-prediction, σ_max ≈ 4519, its zero-SNR cap); for SD 1.x it reads neither and
    would sample epsilon on SD's ladder (σ_max ≈ 14.6): why the SD 1.x export comes with a workflow."""
    comfy = oracles.comfyui()
    state = real_shaped(family)
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    assert type(config).__name__ == {"sd1": "SD15", "sdxl": "SDXL"}[family]
    model_type = config.model_type(state)
    sampling = comfy.model_base.model_sampling(config, model_type)
    v = isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    if family == "sdxl":
        assert v and sampling.sigma_max.item() == pytest.approx(tools.COMFYUI_ZSNR_SIGMA_MAX, abs=0.05)
    else:
        assert not v and sampling.sigma_max.item() == pytest.approx(tools.SD_SIGMA_MAX, abs=0.05)


@pytest.mark.parametrize(("family", "expected"), [("sd1", ("SD15", "EPS")), ("sdxl", ("SDXL", "V_PREDICTION"))])
def test_forge_detects_the_family_and_reads_v_prediction_only_for_sdxl(real_shaped, family, expected):
    """Forge's detector (``huggingface_guess.guess``) on the same exports: the family, and the prediction type it
    reads (v-prediction from the marker for SDXL only)."""
    state = real_shaped(family)
    guessed = oracles.huggingface_guess().guess(state)
    assert (type(guessed).__name__, guessed.model_type(state).name) == expected


# --- The SD 1.x companions: A1111's .yaml and ComfyUI's workflow ----------------------------------------------------


@pytest.fixture(scope="module")
def v_export(tmp_path_factory):
    """The SD 1.5 twin trained as v + zero SNR, exported: the checkpoint and its companions."""
    from dataclasses import replace

    from fullrange.sampling import retrained

    root = tmp_path_factory.mktemp("v_export")
    base = load_stable_diffusion(save_twin(root / "base", "sd1"))
    model = replace(base, spec=retrained(base.spec, "v_prediction", zero_terminal_snr=True))
    written = export(root / "twin_v.safetensors", model, family="sd1", dtype=torch.float32)
    return SimpleNamespace(folder=root / "base", files={p.suffixes[-2] if len(p.suffixes) > 1 else p.suffix: p
                                                         for p in written})  # fmt: skip


def test_a1111_finds_the_yaml_beside_the_sd1_export_and_it_builds_the_checkpoint_unet(v_export):
    """A1111 picks the same-name ``.yaml`` (its own ``find_checkpoint_config_near_filename``); read as A1111 reads
    it (YAML), it says ``parameterization: v``, and its UNet config builds the LDM UNet (ComfyUI's copy of the class
    A1111 instantiates, after ComfyUI's own conversion of LDM's config keys) that loads the checkpoint's UNet with
    nothing missing or unexpected."""
    import yaml

    checkpoint, config_file = v_export.files[".safetensors"], v_export.files[".yaml"]
    a1111 = oracles.a1111()
    assert a1111.sd_models_config.find_checkpoint_config_near_filename(SimpleNamespace(filename=str(checkpoint))) == (
        str(config_file)
    )
    config = yaml.safe_load(config_file.read_text())["model"]["params"]
    assert config["parameterization"] == "v"
    comfy = oracles.comfyui()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = comfy.model_detection.convert_config(config["unet_config"]["params"])  # LDM's keys to ComfyUI's
    unet = UNetModel(**params, operations=comfy.ops.disable_weight_init)
    prefix = "model.diffusion_model."
    state = {k[len(prefix) :]: v for k, v in load_file(checkpoint).items() if k.startswith(prefix)}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    assert (missing, unexpected) == ([], [])


def test_the_comfyui_workflow_makes_comfyui_sample_the_sd1_export_as_v_with_zero_snr(v_export):
    """The workflow beside the SD 1.x export, run through ComfyUI's own node classes (the checkpoint loaded as
    ComfyUI loads it, named not detected): every input valid for its node, and the model the sampler gets predicts
    v on the zero-SNR ladder (σ_max ≈ 4519 instead of 14.6) with RescaleCFG set."""
    import json

    comfy = oracles.comfyui()
    workflow = json.loads(v_export.files[".comfyui"].read_text())
    patcher, clip, _ = oracles.comfyui_load(comfy, v_export.files[".safetensors"], v_export.folder, "sd1")
    # The export's folder as ComfyUI's models/checkpoints, where a user puts the file.
    comfy.nodes.folder_paths.add_model_folder_path("checkpoints", str(v_export.files[".safetensors"].parent))
    classes = comfy.nodes.NODE_CLASS_MAPPINGS | comfy.nodes_model_advanced.NODE_CLASS_MAPPINGS
    outputs = {"1": (patcher, clip, None)}  # CheckpointLoaderSimple, whose detection a twin is too narrow for
    for key in sorted(workflow, key=int):
        node = workflow[key]
        kind = classes[node["class_type"]]
        declared = kind.INPUT_TYPES()["required"]
        assert set(node["inputs"]) <= set(declared), node["class_type"]
        for name, value in node["inputs"].items():
            if isinstance(declared[name][0], list):
                assert value in declared[name][0], (node["class_type"], name, value)
        if node["class_type"] in ("ModelSamplingDiscrete", "RescaleCFG"):
            inputs = {k: outputs[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            outputs[key] = getattr(kind(), kind.FUNCTION)(**inputs)
    sampled = outputs[workflow["7"]["inputs"]["model"][0]][0]
    sampling = sampled.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    assert sampling.sigma_max.item() == pytest.approx(tools.COMFYUI_ZSNR_SIGMA_MAX, abs=0.05)
    assert sampled.model_options.get("sampler_cfg_function") is not None
