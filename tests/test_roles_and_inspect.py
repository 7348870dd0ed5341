import os

import pytest
import torch
import torch.nn as nn

from mixquant.app.cli import main as cli
from mixquant.quant.roles import discover_layers, layer_role


@pytest.mark.parametrize("name,role", [
    # LDM names (ComfyUI / A1111 UNetModel)
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "content"),
    ("output_blocks.11.1.transformer_blocks.0.ff.net.0.proj", "content"),
    ("middle_block.1.transformer_blocks.0.ff.net.2", "content"),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "quality"),
    ("input_blocks.1.0.in_layers.2", "quality"),
    ("output_blocks.2.0.skip_connection", "quality"),
    ("time_embed.0", "quality"),
    ("input_blocks.1.1.proj_in", "quality"),
    # diffusers UNet
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0", "content"),
    ("down_blocks.0.resnets.0.conv1", "quality"),
    # DiTs: PixArt (attn2), SD3/Flux joint attention (context stream), Flux LDM names
    ("transformer_blocks.3.attn2.to_v", "content"),
    ("transformer_blocks.0.attn.add_k_proj", "content"),
    ("transformer_blocks.0.ff_context.net.2", "content"),
    ("transformer_blocks.0.attn.to_q", "quality"),
    ("double_blocks.0.txt_attn.qkv", "content"),
    ("double_blocks.0.img_mlp.0", "content"),
    ("double_blocks.0.img_attn.qkv", "quality"),
])
def test_layer_roles(name, role):
    assert layer_role(name) == role


def _tree(names):
    root = nn.Module()
    for i, n in enumerate(names):
        parent = root
        parts = n.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], nn.Conv2d(4, 4, 3) if "blocks.0.0" in n or n.startswith("out") else
                          nn.Linear(8, 8))
    return root


def test_ldm_protected_layers():
    m = _tree(["input_blocks.0.0", "input_blocks.1.1.transformer_blocks.0.attn2.to_k", "out.2"])
    info = {li.name: li for li in discover_layers(m)}
    assert info["input_blocks.0.0"].protected and info["out.2"].protected
    assert not info["input_blocks.1.1.transformer_blocks.0.attn2.to_k"].protected


def test_unknown_architecture_protects_first_and_last():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    info = discover_layers(m)
    assert [li.protected for li in info] == [True, False, True]


def test_dit_from_local_config():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    dit = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                   caption_channels=12)
    info = discover_layers(dit)
    roles = {li.name: li.role for li in info}
    assert roles["transformer_blocks.0.attn2.to_k"] == "content"
    assert roles["transformer_blocks.0.ff.net.2"] == "content"
    assert roles["transformer_blocks.0.attn1.to_q"] == "quality"
    assert {li.name for li in info if li.protected} >= {"pos_embed.proj", "proj_out"}


def test_inspect_prints_layers_and_bad_file_is_one_line(tmp_path, capsys, small_unet, unet_inputs):
    from mixquant.app.diffusers_host.files import save_denoiser
    from mixquant.quant.apply import quantize_model, uniform_plan
    from mixquant.quant.fileformat import fingerprint

    q, _ = quantize_model(small_unet, uniform_plan(discover_layers(small_unet), "W4g64A16"))
    path = str(tmp_path / "q.safetensors")
    save_denoiser(q, path, fingerprint(small_unet))
    assert cli(["inspect", path, "--layers"]) == 0
    out = capsys.readouterr().out
    assert "UNet2DConditionModel" in out and "W4g64A16" in out and "conv_in" not in out.split("formats:")[1][:40]
    # piped into a program that reads one line and stops: no traceback
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "mixquant")
    run = subprocess.run(f"{exe} inspect {path} --layers --json | head -c 10",
                         shell=True, capture_output=True, text=True, timeout=300)
    assert len(run.stdout) == 10 and "Traceback" not in run.stderr and "Error" not in run.stderr, run.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert cli(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0]
    assert cli(["inspect", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "paths on cpu" in out and "W8A8 static" in out  # the path per kind of layer
