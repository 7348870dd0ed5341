"""Single-file checkpoints (app/diffusers_host/single_file.py): the family, widths and depths read from a file laid out
as the ones artists download (tests/ldm_checkpoints.py writes them with random weights), loaded offline into a
diffusers pipeline whose tensors are the file's; what is not one of the families gets one clear error; and the whole
CLI flow (quantize -> file -> generate) from an SD1.x and an SDXL file."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from mixquant.app.cli import main as cli
from mixquant.app.diffusers_host.models import load_pipeline
from mixquant.app.diffusers_host.single_file import inspect_checkpoint
from mixquant.quant.errors import MixQuantError

_spec = importlib.util.spec_from_file_location("ldm_checkpoints", Path(__file__).with_name("ldm_checkpoints.py"))
L = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(L)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fam in L.FAMILIES:
        out[fam] = str(d / f"{fam}.safetensors")
        L.write_checkpoint(out[fam], fam, seed=3)
    return out


CHECKED = ("block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection", "in_channels",
           "down_block_types", "up_block_types", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_configs_are_read_from_the_shapes(files, family):
    sf = inspect_checkpoint(files[family])
    want = L.diffusers_configs(family)
    assert sf.family == family.split("-")[0]
    assert sf.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    got_u, want_u = sf.configs["unet"], want["unet"]
    for k in CHECKED:
        assert _as_list(got_u.get(k)) == _as_list(want_u.get(k)), k
    tl = want_u.get("transformer_layers_per_block", 1)
    depths = [tl] * len(want_u["block_out_channels"]) if isinstance(tl, int) else list(tl)
    attn = [t.startswith("CrossAttn") for t in want_u["down_block_types"]]
    assert [d for d, a in zip(got_u["transformer_layers_per_block"], attn) if a] == \
        [d for d, a in zip(depths, attn) if a]
    assert _as_list(sf.configs["vae"]["block_out_channels"]) == _as_list(want["vae"]["block_out_channels"])
    for enc in ("text_encoder", "text_encoder_2"):
        if enc in want:
            for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "hidden_act"):
                # SD2's encoder stops at the penultimate of its 24 layers (diffusers drops resblocks.23 by name); a
                # reduced one keeps every layer it has (ldm_checkpoints' config shows the real-size rule)
                extra = int(family.startswith("sd2") and k == "num_hidden_layers")
                assert sf.configs[enc][k] == (want[enc][k] + extra if extra else want[enc][k]), (enc, k)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_pipeline_holds_the_files_tensors(files, family):
    from safetensors import safe_open

    pipe = load_pipeline(files[family], dtype="fp32")
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    with safe_open(files[family], framework="pt") as f:
        conv_in = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").float()
        out = f.get_tensor("model.diffusion_model.out.2.weight").float()
        post = f.get_tensor("first_stage_model.post_quant_conv.weight").float()
        prefix = {"sd1": "cond_stage_model.transformer.text_model.embeddings.",
                  "sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.0.transformer.text_model."
                  "embeddings."}[family]
        tok = f.get_tensor(prefix + "token_embedding.weight").float()
    assert torch.equal(pipe.unet.conv_in.weight, conv_in) and torch.equal(pipe.unet.conv_out.weight, out)
    assert torch.equal(pipe.vae.post_quant_conv.weight, post)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, tok)
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:3] == [49406, 320, 1125]  # the real CLIP vocabulary: <start> a photo
    img = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def _truncated(src, dst):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: len(data) * 2 // 3])


def _header_only_junk(dst):
    open(dst, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _lora(dst):
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(4.0)}, dst)


def _flux(dst):
    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 4)}, dst)


def _unet_only(src, dst):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}, dst)


@pytest.mark.parametrize("case,needle", [
    ("sdxl-refiner", "refiner"), ("sd1-inpaint", "inpainting"), ("truncated", "truncated"),
    ("junk", "not a readable safetensors"), ("lora", "LoRA"), ("flux", "Flux"), ("unet-only", "no text encoder"),
])
def test_what_is_not_a_known_checkpoint_gets_one_clear_error(files, tmp_path, case, needle):
    path = files.get(case) or str(tmp_path / f"{case}.safetensors")
    if case == "truncated":
        _truncated(files["sdxl"], path)
    elif case == "junk":
        _header_only_junk(path)
    elif case == "lora":
        _lora(path)
    elif case == "flux":
        _flux(path)
    elif case == "unet-only":
        _unet_only(files["sd1"], path)
    with pytest.raises(MixQuantError, match=needle):
        load_pipeline(path)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cli_quantizes_a_single_file_and_generates_with_it(files, tmp_path, capsys, monkeypatch, family):
    monkeypatch.setenv("MIXQUANT_CACHE", str(tmp_path / "cache"))
    out, rep, png = tmp_path / "q.safetensors", tmp_path / "r.json", tmp_path / "x.png"
    common = ["--steps", "2", "--size", "64x64"]
    rc = cli(["quantize", "--model", files[family], "--prompt", "a red fox", "--prompt", "a blue car", *common,
              "--avg-w-bits", "4", "--a-bits", "8", "--out", str(out), "--report", str(rep), "--no-eval"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(rep.read_text())
    assert report["sensitivity_mode"] == "fast"  # the default
    assert abs(report["avg_w_bits"] - 4) < 0.05 and report["bytes_quantized"] < 0.4 * report["bytes_fp16"]
    rc = cli(["generate", "--model", files[family], "--quantized", str(out), "--prompt", "a red fox", *common,
              "--out", str(png)])
    assert rc == 0, capsys.readouterr().err
    from PIL import Image

    assert Image.open(png).size[0] >= 64


@pytest.mark.parametrize("case", ["truncated", "foreign"])
def test_cli_refuses_a_bad_checkpoint_without_writing(files, tmp_path, capsys, case):
    bad = str(tmp_path / "bad.safetensors")
    if case == "truncated":
        _truncated(files["sd1"], bad)
    else:
        _flux(bad)
    out = tmp_path / "q.safetensors"
    rc = cli(["quantize", "--model", bad, "--prompt", "a fox", "--avg-w-bits", "4", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mixquant: error:"), err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p != "bad.safetensors"]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_native_export_names_a_real_size_unet_as_its_checkpoint_does(family):
    """quant/native's diffusers -> LDM map, on the real-size configs (meta device: no memory), gives exactly the
    UNet keys of the original single-file checkpoint (what stock ComfyUI's loaders detect the family from)."""
    from diffusers import UNet2DConditionModel

    from mixquant.quant.native import diffusers_to_ldm, rename_tensor, sd_family

    cfg = L.diffusers_configs(family, small=False)["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    assert sd_family(dict(unet.config)) == {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[family]
    rename = diffusers_to_ldm(dict(unet.config))
    got = {rename_tensor(k, rename): tuple(v.shape) for k, v in unet.state_dict().items()}
    want = {k[len("model.diffusion_model."):]: tuple(s) for k, s in L.checkpoint_shapes(family, small=False).items()
            if k.startswith("model.diffusion_model.")}
    # the LDM files keep 1x1-conv shapes for SD1's transformer projections; names must match exactly
    assert set(got) == set(want)
