"""Side by side: MixQuant against what a user could pick instead, on the same models, prompts and seeds, in one run.

    pip install -e ".[bench]"                # the peers: torchao, optimum-quanto, bitsandbytes, comfy-kitchen, gguf,
                                             # sdnq, nvidia-modelopt
    python bench/peers.py                    # digits quality + SD1.5-architecture UNet speed / memory / SQNR
    python bench/peers.py --skip-sd15        # digits only (a few minutes)
    python bench/peers.py --only torchao,quanto --skip-digits

Writes bench/results/peers.md, peers.json and peers_quality_vs_bytes.png (with --out DIR: there).

What is compared (each peer with its documented default / recommended settings; `PEERS` below says exactly how):
- torch: FP32, and the fastest 16-bit dtype on this machine (probed);
- ComfyUI: `weight_dtype fp8_e4m3fn` (weights stored as float8, upcast per layer), and the native quantized Linear
  formats `int8_tensorwise` (per-row, plain and ConvRot) and `awq_w4a16`, computed by comfy-kitchen's own layouts
  (QuantizedTensor weights under F.linear: the eager backend on CPU, CUDA where it is installed);
- MixQuant: uniform W8A8, uniform W4A16, mixed (A8) at byte budgets and at average W4, the comfyui-native target;
- torchao: int8 dynamic activation + int8 weight, int8 weight-only, int4 weight-only (and its CPU int4 path);
- optimum-quanto: qint8 weights + qint8 activations (with its Calibration), qint8 weights, qint4 weights;
- bitsandbytes: LLM.int8() (Linear8bitLt) and NF4 (Linear4bit);
- GGUF (ComfyUI-GGUF): its file types Q8_0, Q6_K, Q5_K_M/S, Q4_K_M/S, Q3_K_M/S, made by its own rules (bench/gguf_peer.py:
  convert.py's F16/F32 choices and row-of-256 layout, llama-quantize's lcpp.patch per-tensor types), dequantized on
  every forward as its GGMLOps do;
- SDNQ: uniform int8 / int4 / uint4 on Linear layers (its default) and with convs, with SVD low-rank correction, and
  its dynamic per-layer dtype mode at three loss thresholds;
- NVIDIA Model Optimizer: the INT8 (SmoothQuant, per-step percentile conv ranges) and FP8 recipes of its diffusers
  example (bench/modelopt_peer.py), weights compressed to real int8 / float8 storage.
A peer that cannot import or run here gets a row with the exception text, never a crash.

How things are measured:
- Bytes: the storage of every tensor the denoiser holds (parameters and buffers), measured, not computed. Tensor
  subclasses (torchao, quanto, comfy-kitchen) are opened with `__tensor_flatten__` (recursively); bitsandbytes weights
  add their quant_state / SCB tensors. Shared storage is counted once. The float parts (unquantized layers, norms,
  biases, float scales) are counted at 2 bytes per element, as a 16-bit deployment holds them (the CPU runs here keep
  them in fp32): the same rule for every row, MixQuant included ("x FP16" = these bytes / the FP16 denoiser).
  Bytes at the dtype actually run are in the JSON (`bytes_as_run`). The FP32 row is counted at 4 bytes.
- digits quality: the embedded `digits` pipeline in fp32, held-out prompts (bench/pipeline.py eval_set), the same
  seeds for all, DPM-Solver++ 8 steps, guidance 4 (`--guidance`); app/diffusers_host/harness.compare_pipelines gives
  denoiser SQNR (teacher-forced on the FP trajectory), image PSNR / SSIM vs FP and content accuracy (the shipped digit
  classifier).
  `--content-seeds N` takes content accuracy / confidence from N seeds per prompt instead (each config's own images
  only: cheaper per image, so enough images to separate configs a few images apart). Content is also compared image
  by image: a MixQuant row against the peer whose size it matches, and each budget's best against each tool's best,
  counting the images only one side draws right, with an exact binomial (McNemar) p-value. `--content-seed-start`
  runs a later block of seeds; bench/pool_content.py pools the blocks of several runs image by image.
  Calibration (MixQuant, quanto's activations): the prompts of examples/prompts.txt, never the evaluation prompts.
- Latency: CPU time of the denoiser forward (process time; 1 thread), quantized and FP32 measured alternately in one
  process, so a busy machine slows both alike; ratio = quantized / FP32 (> 1: slower).
- SD1.5-architecture UNet (random weights, configs/sd15_unet.json): 32x32 latents, batch 2, one forward at t=500;
  SQNR of the output vs FP32 on the same input; bytes as above.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_name, sd15_unet  # noqa: E402
from pipeline import CALIB_PROMPTS, LatentRunner, eval_set  # noqa: E402

# x FP16 bytes: the equal-bytes rows, from the 8-bit recipes that keep a few layers float (0.6) down to the smallest
# any tool reaches; MixQuant's mixed plans are made at each
BUDGETS = PLAN_BUDGETS = (0.6, 0.5, 0.4, 0.3, 0.25, 0.2)
BUDGET_TOL = 0.05  # a config "reaches" a budget when its bytes are at most budget * (1 + tol)
TOOLS = ("torch", "ComfyUI", "MixQuant", "MixQuant (comfyui-native target)", "torchao", "optimum-quanto",
         "bitsandbytes", "GGUF", "SDNQ", "Model Optimizer")


# --- bytes --------------------------------------------------------------------------------------------------------

def _leaves(t: torch.Tensor):
    """The plain tensors that hold `t`'s data."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _leaves(getattr(t, n))
        return
    yield t
    qs = getattr(t, "quant_state", None)  # bitsandbytes Params4bit
    if qs is not None:
        for obj in (qs, getattr(qs, "state2", None)):
            if obj is not None:
                for v in vars(obj).values():
                    if torch.is_tensor(v):
                        yield v
    scb = getattr(t, "SCB", None)  # bitsandbytes Int8Params
    if torch.is_tensor(scb):
        yield scb


def model_tensors(model: nn.Module):
    seen = set()
    for _, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        yield t


def measured_bytes(model: nn.Module, float_bytes: int | None = 2) -> int:
    """Storage bytes of every tensor of `model` (see the module docstring). `float_bytes`: bytes per element of the
    fp32/fp16/bf16 tensors (2: as a 16-bit deployment holds them); None: as they are (fp8 is always 1 byte)."""
    total, seen = 0, set()
    for t in model_tensors(model):
        for leaf in _leaves(t):
            st = leaf.untyped_storage()
            key = (st.data_ptr(), st.device.type, st.nbytes()) if st.data_ptr() else id(st)
            if key in seen:
                continue
            seen.add(key)
            n = st.nbytes()
            if float_bytes is not None and leaf.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                n = n // leaf.element_size() * float_bytes
            total += n
    return total


def fp16_bytes(model: nn.Module) -> int:
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())


def coverage(fp_model: nn.Module, model: nn.Module) -> dict:
    """How many of the FP model's Linear / Conv2d layers hold a non-float (quantized or fp8) weight in `model`."""
    mods = dict(model.named_modules())
    out = {"linear": [0, 0], "conv2d": [0, 0]}
    for name, m in fp_model.named_modules():
        kind = "linear" if isinstance(m, nn.Linear) else "conv2d" if isinstance(m, nn.Conv2d) else None
        if kind is None:
            continue
        out[kind][1] += 1
        q = mods.get(name)
        w = getattr(q, "weight", None) if q is not None else None
        if w is None:  # quanto/bnb/MixQuant modules keep `weight`; anything else counts as float
            continue
        if any(not leaf.is_floating_point() or leaf.element_size() == 1 for leaf in _leaves(w)):
            out[kind][0] += 1
    return out


# --- peers --------------------------------------------------------------------------------------------------------

@dataclass
class Env:
    """What the builders need from the section that runs them."""
    kind: str  # "digits" | "sd15"
    fp_model: nn.Module
    calibrate: Callable[[nn.Module], None]  # drive a model over the calibration inputs (quanto's Calibration)
    calib_steps: int = 1  # denoiser calls per calibration run, in timestep order (Model Optimizer's per-step ranges)
    device: str = "cpu"
    dtype16: torch.dtype = torch.bfloat16
    mixquant: dict = field(default_factory=dict)  # key -> (model, note) built by the section (engine runs)


@dataclass
class Peer:
    key: str
    tool: str
    label: str
    settings: str
    build: Callable[[Env], nn.Module]
    sections: tuple = ("digits", "sd15")
    note: str = ""
    capped: bool = True  # the SD1.5 forward may be stopped at --cap x FP32 (False: its SQNR is wanted whatever it costs)


def _copy(env: Env) -> nn.Module:
    return copy.deepcopy(env.fp_model)


def _cast_io_hooks(model: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype = torch.float32):
    """Run `model` in `dtype` inside an fp32 pipeline: sample and context cast in, the output cast back."""

    def pre(mod, args, kwargs):
        args = tuple(a.to(dtype) if i == 0 and torch.is_tensor(a) else a for i, a in enumerate(args))
        for k in ("sample", "encoder_hidden_states"):
            if torch.is_tensor(kwargs.get(k)):
                kwargs[k] = kwargs[k].to(dtype)
        if len(args) > 2 and torch.is_tensor(args[2]):
            args = args[:2] + (args[2].to(dtype),) + args[3:]
        return args, kwargs

    def post(mod, args, kwargs, out):
        if torch.is_tensor(out):
            return out.to(out_dtype)
        if isinstance(out, tuple):
            return (out[0].to(out_dtype),) + tuple(out[1:])
        return type(out)(sample=out.sample.to(out_dtype))

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    return model


def build_fp32(env):
    return env.fp_model


def build_16bit(env):
    return _cast_io_hooks(_copy(env).to(env.dtype16), env.dtype16)


# ComfyUI `weight_dtype fp8_e4m3fn`: the model is built with dtype=float8 (comfy.ops manual_cast), so every Linear /
# Conv2d weight and bias is stored as float8_e4m3fn (a plain round-to-nearest cast of the checkpoint) and cast to the
# compute dtype inside each layer's forward (comfy.ops.cast_bias_weight). No scale.
class _Fp8Linear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _Fp8Conv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def to_fp8_storage(model: nn.Module, dtype=torch.float8_e4m3fn) -> nn.Module:
    for m in model.modules():
        cls = _Fp8Linear if type(m) is nn.Linear else _Fp8Conv2d if type(m) is nn.Conv2d else None
        if cls is None:
            continue
        m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
        m.__class__ = cls
    return model


