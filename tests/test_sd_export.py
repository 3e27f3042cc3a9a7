"""Export: our diffusers → LDM names against diffusers' own LDM → diffusers conversion on the full-size
architectures, and tiny exports that reload with the same weights and the markers of their spec."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as dsf
from safetensors.torch import load_file
from typer.testing import CliRunner

from fullrange.cli import app
from fullrange.sampling import STABLE_DIFFUSION, ZERO_TERMINAL_SNR, retrained
from fullrange.sd import load_stable_diffusion, markers, single_file
from fullrange.sd.config import ModelConfig
from fullrange.sd.export import FAMILIES, export
from fullrange.sd.ldm import XL_OPENCLIP_PREFIX, text_encoders_to_ldm, unet_to_ldm, vae_to_ldm

VAE_NAMES = [
    "decoder.up.3.upsample.conv",
    "decoder.up.0.block.0.nin_shortcut",
    "encoder.down.1.block.0.nin_shortcut",
    "encoder.down.2.downsample.conv",
    "encoder.mid.attn_1.proj_out",
    "decoder.mid.block_2.conv1",
    "quant_conv",
]
UNET_NAMES = {
    "sd1": [
        "time_embed.0",
        "input_blocks.3.0.op",
        "input_blocks.9.0.op",
        "input_blocks.4.0.skip_connection",
        "middle_block.1.proj_in",
        "middle_block.2.emb_layers.1",
        "output_blocks.2.1.conv",
        "output_blocks.5.2.conv",
        "output_blocks.8.2.conv",
        "output_blocks.11.1.proj_out",
        "out.2",
    ],
    "sdxl": [
        "label_emb.0.0",
        "label_emb.0.2",
        "input_blocks.3.0.op",
        "input_blocks.6.0.op",
        "input_blocks.7.1.transformer_blocks.9.attn1.to_q",
        "middle_block.1.transformer_blocks.9.ff.net.2",
        "output_blocks.2.2.conv",
        "output_blocks.5.2.conv",
        "output_blocks.8.0.skip_connection",
    ],
}
TEXT_NAMES = {
    "sd1": ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
    "sd2": [
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
        "cond_stage_model.model.ln_final.weight",
    ],
    "sdxl": [
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ],
}


@pytest.mark.parametrize("name,model_type", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
def test_export_names_invert_diffusers_conversion_on_the_real_architectures(bundled, meta_models, name, model_type):
    """Export the full-size networks' names (meta tensors) to LDM; diffusers recognises the family and its own
    LDM → diffusers conversion gives back every tensor name and shape."""
    model = meta_models(bundled[name])
    second = model.text_encoder_2.state_dict() if model.is_xl else None
    ldm = {
        **unet_to_ldm(model.unet.state_dict(), model.unet.config),
        **vae_to_ldm(model.vae.state_dict(), model.vae.config),
        **text_encoders_to_ldm(name, model.text_encoder.state_dict(), second),
    }
    assert dsf.infer_diffusers_model_type(ldm) == model_type
    expected = [f"model.diffusion_model.{n}.weight" for n in UNET_NAMES.get(name, UNET_NAMES["sd1"])]
    expected += [f"first_stage_model.{n}.weight" for n in VAE_NAMES]
    assert not {*expected, *TEXT_NAMES[name]} - ldm.keys()
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    text = {
        "sd1": lambda: dsf.convert_ldm_clip_checkpoint(ldm),
        "sd2": lambda: dsf.convert_open_clip_checkpoint(model.text_encoder, ldm),
        "sdxl": lambda: dsf.convert_ldm_clip_checkpoint(ldm),
    }[name]()
    pairs = [
        (model.unet, dsf.convert_ldm_unet_checkpoint(ldm, dict(model.unet.config))),
        (model.vae, dsf.convert_ldm_vae_checkpoint(ldm, dict(model.vae.config))),
        (model.text_encoder, text),
    ]
    if model.is_xl:
        prefix = XL_OPENCLIP_PREFIX
        pairs.append((model.text_encoder_2, dsf.convert_open_clip_checkpoint(model.text_encoder_2, ldm, prefix)))
    for network, back in pairs:  # transformers' CLIPTextModel has no text_model. prefix, ...WithProjection has
        assert {k.removeprefix("text_model."): v.shape for k, v in back.items()} == {
            k.removeprefix("text_model."): v.shape for k, v in network.state_dict().items()
        }


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_export_reloads_with_the_same_weights_and_markers(tiny_sd, tiny_sdxl, tmp_path, name):
    folder = tiny_sdxl if name == "sdxl" else tiny_sd
    model = load_stable_diffusion(folder)
    spec = ZERO_TERMINAL_SNR if name == "sd2" else replace(model.spec, prediction="v_prediction")
    model = replace(model, spec=spec)
    path = export(tmp_path / "model.safetensors", model, family=name, dtype=torch.float32)[0]
    header = single_file.read_header(path)
    assert single_file.family(header, path) == name
    decision = markers.decide(markers.from_header(header, str(path)))
    assert (decision.prediction, decision.zero_terminal_snr) == ("v_prediction", True if name == "sd2" else None)
    found = markers.from_header(header, str(path))
    # Every convention that can say it agrees: ComfyUI's tensors, kohya's keys and modelspec's.
    assert {m.convention for m in found if m.prediction == "v_prediction"} == {"comfyui", "kohya", "modelspec"}

    loaded = load_stable_diffusion(ModelConfig(str(path), sha256=single_file.sha256(path), config=str(folder)))
    assert loaded.is_xl == (name == "sdxl")
    for component in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if name == "sdxl" else ())):
        ours, theirs = getattr(model, component).state_dict(), getattr(loaded, component).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    assert loaded.spec.prediction == "v_prediction" and loaded.spec.schedule.zero_terminal_snr == (name == "sd2")
    assert loaded.spec.spacing == ("trailing" if name == "sd2" else "leading")


def _adapter_folder(folder, tmp_path, kind="lora", ztsnr=False):
    """A LoRA (rank 2) or OFT (block 4) folder as ``fullrange train`` writes it, for the tiny model at ``folder``,
    with random non-zero adapter weights; ``ztsnr``: trained as zero-SNR v-prediction on the epsilon base."""
    from fullrange import adapters
    from fullrange.adapters import AdapterConfig
    from fullrange.sampling import retrained

    trained = load_stable_diffusion(folder)
    if kind == "lora":
        adapters.add_lora(trained.unet, rank=2)
    else:
        adapters.add_oft(trained.unet, block_size=4)
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if p.requires_grad and "lora_A" not in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    if ztsnr:
        trained = replace(trained, spec=retrained(trained.spec, "v_prediction", zero_terminal_snr=True))
    config = AdapterConfig("lora", rank=2) if kind == "lora" else AdapterConfig("oft", block_size=4)
    return adapters.ADAPTERS[kind].save(trained, config, tmp_path)[kind]


def test_cli_export_then_sample_the_single_file(tiny_sd, tmp_path):
    runner = CliRunner()
    path = tmp_path / "tiny.safetensors"
    result = runner.invoke(app, ["export", "--model", str(tiny_sd), "--out", str(path), "--family", "sd1"])
    assert result.exit_code == 0, result.output
    assert "prediction epsilon, zero terminal SNR False" in result.output
    args = ["sample", "--model", str(path), "--model-config", str(tiny_sd), "--prompt", "a dark alley"]
    args += ["--steps", "2", "--resolution", "16", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--sha256", single_file.sha256(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "grid-000000.png").is_file()
    result = runner.invoke(app, [*args, "--sha256", "f" * 64])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "SHA-256" in result.output


def test_kohya_lora_loads_in_diffusers_with_every_weight_and_the_same_images(tiny_sd, tmp_path):
    """A LoRA on attention, feed-forward and ResNet layers, trained as zero-SNR v-prediction on an epsilon base,
    exported in kohya's format: diffusers' kohya loader takes every weight (counted), and the pipeline samples what
    ``fullrange sample --adapter`` samples from the LoRA folder."""

    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    from fullrange import adapters
    from fullrange.diffusers import FullrangeScheduler
    from fullrange.sd import load_adapter, load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate

    lora = _adapter_folder(tiny_sd, tmp_path, ztsnr=True)
    out = adapters.ADAPTERS["lora"].export(tmp_path / "kohya.safetensors", lora, load_stable_diffusion(tiny_sd), "sd1")

    with safe_open(out, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    downs = {k for k in keys if k.endswith(".lora_down.weight")}
    assert keys == downs | {k.replace("lora_down", "lora_up") for k in downs} | {
        k.replace(".lora_down.weight", ".alpha") for k in downs
    }
    assert all(k.startswith("lora_unet_") for k in keys) and alphas == {2.0}
    assert any("_attn2_to_k." in k for k in downs) and any("_resnets_0_conv1." in k for k in downs)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2" and meta["ss_v_parameterization"] == "True"
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_base_model_version"] == "sd_v1"
    assert "mixes two prediction types" in meta["modelspec.description"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out), adapter_name="kohya")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="kohya")
    assert len(loaded) == 2 * len(downs)  # every lora_down and lora_up, none skipped
    spec_config = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    pipe.scheduler = FullrangeScheduler.from_config(
        pipe.scheduler.config | spec_config, sampler="ddim", spacing="trailing"
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a dark room", "a bright beach"]
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    kwargs = {"num_inference_steps": 5, "guidance_scale": 3.0, "height": 16, "width": 16, "output_type": "pt"}
    theirs = pipe(prompts, latents=noise, **kwargs).images
    settings = SampleSettings(sampler="ddim", steps=5, spacing="trailing", guidance=3.0, guidance_rescale=0.0)
    ours = generate(load_adapter(load_stable_diffusion(tiny_sd), lora), prompts, settings)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_cli_export_kohya_needs_a_lora_and_writes_one(tiny_sd, tmp_path):
    from typer.testing import CliRunner

    from fullrange.cli import app

    runner = CliRunner()
    args = ["export", "--model", str(tiny_sd), "--format", "kohya", "--family", "sd1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x.safetensors")])
    assert (
        result.exit_code != 0 and "error: --format kohya writes a LoRA adapter: give it with --adapter" in result.output
    )
    result = runner.invoke(app, [*args, "--adapter", str(tiny_sd), "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code != 0 and "not a LoRA folder" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def _lycoris_merge(file, unet):
    """LyCORIS' own loader (``create_lycoris_from_weights``) on ``unet``: the number of modules it makes from the
    file, then merged into ``unet``. Its generic loader names modules ``lycoris_<path>``, kohya's ``lora_unet_<path>``:
    the prefix is all that is renamed."""
    from lycoris import create_lycoris_from_weights

    weights = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in load_file(file).items()}
    network, _ = create_lycoris_from_weights(1.0, str(file), unet, weights_sd=weights)
    network.merge_to(1.0)
    return len(network.loras)


def test_oft_exports_as_lycoris_weight_differences_that_lycoris_applies_exactly(tiny_sd, tmp_path):
    """An OFT adapter as LyCORIS "full" differences: LyCORIS' loader takes every layer (counted) and merging them
    gives the UNet that fullrange's merged OFT has (to float32 rounding)."""
    from fullrange import adapters
    from fullrange.sd import load_adapter, load_stable_diffusion

    oft = _adapter_folder(tiny_sd, tmp_path, "oft")
    out = adapters.ADAPTERS["oft"].export(tmp_path / "oft.safetensors", oft, load_stable_diffusion(tiny_sd), "sd1")

    merged = adapters.merge_adapters(load_adapter(load_stable_diffusion(tiny_sd), oft).unet)
    unet = load_stable_diffusion(tiny_sd).unet
    expected_layers = sum(1 for k in load_file(out) if k.endswith(".diff"))
    assert expected_layers > 10 and _lycoris_merge(out, unet) == expected_layers
    ours, theirs = merged.state_dict(), unet.state_dict()
    assert ours.keys() == theirs.keys()
    changed = [k for k in ours if not torch.equal(ours[k], load_stable_diffusion(tiny_sd).unet.state_dict()[k])]
    assert len(changed) == expected_layers
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], atol=1e-6, rtol=1e-5)


