"""quant/fusion.py's linking of producers and readers, on the CPU (where the fused kernels do not run, so every
producer keeps its own forward's result); the fused kernels feeding their readers run under the Triton interpreter
in tests/test_kernels_triton_cases.py."""
import copy

import torch

from mixquant.quant import fusion
from mixquant.quant.apply import quantize_model
from mixquant.quant.calibration import collect_act_ranges
from mixquant.quant.formats import LayerFormat


def _block():
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(32)
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(32, 32) for _ in range(3))
            self.geglu, self.out = GEGLU(32, 48), torch.nn.Linear(48, 32)

        def forward(self, x):
            h = self.norm(x)
            a = self.to_q(h) + self.to_k(h) + self.to_v(h)
            return a + self.out(self.geglu(a))

    return Block().eval()


def _quantized(model, x, formats):
    with torch.no_grad():
        ranges = collect_act_ranges(model, lambda: model(x))
        return quantize_model(model, formats, ranges)[0]


NAMES = ["to_q", "to_k", "to_v", "out", "geglu.proj"]


def test_producers_and_readers_are_linked_at_the_first_call():
    m, x = _block(), torch.randn(2, 5, 32)
    q = _quantized(m, x, {n: LayerFormat(8, 8) for n in NAMES})
    assert fusion.groups(q) == []  # nothing before the first call
    with torch.no_grad():
        y0 = q(x)
        gs = fusion.groups(q)
        assert sorted(len(g.readers) for g in gs) == [1, 3] and {g.kind for g in gs} == {"layernorm", "geglu"}
        assert torch.equal(q(x), y0)  # no Triton device here: the producers' own forwards
        # a deep copy (as hosts clone models) computes with its own weights and its own readers
        c = copy.deepcopy(q)
        c.norm.weight.data *= 2
        assert not torch.equal(c(x), y0) and torch.equal(q(x), y0)
        assert all(r in dict(c.named_modules()).values() for g in fusion.groups(c) for r in g.readers)


def test_readers_that_quantize_differently_are_not_fused(monkeypatch):
    m, x = _block(), torch.randn(2, 5, 32)
    fmts = {n: LayerFormat(8, 8) for n in NAMES} | {"to_k": LayerFormat(8, 8, None, "dynamic")}
    q = _quantized(m, x, fmts)
    with torch.no_grad():
        q(x)
    assert [g.kind for g in fusion.groups(q)] == ["geglu"]  # q / k / v disagree: the LayerNorm stays as it is
    monkeypatch.setenv("MIXQUANT_FUSE", "0")
    q2 = _quantized(m, x, {n: LayerFormat(8, 8) for n in NAMES})
    with torch.no_grad():
        q2(x)
    assert fusion.groups(q2) == []


def test_a_kernel_that_fails_leaves_the_layer_unfused(monkeypatch):
    import pytest

    from mixquant.kernels import triton_fused

    m, x = _block(), torch.randn(2, 5, 32)
    q = _quantized(m, x, {n: LayerFormat(8, 8) for n in NAMES})
    with torch.no_grad():
        y0 = q(x)
        monkeypatch.setattr(fusion, "_usable", lambda x: True)

        def broken(*a, **k):
            raise RuntimeError("no kernel for this GPU")

        monkeypatch.setattr(triton_fused, "layernorm_quant", broken)
        monkeypatch.setattr(triton_fused, "gelu_quant", broken)
        with pytest.warns(UserWarning, match="runs unfused"):
            y1 = q(x)
    assert torch.equal(y0, y1) and fusion.groups(q) == []


def test_resblock_groupnorm_links_to_its_conv_through_silu_and_dropout():
    """In a UNet ResBlock the GroupNorm's output reaches the 3x3 conv through the SiLU (and dropout): that GroupNorm
    and the conv are linked, the SiLU becomes a pass-through for its fused output only; on the CPU (no Triton
    device) everything computes as before."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(1)
    block = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=8, groups=4).eval()
    x, temb = torch.randn(1, 16, 5, 5), torch.randn(1, 8)
    with torch.no_grad():
        ranges = collect_act_ranges(block, lambda: block(x, temb))
        q = quantize_model(block, {"conv1": LayerFormat(8, 8), "conv2": LayerFormat(8, 8),
                                   "conv_shortcut": LayerFormat(8, 8)}, ranges)[0]
        y0 = q(x, temb)
        gs = {g.kind: g for g in fusion.groups(q)}
        assert set(gs) == {"groupnorm_silu"} and len(fusion.groups(q)) == 2
        assert {id(r) for g in fusion.groups(q) for r in g.readers} == {id(q.conv1), id(q.conv2)}
        assert torch.equal(q(x, temb), y0)
        # the pass-through acts only on a tensor a fused GroupNorm marked (unchanged since)
        t = torch.randn(3)
        assert torch.equal(q.nonlinearity(t), torch.nn.functional.silu(t))
        setattr(t, fusion.ACTIVATED_ATTR, (None, t._version))
        assert q.nonlinearity(t) is t
        t.add_(1)
        assert torch.equal(q.nonlinearity(t), torch.nn.functional.silu(t))
    # dynamic activations are not what the GroupNorm kernel writes: not linked
    with torch.no_grad():
        qd = quantize_model(block, {"conv1": LayerFormat(8, 8, a_mode="dynamic")}, ranges)[0]
        qd(x, temb)
    assert fusion.groups(qd) == []