def build_comfy_fp8(env):
    return to_fp8_storage(_copy(env))


def _ck_linear_weights(model: nn.Module, make) -> nn.Module:
    """Replace every nn.Linear weight by the comfy-kitchen QuantizedTensor `make(weight)` returns (None: keep float).
    F.linear on that weight dispatches to comfy-kitchen's layout op, as ComfyUI's mixed_precision_ops do."""
    for m in model.modules():
        if type(m) is nn.Linear:
            qt = make(m.weight.detach())
            if qt is not None:
                m.weight = nn.Parameter(qt, requires_grad=False)
    return model


def _convrot_group(k: int, default: int = 256) -> int | None:
    """comfy-kitchen's ConvRot group: a power of 4 dividing K (its default 256 where it divides)."""
    for g in (default, 64, 16, 4):
        if g <= default and k % g == 0:
            return g
    return None


def build_comfy_int8(env, convrot: bool = False):
    from comfy_kitchen.tensor.base import QuantizedTensor

    def make(w):
        if convrot:
            g = _convrot_group(w.shape[1])
            if g is None:
                return None
            return QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True, convrot=True,
                                              convrot_groupsize=g)
        return QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True)

    return _ck_linear_weights(_copy(env), make)


def awq_rtn_quantize(w: torch.Tensor, group: int = 64, grid: int = 20, max_shrink: float = 0.5):
    """Asymmetric 4-bit per-group weights in comfy-kitchen's awq_w4a16 layout: (packed int8 [N, K/2] with the even
    column in the low nibble, scale [K/G, N], zeros [K/G, N]) with W = (u - 8) * scale + zeros. Round to nearest with
    a per-group clipping search (AWQ's auto-clip idea, on the weight error: shrink factors 1 .. 1 - max_shrink)."""
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // group, group)
    lo0, hi0 = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    best_err = torch.full_like(lo0, float("inf"))
    best_s, best_z = torch.ones_like(lo0), torch.zeros_like(lo0)
    for i in range(grid):
        r = 1.0 - max_shrink * i / grid
        lo, hi = lo0 * r, hi0 * r
        s = ((hi - lo) / 15).clamp(min=1e-8)
        z = torch.round(-lo / s).clamp(0, 15)
        q = (torch.round(wg / s) + z).clamp(0, 15)
        err = ((q - z) * s - wg).pow(2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    u = (torch.round(wg / best_s) + best_z).clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = ((u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)).to(torch.uint8).view(torch.int8).contiguous()
    scale = best_s.reshape(n, -1).t().contiguous().half()
    zeros = ((8 - best_z) * best_s).reshape(n, -1).t().contiguous().half()
    return packed, scale, zeros


def build_comfy_awq(env):
    from comfy_kitchen.tensor.awq_w4a16 import TensorCoreAWQW4A16Layout
    from comfy_kitchen.tensor.base import QuantizedTensor

    def make(w):
        n, k = w.shape
        g = 64 if k % 64 == 0 else (k if k < 64 and k % 2 == 0 else None)
        if g is None:
            return None
        packed, scale, zeros = awq_rtn_quantize(w, g)
        params = TensorCoreAWQW4A16Layout.Params(scale=scale.to(w.device), orig_dtype=w.dtype, orig_shape=(n, k),
                                                 zeros=zeros.to(w.device), group_size=g)
        return QuantizedTensor(packed.to(w.device), "TensorCoreAWQW4A16Layout", params)

    return _ck_linear_weights(_copy(env), make)


def build_torchao(env, which: str):
    from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_)
    from torchao.quantization.granularity import PerGroup

    cfg = {"int8dq": lambda: Int8DynamicActivationInt8WeightConfig(),
           "int8wo": lambda: Int8WeightOnlyConfig(),
           "int4wo": lambda: Int4WeightOnlyConfig(),
           "intx4wo": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))}[which]()
    m = _copy(env)
    quantize_(m, cfg)
    return m


def build_quanto(env, weights: str, activations: str | None):
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

    qt = {"qint8": qint8, "qint4": qint4}
    m = _copy(env)
    quantize(m, weights=qt[weights], activations=qt[activations] if activations else None)
    if activations:
        with torch.no_grad(), Calibration(momentum=0.9):
            env.calibrate(m)
    freeze(m)
    return m


def build_bnb(env, which: str):
    import bitsandbytes as bnb

    m = _copy(env)
    for name, lin in [(n, x) for n, x in m.named_modules() if type(x) is nn.Linear]:
        w, b = lin.weight.detach(), lin.bias
        if which == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=b is not None, has_fp16_weights=False,
                                    threshold=6.0)
            q.weight = bnb.nn.Int8Params(w.clone().cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=b is not None, compute_dtype=w.dtype,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(w.clone().cpu(), requires_grad=False, quant_type="nf4")
        if b is not None:
            q.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        q = q.to(env.device)  # bitsandbytes quantizes when the module is moved to its device
        parent, _, attr = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, attr, q)
    return m


def build_scaled_mm_fp8(env):
    """GPU only: fp8 e4m3 weights (per-tensor scale) x fp8 activations (dynamic per-tensor scale) via
    torch._scaled_mm, on every Linear (what ComfyUI's `fp8_e4m3fn_fast` does on SM >= 8.9)."""
    if not (env.device.startswith("cuda") and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (8, 9)):
        raise RuntimeError("torch._scaled_mm fp8 needs a CUDA GPU with compute capability >= 8.9")

    class _ScaledMMLinear(nn.Linear):
        def forward(self, x):
            shp = x.shape
            x2 = x.reshape(-1, shp[-1])
            xs = (x2.abs().amax().float() / 448.0).clamp(min=1e-12)
            xq = (x2 / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.w_scale, out_dtype=x.dtype,
                                 bias=self.bias)
            return y.reshape(*shp[:-1], -1)

    # in the 16-bit dtype (ComfyUI runs fp8 weights with fp16 / bf16 compute; _scaled_mm takes no bias with an
    # fp32 output), inside the fp32 pipeline like build_16bit
    m = _cast_io_hooks(_copy(env).to(env.dtype16), env.dtype16)
    for lin in [x for x in m.modules() if type(x) is nn.Linear]:
        if lin.in_features % 16 or lin.out_features % 16:
            continue
        w = lin.weight.detach()
        s = (w.abs().amax().float() / 448.0).clamp(min=1e-12)
        lin.weight = nn.Parameter((w / s).to(torch.float8_e4m3fn), requires_grad=False)
        lin.register_buffer("w_scale", s)
        lin.__class__ = _ScaledMMLinear
    return m


def build_gguf(env, ftype: str):
    from gguf_peer import gguf_quantize_model

    return gguf_quantize_model(_copy(env), ftype)


# ComfyUI-GGUF's file types, from its largest down to Q3_K (Q2_K: "not recommended" there too); the _M mixes keep
# the attention values and the feed-forward outputs of a few blocks at a higher type (lcpp.patch)
GGUF_TYPES = {"Q8_0": "sd15", "Q6_K": "sd15", "Q5_K_M": "sd15-full", "Q5_K_S": "sd15", "Q4_K_M": "sd15",
              "Q4_K_S": "sd15", "Q3_K_M": "sd15-full", "Q3_K_S": "sd15"}


def build_sdnq(env, dtype: str, conv: bool, svd: bool = False, threshold: float | None = None):
    """SDNQ's documented post-load entry point, its defaults otherwise (group size auto, svd_rank 32, scales kept in
    fp32 by dequantize_fp32=True; counted at 2 B like every float part here). Eager dequantization
    (SDNQ_USE_TORCH_COMPILE=0, set before sdnq is imported): on a CPU its default torch.compile of the dequantizer
    compiles once per layer shape, which costs minutes here and does not change a single value."""
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
    from sdnq import sdnq_post_load_quant

    kw = dict(weights_dtype=dtype, quant_conv=conv, use_svd=svd)
    if threshold is not None:
        kw.update(use_dynamic_quantization=True, dynamic_loss_threshold=threshold)
    with torch.no_grad():
        return sdnq_post_load_quant(_copy(env), **kw)


def _sdnq_settings(dtype: str, conv: bool, svd: bool = False, threshold: float | None = None) -> str:
    dyn = f", use_dynamic_quantization=True, dynamic_loss_threshold={threshold:g}" if threshold is not None else ""
    return f"sdnq_post_load_quant(m, weights_dtype='{dtype}', quant_conv={conv}, use_svd={svd}{dyn})"


# (key, label, build kwargs, sections): SDNQ uniform int8 / int4 / uint4, Linear only (its default) and with convs,
# SVD low-rank correction at 4 bits, and its dynamic per-layer mode (the smallest dtype from the floor up whose
# weight loss mse / var is under the threshold; 1e-2 is its automatic threshold for a 4-bit floor)
SDNQ_CONFIGS = [
    ("int8", "int8", dict(dtype="int8", conv=False), ("digits", "sd15")),
    ("int8-conv", "int8 + convs", dict(dtype="int8", conv=True), ("digits", "sd15")),
    ("int4", "int4", dict(dtype="int4", conv=False), ("digits", "sd15-full")),
    ("int4-conv", "int4 + convs", dict(dtype="int4", conv=True), ("digits", "sd15")),
    ("uint4", "uint4", dict(dtype="uint4", conv=False), ("digits", "sd15")),
    ("uint4-conv", "uint4 + convs", dict(dtype="uint4", conv=True), ("digits", "sd15")),
    ("int4-conv-svd", "int4 + convs + SVD", dict(dtype="int4", conv=True, svd=True), ("digits", "sd15-full")),
    ("uint4-conv-svd", "uint4 + convs + SVD", dict(dtype="uint4", conv=True, svd=True), ("digits", "sd15")),
    *[(f"dyn{t:g}", f"dynamic (uint4 floor, convs) at {t:g}", dict(dtype="uint4", conv=True, threshold=t),
       ("digits", "sd15" if t > 1e-3 else "sd15-full")) for t in (1e-2, 4e-3, 1e-3)],  # 1e-3: 20+ min on SD1.5
]


