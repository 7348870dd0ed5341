"""The fast sensitivity (quant/sensitivity.py, mode "fast"): per-channel output gains from backward passes against
the exact Jacobian, and its per-layer losses against the exhaustive MixDQ measurement ("full") on digits."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from mixquant.quant.sensitivity import _weighted, coherent_split, output_gains


class _Runner:
    def output_of(self, out):
        return out


def test_gains_are_the_jacobians_column_norms():
    """White probes: gain of a layer's channel j = E_r (J^T r)_j^2 = sum_k J[k, j]^2 (J: the layer output -> the
    model output). Here J is W2 for the first layer and the identity for the last; averaged over many calls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    x = torch.randn(2, 4)
    calls = [SimpleNamespace(args=(x,), kwargs={})] * 600
    gains = output_gains(model, _Runner(), calls, ["0", "1"], kinds=("quality",))["quality"]
    g0 = torch.stack(gains["0"]).mean(0)[0]  # (row 0: the diagonal gain; row 1: coherent_gains' shared part)
    g1 = torch.stack(gains["1"]).mean(0)[0]
    want0 = (model[1].weight.detach() ** 2).sum(0)
    assert torch.allclose(g0, want0, rtol=0.15), (g0, want0)
    assert torch.allclose(g1, torch.ones(3), rtol=0.15), g1
    assert all(p.requires_grad for p in model.parameters())  # put back as they were


