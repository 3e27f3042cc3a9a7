"""Reading single files: bundled configs and tokenizer against published figures, checksums, markers, refusals."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer
from typer.testing import CliRunner

from fullrange.cli import app
from fullrange.sd import load_stable_diffusion, markers, single_file
from fullrange.sd.config import ModelConfig
from fullrange.sd.export import export


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
def test_bundled_configs_build_the_published_architectures(bundled, meta_models, name, counts):
    model = meta_models(bundled[name])
    networks = ("unet", "vae", "text_encoder", "text_encoder_2")[: len(counts)]
    assert tuple(_count(getattr(model, n)) for n in networks) == counts


@pytest.mark.parametrize(
    "name,tokenizer,pad_id", [("sd1", "tokenizer", 49407), ("sd2", "tokenizer", 0), ("sdxl", "tokenizer_2", 0)]
)
def test_bundled_tokenizer_gives_clips_token_ids(bundled, name, tokenizer, pad_id):
    tokenizer = CLIPTokenizer.from_pretrained(bundled[name] / tokenizer)
    assert len(tokenizer) == 49408
    # OpenAI CLIP's ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("A dark alley", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == pad_id


# Names as the original checkpoints (and A1111 / ComfyUI) have them; diffusers' reverse conversion also accepts
# some misplaced ones (an upsampler at .1 after an attention block), so they are pinned here.
def test_sha256_mismatch_and_malformed_digest_are_refused(tiny_sd, tmp_path):
    path = export(tmp_path / "m.safetensors", load_stable_diffusion(tiny_sd), family="sd1")[0]
    with pytest.raises(ValueError, match=r"^model\.sha256 .*SHA-256 is [0-9a-f]{64}, not the expected 0{64}; refusing"):
        load_stable_diffusion(ModelConfig(str(path), sha256="0" * 64, config=str(tiny_sd)))
    with pytest.raises(ValueError, match=r"^sha256 'abc': not 64 hex digits"):
        ModelConfig(str(path), sha256="abc")
    with pytest.raises(ValueError, match="is a folder"):
        load_stable_diffusion(ModelConfig(str(tiny_sd), sha256="0" * 64))


def test_weights_that_do_not_fit_the_bundled_config_say_so(tiny_sd, tmp_path):
    path = export(tmp_path / "m.safetensors", load_stable_diffusion(tiny_sd), family="sd1")[0]
    with pytest.raises(ValueError, match=r"do not fit the bundled sd1 config .*as model\.config$"):
        load_stable_diffusion(path)
    result = CliRunner().invoke(app, ["sample", "--model", str(path), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.rstrip().endswith("as --model-config"), result.output


def test_pickle_single_file_is_refused_unless_allowed(tiny_sd, tmp_path):
    model = load_stable_diffusion(tiny_sd)
    exported = export(tmp_path / "m.safetensors", model, family="sd1", dtype=torch.float32)[0]
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(exported)}, path)
    with pytest.raises(ValueError, match=r"pickle checkpoint.*model\.allow_pickle"):
        load_stable_diffusion(path)
    loaded = load_stable_diffusion(ModelConfig(str(path), allow_pickle=True, config=str(tiny_sd)))
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
        load_stable_diffusion(path)


@pytest.mark.parametrize(
    "extra,metadata,expected",
    [
        ({}, {}, (None, None)),
        (
            {
                "v_pred": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                "ztsnr": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
            },
            {},
            ("v_prediction", True),
        ),
        (
            {},
            {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "False"},
            ("v_prediction", False),
        ),
    ],
)
def test_single_file_markers(tmp_path, extra, metadata, expected):
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, extra, metadata)
    decision = markers.decide(markers.from_header(single_file.read_header(path), str(path)))
    assert (decision.prediction, decision.zero_terminal_snr) == expected and not decision.conflicts


def test_single_file_markers_on_garbage(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        single_file.read_header(path)