def build_modelopt(env, recipe: str):
    from modelopt_peer import modelopt_quantize

    m = _copy(env)
    with torch.no_grad():
        return modelopt_quantize(m, recipe, env.calibrate, env.calib_steps)


def build_mixquant(env, key):
    if key not in env.mixquant:
        raise RuntimeError(f"MixQuant config {key} was not built")
    made = env.mixquant[key]
    if isinstance(made, Exception):
        raise made
    return made


# MixQuant with another menu at one budget (key: (budget x FP16, QuantizeConfig fields, label, settings)): what a
# peer's idea is worth in our method, measured
EXPERIMENTS = {
    "g32-b0.3": (0.3, dict(a_bits=8, group_size=32), "mixed A8 at 0.3x FP16, groups of 32",
                 "as mixed A8 at 0.3x with group_size=32 (4-bit layers 4.75 bits/weight: GGUF's K-quant groups of 32, "
                 "without its 6-bit second-level scales)"),
    "g32-wb0.3": (0.3, dict(a_bits=16, group_size=32), "mixed W-only at 0.3x FP16, groups of 32",
                  "as mixed W-only at 0.3x with group_size=32"),
    "w48-b0.3": (0.3, dict(a_bits=8, w_bits_content=(4, 8)), "mixed A8 at 0.3x FP16, no 2-bit layers",
                 "as mixed A8 at 0.3x with w_bits_content=(4, 8) (GGUF has no 2-bit tensor in these files)"),
    "w48-wb0.3": (0.3, dict(a_bits=16, w_bits_content=(4, 8)), "mixed W-only at 0.3x FP16, no 2-bit layers",
                  "as mixed W-only at 0.3x with w_bits_content=(4, 8)"),
    "f16-wb0.6": (0.6, dict(a_bits=16, w_bits_content=(2, 4, 8, 16), w_bits_quality=(4, 8, 16)),  # (SD1.5 too)
                  "mixed W-only at 0.6x FP16, float layers allowed", "as mixed W-only at 0.6x with 16 (float) in both "
                  "weight menus: w_bits_content=(2, 4, 8, 16), w_bits_quality=(4, 8, 16)"),
}


def _mq(key, label, settings, sections=("digits", "sd15"), note="", tool="MixQuant"):
    return Peer(f"mixquant-{key}", tool, label, settings, lambda env, k=key: build_mixquant(env, k), sections, note)


PEERS = [
    Peer("fp32", "torch", "FP32", "the model as trained", build_fp32, note="reference"),
    Peer("fp16", "torch", "16-bit (fastest here)", "model.to(bf16 or fp16: the faster one in a probe matmul)",
         build_16bit),
    Peer("comfy-fp8", "ComfyUI", "fp8_e4m3fn weights", "weight_dtype fp8_e4m3fn: Linear/Conv2d weights + biases "
         "cast to float8_e4m3fn, upcast per layer", build_comfy_fp8),
    Peer("comfy-int8", "ComfyUI", "int8_tensorwise", "comfy-kitchen TensorWiseINT8Layout, per-row weight scale, "
         "dynamic per-row int8 activations (int8_linear)", lambda env: build_comfy_int8(env)),
    Peer("comfy-int8-convrot", "ComfyUI", "int8_tensorwise + ConvRot", "as int8_tensorwise with convrot=True "
         "(H4 Hadamard groups of 256, or the largest power of 4 dividing K)", lambda env: build_comfy_int8(env, True),
         ("digits", "sd15-full"), note="on SD1.5 with --full only (the same int8 GEMM as int8_tensorwise)"),
    Peer("comfy-awq", "ComfyUI", "awq_w4a16", "comfy-kitchen TensorCoreAWQW4A16Layout, group 64 (K<64: one group), "
         "RTN + per-group clip search (comfy-kitchen has no AWQ quantizer)", build_comfy_awq),
    _mq("w8a8", "uniform W8A8", "W8 per-channel + static per-tensor A8 (calibrated), conv_in/out 16-bit"),
    _mq("w4a16", "uniform W4A16", "W4 group 64 asymmetric, 16-bit activations, conv_in/out 16-bit",
        ("digits", "sd15-full")),
    _mq("avgw4", "mixed avg W4 A8", "MILP at an average of 4 weight bits, A8 (5% of activations may stay 16-bit)",
        ("digits", "sd15-full")),
    *[_mq(f"b{b}", f"mixed A8 at {b}x FP16", f"MILP at budget_mb = {b} x FP16 bytes, A8",
          ("digits", "sd15" if b == 0.3 else "sd15-full")) for b in PLAN_BUDGETS],
    *[_mq(f"wb{b}", f"mixed W-only at {b}x FP16", f"MILP at budget_mb = {b} x FP16 bytes, a_bits=16 "
          "(weight-only, like the weight-only peers)") for b in PLAN_BUDGETS],
    *[_mq(key, label, settings, ("digits", "sd15") if key == "f16-wb0.6" else ("digits",))
      for key, (_f, _kw, label, settings) in EXPERIMENTS.items()],
    _mq("native", "comfyui-native target", "Linear-only menu: W8A8-dynamic (int8_tensorwise) / W4g64A16 "
        "(awq_w4a16) / float; convs 16-bit", ("digits", "sd15-full"), tool="MixQuant (comfyui-native target)"),
    _mq("native-min", "comfyui-native target, smallest", "the same at the smallest feasible budget",
        ("digits",), tool="MixQuant (comfyui-native target)"),
    Peer("torchao-int8dq", "torchao", "int8 dyn. act + int8 weight", "quantize_(m, "
         "Int8DynamicActivationInt8WeightConfig())", lambda env: build_torchao(env, "int8dq")),
    Peer("torchao-int8wo", "torchao", "int8 weight-only", "quantize_(m, Int8WeightOnlyConfig())",
         lambda env: build_torchao(env, "int8wo")),
    Peer("torchao-int4wo", "torchao", "int4 weight-only", "quantize_(m, Int4WeightOnlyConfig()) (group 128; in torchao 0.18 a CUDA path "
         "(mslk / tinygemm): on a CPU its int4 route is the next row)",
         lambda env: build_torchao(env, "int4wo")),
    Peer("torchao-intx4wo", "torchao", "int4 weight-only (CPU path)", "quantize_(m, IntxWeightOnlyConfig("
         "weight_dtype=torch.int4, granularity=PerGroup(32)))", lambda env: build_torchao(env, "intx4wo")),
    Peer("quanto-w8a8", "optimum-quanto", "qint8 W + qint8 A", "quantize(m, weights=qint8, activations=qint8); "
         "with Calibration(momentum=0.9): calibration run; freeze(m)", lambda env: build_quanto(env, "qint8", "qint8")),
    Peer("quanto-w8", "optimum-quanto", "qint8 weights", "quantize(m, weights=qint8); freeze(m)",
         lambda env: build_quanto(env, "qint8", None)),
    Peer("quanto-w4", "optimum-quanto", "qint4 weights", "quantize(m, weights=qint4); freeze(m) (group 128, "
         "smaller where K needs)", lambda env: build_quanto(env, "qint4", None)),
    Peer("bnb-int8", "bitsandbytes", "LLM.int8()", "Linear8bitLt(has_fp16_weights=False, threshold=6.0) on every "
         "Linear", lambda env: build_bnb(env, "int8")),
    Peer("bnb-nf4", "bitsandbytes", "NF4", "Linear4bit(quant_type='nf4', compute_dtype=model dtype) on every Linear "
         "(blocksize 64, double quant: the library defaults)", lambda env: build_bnb(env, "nf4")),
    *[Peer(f"gguf-{t}", "GGUF", t, f"ComfyUI-GGUF's files: tools/convert.py (F16 file; 1-D and <= 1024-element tensors "
           f"F32; shapes whose last dim is not a multiple of 256 laid out as rows of 256) then llama-quantize {t} with "
           "its lcpp.patch rules for sd1/sdxl (time embedding, conv_in/out kept F16; K-quant rows % 256 -> F16); "
           "weights dequantized on every forward (numpy, gguf package) as its GGMLOps do",
           lambda env, t=t: build_gguf(env, t), ("digits", sec),
           note="latency: the gguf package's numpy decoder (ComfyUI-GGUF decodes in torch), not its speed",
           capped=False) for t, sec in GGUF_TYPES.items()],
    *[Peer(f"sdnq-{k}", "SDNQ", label, _sdnq_settings(**kw), lambda env, kw=kw: build_sdnq(env, **kw), secs)
      for k, label, kw, secs in SDNQ_CONFIGS],
    Peer("modelopt-int8", "Model Optimizer", "INT8 SmoothQuant", "its diffusers example's INT8 recipe: "
         "INT8_SMOOTHQUANT_CFG (alpha 0.8; W int8 per channel, A int8 per tensor, static), per-step percentile "
         "ranges on conv inputs (min-mean, percentile 1.0), time embeddings / conv_in / conv_out / conv_shortcut "
         "kept; calibrated on the calibration prompts; mtq.compress", lambda env: build_modelopt(env, "int8")),
    Peer("modelopt-fp8", "Model Optimizer", "FP8", "its diffusers example's FP8 recipe: the diffusers fp8 preset "
         "(E4M3 per-tensor W and A, max calibration) with attention bmm quantizers where head size % 16 == 0, the "
         "same layers kept; mtq.compress", lambda env: build_modelopt(env, "fp8")),
    Peer("scaled-mm-fp8", "torch", "fp8 _scaled_mm (GPU)", "fp8 e4m3 weights + dynamic per-tensor fp8 activations, "
         "torch._scaled_mm on every Linear", build_scaled_mm_fp8, note="needs a GPU with SM >= 8.9"),
]


