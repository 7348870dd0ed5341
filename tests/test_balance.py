"""Channel balancing (SmoothQuant / ViDiT-Q; quant/layers.py `smooth`, calibration.set_balance) and per-token activations
for diffusion transformers: the balanced layer computes x W^T (up to quantization) in every mode and kernel path, its
ranges are exactly those of x / s, LoRA hooks speak the float W, files keep s, the native export does not claim it,
and on a Flux-layout model with the outlier channels trained DiTs have it beats per-tensor static quantization."""
import pytest
import torch
import torch.nn as nn

from mixquant.kernels import dispatch
from mixquant.quant.apply import ActRange, quantize_, quantized_layer, uniform_plan
from mixquant.quant.formats import as_format
from mixquant.quant.layers import QuantLinear
from mixquant.quant.native import native_format


def _outlier_input(b=3, n=17, k=96, chans=(5, 40), gain=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, k, generator=g)
    x[..., list(chans)] *= gain
    return x


def _smooth_for(x, w, alpha=0.5):
    ax = x.abs().amax(dim=(0, 1))
    aw = w.abs().amax(dim=0)
    s = ax ** alpha / aw ** (1 - alpha)
    return s / s.log().mean().exp()


@pytest.mark.parametrize("name", ["W8A8", "W8A8d", "W4g32A8d", "W16A8", "W8A16"])
def test_balanced_linear_is_packed_equal_simulate_and_beats_unbalanced(name):
    torch.manual_seed(1)
    fmt = as_format(name)
    lin = nn.Linear(96, 48)
    x = _outlier_input()
    s = _smooth_for(x, lin.weight.detach())
    outs = {}
    for bal in (None, s):
        rng = ActRange((x / (1 if bal is None else bal)).min().reshape(1, 1),
                       (x / (1 if bal is None else bal)).max().reshape(1, 1), None, bal)
        q = quantized_layer(lin, fmt, act_range=rng)
        sim = quantized_layer(lin, fmt, mode="simulate", act_range=rng)
        with torch.no_grad(), dispatch.use_backend("reference"):
            yq, ys = q(x), sim(x)
        assert torch.equal(yq, ys)
        with torch.no_grad():  # the machine's own route agrees with the reference
            assert float((q(x) - yq).abs().max()) <= 1e-4 * float(yq.abs().max()) + 1e-6
        outs[bal is not None] = yq
    y = lin(x).detach()
    err = {k: float(((v - y) ** 2).sum() / (y ** 2).sum()) for k, v in outs.items()}
    if fmt.a_bits < 16:  # the outlier channels no longer set every token's (or the tensor's) step size
        assert err[True] < 0.5 * err[False], err
    assert err[True] < (0.05 if fmt.w_bits == 4 else 5e-3)


def test_a_balanced_conv_computes_the_float_conv():
    """(Balancing is planned for Linear layers; a conv takes it as well: s per input channel, the K order of a conv
    weight is kh x kw x C_in.)"""
    torch.manual_seed(3)
    conv = nn.Conv2d(24, 16, 3, padding=1)
    x = torch.randn(2, 24, 8, 8)
    x[:, 5] *= 30
    s = x.abs().amax(dim=(0, 2, 3)) ** 0.5
    q = quantized_layer(conv, as_format("W8A16"), act_range=ActRange(torch.zeros(1, 1), torch.ones(1, 1), None, s))
    sim = quantized_layer(conv, as_format("W8A16"), mode="simulate",
                          act_range=ActRange(torch.zeros(1, 1), torch.ones(1, 1), None, s))
    with torch.no_grad(), dispatch.use_backend("reference"):
        yq, ys, y = q(x), sim(x), conv(x)
    assert torch.equal(yq, ys)
    assert float(((yq - y) ** 2).sum() / (y ** 2).sum()) < 1e-4
    torch.testing.assert_close(q.convert_weight(q.weight.detach().float()), conv.weight.detach(), rtol=0, atol=0.02)


