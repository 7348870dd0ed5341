"""The original (Black Forest Labs / Stability = ComfyUI) layout of Flux.1 and SD3 transformers against diffusers'
(quant/dit_names.py): equal to diffusers' own converters, at the real widths (tensors one column wide, so the 12B
layout costs nothing) and at small ones, both ways."""
import json
import os

import pytest
import torch

from mixquant.quant.dit_names import flux_layout, from_original, sd3_layout, to_original
from mixquant.quant.errors import MixQuantError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "dit")


def _config(name, **over):
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        return {**{k: v for k, v in json.load(f).items() if not k.startswith("_")}, **over}


def _tagged(cls, cfg):
    """The model's state dict with distinct random values, each tensor cut to one column (rows are what map)."""
    with torch.device("meta"):
        model = cls.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(tuple(v.shape[:1]) + (1,) * (v.dim() - 1), generator=g)
            for k, v in model.state_dict().items()}


CASES = [("flux_dev", "flux", {"num_layers": 1, "num_single_layers": 1}), ("sd3_dev", "sd3", {"num_layers": 3}),
         ("sd3_dev", "sd3", {"num_layers": 3, "dual_attention_layers": [0, 1]}), ("sd3_small", "sd3", {})]


@pytest.mark.parametrize("name,family,over", CASES)
def test_layout_equals_diffusers_converter(name, family, over):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders import single_file_utils as su

    cls, layout, convert = {
        "flux": (FluxTransformer2DModel, flux_layout, su.convert_flux_transformer_checkpoint_to_diffusers),
        "sd3": (SD3Transformer2DModel, sd3_layout, su.convert_sd3_transformer_checkpoint_to_diffusers)}[family]
    cfg = _config(name, **over)
    state = _tagged(cls, cfg)
    lay = layout(cfg)
    orig = to_original(state, lay)
    assert any(e.fused for e in lay.entries)
    # diffusers' converter takes our original-layout dict back to exactly the model's tensors ...
    back = convert({"model.diffusion_model." + k: v.clone() for k, v in orig.items()})
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # ... and so does our own reading of the table
    mine = from_original({"model.diffusion_model." + k: v for k, v in orig.items()}, lay, "model.diffusion_model.")
    assert set(mine) == set(state)
    assert all(torch.equal(mine[k], state[k]) for k in state)
    if family == "flux":  # the fused layers ComfyUI names, with their heights
        w = 3072
        assert orig["double_blocks.0.img_attn.qkv.weight"].shape[0] == 3 * w
        assert orig["single_blocks.0.linear1.weight"].shape[0] == 3 * w + 4 * w
        # the final modulation's halves swapped: original (shift, scale) = diffusers (scale, shift) reversed
        assert torch.equal(orig["final_layer.adaLN_modulation.1.weight"][:w], state["norm_out.linear.weight"][w:])


def test_small_flux_both_ways_and_bad_input():
    from diffusers import FluxTransformer2DModel

    cfg = _config("flux_small")
    state = _tagged(FluxTransformer2DModel, cfg)
    lay = flux_layout(cfg)
    orig = to_original(state, lay)
    back = from_original(orig, lay)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(MixQuantError, match="rows"):  # a fused tensor of another width
        from_original({**orig, "single_blocks.0.linear1.weight": orig["single_blocks.0.linear1.weight"][:-1]}, lay)
    with pytest.raises(MixQuantError, match="no place"):
        from_original({**orig, "double_blocks.9.extra.weight": torch.zeros(1)}, lay)
    with pytest.raises(MixQuantError, match="no place"):
        to_original({**state, "something_else.weight": torch.zeros(1)}, lay)


def test_comfyui_native_plans_tie_the_layers_a_stacked_layer_joins():
    """--target comfyui-native on a diffusers Flux: q, k, v (and a single block's linear1 parts) take one format,
    so each stacked layer of ComfyUI's layout exports natively."""
    from mixquant.app.diffusers_host.random_models import random_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings
    from mixquant.quant import engine

    pipe = random_pipeline("flux", "small", seed=1)
    runner = PipelineRunner(pipe, SamplerSettings(steps=2, guidance=3.5, width=32, height=32))
    lay = flux_layout(dict(runner.denoiser.config))
    groups = [[p.module for p in e.pieces] for e in lay.entries if len({p.module for p in e.pieces}) > 1]
    assert len(groups) == 2 * 2 + 2  # img / txt qkv per double block, linear1 per single block
    common = dict(avg_w_bits=6, speed="off", sens_mode="local", sweep_seconds=0, cache_dir="", weight_search="mse")
    native = engine.QuantizeConfig(target="comfyui-native", **common)
    prepared = engine.prepare(runner, ["a red fox", "a blue car"], native)
    prob = engine.problem(prepared.layers, native, prepared.calib, prepared.sens, runner.denoiser)
    assert len(prob.ties) == len(groups)
    for lam in (0.2, 0.5, 0.8):
        plan = prob.solve(prepared.sens, lam)
        for g in groups:
            assert len({plan[n].name for n in g}) == 1, [(n, plan[n].name) for n in g]
        st = engine.plan_stats(prepared.layers, plan, prepared.calib.act_elements)
        assert st["avg_w_bits"] <= 6 + 1e-6
