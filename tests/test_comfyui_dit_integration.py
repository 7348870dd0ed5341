"""MixQuant on diffusion transformers inside a real ComfyUI (skipped unless COMFYUI_PATH points at a checkout): a
Flux-layout and an SD3-layout diffusion-model file (random weights) loaded by the stock Load Diffusion Model node go
Calibrate -> Plan -> Quantize Model -> stock KSampler, and the native export of the quantized model loads back into
the stock loader and samples.

ComfyUI fixes Flux's widths (3072, 24 heads) and counts its blocks, so the Flux file is full width with one double
and one single block (545M parameters); SD3's width is 64 x its depth, so that file is small (depth 2, width 128).
Flux's T5-XXL does not fit a test here: its conditioning comes from stock nodes instead (CLIPLoader of type sd3 with a
full-size CLIP-L: context padded to T5's 4096, pooled 768 + 1280 zeros = 2048, which the Flux file's vector_in takes;
ComfyUI reads that width from the file) into Calibrate's conditioning input; the SD3 file is calibrated from the CLIP
and prompts as the UNets are.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("comfy_it", Path(__file__).with_name("test_comfyui_integration.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

pytestmark = H.pytestmark
FLUX, SD3, CLIP_L = "mq_flux_1x1.safetensors", "mq_sd3_d2.safetensors", "mq_clip_l.safetensors"


def flux_shapes(hidden=3072, mlp=12288, head=128, vec=2048, ctx=4096, latent=16, double=1, single=1) -> dict:
    """ComfyUI's Flux state dict (comfy.ldm.flux.model.Flux, names and shapes as it builds them)."""
    s = {"img_in": (hidden, latent * 4), "time_in.in_layer": (hidden, 256), "time_in.out_layer": (hidden, hidden),
         "vector_in.in_layer": (hidden, vec), "vector_in.out_layer": (hidden, hidden),
         "guidance_in.in_layer": (hidden, 256), "guidance_in.out_layer": (hidden, hidden), "txt_in": (hidden, ctx),
         "final_layer.linear": (latent * 4, hidden), "final_layer.adaLN_modulation.1": (2 * hidden, hidden)}
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            s.update({p + "mod.lin": (6 * hidden, hidden), p + "attn.qkv": (3 * hidden, hidden),
                      p + "attn.proj": (hidden, hidden), p + "mlp.0": (mlp, hidden), p + "mlp.2": (hidden, mlp)})
    for i in range(single):
        p = f"single_blocks.{i}."
        s.update({p + "linear1": (3 * hidden + mlp, hidden), p + "linear2": (hidden, hidden + mlp),
                  p + "modulation.lin": (3 * hidden, hidden)})
    out = {}
    for name, shape in s.items():
        out[name + ".weight"] = shape
        out[name + ".bias"] = (shape[0],)
    norms = [f"double_blocks.{i}.{side}_attn.norm" for i in range(double) for side in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(single)]
    for n in norms:
        out[n + ".query_norm.scale"] = ("ones", head)
        out[n + ".key_norm.scale"] = ("ones", head)
    return out


def sd3_shapes(depth=2, adm=2048, ctx=4096, latent=16, patches=1024) -> dict:
    """ComfyUI's MMDiT (SD3) state dict for a depth: width 64 x depth, the last block's context side pre-only."""
    h = 64 * depth
    s = {"pos_embed": (1, patches, h), "x_embedder.proj.weight": (h, latent, 2, 2), "x_embedder.proj.bias": (h,),
         "t_embedder.mlp.0.weight": (h, 256), "t_embedder.mlp.2.weight": (h, h), "y_embedder.mlp.0.weight": (h, adm),
         "y_embedder.mlp.2.weight": (h, h), "context_embedder.weight": (h, ctx),
         "final_layer.linear.weight": (4 * latent, h), "final_layer.adaLN_modulation.1.weight": (2 * h, h)}
    for i in range(depth):
        for side in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{side}."
            pre_only = side == "context_block" and i == depth - 1
            s[p + "attn.qkv.weight"] = (3 * h, h)
            s[p + "adaLN_modulation.1.weight"] = ((2 if pre_only else 6) * h, h)
            if not pre_only:
                s.update({p + "attn.proj.weight": (h, h), p + "mlp.fc1.weight": (4 * h, h),
                          p + "mlp.fc2.weight": (h, 4 * h)})
    for k in [k for k in s if k.endswith(".weight")]:
        s[k[:-len("weight")] + "bias"] = (s[k][0],)
    return s


