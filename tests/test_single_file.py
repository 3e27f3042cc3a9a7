"""Single-file checkpoints: bundled configs and tokenizer against published figures, our diffusers → LDM export
against diffusers' own LDM → diffusers conversion, checksums, markers and refusals."""

import json
import struct
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as dsf
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from typer.testing import CliRunner

from fullrange import sd, single_file
from fullrange.cli import app


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return sd.save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return sd.save_tiny_stable_diffusion(tmp_path_factory.mktemp("sdxl") / "tiny", xl=True)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {name: single_file.write_config_folder(name, root / name) for name in single_file.FAMILIES}


def _meta_models(folder):
    """The bundled architecture on the meta device (shapes and names, no memory), as ``StableDiffusion`` names
    its parts."""
    parts = {}
    with torch.device("meta"):
        parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        if (folder / "text_encoder_2").is_dir():
            config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return SimpleNamespace(**parts, is_xl="text_encoder_2" in parts)


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name,counts",
    # Published sizes: SD 1.5 UNet 859.52 M, SD 2.x UNet 865.91 M, SDXL UNet 2567.46 M, KL-f8 VAE 83.65 M;
    # CLIP ViT-L/14 text 123.06 M; OpenCLIP ViT-H/14 text less its last layer (diffusers keeps 23 of 24)
    # 340.39 M; OpenCLIP ViT-bigG/14 text with projection 694.66 M.
    [
        ("sd1", (859_520_964, 83_653_863, 123_060_480)),
        ("sd2", (865_910_724, 83_653_863, 340_387_840)),
        ("sdxl", (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)),
    ],
)
def test_bundled_configs_build_the_published_architectures(configs, name, counts):
    model = _meta_models(configs[name])
    networks = ("unet", "vae", "text_encoder", "text_encoder_2")[: len(counts)]
    assert tuple(_count(getattr(model, n)) for n in networks) == counts


@pytest.mark.parametrize(
    "name,tokenizer,pad_id", [("sd1", "tokenizer", 49407), ("sd2", "tokenizer", 0), ("sdxl", "tokenizer_2", 0)]
)
def test_bundled_tokenizer_gives_clips_token_ids(configs, name, tokenizer, pad_id):
    tokenizer = CLIPTokenizer.from_pretrained(configs[name] / tokenizer)
    assert len(tokenizer) == 49408
    # OpenAI CLIP's ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("A dark alley", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == pad_id


# Names as the original checkpoints (and A1111 / ComfyUI) have them; diffusers' reverse conversion also accepts
# some misplaced ones (an upsampler at .1 after an attention block), so they are pinned here.
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
def test_export_names_invert_diffusers_conversion_on_the_real_architectures(configs, name, model_type):
    """Export the full-size networks' names (meta tensors) to LDM; diffusers recognises the family and its own
    LDM → diffusers conversion gives back every tensor name and shape."""
    model = _meta_models(configs[name])
    ldm = {
        **single_file.unet_to_ldm(model.unet.state_dict(), model.unet.config),
        **single_file.vae_to_ldm(model.vae.state_dict(), model.vae.config),
        **single_file.text_encoders_to_ldm(model, name),
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
        prefix = single_file.XL_OPENCLIP_PREFIX
        pairs.append((model.text_encoder_2, dsf.convert_open_clip_checkpoint(model.text_encoder_2, ldm, prefix)))
    for network, back in pairs:  # transformers' CLIPTextModel has no text_model. prefix, ...WithProjection has
        assert {k.removeprefix("text_model."): v.shape for k, v in back.items()} == {
            k.removeprefix("text_model."): v.shape for k, v in network.state_dict().items()
        }


@pytest.mark.parametrize("name", single_file.FAMILIES)
def test_tiny_export_reloads_with_the_same_weights_and_markers(tiny_sd, tiny_sdxl, tmp_path, name):
    folder = tiny_sdxl if name == "sdxl" else tiny_sd
    model = sd.load_stable_diffusion(folder)
    model.scheduler_config |= {"prediction_type": "v_prediction", "rescale_betas_zero_snr": name == "sd2"}
    model.prediction = "v_prediction"
    path = single_file.export(tmp_path / "model.safetensors", model, name=name, dtype=torch.float32)
    header = single_file.read_header(path)
    assert single_file.family(header, path) == name
    assert single_file.markers(header) == {"v_prediction": True, "zero_terminal_snr": name == "sd2"}

    loaded = sd.load_stable_diffusion(path, config=folder, sha256=single_file.sha256(path))
    assert loaded.is_xl == (name == "sdxl")
    for component in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if name == "sdxl" else ())):
        ours, theirs = getattr(model, component).state_dict(), getattr(loaded, component).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    assert loaded.prediction == "v_prediction" and loaded.schedule.zero_terminal_snr == (name == "sd2")
    assert loaded.scheduler_config["timestep_spacing"] == ("trailing" if name == "sd2" else "leading")