def test_kohya_lora_loads_in_lycoris_with_every_module(tiny_sd, tmp_path):
    """The kohya LoRA file, read by LyCORIS' kohya loader: every module loads, and its merge equals the UNet with
    fullrange's LoRA merged (alpha = rank, so the scale is 1)."""
    from fullrange import adapters
    from fullrange.sd import load_adapter, load_stable_diffusion

    lora = _adapter_folder(tiny_sd, tmp_path)
    out = adapters.ADAPTERS["lora"].export(tmp_path / "lora.safetensors", lora, load_stable_diffusion(tiny_sd), "sd1")
    modules = sum(1 for k in load_file(out) if k.endswith(".lora_down.weight"))
    unet = load_stable_diffusion(tiny_sd).unet
    assert _lycoris_merge(out, unet) == modules
    merged = adapters.merge_adapters(load_adapter(load_stable_diffusion(tiny_sd), lora).unet).state_dict()
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, merged[k], atol=1e-6, rtol=1e-5)


def test_kohya_lora_on_sdxl_loads_in_diffusers_with_every_weight(tiny_sdxl, tmp_path):
    """The same on SDXL: diffusers' SDXL pipeline takes every weight of the kohya file (counted) and, fused, has
    fullrange's merged UNet."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from fullrange import adapters
    from fullrange.sd import load_adapter, load_stable_diffusion

    lora = _adapter_folder(tiny_sdxl, tmp_path)
    out = adapters.ADAPTERS["lora"].export(tmp_path / "xl.safetensors", lora, load_stable_diffusion(tiny_sdxl))
    downs = [k for k in load_file(out) if k.endswith(".lora_down.weight")]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(out), adapter_name="kohya")
    assert len(get_peft_model_state_dict(pipe.unet, adapter_name="kohya")) == 2 * len(downs)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = adapters.merge_adapters(load_adapter(load_stable_diffusion(tiny_sdxl), lora).unet).state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, merged[k], atol=1e-6, rtol=1e-5)


def test_cli_export_diffusers_writes_a_pipeline_with_the_adapter_merged_and_its_scheduler(tiny_sd, tmp_path):
    """``--format diffusers``: a new folder that diffusers loads, the UNet with the LoRA merged, the scheduler config
    of the LoRA's spec; an existing folder is refused."""
    from diffusers import StableDiffusionPipeline

    from fullrange import adapters
    from fullrange.sd import load_adapter

    lora = _adapter_folder(tiny_sd, tmp_path, ztsnr=True)
    args = ["export", "--model", str(tiny_sd), "--adapter", str(lora), "--format", "diffusers", "--precision", "fp32"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "pipe")])
    assert result.exit_code == 0, result.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    merged = adapters.merge_adapters(load_adapter(load_stable_diffusion(tiny_sd), lora).unet).state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in pipe.unet.state_dict().items())
    assert not list(tmp_path.glob(".pipe.*"))  # no temporary folder left
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "pipe")])
    assert result.exit_code != 0 and "already exists" in result.output