def peer_versions() -> dict:
    out = {"torch": torch.__version__}
    for mod, name in (("torchao", "torchao"), ("optimum.quanto", "optimum-quanto"), ("bitsandbytes", "bitsandbytes"),
                      ("comfy_kitchen", "comfy-kitchen"), ("gguf", "gguf"), ("sdnq", "sdnq"),
                      ("modelopt.torch.quantization", "nvidia-modelopt"), ("diffusers", "diffusers")):
        try:
            from importlib.metadata import version

            out[name] = version(name)
            __import__(mod)
        except Exception as e:  # noqa: BLE001 - a peer that does not import says why
            out[name] = f"not usable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return out


def fastest_16bit(device: str = "cpu") -> tuple[torch.dtype, dict]:
    """The faster 16-bit dtype here and the probe's times (ms): on a CPU, the dtype race MixQuant's CPU plan already
    ran (kernels/cpu_routes.py); on a GPU, fp16."""
    if str(device).startswith("cuda"):
        return torch.float16, {}
    from mixquant.kernels import cpu_routes as cpu

    times = dict(cpu.plan().timings_ms.get("float_dtype", {}))
    cands = {k: v for k, v in times.items() if k != "float32"}
    return (getattr(torch, min(cands, key=cands.get)) if cands else torch.bfloat16), times


# --- timing -------------------------------------------------------------------------------------------------------

class _Abort(Exception):
    pass


@contextlib.contextmanager
def _time_cap(model: nn.Module, cap_s: float | None, clock):
    """Abort a forward that has run longer than cap_s (checked at every submodule call)."""
    if not cap_s:
        yield
        return
    t0 = clock()

    def hook(mod, args):
        if clock() - t0 > cap_s:
            raise _Abort()

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed_call(model, call, device="cpu", cap_s=None):
    """(seconds, output): CPU time of the process on CPU (wall time on GPU); seconds = inf with output None when
    the cap was hit (then seconds_capped says how long it ran)."""
    clock = time.perf_counter if str(device).startswith("cuda") else time.process_time
    _sync(device)
    t0 = clock()
    try:
        with torch.no_grad(), _time_cap(model, cap_s, clock):
            out = call(model)
        _sync(device)
    except _Abort:
        return math.inf, None, clock() - t0
    return clock() - t0, out, clock() - t0


def interleaved_ratio(fp_model, q_model, call, rounds: int, device="cpu"):
    """Median over rounds of t(q) / t(fp), the two timed one after the other (after a warm-up of each)."""
    timed_call(fp_model, call, device)
    timed_call(q_model, call, device)
    ratios, tq, tf = [], [], []
    for _ in range(rounds):
        a, _, _ = timed_call(fp_model, call, device)
        b, _, _ = timed_call(q_model, call, device)
        ratios.append(b / a)
        tq.append(b)
        tf.append(a)
    ratios.sort()
    return ratios[len(ratios) // 2], sorted(tq)[len(tq) // 2], sorted(tf)[len(tf) // 2]


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".strip()


# --- digits -------------------------------------------------------------------------------------------------------

def digits_section(args, peers, dtype16, log):
    from mixquant.app.diffusers_host.api import pipeline_with_denoiser
    from mixquant.app.diffusers_host.harness import compare_pipelines
    from mixquant.app.diffusers_host.models import load_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings

    pipe = load_pipeline("digits")
    fp_unet = pipe.unet
    sampler = SamplerSettings(steps=args.steps, guidance=args.guidance, scheduler="dpm")
    calib_prompts = [p.strip() for p in open(CALIB_PROMPTS) if p.strip()]
    ev = eval_set(args.eval_per_digit)
    seeds = list(range(1000, 1000 + args.seeds))
    fp16 = fp16_bytes(fp_unet)

    def calibrate_run(model):  # quanto's Calibration: the sampler on the calibration prompts, this model as UNet
        q = pipeline_with_denoiser(pipe, model)
        PipelineRunner(q, sampler).sample(calib_prompts, list(range(len(calib_prompts))))

    env = Env("digits", fp_unet, calibrate_run, calib_steps=sampler.steps, dtype16=dtype16)
    wanted = {p.key for p in peers}
    t0 = time.time()
    if any(k.startswith("mixquant-") for k in wanted) or not args.no_match:  # (the match rows are MixQuant's too)
        env.mixquant = mixquant_digits(pipe, sampler, calib_prompts, fp16, wanted, args.cache_dir, log)
    mq_seconds = time.time() - t0

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 24, fp_unet.config.cross_attention_dim, generator=g)

    def call(m):
        return m(x, torch.tensor(500.0), encoder_hidden_states=ctx).sample

    rows = []
    start = getattr(args, "content_seed_start", 1000)
    content_seeds = list(range(start, start + args.content_seeds)) if args.content_seeds else None
    fp_content = {}

    def run_row(p):
        with _row_run("digits", p, rows, log, args.verbose) as row:
            q = _build_and_measure(p, env, row, fp16)
            if p.key.startswith("mixquant-"):
                row["deploy_bytes_engine"] = _engine_deploy_bytes(q)
            res = compare_pipelines(pipe, pipeline_with_denoiser(pipe, q), ev, seeds, steps=sampler.steps,
                                    guidance=sampler.guidance, scheduler=sampler.scheduler)
            row.update({k: res[k] for k in ("sqnr_db", "psnr_db", "ssim", "ssim_large_window", "content_accuracy",
                                            "content_accuracy_fp", "content_confidence", "content_confidence_fp")})
            row["content_hits"] = hits_str(res["content_hits"])
            if content_seeds:  # content on more images: the sampler only (no teacher forcing), FP images once
                if not fp_content:
                    fp_content.update(content_pass(pipe, ev, content_seeds, sampler))
                c = fp_content if p.key == "fp32" else content_pass(pipeline_with_denoiser(pipe, q), ev,
                                                                          content_seeds, sampler)
                row.update(content_accuracy=c["accuracy"], content_confidence=c["confidence"],
                           content_accuracy_fp=fp_content["accuracy"],
                           content_confidence_fp=fp_content["confidence"], content_hits=c["hits"])
            row["latency_ratio"], row["latency_s"], row["latency_fp_s"] = interleaved_ratio(
                fp_unet, q, call, args.digits_rounds)
            row["status"] = "ok"

    for p in peers:
        if "digits" in p.sections:
            run_row(p)
    # equal bytes exactly: MixQuant's mixed plans at the size of each peer below 0.45x (one per 2% of size; the
    # budget rows cover the larger sizes)
    match = env.mixquant.get("_match")
    if match is not None and not args.no_match:
        done = []
        for r in list(rows):
            size = r.get("x_fp16")
            if r.get("status") != "ok" or r["tool"].startswith("MixQuant") or r["tool"] == "torch" or size is None \
                    or size >= 0.45 or any(abs(d - size) <= 0.02 * size for d in done):
                continue
            done.append(size)
            for a_bits, what in ((8, "A8"), (16, "W-only")):
                run_row(Peer(f"mixquant-match-{r['key']}-a{a_bits}", "MixQuant",
                             f"mixed {what} at {r['label']}'s size", f"MILP at budget_mb = the {r['tool']} "
                             f"{r['label']} bytes ({size:.3f}x FP16), a_bits={a_bits}",
                             lambda env, size=size, a=a_bits: match(size, a), ("digits",)))
    meta = {"fp16_bytes": fp16, "n_images": len(ev) * len(seeds), "seeds": seeds, "steps": sampler.steps,
            "content_images": len(ev) * len(content_seeds or seeds), "content_seeds": content_seeds or seeds,
            "content_hits_fp": fp_content.get("hits"),
            "guidance": sampler.guidance,
            "calibration_prompts": len(calib_prompts), "mixquant_seconds": mq_seconds,
            "params": sum(t.numel() for t in fp_unet.parameters())}
    return rows, meta


def hits_str(hits) -> str:
    """Per-image content hits as one short string for the JSON: 1 right, 0 wrong, - no digit named."""
    return "".join("-" if h is None else "1" if h else "0" for h in hits)


def hits_list(text: str | None):
    return None if text is None else [None if c == "-" else c == "1" for c in text]


@torch.no_grad()
def content_pass(pipe, prompts, seeds, sampler, batch: int = 64) -> dict:
    """The digit classifier on the pipeline's own images for every prompt x seed (prompt-major, as
    compare_pipelines orders them): accuracy, confidence and the per-image hits string."""
    from mixquant.app.digits import content_confidence, content_hits, digits_classifier, hit_rate
    from mixquant.app.diffusers_host.models import set_scheduler

    set_scheduler(pipe, sampler.scheduler)
    clf = digits_classifier()
    items = [(p, s) for p in prompts for s in seeds]
    hits, conf = [], 0.0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        ps = [p for p, _ in chunk]
        images = pipe(ps, generator=[torch.Generator("cpu").manual_seed(s) for _, s in chunk],
                      num_inference_steps=sampler.steps, guidance_scale=sampler.guidance, output_type="pt").images
        chunk_hits = content_hits(images, ps, clf)
        hits += chunk_hits
        n = sum(h is not None for h in chunk_hits)
        if n:
            conf += content_confidence(images, ps, clf) * n
    n = sum(h is not None for h in hits)
    return {"accuracy": hit_rate(hits), "confidence": conf / n if n else math.nan, "hits": hits_str(hits)}


def paired_rows(rows, budgets=BUDGETS, tol=BUDGET_TOL) -> list[tuple]:
    """(MixQuant row, peer row, paired_content) for each MixQuant row made at a peer's exact size (vs that peer) and
    for the best MixQuant config against each other tool's best at each budget, where both have per-image hits."""
    from mixquant.app.digits import paired_content

    ok = {r["key"]: r for r in rows if r.get("status") == "ok" and r.get("content_hits")}
    pairs, seen = [], set()
    for r in ok.values():
        if r["key"].startswith("mixquant-match-"):
            peer = r["key"][len("mixquant-match-"):].rsplit("-a", 1)[0]
            if peer in ok:
                pairs.append((r, ok[peer]))
    best = best_at_budgets([r for r in rows if r["key"] in ok], budgets, tol)
    for b in budgets:
        mq = best[b].get("MixQuant")
        for tool, other in best[b].items():
            if mq is not None and other is not None and tool not in ("MixQuant", "torch") \
                    and not tool.startswith("MixQuant"):
                pairs.append((mq, other))
    out = []
    for a, b in pairs:
        if (a["key"], b["key"]) in seen or len(a["content_hits"]) != len(b["content_hits"]):
            continue
        seen.add((a["key"], b["key"]))
        out.append((a, b, paired_content(hits_list(a["content_hits"]), hits_list(b["content_hits"]))))
    return out


