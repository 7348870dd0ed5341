"""Diffusion transformers (#23): Flux-family and SD3-family pipelines (random weights, the small configs shipped in
configs/dit/) through the same calibrate -> plan -> quantize -> file -> generate as the UNets, in the CLI and the
Python API; their roles; the runner's timestep schedule; what is not supported gets one clear message."""
import json

import pytest
import torch

from mixquant.app.cli import main as cli
from mixquant.app.diffusers_host.models import check_supported, denoiser_of, load_pipeline
from mixquant.app.diffusers_host.random_models import random_denoiser, random_pipeline
from mixquant.app.diffusers_host.runner import PipelineRunner
from mixquant.quant.errors import MixQuantError
from mixquant.quant.roles import discover_layers, layer_role
from mixquant.quant.runner import SamplerSettings, capture_calls

FAMILIES = ("flux", "sd3")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        random_pipeline(fam, seed=1).save_pretrained(str(d))
        out[fam] = str(d)
    return out


def test_roles_of_dit_layers():
    # diffusers names (Flux double / single blocks, SD3 joint blocks) and ComfyUI's names for the same layers
    content = ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
               "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out",
               "single_transformer_blocks.3.proj_mlp", "single_transformer_blocks.3.proj_out",
               "double_blocks.0.img_mlp.0", "double_blocks.0.txt_attn.qkv", "single_blocks.7.linear1",
               "joint_blocks.2.context_block.attn.qkv", "joint_blocks.2.x_block.mlp.fc1"]
    quality = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
               "single_transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv",
               # adaLN modulation is measured, as a quality layer, even inside the text stream
               "transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
               "single_transformer_blocks.0.norm.linear", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin",
               "joint_blocks.0.context_block.adaLN_modulation.1"]
    for n in content:
        assert layer_role(n) == "content", n
    for n in quality:
        assert layer_role(n) == "quality", n
    for fam in FAMILIES:
        layers = discover_layers(random_denoiser(fam))
        prot = {li.name for li in layers if li.protected}
        # embedders, the patch embedding and the final layer stay 16-bit; every block layer is planned
        assert "context_embedder" in prot and "proj_out" in prot and "norm_out.linear" in prot
        assert any(n.startswith("time_text_embed.") for n in prot)
        assert not any(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in prot)
        assert {li.role for li in layers if not li.protected} == {"content", "quality"}


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_knows_the_schedule_the_pipeline_runs(family):
    """timesteps() is computed as the pipeline computes them (Flux: shifted by the image's token count, divided by
    1000): calibration sorts each call into its timestep group as it happens, so they must agree."""
    pipe = random_pipeline(family)
    for size in (64, 96):
        r = PipelineRunner(pipe, SamplerSettings(steps=5, guidance=3.5, width=size, height=size, scheduler="auto"))
        calls, images = capture_calls(r, ["a cat"], [0], keep=False)
        assert [c.timestep for c in calls] == pytest.approx(r.timesteps(), abs=1e-5)
        assert images.shape == (1, 3, size, size)
    assert r.s.scheduler == "euler"
    with pytest.raises(MixQuantError, match="flow matching"):
        PipelineRunner(pipe, SamplerSettings(steps=2, scheduler="dpm"))


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_quantize_generate_inspect(folders, family, tmp_path, capsys):
    out, rep = tmp_path / "q.safetensors", tmp_path / "q.json"
    common = ["--steps", "3", "--size", "64x64"]
    balance = ["--balance", "on"] if family == "flux" else []  # (random weights have no outlier channels)
    rc = cli(["quantize", "--model", folders[family], "--prompt", "a red fox", "--prompt", "a blue car",
              "--avg-w-bits", "6", "--out", str(out), "--report", str(rep), *balance, *common])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    report = json.loads(rep.read_text())
    assert bool(report["balanced_layers"]) == bool(balance)
    assert ("channel balancing on" in printed.out) == bool(balance)
    assert report["sampler"]["scheduler"] == "euler"
    assert report["bytes_quantized"] <= 0.5 * report["bytes_fp16"]
    assert report["quality"]["sqnr_db"] > 15
    roles = {li["role"] for li in report["layers"] if li["format"] != "W16A16"}
    assert roles == {"content", "quality"}
    img = tmp_path / "g.png"
    rc = cli(["generate", "--model", folders[family], "--quantized", str(out), "--prompt", "a red fox",
              "--out", str(img), *common])
    assert rc == 0, capsys.readouterr().err
    assert img.stat().st_size > 0
    rc = cli(["inspect", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and ("FluxTransformer2DModel" if family == "flux" else "SD3Transformer2DModel") in text


def test_quantized_file_reloads_into_the_same_outputs(folders, tmp_path):
    """The file alone rebuilds the quantized transformer: the same tensors, and in each timestep group every
    quantized layer gives the saved model's layer's output bit for bit on the input that layer got there; the whole
    outputs agree but for float rounding (equal float weights in other memory can round differently on some CPUs'
    GEMMs, by 1e-7 here, and an activation code that flips on it moves the output by one step of the grid)."""
    from mixquant.app.diffusers_host.api import quantize_pipeline
    from mixquant.app.diffusers_host.files import load_denoiser, save_outputs
    from mixquant.quant.layers import QuantLayer

    pipe = load_pipeline(folders["flux"])
    qpipe, report = quantize_pipeline(pipe, ["a cat"], avg_w_bits=6, evaluate=False, speed="off", sweep_seconds=0,
                                      act_groups=2, sampler=SamplerSettings(steps=3, width=64, height=64))
    path = str(tmp_path / "f.safetensors")
    q1 = denoiser_of(qpipe)
    save_outputs(denoiser_of(pipe), q1, report, path, None, "flux")
    q2 = load_denoiser(path, base=denoiser_of(pipe))
    s1, s2 = q1.state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys() and all(s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]) for k in s1)
    layers2 = {n: m for n, m in q2.named_modules() if isinstance(m, QuantLayer)}
    calls, _ = capture_calls(PipelineRunner(pipe, SamplerSettings(steps=3, width=64, height=64)), ["a dog"], [1])
    groups = set()
    for c in (calls[0], calls[-1]):  # (two timestep groups: the switch goes with the file)
        seen = {}
        hooks = [m.register_forward_hook(lambda m, a, y, n=n: seen.setdefault(n, (a[0], y, m.act_group)) and None)
                 for n, m in q1.named_modules() if isinstance(m, QuantLayer)]
        with torch.no_grad():
            a = q1(*c.args, **c.kwargs)[0]
            for h in hooks:
                h.remove()
            b = q2(*c.args, **c.kwargs)[0]
            assert seen.keys() == layers2.keys()
            for n, (x, y, group) in seen.items():
                assert layers2[n].act_group == group and torch.equal(layers2[n](x), y), n
        groups |= {g for _, _, g in seen.values()}
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert groups == {0, 1}