def test_lora_hooks_and_export_speak_the_float_weight():
    torch.manual_seed(2)
    lin = nn.Linear(64, 32)
    x = _outlier_input(k=64, chans=(3,))
    s = _smooth_for(x, lin.weight.detach())
    q = quantized_layer(lin, as_format("W8A8d"), act_range=ActRange(torch.zeros(1, 1), torch.ones(1, 1), None, s))
    w = q.convert_weight(q.weight.detach().float())  # what a LoRA is added to: W, not W s
    assert w.shape == lin.weight.shape
    wf = lin.weight.detach()
    assert float(((w - wf) ** 2).sum() / (wf ** 2).sum()) < 1e-3  # (W s quantized, then / s: not W s)
    torch.testing.assert_close(q.unbalanced_weight(), w, rtol=0, atol=1e-6)
    y0 = q(x)
    q.set_weight(w)  # requantized from the float weight: the same layer again
    torch.testing.assert_close(q(x), y0, rtol=1e-3, atol=1e-3 * float(y0.abs().max()))
    fmt, why = native_format(q)
    assert fmt is None and "balanced" in why  # ComfyUI's int8_tensorwise has no place for s
    with pytest.raises(ValueError):
        q.set_smooth(torch.zeros(64))


def test_balanced_ranges_are_exact_and_auto_picks_outlier_layers():
    from mixquant.app.diffusers_host.random_models import random_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner
    from mixquant.quant.calibration import calibrate
    from mixquant.quant.runner import SamplerSettings

    pipe = random_pipeline("flux", outliers=20.0)
    runner = PipelineRunner(pipe, SamplerSettings(steps=3, width=64, height=64))
    calib = calibrate(runner, ["a cat", "a red car"], [0, 1], n_groups=2)
    model = runner.denoiser
    assert calib.set_balance(model, "off") == {}
    auto = calib.set_balance(model, "auto")
    # the modulated inputs of the attention and MLP layers carry the outliers; the modulation layers' inputs do not
    assert any(n.endswith("attn.to_q") for n in auto) and any(n.endswith("ff.net.0.proj") for n in auto)
    assert not any(n.endswith("norm1.linear") for n in auto)
    every = calib.set_balance(model, "on")
    assert set(auto) < set(every)
    # the range of a balanced layer is the min/max of x / s per timestep group, from the recorded inputs
    name = next(n for n in auto if n.endswith("attn.to_q"))
    seen = {}
    h = model.get_submodule(name).register_forward_pre_hook(
        lambda m, a: seen.setdefault(len(seen), a[0].detach().clone()))
    try:
        calls = [c for c in calib.calls if calib.group_of(c.timestep) == 0]
        with torch.no_grad():
            for c in calls:
                model(*c.args, **c.kwargs)
    finally:
        h.remove()
    calib.set_balance(model, "auto")
    r = calib.ranges()[name]
    xs = torch.cat([v.reshape(-1, v.shape[-1]) for v in seen.values()]) / r.smooth
    assert float(r.lo[0, 0]) == pytest.approx(float(xs.min()), rel=1e-5)
    assert float(r.hi[0, 0]) == pytest.approx(float(xs.max()), rel=1e-5)


def test_per_token_with_balancing_beats_per_tensor_static_on_flux():
    """bench/dit.py's claim at test size: on the small Flux layout with trained-like outlier channels, every block
    Linear at W8A8, per-token activations with channel balancing give a higher denoiser-output SQNR than one static
    per-tensor range."""
    from mixquant.app.diffusers_host.random_models import random_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner
    from mixquant.quant.calibration import calibrate
    from mixquant.quant.roles import discover_layers
    from mixquant.quant.runner import SamplerSettings, capture_calls

    pipe = random_pipeline("flux", outliers=20.0)
    runner = PipelineRunner(pipe, SamplerSettings(steps=4, width=64, height=64))
    model = runner.denoiser
    calib = calibrate(runner, ["a red fox", "a city at night", "a bowl of fruit"], [0, 1, 2])
    held, _ = capture_calls(runner, ["a green parrot"], [7])
    layers = discover_layers(model)

    def sqnr(fmt, balance):
        calib.set_balance(model, balance)
        q, _ = quantize_(model, uniform_plan(layers, fmt, kinds=("linear",)), calib, inplace=False)
        sig = noise = 0.0
        with torch.no_grad():
            for c in held:
                y = runner.output_of(q(*c.args, **c.kwargs))
                sig += float((c.output ** 2).sum())
                noise += float(((y - c.output) ** 2).sum())
        return 10 * torch.log10(torch.tensor(sig / noise)).item()

    static = sqnr(as_format("W8A8"), "off")
    token = sqnr(as_format("W8A8d"), "off")
    token_bal = sqnr(as_format("W8A8d"), "auto")
    assert token_bal > token > static
    assert token_bal > static + 3.0
    assert isinstance(model.get_submodule(layers[10].name), nn.Linear)  # (the FP model was never modified)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
