"""BOS-aware to_k/to_v, data-found skip split, timestep groups, interruption — on small modules driven through
the DenoiserRunner interface (no diffusers pipeline needed)."""
import pytest
import torch
import torch.nn as nn

from mixquant.quant.apply import quantize_model
from mixquant.quant.calibration import calibrate
from mixquant.quant.errors import InterruptedRun, MixQuantError
from mixquant.quant.formats import LayerFormat
from mixquant.quant.runner import DenoiserRunner, Progress


class CrossAttn(nn.Module):
    """The cross-attention of an SD1.5 transformer block (first level: query 320, context 768, 8 heads x 40), as
    the diffusers Attention module builds it; wrapped so the layer names are `attn2.to_k` etc."""

    def __init__(self, query_dim=320, context_dim=768, heads=8, dim_head=40):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn2 = Attention(query_dim=query_dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head)

    def forward(self, x, t, context):
        return self.attn2(x, encoder_hidden_states=context)


def clip_like_context(batch, tokens, dim, bos_outlier: bool, seed=0):
    """Tokens ~N(0, 1) with a few larger channels (|x| up to ~15, as CLIP's last layer); token 0 identical for every
    prompt (causal attention) and, like real CLIP's BOS, ~825 in a few channels when `bos_outlier`."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, tokens, dim, generator=g)
    ctx[:, :, :4] *= 12
    bos = torch.randn(dim, generator=torch.Generator().manual_seed(99))
    if bos_outlier:
        bos[[3, 17, dim - 5]] = torch.tensor([825.0, -640.0, 410.0])
    ctx[:, 0] = bos
    return ctx


class ModuleRunner(DenoiserRunner):
    def __init__(self, module, xs, contexts, steps=4):
        self.denoiser, self.xs, self.contexts, self.steps = module, xs, contexts, steps

    def timesteps(self):
        return [1000.0 * (1 - i / self.steps) for i in range(self.steps)]

    def sample(self, prompts, seeds):
        outs = []
        for t in self.timesteps():
            outs.append(self.denoiser(self.xs, torch.tensor(t), self.contexts))
        return outs[-1]

    def timestep_of(self, args, kwargs):
        return float(args[1])

    def expected_calls(self, n):
        return self.steps


def _cross_attn_error(module, ctx, x, bos: bool, fmt=LayerFormat(8, 8)):
    runner = ModuleRunner(module, x, ctx)
    calib = calibrate(runner, ["p"], [0])
    names = ["attn2.to_k", "attn2.to_v"]
    plan = {n: fmt for n in names}
    q, _ = quantize_model(module, plan, calib.ranges(), bos=calib.bos() if bos else None)
    with torch.no_grad():
        ref = module(x, torch.tensor(0.0), ctx)
        out = q(x, torch.tensor(0.0), ctx)
    return float(((out - ref) ** 2).sum() / (ref ** 2).sum()), calib, q


@pytest.mark.parametrize("dims", [dict(query_dim=320, context_dim=768, heads=8, dim_head=40),  # SD1.5 level 1
                                  dict(query_dim=32, context_dim=64, heads=8, dim_head=4)])  # digits UNet level 1
def test_bos_aware_beats_naive_with_clip_like_token0(dims):
    torch.manual_seed(0)
    m = CrossAttn(**dims).eval()
    ctx = clip_like_context(4, 16, dims["context_dim"], bos_outlier=True)
    ctx[1] = 0  # an all-zero negative conditioning (ComfyUI ConditioningZeroOut) in the batch
    x = torch.randn(4, 64, dims["query_dim"])
    naive, calib, _ = _cross_attn_error(m, ctx, x, bos=False)
    aware, _, q = _cross_attn_error(m, ctx, x, bos=True)
    assert set(calib.bos()) == {"attn2.to_k", "attn2.to_v"}
    assert aware < naive / 1000, (aware, naive)  # measured: 0.99 vs 1e-6 (SD1.5 dims), 0.96 vs 5e-7 (digits dims)
    # token 0 is exact where it is the BOS embedding, and the zero conditioning gets the bias
    with torch.no_grad():
        k_fp = m.attn2.to_k(ctx)
        k_q = q.attn2.to_k(ctx)
    assert torch.allclose(k_q[0, 0], k_fp[0, 0], atol=1e-4)
    assert torch.allclose(k_q[1, 0], k_fp[1, 0], atol=1e-6)


def test_ordinary_token0_changes_nothing():
    torch.manual_seed(0)
    m = CrossAttn(32, 64, 8, 4).eval()
    ctx = clip_like_context(4, 16, 64, bos_outlier=False)
    x = torch.randn(4, 64, 32)
    plain, calib, q1 = _cross_attn_error(m, ctx, x, bos=False)
    aware, _, q2 = _cross_attn_error(m, ctx, x, bos=True)
    assert calib.bos() == {}
    assert plain == aware
    with torch.no_grad():
        assert torch.equal(q1(x, torch.tensor(0.0), ctx), q2(x, torch.tensor(0.0), ctx))


class SkipConcat(nn.Module):
    """A UNet up-block shape: the input of a conv is cat(hidden, skip) with very different ranges."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(48, 16, 3, padding=1)

    def forward(self, x, t, skip):
        return self.conv(torch.cat([x, skip], dim=1))


