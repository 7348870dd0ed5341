"""Quantizing into a device layer by layer (#23 item 4): the float model stays where it is (the CPU), each layer
goes to the device alone, is quantized there and dropped; the device never holds the float model and its quantized
copy together."""
import pytest
import torch

from mixquant.quant.apply import quantize_model, uniform_plan
from mixquant.quant.calibration import collect_act_ranges
from mixquant.quant.layers import QuantLayer
from mixquant.quant.roles import discover_layers
from mixquant.quant.sizes import model_bytes


def _run(m, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return m(*[a.to(next(m.parameters()).device) for a in (x, t, ctx)]).sample


def test_into_a_device_gives_the_same_model_and_leaves_the_source(small_unet, unet_inputs):
    layers = discover_layers(small_unet)
    plan = uniform_plan(layers, "W4g64A8")
    ranges = collect_act_ranges(small_unet, lambda: _run(small_unet, unet_inputs))
    before = {k: v.clone() for k, v in small_unet.state_dict().items()}
    ref, s_ref = quantize_model(small_unet, plan, ranges)
    # "cpu:0" is another torch.device than the tensors' "cpu": every layer takes the moved-copy path here
    got, s_got = quantize_model(small_unet, plan, ranges, device="cpu:0")
    assert torch.equal(_run(ref, unet_inputs), _run(got, unet_inputs))
    assert s_ref.bytes_after == s_got.bytes_after and s_ref.bytes_before == s_got.bytes_before
    after = small_unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the float model is untouched
    assert not any(isinstance(m, QuantLayer) for m in small_unet.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_is_the_quantized_model_and_one_float_layer(small_unet, unet_inputs):
    layers = discover_layers(small_unet)
    plan = uniform_plan(layers, "W4g64A8")
    ranges = collect_act_ranges(small_unet, lambda: _run(small_unet, unet_inputs))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q, _ = quantize_model(small_unet, plan, ranges, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    largest = max(model_bytes(small_unet.get_submodule(li.name)) for li in layers)
    assert peak <= model_bytes(q) + 6 * largest, (peak, model_bytes(q), largest)
    assert peak < model_bytes(small_unet) + model_bytes(q)
    assert all(p.device.type == "cuda" for p in q.parameters())
    ref, _ = quantize_model(small_unet, plan, ranges)
    assert torch.allclose(_run(q, unet_inputs).cpu(), _run(ref, unet_inputs), rtol=1e-2, atol=1e-2)