@contextlib.contextmanager
def _row_run(section: str, p: Peer, rows: list, log, verbose: bool):
    """The row of peer `p`: filled by the block; a peer that fails gets a row that says why (never a crash); then
    timed, logged and appended to `rows`."""
    row = {"section": section, "key": p.key, "tool": p.tool, "label": p.label, "settings": p.settings,
           "note": p.note}
    t1 = time.time()
    try:
        yield row
    except Exception as e:  # noqa: BLE001 - a peer that cannot run gets a row that says why
        row.update(status="failed", reason=_reason(e))
        if verbose:
            traceback.print_exc()
    row["seconds"] = time.time() - t1
    log(_row_line(row))
    rows.append(row)
    gc.collect()


def _build_and_measure(p: Peer, env: Env, row: dict, fp16: int) -> nn.Module:
    """Build the peer's model and record its build time, measured bytes and layer coverage in `row`."""
    t1 = time.time()
    q = p.build(env)
    row["build_s"] = time.time() - t1
    row["bytes"] = fp16 * 2 if p.key == "fp32" else measured_bytes(q)
    row["bytes_as_run"] = measured_bytes(q, None)
    row["x_fp16"] = row["bytes"] / fp16
    row["coverage"] = coverage(env.fp_model, q)
    if p.key.startswith("mixquant-"):
        row["note"] = (row["note"] + "; " if row["note"] else "") + getattr(q, "_peers_note", "")
    return q


def _engine_deploy_bytes(model) -> int | None:
    try:
        from mixquant.quant.engine import deploy_bytes

        return deploy_bytes(model)
    except Exception:  # noqa: BLE001
        return None


TWO_BIT_NOTE = "quality layers may take 2 bits (MixDQ's {4, 8} menu cannot reach this size)"


def plan_within(run, budget: dict, kw: dict, prepared):
    """MixQuant's mixed plan at `budget` ({"budget_mb": MB} or {"avg_w_bits": bits}) -> (model, report, note).
    `run(cfg_kw, prepared)` is the section's engine.run -> (model, report); a byte budget is re-solved lower by any
    overshoot of the measured bytes (the deployed layers also hold activation ranges / BOS vectors the allocation
    does not count); below the reach of MixDQ's {4, 8} menu quality layers may take 2 bits too. `prepared(w2)`: the
    calibration + sensitivity for the menu without / with 2-bit quality layers."""
    from mixquant.quant.errors import MixQuantError

    def solve(cfg_kw, prep):
        q, rep = run(cfg_kw, prep)
        target = budget.get("budget_mb")
        for _ in range(2):
            over = measured_bytes(q) - target * 1e6 if target is not None else 0
            if over <= 0:
                break
            cfg_kw = {**cfg_kw, "budget_mb": cfg_kw["budget_mb"] - (over + 64) / 1e6}
            q, rep = run(cfg_kw, prep)
        return q, rep

    try:
        return (*solve({**budget, **kw}, prepared(False)), "")
    except MixQuantError as e:
        try:
            return (*solve({**budget, **kw, "w_bits_quality": (2, 4, 8)}, prepared(True)), TWO_BIT_NOTE)
        except MixQuantError as e2:
            raise MixQuantError(f"{e} / with 2-bit quality layers: {e2}") from None


def mixquant_digits(pipe, sampler, prompts, fp16, wanted, cache_dir, log) -> dict:
    """Every MixQuant config of the digits section, on one calibration + cached sensitivities."""
    from mixquant.app.diffusers_host.runner import PipelineRunner
    from mixquant.quant import engine
    from mixquant.quant.apply import quantize_model, uniform_plan
    from mixquant.quant.errors import MixQuantError
    from mixquant.quant.formats import LayerFormat
    from mixquant.quant.roles import discover_layers

    runner = PipelineRunner(pipe, sampler)
    seeds = list(range(len(prompts)))
    out = {}

    def tag(model, note):
        model._peers_note = note
        return model

    def run(cfg_kw, prepared):
        q, rep, _ = engine.run(runner, prompts, engine.QuantizeConfig(**cfg_kw), seeds, prepared=prepared)
        return q, rep

    base = dict(a_bits=8, cache_dir=cache_dir)
    t = time.time()
    prep = engine.prepare(runner, prompts, engine.QuantizeConfig(avg_w_bits=4, **base), seeds)
    log(f"  MixQuant digits: calibration + sensitivity {time.time() - t:.0f} s")
    layers = discover_layers(pipe.unet)
    ranges, bos = prep.calib.ranges(), prep.calib.bos()
    for key, fmt in (("w8a8", LayerFormat(8, 8)), ("w4a16", LayerFormat(4, 16, 64))):
        if f"mixquant-{key}" in wanted:
            q, _ = quantize_model(pipe.unet, uniform_plan(layers, fmt), ranges, bos=bos)
            out[key] = tag(q, "")
    wide, base16, prep16 = {}, dict(a_bits=16, cache_dir=cache_dir), None
    jobs = [("avgw4", dict(avg_w_bits=4), base, prep)] + \
        [(f"b{b}", dict(budget_mb=b * fp16 / 1e6), base, prep) for b in PLAN_BUDGETS]
    if any(f"mixquant-wb{b}" in wanted for b in PLAN_BUDGETS):
        t = time.time()
        prep16 = engine.prepare(runner, prompts, engine.QuantizeConfig(avg_w_bits=4, **base16), seeds)
        log(f"  MixQuant digits: weight-only sensitivity {time.time() - t:.0f} s")
        jobs += [(f"wb{b}", dict(budget_mb=b * fp16 / 1e6), base16, prep16) for b in PLAN_BUDGETS]
    for key, (frac, extra, _label, _settings) in EXPERIMENTS.items():  # other menus at one budget
        if f"mixquant-{key}" in wanted:
            kw = dict(cache_dir=cache_dir, **extra)
            jobs.append((key, dict(budget_mb=frac * fp16 / 1e6), kw,
                         engine.prepare(runner, prompts, engine.QuantizeConfig(avg_w_bits=4, **kw), seeds)))

    def fit(budget, kw, prepared):
        """The mixed plan at `budget`, tagged (plan_within; the 2-bit menu's sensitivity made once per settings)."""
        def prepared_for(w2):
            key = tuple(sorted(kw.items()))
            if w2 and key not in wide:
                t = time.time()
                wide[key] = engine.prepare(runner, prompts, engine.QuantizeConfig(
                    **budget, **kw, w_bits_quality=(2, 4, 8)), seeds)
                log(f"  MixQuant digits: sensitivity with 2-bit quality layers {time.time() - t:.0f} s")
            return wide[key] if w2 else prepared

        q, rep, note = plan_within(run, budget, kw, prepared_for)
        return tag(q, f"avg W {rep['avg_w_bits']:.2f} bits, avg A {rep['avg_a_bits']:.2f} bits, "
                      f"{rep.get('weight_search', 'mse')} weight ranges" + (f"; {note}" if note else ""))

    for key, budget, kw, prepared in jobs:
        if f"mixquant-{key}" in wanted:
            try:
                out[key] = fit(budget, kw, prepared)
            except MixQuantError as e:
                out[key] = e
    if {"mixquant-native", "mixquant-native-min"} & wanted:
        cfg_n = dict(a_bits=8, cache_dir=cache_dir, target="comfyui-native")
        t = time.time()
        prep_n = engine.prepare(runner, prompts, engine.QuantizeConfig(avg_w_bits=8, **cfg_n), seeds)
        log(f"  MixQuant digits: comfyui-native sensitivity {time.time() - t:.0f} s")
        for key, frac in (("native", 0.75), ("native-min", None)):
            if f"mixquant-{key}" not in wanted:
                continue
            mb = (frac or 0.01) * fp16 / 1e6
            try:
                q, rep, _ = engine.run(runner, prompts, engine.QuantizeConfig(budget_mb=mb, **cfg_n), seeds,
                                       prepared=prep_n)
            except MixQuantError as e:
                smallest = _smallest_mb(str(e))
                if frac is not None or smallest is None:
                    out[key] = e
                    continue
                q, rep, _ = engine.run(runner, prompts, engine.QuantizeConfig(budget_mb=smallest, **cfg_n), seeds,
                                       prepared=prep_n)
                frac = smallest * 1e6 / fp16
            out[key] = tag(q, f"budget {frac:.2f} x FP16; avg W {rep['avg_w_bits']:.2f} bits")
    prepared_by_bits = {8: prep, 16: prep16}

    def match(frac, a_bits):
        kw = base if a_bits == 8 else base16
        if prepared_by_bits[a_bits] is None:
            prepared_by_bits[a_bits] = engine.prepare(runner, prompts, engine.QuantizeConfig(avg_w_bits=4, **kw),
                                                      seeds)
        return fit(dict(budget_mb=frac * fp16 / 1e6), kw, prepared_by_bits[a_bits])

    out["_match"] = match
    return out


def _smallest_mb(msg: str) -> float | None:
    import re

    m = re.search(r"smallest feasible budget for this model and target is ([0-9.]+) MB", msg)
    return float(m.group(1)) if m else None


# --- SD1.5-architecture UNet --------------------------------------------------------------------------------------