def write_random(path: str, shapes: dict, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if shape and shape[0] == "ones":
            out[k] = torch.ones(shape[1], dtype=torch.bfloat16)
            continue
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) > 1 else 1
        std = 0.02 if k.endswith("bias") or k == "pos_embed" else fan_in ** -0.5
        out[k] = (torch.randn(shape, generator=g) * std).to(torch.bfloat16)
    save_file(out, path)


def write_clip_l(path: str, seed: int = 2) -> None:
    """A full-size CLIP-L text encoder file (the keys ComfyUI's CLIPLoader recognises), random weights."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu"))
    # (the names of a CLIP-L file: transformers 5 leaves out the "text_model." its older versions and the files have)
    save_file({(k if k.startswith("text_model.") else "text_model." + k): v.detach().to(torch.float16).contiguous()
               for k, v in clip.state_dict().items() if not k.endswith("position_ids")}, path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import subprocess

    base = str(tmp_path_factory.mktemp("comfy_dit"))
    for d in ("diffusion_models", "text_encoders", "mixquant", "output", "custom_nodes"):
        os.makedirs(os.path.join(base, d))
    write_random(os.path.join(base, "diffusion_models", FLUX), flux_shapes())
    write_random(os.path.join(base, "diffusion_models", SD3), sd3_shapes())
    write_clip_l(os.path.join(base, "text_encoders", CLIP_L))
    os.symlink(H.REPO, os.path.join(base, "custom_nodes", "ComfyUI-MixQuant-under-test"))
    cfg = os.path.join(base, "extra_model_paths.yaml")
    with open(cfg, "w") as f:
        f.write(f"mixquant_test:\n  base_path: {base}\n  diffusion_models: diffusion_models\n"
                f"  text_encoders: text_encoders\n  mixquant: mixquant\n  custom_nodes: custom_nodes\n"
                f"  is_default: true\n")
    port = H._free_port()
    log = os.path.join(base, "comfyui.log")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "MIXQUANT_CACHE": os.path.join(base, "cache"), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([H.PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--disable-auto-launch", "--extra-model-paths-config", cfg,
                                 "--output-directory", os.path.join(base, "output")],
                                cwd=H.COMFYUI, stdout=out, stderr=subprocess.STDOUT, env=env)
    with H.serving(H.Server(base, port, proc, log), "/object_info/KSampler", "ComfyUI", H.START_TIMEOUT) as srv:
        yield srv


def _graph(family: str) -> dict:
    flux = family == "flux"
    cfg = 1.0 if flux else 4.0
    calib = {"model": ["1", 0], "prompts": "" if flux else "a red car\na blue house", "negative": "", "steps": 2,
             "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "width": 64, "height": 64, "seed": 0}
    if flux:  # (no CLIP: the conditioning of stock nodes, one image per seed)
        calib.update(conditioning=["3", 0], negative_conditioning=["4", 0], conditioning_images=2)
    else:
        calib.update(clip=["2", 0])
    sampler = {"seed": 7, "steps": 2, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
               "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["8", 0], "denoise": 1.0}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX if flux else SD3, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_L, "type": "sd3"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red car", "clip": ["2", 0]}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "MixQuantCalibrate", "inputs": calib},
        "6": {"class_type": "MixQuantPlan", "inputs": {"calibration": ["5", 0], "budget_kind": "average weight bits",
                                                       # (SD3 at width 128: its 16-bit embedders are
                                                       # most of it, so 6 bits on average cannot be met)
                                                       "budget": 6.0 if flux else 11.0, "activation_bits": "8",
                                                       "target": "mixquant"}},
        "7": {"class_type": "MixQuantQuantizeModel", "inputs": {"model": ["1", 0], "plan": ["6", 0]}},
        "8": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["7", 0], **sampler}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": f"latents/{family}_q"}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": f"latents/{family}_fp"}},
        "13": {"class_type": "MixQuantSaveNative", "inputs": {"model": ["7", 0], "filename": f"native_{family}"}},
        "14": {"class_type": "MixQuantReport", "inputs": {"plan": ["6", 0]}},
    }


def _latent(server, prefix):
    from safetensors.torch import load_file

    folder = os.path.join(server.base, "output", "latents")
    name = sorted(f for f in os.listdir(folder) if f.startswith(prefix))[-1]
    return load_file(os.path.join(folder, name))["latent_tensor"].float()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_calibrate_plan_quantize_sample_and_native_export(server, family):
    import torch

    h = server.run(_graph(family))
    q, fp = _latent(server, f"{family}_q"), _latent(server, f"{family}_fp")
    assert q.shape == fp.shape and q.shape[1] == 16 and torch.isfinite(q).all()
    sqnr = 10 * torch.log10((fp ** 2).sum() / ((q - fp) ** 2).sum().clamp(min=1e-20))
    assert sqnr > 10, float(sqnr)  # the quantized model samples close to the FP one
    report = next(out["text"][0] for out in h["outputs"].values() if "text" in out and "bits" in out["text"][0])
    assert "W" in report
    # (how many layers go native depends on the plan, which with the default speed target depends on this machine's
    # timings: a CPU may keep every layer weight-only 8-bit, which has no native form; the layout is checked anyway)
    native = next(out["mixquant_native"][0] for out in h["outputs"].values() if "mixquant_native" in out)
    exported = next(f for f in os.listdir(os.path.join(server.base, "diffusion_models"))
                    if f.startswith(f"native_{family}"))
    unets = server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert exported in unets  # the stock Load Diffusion Model node lists it
    markers = _check_native_layout(os.path.join(server.base, "diffusion_models", exported),
                                   os.path.join(server.base, "diffusion_models", FLUX if family == "flux" else SD3))
    assert markers == native["native_layers"]
    if not _comfy_reads_quantized_layers():
        return  # (this ComfyUI predates its quantized formats: the file's layout is checked above instead)
    g = _graph(family)  # the stock loader takes the export (its format checks) and it samples
    g = {k: g[k] for k in ("2", "3", "4", "8")}
    g["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": exported, "weight_dtype": "default"}}
    g["9"] = {"class_type": "KSampler", "inputs": {**_graph(family)["9"]["inputs"], "model": ["1", 0]}}
    g["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": f"latents/{family}_nat"}}
    server.run(g)
    nat = _latent(server, f"{family}_nat")
    assert nat.shape == fp.shape and torch.isfinite(nat).all()


def _comfy_reads_quantized_layers() -> bool:
    """Does this ComfyUI load `.comfy_quant` layers (its mixed-precision ops, v0.27 numbering and later)?"""
    ops = os.path.join(H.COMFYUI, "comfy", "ops.py")
    return os.path.isfile(ops) and "comfy_quant" in open(ops, errors="replace").read()


def _check_native_layout(path: str, fp_path: str) -> int:
    """What ComfyUI's loader checks of a native file: the FP file's tensor names (its architecture detection reads
    them and the float layers' shapes), and each marked layer's tensors in its format's dtypes and shapes. Returns
    how many layers are marked."""
    import json

    import torch
    from safetensors import safe_open

    with safe_open(fp_path, "pt") as f:
        fp = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with safe_open(path, "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    markers = {k[:-len(".comfy_quant")]: json.loads(bytes(v.tolist()).decode()) for k, v in got.items()
               if k.endswith(".comfy_quant")}
    assert {k for k in got if not k.endswith(".comfy_quant") and not k.endswith(("weight_scale", "weight_zeros"))} \
        == set(fp)
    for k, shape in fp.items():
        layer = k[:-len(".weight")] if k.endswith(".weight") else None
        if layer not in markers:
            assert tuple(got[k].shape) == shape and got[k].is_floating_point(), k
    for layer, conf in markers.items():
        n, k = fp[layer + ".weight"]
        w, s = got[layer + ".weight"], got[layer + ".weight_scale"]
        if conf["format"] == "int8_tensorwise":
            assert w.dtype == torch.int8 and tuple(w.shape) == (n, k) and tuple(s.shape) == (n, 1)
        else:
            assert conf["format"] == "awq_w4a16" and tuple(w.shape) == (n, k // 2)
            assert tuple(s.shape) == (k // conf["group_size"], n) == tuple(got[layer + ".weight_zeros"].shape)
    return len(markers)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_transformer_exports_to_a_file_stock_comfyui_samples(server, family):
    """A diffusers Flux / SD3 transformer (the test's FP file read into diffusers) quantized with a mixed plan and
    exported by `mixquant export`: ComfyUI's names, its fused qkv / linear1 joined from our separate layers, and the
    stock loader takes it and samples close to the FP file."""
    import torch

    from mixquant.app.diffusers_host.dit_file import transformer_config
    from mixquant.app.diffusers_host.files import architecture_of
    from mixquant.quant.apply import quantize_model
    from mixquant.quant.dit_names import from_original, layout_for
    from mixquant.quant.fileformat import fingerprint, save_quantized
    from mixquant.quant.formats import LayerFormat
    from mixquant.quant.native import export_file

    fp_name = FLUX if family == "flux" else SD3
    fp_path = os.path.join(server.base, "diffusion_models", fp_name)
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from safetensors.torch import load_file

    orig = {k: v.float() for k, v in load_file(fp_path).items()}
    cfg = transformer_config(family, {k: tuple(v.shape) for k, v in orig.items()})
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    model = cls.from_config(cfg).eval()
    model.load_state_dict(from_original(orig, layout_for(cls.__name__, cfg)))
    del orig
    w8, w4 = LayerFormat(8, 8, a_mode="dynamic"), LayerFormat(4, 16, 64)  # (W8A8d, W4g64A16: both native)
    plan = {n: w8 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plan["transformer_blocks.0.attn.to_k"] = w4  # joined with int8 parts: requantized to int8
    if family == "flux":  # a single block's linear1 all W4: joined as awq_w4a16
        plan.update({f"single_transformer_blocks.0.{n}": w4 for n in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                       "proj_mlp")})
    qm, _ = quantize_model(model, plan, search="minmax")
    src = os.path.join(server.base, f"dfl_{family}.safetensors")
    save_quantized(qm, src, architecture=architecture_of(model), base_fingerprint=fingerprint(model))
    del model, qm
    exported = f"native_dfl_{family}.safetensors"
    out = os.path.join(server.base, "diffusion_models", exported)
    s = export_file(src, out)
    assert "original" in s["naming"] and s["requantized_layers"] >= 1
    assert _check_native_layout(out, fp_path) == s["native_layers"] > 0
    if not _comfy_reads_quantized_layers():
        return
    g = _graph(family)
    g = {k: g[k] for k in ("1", "2", "3", "4", "8", "10")}
    g["12"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": f"latents/{family}_dfp"}}
    g["21"] = {"class_type": "UNETLoader", "inputs": {"unet_name": exported, "weight_dtype": "default"}}
    g["22"] = {"class_type": "KSampler", "inputs": {**g["10"]["inputs"], "model": ["21", 0]}}
    g["23"] = {"class_type": "SaveLatent",
               "inputs": {"samples": ["22", 0], "filename_prefix": f"latents/{family}_dnat"}}
    server.run(g)
    fp, nat = _latent(server, f"{family}_dfp"), _latent(server, f"{family}_dnat")
    assert nat.shape == fp.shape and torch.isfinite(nat).all()
    sqnr = 10 * torch.log10((fp ** 2).sum() / ((nat - fp) ** 2).sum().clamp(min=1e-20))
    assert sqnr > 10, float(sqnr)