def test_gains_reach_layers_fed_only_by_inputs_without_gradient():
    """A layer fed by a float input that is not the first argument (text context, time embedding) still gets its
    gain; a conv's channels are dimension 1."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.ctx = nn.Linear(5, 3)

        def forward(self, x, context=None):
            return self.conv(x) * 2 + self.ctx(context).mean(1)[:, :, None, None]

    torch.manual_seed(0)
    net = Net()
    call = SimpleNamespace(args=(torch.randn(1, 2, 4, 4),), kwargs={"context": torch.randn(1, 7, 5)})
    gains = output_gains(net, _Runner(), [call] * 300, ["conv", "ctx"], kinds=("quality",))["quality"]
    conv = torch.stack(gains["conv"]).mean(0)[0]
    ctx = torch.stack(gains["ctx"]).mean(0)[0]
    assert conv.shape == (3,) and torch.allclose(conv, torch.full((3,), 4.0), rtol=0.15)  # d out / d conv = 2
    # d out / d ctx[b, t, c] = 1/7 on each of the 16 pixels: E (sum_p r_p / 7)^2 = 16 / 49
    assert ctx.shape == (3,) and torch.allclose(ctx, torch.full((3,), 16 / 49), rtol=0.2)


@pytest.fixture(scope="module")
def digits_tables(tmp_path_factory):
    from mixquant.app.diffusers_host.models import load_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings
    from mixquant.quant import engine

    torch.set_num_threads(1)
    pipe = load_pipeline("digits")
    runner = PipelineRunner(pipe, SamplerSettings(steps=4, guidance=4.0, scheduler="dpm"))
    prompts = ["a handwritten digit zero", "the number 1", "digit two, bold", "a picture of the number three"]
    cache = str(tmp_path_factory.mktemp("sens"))
    out = {}
    for mode in ("full", "fast", "local"):
        cfg = engine.QuantizeConfig(avg_w_bits=4, a_bits=8, sens_mode=mode, cache_dir=cache, sens_calls=2)
        out[mode] = engine.prepare(runner, prompts, cfg).sens
    return out


def _pairs(ref, other, role):
    xs, ys = [], []
    for layer, table in ref.loss.items():
        if ref.role[layer] == role:
            for f, v in table.items():
                xs.append(v)
                ys.append(other.loss[layer][f])
    return xs, ys


def test_fast_ranks_layers_as_the_exhaustive_measurement_does(digits_tables):
    from scipy.stats import spearmanr

    full, fast, local = digits_tables["full"], digits_tables["fast"], digits_tables["local"]
    assert set(fast.loss) == set(full.loss)
    rho = {m: {r: spearmanr(*_pairs(full, t, r)).statistic for r in ("content", "quality")}
           for m, t in (("fast", fast), ("local", local))}
    assert rho["fast"]["quality"] > 0.9 and rho["fast"]["content"] > 0.75, rho
    # the gains are what the local measurement lacks: how much of a layer's noise reaches the output
    assert rho["fast"]["quality"] > rho["local"]["quality"] + 0.1, rho


def test_fast_quality_losses_are_denoiser_output_noise(digits_tables):
    """For quality layers both modes estimate the same quantity (the denoiser output's relative noise power): the
    fast one to first order, so on the same scale (typical ratio near 1, not off by a batch or element count)."""
    xs, ys = _pairs(digits_tables["full"], digits_tables["fast"], "quality")
    ratios = sorted(y / x for x, y in zip(xs, ys) if x > 0 and y > 0)
    median = ratios[len(ratios) // 2]
    assert 1 / 3 < median < 3, median
    assert all(math.isfinite(v) for v in ys)


def test_gains_of_a_model_built_in_inference_mode():
    """ComfyUI builds and runs its models under torch.inference_mode: the gains still come out (the same as for the
    model built normally) and the model computes the same afterwards, in inference mode too."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
        model.load_state_dict(ref.state_dict())
        x = torch.randn(2, 4)
        before = model(x)
    call = SimpleNamespace(args=(x,), kwargs={})
    want = output_gains(ref, _Runner(), [call], ["0", "2"], kinds=("quality",), seed=3)["quality"]
    got = output_gains(model, _Runner(), [call], ["0", "2"], kinds=("quality",), seed=3)["quality"]
    for n in ("0", "2"):
        assert torch.allclose(got[n][0], want[n][0]), n
    with torch.inference_mode():
        assert torch.equal(model(x), before)


def test_gains_of_a_model_that_adds_in_place_into_a_saved_tensor():
    """WebUI Forge's UNet adds into a tensor a LayerNorm saved for backward (`x += attn(norm(x))`): the gains are
    still measured, the same as for the model written out of place."""

    class Block(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.inplace = inplace
            self.proj_in, self.norm, self.attn = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            x = self.proj_in(x) * 1.0
            n = self.attn(self.norm(x))
            if self.inplace:
                x += n
            else:
                x = x + n
            return self.out(x)

    torch.manual_seed(0)
    ref = Block(False)
    model = Block(True)
    model.load_state_dict(ref.state_dict())
    call = SimpleNamespace(args=(torch.randn(2, 4),), kwargs={})
    names = ["proj_in", "attn", "out"]
    want = output_gains(ref, _Runner(), [call] * 3, names, kinds=("quality", "content"), seed=5)
    got = output_gains(model, _Runner(), [call] * 3, names, kinds=("quality", "content"), seed=5)
    for kind in ("quality", "content"):
        for n in names:
            assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(want[kind][n], got[kind][n]))


def test_an_error_every_token_shares_is_weighed_as_one_vector():
    """A model that sums its layer's output over the tokens (as attention over a text context does): an error the
    same at every token (inputs that repeat, like padding) reaches the output N times over in amplitude, N^2 in
    power. The diagonal estimate sees N; the coherent one (diffusion transformers) the true N^2 to first order, and
    both agree on an error that varies over tokens."""
    n, c = 12, 5
    model = nn.Sequential(nn.Linear(c, c, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(c))

    class Summed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).sum(dim=1)

    net = Summed()
    x = torch.randn(2, n, c)
    gains = output_gains(net, _Runner(), [SimpleNamespace(args=(x,), kwargs={})] * 400, ["inner.0"],
                         kinds=("quality",))["quality"]["inner.0"]
    g = torch.stack(gains).mean(0)
    shared = torch.randn(2, 1, c).expand(2, n, c)
    split = coherent_split(shared, 2)
    true = float((shared.sum(1) ** 2).sum())
    assert _weighted([split], [g], coherent=True) == pytest.approx(true, rel=0.15)
    assert _weighted([split], [g]) == pytest.approx(true / n, rel=0.15)  # the diagonal estimate: N times low
    varying = torch.randn(2, n, c)
    varying = varying - varying.mean(dim=1, keepdim=True)  # (nothing shared: both estimates are the same)
    split = coherent_split(varying, 2)
    assert _weighted([split], [g], coherent=True) == pytest.approx(_weighted([split], [g]), rel=1e-6)


def test_the_backward_recomputes_blocks_and_keeps_only_their_inputs(small_unet, unet_inputs, monkeypatch):
    """The gains' backward recomputes the model's blocks (offload.recomputed over checkpoint_units: a UNet's ResNet
    blocks and transformers): the forward keeps under half of what autograd would save (a backward through a UNet at
    1024 px keeps several times its weights), and the gains are those of the plain backward exactly."""
    from mixquant.quant import offload

    x, t, ctx = unet_inputs
    units = offload.checkpoint_units(small_unet)
    assert {"ResnetBlock2D", "Transformer2DModel"} <= {type(u).__name__ for u in units}
    assert not any(u is not v and any(m is v for m in u.modules()) for u in units for v in units)  # none nested

    def saved_bytes(recompute: bool) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                offload.recomputed(small_unet) if recompute else contextlib.nullcontext():
            small_unet(x.clone().requires_grad_(True), t, encoder_hidden_states=ctx).sample.sum().backward()
        return total[0]

    plain, recomputed = saved_bytes(False), saved_bytes(True)
    assert recomputed < plain / 2, (recomputed, plain)  # (0.43 here: 8x8 latents, the units inputs weigh more)
    assert all(u.__dict__.get("_call_impl") is None for u in units)  # restored

    class Runner:
        def output_of(self, out):
            return out.sample

    call = SimpleNamespace(args=(x, t), kwargs={"encoder_hidden_states": ctx})
    names = [n for n, m in small_unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    got = output_gains(small_unet, Runner(), [call], names, seed=2)
    monkeypatch.setattr(offload, "checkpoint_units", lambda model, parts=16: [])
    want = output_gains(small_unet, Runner(), [call], names, seed=2)
    for kind in want:
        for n in names:
            assert all(torch.equal(a, b) for a, b in zip(want[kind][n], got[kind][n])), (kind, n)


class _Flaky(nn.Module):  # (computes the same values with other ops on every other run: it does not replay alike)
    def __init__(self, flaky):
        super().__init__()
        self.lin, self.flaky, self.runs = nn.Linear(6, 6), flaky, 0

    def forward(self, x):
        h = self.lin(x)
        self.runs += 1
        if self.flaky and self.runs % 2:
            return torch.tanh(h * torch.ones_like(h))
        return torch.tanh(h + 0)


def test_a_model_that_does_not_replay_alike_gets_the_plain_backward(monkeypatch):
    """A host's block may compute differently when it runs again (here: other ops, the same values, so autograd saves
    another number of tensors): the recomputation fails its check, and the gains come from one plain backward."""
    from mixquant.quant import offload

    torch.manual_seed(0)
    model = nn.Sequential(*[_Flaky(i == 10) for i in range(20)])
    assert len(offload.checkpoint_units(model)) == 20
    call = SimpleNamespace(args=(torch.randn(3, 6),), kwargs={})
    names = [f"{i}.lin" for i in range(20)]
    got = output_gains(model, _Runner(), [call] * 2, names, kinds=("quality", "content"), seed=4)
    monkeypatch.setattr(offload, "checkpoint_units", lambda m, parts=16: [])
    want = output_gains(model, _Runner(), [call] * 2, names, kinds=("quality", "content"), seed=4)
    for kind in want:
        for n in names:
            assert all(torch.equal(a, b) for a, b in zip(want[kind][n], got[kind][n])), (kind, n)


def test_a_streamed_model_that_does_not_replay_alike_gets_one_clear_message():
    """Streamed through a device, a plain backward would hold every block's weights there (the model does not fit
    it): instead of falling back to it, one message names the local sensitivity; every tensor is back home after."""
    from mixquant.quant import offload
    from mixquant.quant.errors import MixQuantError

    torch.manual_seed(0)
    model = nn.Sequential(*[_Flaky(i == 10) for i in range(20)])
    homes = [id(t) for _, _, t in offload._tensors(model)]
    call = SimpleNamespace(args=(torch.randn(3, 6),), kwargs={})
    with offload.streamed(model, list(model), "cpu:0"):
        with pytest.raises(MixQuantError, match="local sensitivity") as err:
            output_gains(model, _Runner(), [call], [f"{i}.lin" for i in range(20)], kinds=("quality",))
    assert "\n" not in str(err.value)  # (one line: torch's own message spans several)
    assert [id(t) for _, _, t in offload._tensors(model)] == homes
    assert all(b.__dict__.get("_call_impl") is None for b in model)


def test_out_of_memory_in_the_recomputed_backward_is_not_retried_without_it():
    """An out-of-memory error with the recomputation is raised as it is: the plain backward a retry would make
    needs more memory still."""
    class Hungry(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.runs = nn.Linear(6, 6), 0

        def forward(self, x):
            self.runs += 1
            if self.runs == 2:  # (its recomputation in the backward)
                raise torch.OutOfMemoryError("CUDA out of memory (a test)")
            return torch.tanh(self.lin(x))

    torch.manual_seed(0)
    model = nn.Sequential(*[Hungry() for _ in range(20)])
    call = SimpleNamespace(args=(torch.randn(3, 6),), kwargs={})
    with pytest.raises(torch.OutOfMemoryError):
        output_gains(model, _Runner(), [call], [f"{i}.lin" for i in range(20)], kinds=("quality",))
    assert model[0].runs == 1 and model[-1].runs == 2  # (the last block failed recomputed; no second forward pass)


def test_blocks_fed_tensors_made_in_inference_mode_are_recomputed(monkeypatch):
    """ComfyUI records a call's tensors in inference mode and its blocks take them as arguments (Flux's `vec` from
    `y`), positional or by keyword: a recomputed region keeps its positional tensor arguments (torch saves them for
    the backward; keyword ones it only holds), so those are copied first; the blocks are recomputed (no fall back to
    the plain backward) and the gains are the plain backward's."""
    from mixquant.quant import offload

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

        def forward(self, x, cond=None):
            return self.body(x) + (0 if cond is None else self.body(cond))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(20))

        def forward(self, x, cond):
            for i, b in enumerate(self.blocks):
                x = b(x, cond) if i % 2 else b(x, cond=cond)
            return x

    torch.manual_seed(0)
    model = Model()
    with torch.inference_mode():
        cond = torch.randn(3, 6)
    call = SimpleNamespace(args=(torch.randn(3, 6),), kwargs={"cond": cond})
    names = [f"blocks.{i}.body.0" for i in range(20)]
    entered = [0]
    enter = offload._Recomputing.__enter__
    monkeypatch.setattr(offload._Recomputing, "__enter__", lambda self: (entered.__setitem__(0, entered[0] + 1),
                                                                         enter(self))[1])
    got = output_gains(model, _Runner(), [call], names, kinds=("quality",), seed=6)
    assert entered[0] >= 20
    monkeypatch.setattr(offload, "checkpoint_units", lambda m, parts=16: [])
    want = output_gains(model, _Runner(), [call], names, kinds=("quality",), seed=6)
    for n in names:
        assert torch.equal(want["quality"][n][0], got["quality"][n][0]), n


def test_a_recorded_call_is_subsampled_on_its_own_device(monkeypatch):
    """Recorded calls stay on the model's device; CUDA's index_select takes no CPU index (a batch of 4 recorded on a
    GPU, subsampled to the sensitivity's 2, raised there). Meta tensors stand for the GPU's here."""
    from mixquant.quant.runner import DenoiserCall
    from mixquant.quant.sensitivity import subsample_call

    real = torch.Tensor.index_select

    def index_select(self, dim, index):
        assert index.device == self.device, (index.device, self.device)
        return real(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", index_select)
    z = torch.zeros(4, 3, device="meta")
    call = DenoiserCall((z,), {"ctx": torch.zeros(4, 5, 2, device="meta"), "cpu": torch.arange(4.0)}, 500.0, 0, z)
    sub = subsample_call(call, 2)
    assert sub.output.shape == (2, 3) and sub.kwargs["ctx"].shape == (2, 5, 2) and sub.kwargs["cpu"].tolist() == [0, 2]
