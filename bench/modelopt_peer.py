"""NVIDIA Model Optimizer (nvidia-modelopt) as a peer of bench/peers.py: the INT8 and FP8 recipes of its diffusers
example (examples/diffusers/quantization: quantize.py, config.py, utils.py), as that example sets them for SD1.5 /
SDXL UNets, run on whatever device the model is on.

- INT8: `mtq.INT8_SMOOTHQUANT_CFG` (int8 per-output-channel weights, int8 per-tensor static activations, SmoothQuant
  with alpha 0.8), and on every Conv2d input the example's percentile calibrator (Q-Diffusion's idea: one amax per
  denoising step, "min-mean" collection, percentile 1.0 of the steps). The example's recommended run (calib-size 32,
  batch 2, 20 steps) sums each step's amax over its 16 runs and divides by the 20 steps: 0.8 x the mean amax; that
  factor is kept here whatever the number of calibration runs, then the minimum over the steps is taken.
- FP8: its diffusers fp8 preset (E4M3 per-tensor weights and activations, max calibration), attention Q/K/V bmm
  quantizers where the head size is a multiple of 16 (the README's --quantize-mha).
- In both, the quantizers of the time embeddings, conv_in / conv_out, conv_shortcut and the other names of the
  example's filter are disabled after calibration.
- `mtq.compress` then stores the enabled weights as real int8 / float8 tensors (QTensorWrapper), so bytes are
  measured like every other peer's; layers run by dequantizing those weights (its fake-quant path on a CPU; TensorRT
  is where the recipe runs fast).

The example's calibrator and config helpers are not part of the pip package; what they do is written here anew from
its description above.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

# quantizer names the example leaves in high precision (utils.filter_func_default)
KEEP_HIGH_PRECISION = re.compile(r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|"
                                 r"pos_embed|time_text_embed|context_embedder|norm_out|x_embedder).*")
MIN_MEAN_FACTOR = 16 / 20  # the example's runs / steps at its recommended settings (see the module docstring)


def _percentile_calibrator(n_steps: int, percentile: float = 1.0):
    """A modelopt calibrator with one amax per denoising step (call index mod n_steps): the steps' mean amax over the
    calibration runs x MIN_MEAN_FACTOR, then the minimum over the first `percentile` of the steps."""
    from modelopt.torch.quantization import utils as qutils
    from modelopt.torch.quantization.calib.max import MaxCalibrator

    class PerStepCalibrator(MaxCalibrator):
        def __init__(self, num_bits=8, axis=None, unsigned=False, track_amax=False, **_):
            super().__init__(num_bits, axis, unsigned, track_amax)
            self.per_step, self.calls = {}, 0

        def collect(self, x):
            amax = qutils.reduce_amax(x, axis=qutils.convert_quantization_axis_to_reduce_axis(x, self._axis)).detach()
            step = self.calls % n_steps
            total, runs = self.per_step.get(step, (0.0, 0))
            self.per_step[step] = (total + amax, runs + 1)
            self.calls += 1

        def compute_amax(self):
            upto = max(1, int(n_steps * percentile))
            means = [t / r * MIN_MEAN_FACTOR for s, (t, r) in sorted(self.per_step.items()) if s < upto]
            if not means:
                return None
            self._calib_amax = torch.stack(means).amin(0)
            return self._calib_amax

        def reset(self):
            super().reset()
            self.per_step, self.calls = {}, 0

    return PerStepCalibrator


def _int8_config(model: nn.Module, n_steps: int, alpha: float = 0.8) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    calib = _percentile_calibrator(n_steps)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
        {"quantizer_name": f"*{name}*input_quantizer*",
         "cfg": {"num_bits": 8, "axis": None, "calibrator": (calib, (), {"num_bits": 8, "axis": None})}}
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    cfg["algorithm"] = {"method": "smoothquant", "alpha": alpha}
    return cfg


def _fp8_config() -> dict:
    from modelopt.torch.opt.config_loader import load_config
    from modelopt.torch.quantization.config import QuantizeConfig

    cfg = load_config("configs/ptq/presets/diffusers/fp8", schema_type=QuantizeConfig).model_dump(exclude_unset=True)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
        {"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}}]
    cfg["algorithm"] = {"method": "max"}
    return cfg


def _mha_only_where_supported(model: nn.Module, quantize_mha: bool):
    """The example's check_conv_and_mha: FP8 attention bmm quantizers only where the head size is a multiple of 16."""
    from diffusers.models.attention_processor import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            ok = quantize_mha and (m.inner_dim // m.heads) % 16 == 0
            if not ok:
                for attr in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer",
                             "bmm2_output_quantizer"):
                    if hasattr(m, attr):
                        getattr(m, attr).disable()
            m._disable_fp8_mha = not ok


def modelopt_quantize(model: nn.Module, recipe: str, forward_loop, n_steps: int) -> nn.Module:
    """Quantize `model` in place with the example's `recipe` ("int8" or "fp8") and compress its weights.
    `forward_loop(model)` runs the calibration: whole denoising runs of `n_steps` calls each, in timestep order."""
    import warnings

    import modelopt.torch.quantization as mtq

    # its CPU fallback warns once per layer that no real-quant GEMM is there (it dequantizes instead)
    warnings.filterwarnings("ignore", message="RealQuantLinear")
    if recipe == "int8":
        cfg = _int8_config(model, n_steps)
    elif recipe == "fp8":
        cfg = _fp8_config()
    else:
        raise ValueError(f"unknown Model Optimizer recipe {recipe!r}: int8 or fp8")
    for entry in cfg["quant_cfg"]:  # the example's --trt-high-precision-dtype Half
        c = entry.get("cfg")
        if isinstance(c, dict) and "num_bits" in c:
            c.setdefault("trt_high_precision_dtype", "Half")
    mtq.quantize(model, cfg, forward_loop)
    mtq.disable_quantizer(model, lambda name: KEEP_HIGH_PRECISION.match(name) is not None)
    _mha_only_where_supported(model, recipe == "fp8")
    mtq.compress(model)
    return model