def sd15_section(args, peers, dtype16, log):
    device = args.device
    unet = sd15_unet(torch.float32, device)
    fp16 = fp16_bytes(unet)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 4, 32, 32, generator=g).to(device)
    ctx = torch.randn(2, 77, 768, generator=g).to(device)
    t = torch.tensor(500.0, device=device)

    def call(m):
        return m(x, t, encoder_hidden_states=ctx).sample

    gc_ = torch.Generator().manual_seed(99)  # calibration inputs: other latents, contexts and timesteps
    calib_in = [(torch.randn(2, 4, 32, 32, generator=gc_).to(device), torch.tensor(ts, device=device),
                 torch.randn(2, 77, 768, generator=gc_).to(device)) for ts in (args.sd15_calib_t or [300.0])]

    def calibrate_run(model):
        for xi, ti, ci in calib_in:
            model(xi, ti, encoder_hidden_states=ci)

    env = Env("sd15", unet, calibrate_run, calib_steps=len(calib_in), device=device, dtype16=dtype16)
    peers = [p for p in peers if "sd15" in p.sections or (args.full and "sd15-full" in p.sections)]
    wanted = {p.key for p in peers}
    tm = time.time()
    if any(k.startswith("mixquant-") for k in wanted):
        env.mixquant = LazyMixQuantSD15(unet, wanted, args, log)
    log("  SD1.5: FP32 reference forward ...")
    timed_call(unet, call, device)  # warm-up
    t_fp, y_fp, _ = timed_call(unet, call, device)
    fp_times = [t_fp]
    xs, ctxs = x[:1, :, :8, :8].contiguous(), ctx[:1]

    def tiny(m):  # a small call that runs every layer once (lazy initialisation, allocator)
        return m(xs, t, encoder_hidden_states=ctxs).sample

    rows = []
    for p in peers:
        with _row_run("sd15", p, rows, log, args.verbose) as row:
            q = _build_and_measure(p, env, row, fp16)
            if p.key.startswith("mixquant-"):
                # MixQuant races its CPU routes per layer shape on the first call: warm up at the real shape
                row["warmup_s"], _, _ = timed_call(q, call, device)
            else:
                timed_call(q, tiny, device)
            cap = (None if args.full_16bit else args.cap_16bit * t_fp) if p.key == "fp16" else \
                args.cap * t_fp if p.capped else None
            tq, y, ran = timed_call(q, call, device, cap)
            tf, _, _ = timed_call(unet, call, device)
            fp_times.append(tf)
            fp_ref = (fp_times[-2] + tf) / 2
            if y is None:
                row.update(status="capped", latency_s=math.inf, latency_lower_bound_s=ran,
                           latency_ratio_lower_bound=ran / fp_ref,
                           reason=f"forward stopped after {ran:.0f} s CPU (> {ran / fp_ref:.1f}x FP32), so no SQNR")
            else:
                row.update(status="ok", sqnr_db=_sqnr(y_fp, y), latency_s=tq, latency_fp_s=fp_ref,
                           latency_ratio=tq / fp_ref)
                if p.key.startswith("mixquant-"):
                    row["kernel_cache_bytes"] = _kernel_cache_bytes(q)
            del q, y  # free the quantized model before the next one is built (the row's gc.collect runs next)
    meta = {"fp16_bytes": fp16, "params": sum(t.numel() for t in unet.parameters()), "fp32_forward_s": fp_times,
            "mixquant_seconds": getattr(env.mixquant, "seconds", {}),
            "section_s": time.time() - tm}
    return rows, meta


def _sqnr(ref, y) -> float:
    ref, y = ref.double(), y.double()
    n = float(((y - ref) ** 2).sum())
    return math.inf if n == 0 else 10 * math.log10(float((ref ** 2).sum()) / n)


def _kernel_cache_bytes(model) -> int:
    try:
        from mixquant.kernels.cache import cache_bytes

        return sum(cache_bytes(m._kernel_cache) for m in model.modules() if hasattr(m, "_kernel_cache"))
    except Exception:  # noqa: BLE001
        return 0


class LazyMixQuantSD15(dict):
    """MixQuant's SD1.5 configs, built when first asked for. Uniform plans need only the calibration (activation
    ranges); the mixed plan and the comfyui-native target also need the `local` sensitivity (cached on disk under
    --cache-dir, so a second run skips it; the quantizer's MSE range search for 4-bit weights still runs)."""

    def __init__(self, unet, wanted, args, log):
        super().__init__()
        self.unet, self.wanted, self.args, self.log = unet, wanted, args, log
        self.runner = LatentRunner(unet, steps=args.sd15_calib_steps)
        self.prompts, self.seeds = ["a", "b"], [0, 1]
        self.prep, self.calib = {}, None
        self.seconds = {}

    def _cfg(self, **kw):
        from mixquant.quant import engine

        return engine.QuantizeConfig(**{"a_bits": 8, "coupling": (0.5,), "cache_dir": self.args.cache_dir, **kw})

    def _prepared(self, target="mixquant", a_bits=8, w2=False, **extra):
        from mixquant.quant import engine

        key = f"{target} a{a_bits}" + (" w2" if w2 else "") + "".join(f" {k}={v}" for k, v in sorted(extra.items()))
        if key not in self.prep:
            t = time.time()
            kw = {**extra, **({"w_bits_quality": (2, 4, 8)} if w2 else {})}
            self.prep[key] = engine.prepare(self.runner, self.prompts,
                                            self._cfg(avg_w_bits=4, target=target, a_bits=a_bits, **kw), self.seeds)
            self.seconds[f"prepare {key}"] = time.time() - t
            self.log(f"  MixQuant SD1.5: calibration + sensitivity ({key}) {time.time() - t:.0f} s")
        return self.prep[key]

    def _at_budget(self, frac, a_bits, **extra):
        """The mixed plan at `frac` x FP16 bytes (plan_within)."""
        from mixquant.quant import engine

        def run(cfg_kw, prepared):
            q, rep, _ = engine.run(self.runner, self.prompts, self._cfg(**cfg_kw), self.seeds, prepared=prepared)
            return q, rep

        q, rep, note = plan_within(run, {"budget_mb": frac * fp16_bytes(self.unet) / 1e6}, dict(a_bits=a_bits, **extra),
                                   lambda w2: self._prepared(a_bits=a_bits, w2=w2, **extra))
        q._peers_note = f"avg W {rep['avg_w_bits']:.2f}, A {rep['avg_a_bits']:.2f} bits" + (f"; {note}" if note else "")
        return q

    def _calibration(self):
        from mixquant.quant.calibration import calibrate

        if "mixquant a8" in self.prep:
            return self.prep["mixquant a8"].calib
        if self.calib is None:
            t = time.time()
            with torch.no_grad():
                self.calib = calibrate(self.runner, self.prompts, self.seeds)
            self.seconds["calibrate"] = time.time() - t
            self.log(f"  MixQuant SD1.5: calibration {time.time() - t:.0f} s")
        return self.calib

    def __contains__(self, key):
        return f"mixquant-{key}" in self.wanted

    def __getitem__(self, key):
        from mixquant.quant import engine
        from mixquant.quant.apply import quantize_model, uniform_plan
        from mixquant.quant.errors import MixQuantError
        from mixquant.quant.formats import LayerFormat
        from mixquant.quant.roles import discover_layers

        t = time.time()
        try:
            with torch.no_grad():
                if key in ("w8a8", "w4a16"):
                    calib = self._calibration()
                    fmt = LayerFormat(8, 8) if key == "w8a8" else LayerFormat(4, 16, 64)
                    q, _ = quantize_model(self.unet, uniform_plan(discover_layers(self.unet), fmt), calib.ranges(),
                                          bos=calib.bos())
                    q._peers_note = ""
                elif key == "avgw4":
                    q, rep, _ = engine.run(self.runner, self.prompts, self._cfg(avg_w_bits=4), self.seeds,
                                           prepared=self._prepared())
                    q._peers_note = f"avg W {rep['avg_w_bits']:.2f}, A {rep['avg_a_bits']:.2f} bits"
                elif key in EXPERIMENTS:
                    frac, extra = EXPERIMENTS[key][:2]
                    extra = dict(extra)
                    q = self._at_budget(frac, extra.pop("a_bits"), **extra)
                elif key.startswith(("b", "wb")):
                    q = self._at_budget(float(key.lstrip("wb")), 16 if key.startswith("wb") else 8)
                elif key == "native":
                    prep, fp16 = self._prepared("comfyui-native"), fp16_bytes(self.unet)
                    frac = 0.75
                    try:
                        q, rep, _ = engine.run(self.runner, self.prompts, self._cfg(
                            budget_mb=frac * fp16 / 1e6, target="comfyui-native"), self.seeds, prepared=prep)
                    except MixQuantError as e:
                        mb = _smallest_mb(str(e))
                        if mb is None:
                            raise
                        frac = mb * 1e6 / fp16
                        q, rep, _ = engine.run(self.runner, self.prompts, self._cfg(
                            budget_mb=mb, target="comfyui-native"), self.seeds, prepared=prep)
                    q._peers_note = f"budget {frac:.2f} x FP16 (the smallest this target reaches: 0.75 x was " \
                                    f"asked); avg W {rep['avg_w_bits']:.2f} bits" if frac != 0.75 else \
                                    f"budget 0.75 x FP16; avg W {rep['avg_w_bits']:.2f} bits"
                else:
                    raise KeyError(key)
        finally:
            self.seconds[key] = time.time() - t
        return q


# --- report -------------------------------------------------------------------------------------------------------

def _row_line(r) -> str:
    if r.get("status") == "failed":
        return f"  {r['key']:<22} FAILED {r.get('reason', '')[:150]}"
    parts = [f"  {r['key']:<22} {r.get('x_fp16', 0):.3f}x FP16"]
    for k, f in (("sqnr_db", "SQNR {:.1f} dB"), ("ssim", "SSIM {:.3f}"), ("content_accuracy", "acc {:.2f}"),
                 ("content_confidence", "conf {:.3f}"),
                 ("latency_ratio", "lat {:.2f}x")):
        if isinstance(r.get(k), (int, float)):
            parts.append(f.format(r[k]))
    if r.get("status") == "capped":
        parts.append(r["reason"])
    parts.append(f"({r.get('seconds', 0):.0f} s)")
    return " ".join(parts)


def _rank_content(r):
    """digits: content accuracy, then content confidence, then SSIM."""
    return (r.get("content_accuracy") or 0.0, round(r.get("content_confidence") or 0.0, 3), r["ssim"])


def _rank_sqnr(r):
    """SD1.5 (one forward, random weights): denoiser-output SQNR."""
    return r["sqnr_db"]