def test_skip_split_found_from_data_and_helps():
    torch.manual_seed(0)
    m = SkipConcat().eval()
    x = torch.randn(2, 32, 8, 8) * 0.05
    skip = torch.randn(2, 16, 8, 8) * 30
    runner = ModuleRunner(m, x, skip)
    calib = calibrate(runner, ["p"], [0])
    r = calib.ranges()["conv"]
    assert r.split == 32
    plan = {"conv": LayerFormat(8, 8)}
    with torch.no_grad():
        ref = m(x, 0, skip)
        err = {}
        for split in (True, False):
            q, _ = quantize_model(m, plan, calib.ranges(split=split))
            err[split] = float(((q(x, 0, skip) - ref) ** 2).sum() / (ref ** 2).sum())
    assert err[True] < err[False]


def test_timestep_groups_record_separate_ranges():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, t, c):
            return self.lin(x * (1 + float(t) / 10))  # activations grow with the timestep

    m = Scaled().eval()
    runner = ModuleRunner(m, torch.randn(3, 8), None, steps=8)
    calib = calibrate(runner, ["p"], [0], n_groups=4)
    r = calib.ranges()["lin"]
    assert r.lo.shape == (4, 1)
    span = (r.hi - r.lo).reshape(-1)
    assert all(a > b for a, b in zip(span, span[1:]))  # noisiest group first, widest range
    assert calib.n_groups == 4 and len(calib.group_bounds()) == 4


def test_empty_prompts_and_nan_activations():
    m = CrossAttn(32, 64, 8, 4).eval()
    x = torch.randn(2, 8, 32)
    ctx = clip_like_context(2, 4, 64, False)
    with pytest.raises(MixQuantError, match="empty"):
        calibrate(ModuleRunner(m, x, ctx), [], [])
    bad = ctx.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(MixQuantError, match="NaN"):
        calibrate(ModuleRunner(m, x, bad), ["p"], [0])
    # hooks were removed: the module runs clean afterwards
    assert not m.attn2.to_k._forward_pre_hooks


def test_interrupt_raises_cleanly():
    m = CrossAttn(32, 64, 8, 4).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    runner = ModuleRunner(m, torch.randn(2, 8, 32), clip_like_context(2, 4, 64, False))
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(InterruptedRun, match="unchanged"):
        calibrate(runner, ["p"], [0], progress=Progress(should_stop=stop))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in m.modules())


def _bos_to_k():
    """(FP cross-attention, a context with a BOS outlier, the quantized BOS-aware to_k) for the LoRA tests."""
    torch.manual_seed(0)
    m = CrossAttn(32, 64, 8, 4).eval()
    ctx = clip_like_context(2, 6, 64, bos_outlier=True)
    _, _, q = _cross_attn_error(m, ctx, torch.randn(2, 8, 32), bos=True)
    return m, ctx, q.attn2.to_k


def test_bos_output_follows_lora_and_its_removal():
    """ComfyUI patches a LoRA with convert_weight/set_weight and unpatches by restoring only `.weight`: the
    precomputed BOS output must follow both ways."""
    m, ctx, k = _bos_to_k()
    with torch.no_grad():
        before = k(ctx)[:, 0].clone()
        backup = k.weight
        w = k.convert_weight(k.weight.to(torch.float32, copy=True), inplace=True)
        delta = torch.randn_like(w) * 0.05
        k.set_weight(w + delta, seed=1)
        patched = k(ctx)[:, 0]
        expect = torch.nn.functional.linear(ctx[:, 0], m.attn2.to_k.weight + delta)  # FP weight + LoRA delta
        assert torch.allclose(patched, expect, atol=2e-2 * float(expect.abs().max()))
        assert not torch.allclose(patched, before)
        k.weight = backup  # unpatch
        assert torch.equal(k(ctx)[:, 0], before)


@pytest.mark.parametrize("gpu_like", [False, True])
def test_bos_output_follows_a_restore_through_data(gpu_like, monkeypatch):
    """ComfyUI's hook-scheduled LoRAs patch in place and restore with `param.data.copy_(backup)` (copy_to_param),
    which keeps a plain Parameter's version counter: the memoized BOS output must still go back to the original's.
    gpu_like: without the content fingerprint (on a GPU it would synchronize), only the version counter."""
    if gpu_like:
        import mixquant.quant.layers as layers
        monkeypatch.setattr(layers, "fingerprint", lambda t: None)
    m, ctx, k = _bos_to_k()
    with torch.no_grad():
        before = k(ctx)[:, 0].clone()
        backup = k.weight.detach().clone()
        w = k.convert_weight(k.weight.to(torch.float32, copy=True), inplace=True)
        k.set_weight(w + torch.randn_like(w) * 0.05, inplace_update=True, seed=1)
        patched = k(ctx)[:, 0].clone()
        assert not torch.allclose(patched, before)
        k.weight.data.copy_(backup)  # no version bump
        assert torch.equal(k(ctx)[:, 0], before)