def test_sha256_mismatch_and_malformed_digest_are_refused(tiny_sd, tmp_path):
    path = single_file.export(tmp_path / "m.safetensors", sd.load_stable_diffusion(tiny_sd), name="sd1")
    with pytest.raises(ValueError, match=r"SHA-256 is [0-9a-f]{64}, not the expected 0{64}; refusing"):
        sd.load_stable_diffusion(path, config=tiny_sd, sha256="0" * 64)
    with pytest.raises(ValueError, match="not 64 hex digits"):
        sd.load_stable_diffusion(path, config=tiny_sd, sha256="abc")
    with pytest.raises(ValueError, match="is a folder"):
        sd.load_stable_diffusion(tiny_sd, sha256="0" * 64)


def test_weights_that_do_not_fit_the_bundled_config_say_so(tiny_sd, tmp_path):
    path = single_file.export(tmp_path / "m.safetensors", sd.load_stable_diffusion(tiny_sd), name="sd1")
    with pytest.raises(ValueError, match=r"do not fit the bundled sd1 config .*--model-config"):
        sd.load_stable_diffusion(path)


def test_pickle_single_file_is_refused_unless_allowed(tiny_sd, tmp_path):
    model = sd.load_stable_diffusion(tiny_sd)
    exported = single_file.export(tmp_path / "m.safetensors", model, name="sd1", dtype=torch.float32)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(exported)}, path)
    with pytest.raises(ValueError, match=r"pickle checkpoint.*--allow-pickle"):
        sd.load_stable_diffusion(path)
    loaded = sd.load_stable_diffusion(path, allow_pickle=True, config=tiny_sd)
    ours, theirs = model.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _write_safetensors(path, header_extra, metadata=None):
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, **header_extra}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 4)


def _tensor(*shape):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 0]}


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE = "first_stage_model.encoder.conv_in.weight"
CLIP = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


@pytest.mark.parametrize(
    "keys,match",
    [
        ({"conditioner.embedders.0.x": _tensor(1), UNET_IN: _tensor(320, 4, 3, 3)}, "SDXL"),
        ({VAE: _tensor(1)}, "no UNet weights"),
        ({UNET_IN: _tensor(320, 9, 3, 3), VAE: _tensor(1), CLIP: _tensor(1)}, "9 input channels"),
        ({UNET_IN: _tensor(320, 4, 3, 3)}, "no VAE and no text encoder weights"),
    ],
)
def test_family_refusals(tmp_path, keys, match):
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, keys)
    with pytest.raises(ValueError, match=match):
        sd.load_stable_diffusion(path)


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
    assert (tmp_path / "out" / "grid.png").is_file()
    result = runner.invoke(app, [*args, "--sha256", "f" * 64])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "SHA-256" in result.output


@pytest.mark.parametrize(
    "extra,metadata,expected",
    [
        ({}, {}, {"v_prediction": False, "zero_terminal_snr": False}),
        (
            {
                "v_pred": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                "ztsnr": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
            },
            {},
            {"v_prediction": True, "zero_terminal_snr": True},
        ),
        (
            {},
            {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "False"},
            {"v_prediction": True, "zero_terminal_snr": False},
        ),
    ],
)
def test_single_file_markers(tmp_path, extra, metadata, expected):
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, extra, metadata)
    assert single_file.markers(single_file.read_header(path)) == expected


def test_single_file_markers_on_garbage(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        single_file.markers(single_file.read_header(path))