def test_dit_folders_default_to_bf16_on_a_gpu(folders):
    """Flux's and SD3's activations overflow fp16: dtype auto is bf16 for them on a GPU (fp16 for UNets, fp32 on a
    CPU), read from the folder's model_index.json before anything loads."""
    from mixquant.app.diffusers_host import models

    assert models._pipeline_class(folders["flux"]) == "FluxPipeline"
    assert models.resolve_dtype("auto", "cuda", models._pipeline_class(folders["sd3"])) is torch.bfloat16
    assert models.resolve_dtype("auto", "cuda", "StableDiffusionXLPipeline") is torch.float16
    assert models.resolve_dtype("auto", "cpu", "FluxPipeline") is torch.float32
    assert models.resolve_dtype("fp16", "cuda", "FluxPipeline") is torch.float16  # (what the user asks for)


def test_unsupported_denoisers_get_one_clear_message():
    class Video:
        def __init__(self):
            self.unet = torch.nn.Linear(2, 2)

    class OtherDiT:
        def __init__(self):
            self.transformer = torch.nn.Linear(2, 2)

    with pytest.raises(MixQuantError, match="video or other special UNet"):
        check_supported(Video(), "m")
    with pytest.raises(MixQuantError, match="not supported"):
        check_supported(OtherDiT(), "m")
    with pytest.raises(MixQuantError, match="no shipped config"):
        random_denoiser("pixart")


def test_gradio_app_calibrates_quantizes_and_saves_a_flux_folder(folders, tmp_path):
    """The demo's backend (what its buttons call) on a Flux folder: the sampler auto is Flux's own, and the saved file
    reloads onto the folder's transformer."""
    pytest.importorskip("gradio")
    from mixquant.app.diffusers_host.files import load_denoiser
    from mixquant.app.gradio_app import SENS_MODES, DemoBackend, read_settings

    be = DemoBackend(folders["flux"], out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), device="cpu")
    s = read_settings(folders["flux"], "a red fox\na blue car", 2, 3.5, "auto", 0, "", 8, SENS_MODES["fast"])
    cal = be.calibrate(s)
    res = be.quantize(s, "average weight bits", 6.0, cal=cal)
    assert res.numbers["size_ratio"] < 0.5 and res.numbers["quality"]["sqnr_db"] > 15
    path, report_path, _ = be.save(res, "flux_demo.safetensors")
    pipe, _ = be.pipeline(folders["flux"])
    q = load_denoiser(path, base=denoiser_of(pipe))
    assert type(q).__name__ == "FluxTransformer2DModel"
    assert json.load(open(report_path))["sampler"]["scheduler"] == "euler"