def test_export_diffusers_by_default_samples_in_plain_diffusers_on_the_cpu(tiny_sd, tmp_path):
    """Without --dtype, ``--format diffusers`` writes what plain ``from_pretrained`` samples on a CPU (an fp16 folder
    fails there: Half and Float in one matmul); ``--overwrite`` replaces the folder only once the new one is whole."""
    from diffusers import StableDiffusionPipeline

    args = ["export", "--model", str(tiny_sd), "--format", "diffusers", "--out", str(tmp_path / "pipe")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32
    images = pipe("a dark room", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    again = CliRunner().invoke(app, [*args, "--overwrite", "--dtype", "bf16"])
    assert again.exit_code == 0, again.output
    stored = load_file(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary or old folder left


def test_a_rectified_flow_unet_exports_with_its_shift_and_comfyuis_flow_workflow(tmp_path):
    """A plain rectified-flow UNet: the single file says flow and its shift, the workflow beside it has ComfyUI's
    ModelSamplingSD3 with that shift (instead of any v / ztsnr marker), and fullrange reads the file back as the same
    rectified flow. Flow prediction on SD's own timesteps (the aligned conversion) is refused in one line."""
    import json as _json

    from fullrange.sd.testing import save_tiny_stable_diffusion

    folder = save_tiny_stable_diffusion(tmp_path / "m")
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (folder / "scheduler" / "scheduler_config.json").write_text(_json.dumps(config))
    model = load_stable_diffusion(folder)
    written = export(tmp_path / "flow.safetensors", model, family="sd1")
    assert [p.name for p in written] == ["flow.safetensors", "flow.comfyui.json"]
    header = single_file.read_header(written[0])
    assert "v_pred" not in header and "ztsnr" not in header
    assert header["__metadata__"]["modelspec.prediction_type"] == "flow"
    assert header["__metadata__"]["fullrange.flow_shift"] == "3"
    workflow = _json.loads(written[1].read_text())
    assert workflow["2"] == {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    back = load_stable_diffusion(ModelConfig(str(written[0]), config=str(folder)))
    assert back.spec.prediction == "flow" and back.spec.schedule.shift == 3.0
    assert back.spec.schedule.coordinates == "flow"
    aligned = replace(load_stable_diffusion(folder), spec=retrained(STABLE_DIFFUSION, "flow", True))
    with pytest.raises(ValueError, match="aligned conversion"):
        export(tmp_path / "aligned.safetensors", aligned, family="sd1")