def _has(r, metric):
    v = r.get(metric)
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def best_at_budgets(rows, budgets=BUDGETS, tol=BUDGET_TOL, section="digits"):
    """{budget: {tool: best row at <= budget*(1+tol) x FP16, or None}}; best on digits = content accuracy, then
    content confidence, then SSIM; on SD1.5 = SQNR."""
    need, rank = ("ssim", _rank_content) if section == "digits" else ("sqnr_db", _rank_sqnr)
    out = {}
    for b in budgets:
        out[b] = {}
        for tool in TOOLS:
            cands = [r for r in rows if r["tool"] == tool and r.get("status") == "ok" and r.get("x_fp16") is not None
                     and r["x_fp16"] <= b * (1 + tol) and _has(r, need)]
            out[b][tool] = max(cands, key=rank) if cands else None
    return out


def _ours(tool: str) -> bool:
    return tool.startswith("MixQuant")


def standing(rows, budgets=BUDGETS, tol=BUDGET_TOL, metrics=("ssim", "sqnr_db")) -> list[dict]:
    """At each budget, for each peer tool with a config within it: MixQuant's best value of each metric over its
    configs within the budget (either target) against the peer's best, and whether MixQuant is at least the peer on
    every metric. Rows are compared only where both sides have the metric."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("x_fp16") is not None and r["tool"] != "torch"]
    out = []
    for b in budgets:
        within = [r for r in ok if r["x_fp16"] <= b * (1 + tol)]
        ours = [r for r in within if _ours(r["tool"])]
        for tool in TOOLS:
            if tool == "torch" or _ours(tool):
                continue
            theirs = [r for r in within if r["tool"] == tool]
            if not theirs or not ours:
                continue
            entry = {"budget": b, "tool": tool, "metrics": {}}
            for m in metrics:
                a = [r for r in ours if _has(r, m)]
                p = [r for r in theirs if _has(r, m)]
                if a and p:
                    ra, rp = max(a, key=lambda r: r[m]), max(p, key=lambda r: r[m])
                    entry["metrics"][m] = (ra, rp)
            if entry["metrics"]:
                entry["at_least"] = all(ra[m] >= rp[m] for m, (ra, rp) in entry["metrics"].items())
                out.append(entry)
    return out


_METRIC = {"ssim": ("SSIM", 3), "sqnr_db": ("SQNR dB", 1)}


def standing_table(rows, metrics=("ssim", "sqnr_db")) -> list[str]:
    """Markdown lines of `standing`: per budget and peer, MixQuant's best vs the peer's best of each metric."""
    st = standing(rows, metrics=metrics)
    if not st:
        return []
    head = " | ".join(f"{_METRIC[m][0]}: MixQuant / peer" for m in metrics)
    L = ["| budget (x FP16) | peer | " + head + " | MixQuant at least the peer |",
         "|---|---|" + "---|" * len(metrics) + "---|"]
    for e in st:
        cells = []
        for m in metrics:
            if m not in e["metrics"]:
                cells.append("—")
                continue
            ra, rp = e["metrics"][m]
            d = _METRIC[m][1]
            cells.append(f"{ra[m]:.{d}f} ({ra['label']}, {ra['x_fp16']:.2f}x) / {rp[m]:.{d}f} ({rp['label']}, "
                         f"{rp['x_fp16']:.2f}x)")
        L.append(f"| {e['budget']} | {e['tool']} | " + " | ".join(cells) + " | "
                 + ("yes" if e["at_least"] else "**no**") + " |")
    return L


def budget_table(rows, section="digits") -> list[str]:
    """Markdown lines: the best config of each tool at each budget of BUDGETS (best_at_budgets), with its content
    accuracy, confidence and SSIM (digits) or its SQNR (SD1.5)."""
    if section == "digits":
        intro = ("Best config of each tool whose bytes are at most the budget (+{tol}%), ranked by content accuracy, "
                 "then content confidence (the digit classifier's mean probability of the prompted digit: finer than "
                 "accuracy, which saturates near FP's on this model), then SSIM.")
    else:
        intro = "Best config of each tool whose bytes are at most the budget (+{tol}%), by denoiser-output SQNR."
    L = [intro.format(tol=int(BUDGET_TOL * 100)) + " `—`: the tool has no config that small (its smallest is given).",
         "", "| budget (x FP16) | " + " | ".join(TOOLS[1:]) + " |", "|---|" + "---|" * (len(TOOLS) - 1)]
    best = best_at_budgets(rows, section=section)
    for b in BUDGETS:
        cells = []
        for tool in TOOLS[1:]:
            r = best[b][tool]
            if r is None:
                s = smallest(rows, tool)
                cells.append("—" + (f" (smallest {s:.2f}x)" if s else " (no run)"))
            elif section == "digits":
                conf = f", conf {_f(r['content_confidence'])}" if r.get("content_confidence") is not None else ""
                cells.append(f"{r['label']} ({r['x_fp16']:.2f}x): acc {_f(r['content_accuracy'], 4)}{conf}, "
                             f"SSIM {_f(r['ssim'])}")
            else:
                cells.append(f"{r['label']} ({r['x_fp16']:.2f}x): {_f(r['sqnr_db'], 1)} dB")
        L.append(f"| {b} | " + " | ".join(cells) + " |")
    return L


def smallest(rows, tool):
    xs = [r["x_fp16"] for r in rows if r["tool"] == tool and r.get("status") == "ok" and r.get("x_fp16")]
    return min(xs) if xs else None


def _f(v, d=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        return f"{v:.{d}f}"
    return str(v)


def _cov(r):
    c = r.get("coverage")
    if not c:
        return "—"
    return f"{c['linear'][0]}/{c['linear'][1]} lin, {c['conv2d'][0]}/{c['conv2d'][1]} conv"


def _jsonable(o):
    from mixquant.quant.util import json_safe

    return json_safe(o)


def markdown(result, plot_name: str = "peers_quality_vs_bytes.png") -> str:
    L = ["# MixQuant vs what users would pick instead", ""]
    env = result["env"]
    L += [f"Measured with `python bench/peers.py` on {env['cpu']}, {env['threads']} thread(s), device {env['device']}."
          f" Versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}. Total run {env['seconds'] / 60:.1f} "
          "min." + (f" Sections from separate runs ({'; '.join(env['runs'])})." if env.get("runs") else ""), "",
          "Bytes: measured tensor storage of the denoiser (subclass tensors opened with `__tensor_flatten__`, "
          "bitsandbytes quant states included); float parts counted at 2 B/element as a 16-bit deployment holds them "
          "(the FP32 row at 4 B), the same rule for every row. Latency: CPU time of one denoiser forward, quantized "
          "and FP32 run alternately in one process, ratio > 1 = slower than FP32. `lin`/`conv`: layers whose weight "
          "is stored quantized (or fp8) out of all Linear / Conv2d layers.", ""]
    d = result.get("digits")
    if d:
        m = d["meta"]
        L += ["## Quality at equal bytes (digits)", ""] + budget_table(d["rows"])
        st = standing_table(d["rows"])
        if st:
            L += ["", "### MixQuant against each peer at each budget", "",
                  "MixQuant's best SSIM and best denoiser SQNR over its configs within the budget (either target) "
                  "against the peer's best within the same budget (each metric's best config may differ).", ""] + st
        pairs = paired_rows(d["rows"])
        if pairs:
            n_c = m.get("content_images", m["n_images"])
            L += ["", f"### Content, image by image ({n_c} images: every row drew the same prompts with the same seeds)",
                  "", "Images only MixQuant draws right vs only the peer: the images both get right (or both wrong) "
                  "cancel out, so this separates two configs whose accuracies differ by a few images. p: exact "
                  "two-sided binomial (McNemar) test of that split; below 0.05 the difference is unlikely to be "
                  "chance on these prompts and seeds.", "",
                  "| MixQuant | peer | only MixQuant right | only peer right | p |", "|---|---|---|---|---|"]
            for a, b, pc in pairs:
                L.append(f"| {a['label']} ({a['x_fp16']:.3f}x) | {b['tool']} {b['label']} ({b['x_fp16']:.3f}x) | "
                         f"{pc['only_a']} | {pc['only_b']} | {pc['p_value']:.3g} |")
        L += ["", f"## digits: every config ({m['n_images']} images: held-out prompts x seeds {m['seeds']}, "
                  f"DPM-Solver++ {m['steps']} steps, guidance {m.get('guidance', 4.0):g}; FP16 bytes "
                  f"{m['fp16_bytes']:,})", ""]
        if m.get("content_images", m["n_images"]) != m["n_images"]:
            L += [f"Content columns: {m['content_images']} images (the same prompts x seeds {m['content_seeds'][0]}-"
                  f"{m['content_seeds'][-1]}, each config's own images, no teacher forcing); the other columns: the "
                  f"{m['n_images']} images above.", ""]
        L += ["| tool | config | bytes | x FP16 | quantized layers | SQNR dB | PSNR dB | SSIM | content acc (FP) | "
              "content conf (FP) | latency vs FP32 | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            L.append(_md_row(r, digits=True))
        L += ["", f"![quality vs bytes]({plot_name})", ""]
    s = result.get("sd15")
    if s:
        m = s["meta"]
        fp = m["fp32_forward_s"]
        gpu = env.get("device", "cpu") not in ("cpu", None)  # (a GPU's forwards take milliseconds)
        unit, scale, where = ("ms", 1e3, "GPU") if gpu else ("s", 1.0, "CPU")
        L += [f"## SD1.5-architecture UNet: speed, memory, SQNR ({m['params'] / 1e6:.1f} M parameters, random "
              f"weights; 32x32 latents, batch 2; FP32 forward {min(fp) * scale:.1f}-{max(fp) * scale:.1f} {unit} "
              f"{where} over the run)", "",
              f"| tool | config | bytes | x FP16 | quantized layers | SQNR dB vs FP32 | forward {unit} ({where}) | "
              "latency vs FP32 | quantize s (wall) | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            L.append(_md_row(r, digits=False, time_scale=scale))
        L += ["", "### Quality at equal bytes (SD1.5-architecture UNet)", ""] + budget_table(s["rows"], "sd15")
        st = standing_table(s["rows"], metrics=("sqnr_db",))
        if st:
            L += ["", "MixQuant's best SQNR within each budget against each peer's best:", ""] + st
        L.append("")
    return "\n".join(L) + "\n"


def _md_row(r, digits, time_scale: float = 1.0):
    note = r.get("note") or ""
    if r.get("status") == "failed":
        cells = [r["tool"], r["label"]] + ["—"] * (9 if digits else 7) + [f"**could not run**: {r.get('reason', '')}"]
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"
    if r.get("kernel_cache_bytes"):
        note = (note + "; " if note else "") + f"+{r['kernel_cache_bytes'] / 1e6:.0f} MB prepacked int8 at run time"
    if r.get("status") == "capped":
        note = (note + "; " if note else "") + r["reason"]
    lat = "—"
    if isinstance(r.get("latency_ratio"), float):
        lat = f"{r['latency_ratio']:.2f}x"
    elif r.get("latency_ratio_lower_bound"):
        lat = f"> {r['latency_ratio_lower_bound']:.0f}x"
    cells = [r["tool"], r["label"], f"{r.get('bytes', 0):,}", _f(r.get("x_fp16")), _cov(r), _f(r.get("sqnr_db"), 1)]
    if digits:
        acc = "—" if r.get("content_accuracy") is None else \
            f"{r['content_accuracy']:.4f} ({r['content_accuracy_fp']:.4f})"
        conf = "—" if r.get("content_confidence") is None else \
            f"{r['content_confidence']:.3f} ({r['content_confidence_fp']:.3f})"
        cells += [_f(r.get("psnr_db"), 1), _f(r.get("ssim")), acc, conf, lat]
    else:
        lat_s = r.get("latency_s")
        cells += [_f(lat_s * time_scale if isinstance(lat_s, float) else lat_s, 2), lat, _f(r.get("build_s"), 0)]
    cells.append(note)
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


STYLE = {"torch": ("k", "*"), "ComfyUI": ("tab:orange", "s"), "MixQuant": ("tab:blue", "o"),
         "MixQuant (comfyui-native target)": ("tab:cyan", "D"), "torchao": ("tab:red", "^"),
         "optimum-quanto": ("tab:green", "v"), "bitsandbytes": ("tab:purple", "P"), "GGUF": ("tab:brown", "X"),
         "SDNQ": ("tab:olive", "h"), "Model Optimizer": ("tab:gray", "<")}


def frontier(points):
    """The (bytes, quality) points no smaller-or-equal point beats: the best quality a tool offers up to each size."""
    out, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ssim") is not None and r["key"] != "fp32"]
    for ax, key, name in ((axes[0], "ssim", "SSIM vs FP images"),
                          (axes[1], "content_confidence", "content confidence (classifier P(prompted digit))"),
                          (axes[2], "content_accuracy", "content accuracy")):
        for tool in TOOLS:
            pts = [(r["x_fp16"], r[key]) for r in ok if r["tool"] == tool and r.get(key) is not None]
            if not pts:
                continue
            color, marker = STYLE[tool]
            ax.plot(*zip(*pts), marker=marker, color=color, linestyle="none", alpha=0.45, markersize=5)
            front = frontier(pts)
            ax.plot(*zip(*front), marker=marker, color=color, label=tool, linestyle="-" if len(front) > 1 else "none")
        for b in BUDGETS:
            ax.axvline(b, color="0.75", linestyle=":", linewidth=1)
        ax.set_xlabel("denoiser bytes / FP16 bytes (measured)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("digits: quality vs bytes (line: each tool's best config up to that size; faint: its other configs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select_peers(only: str | None, skip: str | None, device: str):
    peers = [p for p in PEERS if p.key != "scaled-mm-fp8" or device.startswith("cuda")]
    if only:
        keys = [k.strip() for k in only.split(",") if k.strip()]
        peers = [p for p in peers if p.key in ("fp32",) or any(p.key == k or p.key.startswith(k + "-") or
                                                               p.tool.lower().startswith(k.lower()) for k in keys)]
    if skip:
        keys = [k.strip() for k in skip.split(",") if k.strip()]
        peers = [p for p in peers if p.key == "fp32" or not any(p.key == k or p.key.startswith(k + "-") for k in keys)]
    return peers


def report_from(paths, out_dir) -> int:
    """Merge saved runs (a digits run and an SD1.5 run, or one section's peers split over processes) into one
    report."""
    runs = [json.load(open(p)) for p in paths]
    merged = {"env": dict(runs[0]["env"])}
    notes = []
    for sec in ("digits", "sd15"):
        srcs = [r for r in runs if sec in r]
        if not srcs:
            continue
        rows, keys = [], set()
        for src in srcs:  # rows of the same section from several runs (e.g. peers split over processes)
            for row in src[sec]["rows"]:
                if row["key"] not in keys:
                    keys.add(row["key"])
                    rows.append(row)
            notes.append(f"{sec}: {src['env']['cpu']}, {src['env']['threads']} thread(s), "
                         f"{src['env']['seconds'] / 60:.1f} min run")
        order = {p.key: i for i, p in enumerate(PEERS)}  # the table's usual order; extra rows (matches) last
        rows.sort(key=lambda r: order.get(r["key"], len(order)))
        merged[sec] = {"rows": rows, "meta": srcs[0][sec]["meta"]}
    merged["env"]["seconds"] = sum(r["env"]["seconds"] for r in runs)
    merged["env"]["runs"] = notes
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "peers.json"), "w") as f:
        json.dump(merged, f, indent=1)
    text = markdown(merged)
    with open(os.path.join(out_dir, "peers.md"), "w") as f:
        f.write(text)
    if "digits" in merged:
        plot(merged["digits"]["rows"], os.path.join(out_dir, "peers_quality_vs_bytes.png"))
    print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--only", help="comma-separated peer keys or key prefixes / tool names (fp32 always runs)")
    ap.add_argument("--skip", help="comma-separated peer keys or key prefixes to leave out")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=4.0,
                    help="digits CFG scale (calibration and evaluation); at 2 the FP model itself misdraws ~6%% of "
                         "digits, so content damage from quantization shows where it saturates at 4")
    ap.add_argument("--eval-per-digit", type=int, default=5)
    ap.add_argument("--full", action="store_true",
                    help="also MixQuant W4A16 / mixed avg W4 A8 / comfyui-native on SD1.5 (their quantization takes "
                         "~25 min on 1 CPU thread), 2 seeds on digits, and a cap of 8x FP32")
    ap.add_argument("--seeds", type=int, help="seeds per prompt on digits (1000, 1001, ...); 1, or 2 with --full")
    ap.add_argument("--content-seeds", type=int,
                    help="content accuracy / confidence on digits from this many seeds per prompt (1000, 1001, ...): "
                         "images only, no teacher forcing, so cheaper than --seeds; the paired table uses them")
    ap.add_argument("--content-seed-start", type=int, default=1000,
                    help="first of the --content-seeds seeds: a later block of images (e.g. 1064 after a run with "
                         "--content-seeds 64) that bench/pool_content.py can pool with the earlier run's")
    ap.add_argument("--digits-rounds", type=int, default=5, help="alternating timing rounds on the digits UNet")
    ap.add_argument("--sd15-calib-steps", type=int, default=2, help="Euler steps of MixQuant's SD1.5 calibration")
    ap.add_argument("--sd15-calib-t", type=float, nargs="*",
                    help="timesteps of quanto's SD1.5 calibration calls (one batch of 2 each; default 300)")
    ap.add_argument("--cap", type=float,
                    help="stop an SD1.5 forward after this many times the FP32 forward's CPU time (a lower bound "
                         "is reported); 4, or 8 with --full")
    ap.add_argument("--cap-16bit", type=float, default=5.0, help="the same for the 16-bit row")
    ap.add_argument("--full-16bit", action="store_true", help="time the 16-bit SD1.5 forward to the end")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the SD1.5 section on a GPU")
    ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "mixquant", "bench-peers"),
                    help="MixQuant's sensitivity cache ('' for a temporary one)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-match", action="store_true",
                    help="skip MixQuant's extra digits rows at the exact size of each small peer")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--report-from", nargs="+", metavar="JSON",
                    help="write the report (peers.md, plot) from saved runs' peers*.json instead of measuring: each "
                         "section's rows from every file that has it (the first row of a key wins), its settings "
                         "from the first")
    args = ap.parse_args(argv)
    if args.report_from:
        return report_from(args.report_from, args.out)
    args.seeds = args.seeds or (2 if args.full else 1)
    args.cap = args.cap or (8.0 if args.full else 4.0)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    tmp = None
    if not args.cache_dir:
        tmp = tempfile.TemporaryDirectory()
        args.cache_dir = tmp.name
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    versions = peer_versions()
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    dtype16, probe = fastest_16bit(args.device)
    log(f"fastest 16-bit dtype here: {dtype16} (matmul 512x640x640: {probe})")
    peers = select_peers(args.only, args.skip, args.device)
    result = {"env": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": args.device,
                      "versions": versions, "dtype16": str(dtype16), "matmul_probe_ms": probe}}
    if not args.skip_digits:
        log("digits section")
        rows, meta = digits_section(args, peers, dtype16, log)
        result["digits"] = {"rows": rows, "meta": meta}
    if not args.skip_sd15:
        log("SD1.5-architecture UNet section")
        rows, meta = sd15_section(args, peers, dtype16, log)
        result["sd15"] = {"rows": rows, "meta": meta}
    result["env"]["seconds"] = time.time() - t0
    suffix = "" if not (args.only or args.skip or args.skip_digits or args.skip_sd15) else "_partial"
    with open(os.path.join(args.out, f"peers{suffix}.json"), "w") as f:
        json.dump(_jsonable(result), f, indent=1)
    text = markdown(result, f"peers{suffix}_quality_vs_bytes.png")
    with open(os.path.join(args.out, f"peers{suffix}.md"), "w") as f:
        f.write(text)
    if "digits" in result:
        try:
            plot(result["digits"]["rows"], os.path.join(args.out, f"peers{suffix}_quality_vs_bytes.png"))
        except ImportError as e:
            log(f"no plot: {e}")
    print(text)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
