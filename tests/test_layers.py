import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn

from mixquant.kernels import dispatch
from mixquant.kernels.packing import row_layout
from mixquant.quant.formats import LayerFormat, as_format
from mixquant.quant.layers import QuantConv2d, QuantLinear
from mixquant.quant.quantizer import packed_weight_bytes

FORMATS = ["W8A16", "W8A8", "W8A8d", "W4g64A16", "W4A8", "W4g128A8d", "W2g64A16", "W16A8"]


def _pair(layer_fp, fmt, x):
    cls = QuantLinear if isinstance(layer_fp, nn.Linear) else QuantConv2d
    q = cls.from_float(layer_fp, fmt)
    s = cls.from_float(layer_fp, fmt, mode="simulate")
    if fmt.a_bits < 16 and fmt.a_mode == "static":
        for m in (q, s):
            m.set_act_range(x.min(), x.max())
    return q, s


@pytest.mark.parametrize("name", FORMATS)
def test_linear_packed_equals_simulate_and_is_close(name):
    torch.manual_seed(0)
    fmt = as_format(name)
    lin = nn.Linear(150, 40)
    x = torch.randn(2, 9, 150)
    q, s = _pair(lin, fmt, x)
    with torch.no_grad(), dispatch.use_backend("reference"):
        y, yq, ys = lin(x), q(x), s(x)
    assert torch.equal(yq, ys)  # fake mode == packed mode, bit for bit (reference kernels)
    with torch.no_grad():  # and the fast path this machine dispatches to agrees with it
        assert float((q(x) - yq).abs().max()) <= 1e-4 * float(yq.abs().max()) + 1e-6
    rel = float(((yq - y) ** 2).sum() / (y ** 2).sum())
    bound = {8: 5e-4, 4: 0.03, 2: 0.3, 16: 5e-4}[fmt.w_bits]
    assert rel < bound


@pytest.mark.parametrize("name", ["W8A8", "W8A8d", "W4g64A8", "W4A16", "W2g64A16"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_packed_equals_simulate_and_is_close(name, stride):
    torch.manual_seed(1)
    fmt = as_format(name)
    conv = nn.Conv2d(12, 20, 3, stride=stride, padding=1)
    x = torch.randn(3, 12, 9, 7)
    q, s = _pair(conv, fmt, x)
    with torch.no_grad(), dispatch.use_backend("reference"):
        y, yq, ys = conv(x), q(x), s(x)
    assert yq.shape == y.shape
    assert torch.equal(yq, ys)
    with torch.no_grad():
        assert float((q(x) - yq).abs().max()) <= 1e-4 * float(yq.abs().max()) + 1e-6
    rel = float(((yq - y) ** 2).sum() / (y ** 2).sum())
    assert rel < {8: 5e-4, 4: 0.03, 2: 0.3}[fmt.w_bits]


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128), (4, 64), (2, 64)])
def test_storage_is_really_packed(bits, group):
    lin = nn.Linear(512, 256).half()
    fmt = LayerFormat(bits, 16, group)
    q = QuantLinear.from_float(lin, fmt)
    sd = q.state_dict()
    # no float tensor the size of the weight survives
    assert not any(t.is_floating_point() and t.numel() >= 256 * 512 for t in sd.values())
    w_bytes = q.weight.untyped_storage().nbytes()
    expect = packed_weight_bytes(256, 512, bits, group, bits == 8)
    assert expect <= w_bytes <= expect + 256 * 15  # rows padded to 16 bytes
    assert w_bytes == 256 * row_layout(512, bits, q.groups, not fmt.symmetric)["row_bytes"] == fmt.weight_bytes(256, 512)
    assert q.weight.stride(0) % 16 == 0 or q.weight.stride(0) < 512  # long rows start 16-byte aligned (GPU loads)
    fp16 = lin.weight.untyped_storage().nbytes()
    assert w_bytes / fp16 <= {8: 0.52, 4: 0.27 if group == 128 else 0.29, 2: 0.17}[bits]


@pytest.mark.parametrize("cls_fp,fmt", [(lambda: nn.Linear(64, 32), "W8A16"), (lambda: nn.Linear(64, 32), "W4g64A16"),
                                        (lambda: nn.Conv2d(8, 16, 3, padding=1), "W4A16")])
def test_lora_hooks_round_trip(cls_fp, fmt):
    """ModelPatcher flow: backup = weight; temp = weight.to(float32, copy=True); convert_weight; add delta;
    set_weight; and restoring the backup restores the layer exactly."""
    torch.manual_seed(0)
    fp = cls_fp()
    q = (QuantLinear if isinstance(fp, nn.Linear) else QuantConv2d).from_float(fp, as_format(fmt))
    x = torch.randn(2, 64) if isinstance(fp, nn.Linear) else torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y0 = q(x)
    backup = q.weight
    temp = q.weight.to(torch.float32, copy=True)
    w = q.convert_weight(temp, inplace=True)
    assert w.shape == fp.weight.shape
    amax = fp.weight.abs().max()
    step = amax / 127 if "W8" in fmt else 2 * amax / 15  # one grid step of the format
    assert (w - fp.weight).abs().max() <= step  # dequantized ~ FP weight
    delta = torch.zeros_like(w)
    delta.view(-1)[::7] = 0.05
    q.set_weight(w + delta, inplace_update=False, seed=123)
    w2 = q.convert_weight(q.weight.to(torch.float32, copy=True))
    step2 = (amax + 0.05) / 127 if "W8" in fmt else 2 * (amax + 0.05) / 15
    assert (w2 - (w + delta)).abs().max() <= step2  # moved by the delta within quantization error
    hit = delta != 0
    moved = (w2 - w)[hit].mean()
    assert abs(float(moved) - 0.05) < 0.2 * 0.05  # the patched elements moved by the delta, on average
    assert abs(float((w2 - w)[~hit].mean())) < 0.1 * 0.05  # the others did not drift
    q.weight = backup  # ComfyUI's unpatch: restore only `.weight`
    with torch.no_grad():
        assert torch.equal(q(x), y0)


def test_static_act_without_range_says_what_to_do():
    q = QuantLinear.from_float(nn.Linear(8, 4), LayerFormat(8, 8))
    with pytest.raises(RuntimeError, match="calibrate"):
        q(torch.randn(1, 8))


def test_timestep_groups_select_their_range():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q = QuantLinear.from_float(lin, LayerFormat(8, 4))
    q.set_act_range(torch.tensor([[-1.0], [-50.0]]), torch.tensor([[1.0], [50.0]]))
    x = torch.randn(4, 16) * 0.5
    q.act_group = 0
    e0 = float((q(x) - lin(x)).pow(2).mean())
    q.act_group = 1
    e1 = float((q(x) - lin(x)).pow(2).mean())
    assert e0 < e1 / 10  # the tight range fits these small activations far better


def test_channel_split_ranges():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    with torch.no_grad():
        lin.weight[:, 16:] = 0  # the output only sees the small-range channels
    x = torch.cat([torch.randn(6, 16) * 0.1, torch.randn(6, 16) * 20], dim=1)  # skip-concat: two scales
    one = QuantLinear.from_float(lin, LayerFormat(8, 4))
    one.set_act_range(x.min(), x.max())
    two = QuantLinear.from_float(lin, LayerFormat(8, 4))
    lo = torch.stack([x[:, :16].min(), x[:, 16:].min()]).reshape(1, 2)
    hi = torch.stack([x[:, :16].max(), x[:, 16:].max()]).reshape(1, 2)
    two.set_act_range(lo, hi, split=16)
    y = lin(x)
    assert float((two(x) - y).pow(2).mean()) < 0.01 * float((one(x) - y).pow(2).mean())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_moves_packed_tensors_to_the_input_device():
    q = QuantLinear.from_float(nn.Linear(64, 32), LayerFormat(4, 16, 64))
    x = torch.randn(2, 64, device="cuda")
    assert q(x).device.type == "cuda" and q.weight.device.type == "cpu"


def test_layers_run_under_inference_mode():
    """Users (and `mixquant generate`) run pipelines under torch.inference_mode(): the kernel caches must cope."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_float(lin, LayerFormat(8, 8, None, "dynamic"))
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = q(x)
    with torch.inference_mode():
        a = q(x)
        b = q(x)  # second call: served from the layer's kernel cache
    assert torch.allclose(a, ref, atol=1e-5) and torch.equal(a, b)


def test_quantized_layers_trace_without_graph_breaks():
    """torch.compile(fullgraph=True) traces a quantized layer's Python (argument memos, row layouts, dispatch): what
    the GPU test compiles with Triton, checked here on the reference path with dynamo's eager backend."""
    lin = QuantLinear.from_float(nn.Linear(32, 16), LayerFormat(8, 8))
    lin.set_act_range(torch.tensor(-1.0), torch.tensor(1.0))
    conv = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1), LayerFormat(4, 8, 32))
    conv.set_act_range(torch.tensor(-1.0), torch.tensor(1.0))
    x, xc = torch.randn(4, 32), torch.randn(1, 8, 5, 5)
    with dispatch.use_backend("reference"), torch.no_grad():
        for layer, inp in ((lin, x), (conv, xc)):
            torch._dynamo.reset()
            assert torch.equal(torch.compile(layer, fullgraph=True, backend="eager")(inp), layer(inp))


def test_cpu_routes_compile_as_one_op_per_layer():
    """torch.compile (inductor, as ComfyUI's TorchCompileModel node uses it) on the CPU: each quantized layer is one
    op in the graph (its route choice and weight caches run eagerly inside, as without compile; tracing them broke
    on inference tensors), the graph has no breaks, and the result is the eager model's."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        pytest.skip("inductor needs a C++ compiler")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(), nn.Flatten(2))
    lin = nn.Linear(25, 32)
    q_conv = QuantConv2d.from_float(model[0], LayerFormat(8, 8))
    q_conv.set_act_range(torch.tensor(-3.0), torch.tensor(3.0))
    q_lin = QuantLinear.from_float(lin, LayerFormat(4, 8, 32))
    q_lin.set_act_range(torch.tensor(-2.0), torch.tensor(2.0))
    model[0] = q_conv
    model.append(q_lin)
    x = torch.randn(2, 8, 5, 5)
    with dispatch.use_backend("cpu"), torch.inference_mode():
        y = model(x)
        torch._dynamo.reset()
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
        ops = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert {"mixquant.cpu_qconv2d.default", "mixquant.cpu_qlinear.default"} <= ops, ops
        torch._dynamo.reset()
        yc = torch.compile(model)(x)
    assert float((yc - y).abs().max() / y.abs().max()) < 2e-2


def test_custom_ops_survive_a_second_import_of_the_package():
    """ComfyUI imports the node pack under its folder's name and pytest imports the checkout's root as `main`, so the
    kernels can register their ops twice in one process. torch.library.custom_op would replace the first
    registration and leave the first import's ops on a freed schema (dynamo then failed with `vector::reserve` or
    segfaulted in about half the runs): the second import must get the op the first registered, and layers of the
    first import must still compile."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import importlib.util, os, sys
        import torch, torch.nn as nn
        import mixquant
        from mixquant.kernels import cpu_routes, dispatch
        from mixquant.quant.formats import LayerFormat
        from mixquant.quant.layers import QuantConv2d, QuantLinear

        root = os.path.dirname(mixquant.__file__)
        spec = importlib.util.spec_from_file_location("pack_folder", os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        again = importlib.util.module_from_spec(spec)
        sys.modules["pack_folder"] = again
        spec.loader.exec_module(again)
        from pack_folder.kernels import cpu_routes as cpu_routes_again
        assert cpu_routes_again is not cpu_routes
        for op in ("linear", "conv2d"):
            assert cpu_routes_again.compiled_op(op) is cpu_routes.compiled_op(op), op

        torch.manual_seed(0)
        conv = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), LayerFormat(8, 8))
        conv.set_act_range(torch.tensor(-3.0), torch.tensor(3.0))
        lin = QuantLinear.from_float(nn.Linear(25, 32), LayerFormat(4, 8, 32))
        lin.set_act_range(torch.tensor(-2.0), torch.tensor(2.0))
        model = nn.Sequential(conv, nn.Flatten(2), lin)
        x = torch.randn(2, 8, 5, 5)
        with dispatch.use_backend("cpu"), torch.inference_mode():
            y = model(x)
            for _ in range(4):
                torch._dynamo.reset()
                yc = torch.compile(model, backend="eager", fullgraph=True)(x)
                assert float((yc - y).abs().max() / y.abs().max()) < 2e-2
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tempfile.gettempdir())
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_activation_args_follow_in_place_range_updates_and_groups():
    """The per-layer memo of activation arguments must see a range loaded in place (load_state_dict copies into the
    buffers) and a switch of timestep group."""
    lin = nn.Linear(16, 8)
    q = QuantLinear.from_float(lin, LayerFormat(8, 8))
    q.set_act_range(torch.tensor([[-1.0], [-4.0]]), torch.tensor([[1.0], [4.0]]))
    x = torch.randn(5, 16) * 3
    with torch.no_grad():
        first = q(x)
        q.act_group = 1
        wide = q(x)
        assert not torch.equal(first, wide)
        q.act_group = 0
        assert torch.equal(q(x), first)
        q.load_state_dict({**q.state_dict(), "input_scale": q.input_scale * 4, "input_zero": q.input_zero})
        assert torch.equal(q(x), wide)  # group 0 now holds group 1's scale (and the same zero point)


def test_a_layer_binds_its_call_once_per_input_shape_and_binds_again_when_it_must(monkeypatch):
    """#22 item 4: a packed layer resolves its kernel call once per input shape (dispatch.bind) and keeps it; it binds
    again when anything the bound call fixed may have changed (timestep group, forced backend, weight), never
    returns what the unbound call would not, and a copy does not carry its bound calls."""
    binds, real = [], dispatch.bind
    monkeypatch.setattr(dispatch, "bind", lambda op, x, **k: (binds.append(tuple(x.shape)), real(op, x, **k))[1])
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(48, 24), LayerFormat(8, 8))
    q.set_act_range(torch.tensor([[-2.0], [-6.0]]), torch.tensor([[2.0], [6.0]]))
    x, x1 = torch.randn(6, 48) * 3, torch.randn(1, 48)

    def unbound(x):
        return dispatch.linear(x, **q._kernel_args(q.weight, q.bias, x.device))

    with torch.inference_mode():
        y = q(x)
        assert torch.equal(q(x), y) and torch.equal(q(x1), unbound(x1)) and torch.equal(q(x), y)
        assert binds == [(6, 48), (1, 48)]  # two shapes, each bound once
        assert torch.equal(y, unbound(x))
        q.act_group = 1
        assert not torch.equal(q(x), y) and torch.equal(q(x), unbound(x)) and len(binds) == 3
        q.act_group = 0
        with dispatch.use_backend("reference"):
            assert torch.equal(q(x), unbound(x)) and len(binds) == 4
        w = q.convert_weight(q.weight.to(torch.float32, copy=True))
        q.set_weight(w * 1.5, inplace_update=True)
        assert torch.equal(q(x), unbound(x)) and not torch.equal(q(x), y) and len(binds) == 5
    assert "_bound_memo" in q.__dict__ and "_bound_memo" not in copy.deepcopy(q).__dict__
    q.to(torch.float32)  # a move (here to what it is): the bound calls hold views of the weight it moves
    assert "_bound_memo" not in q.__dict__


def _gpu_like_cpu_cache(monkeypatch):
    """The CPU's oneDNN route (it keeps a prepacked copy per layer) without the content fingerprint that backs up its
    cache key on the CPU: as on a GPU, where reading the tensor would synchronize."""
    from mixquant.kernels import cache as kernel_cache
    from mixquant.kernels import cpu_routes
    if not cpu_routes._has_onednn():
        pytest.skip("no oneDNN int8 ops in this torch")
    monkeypatch.setattr(kernel_cache, "fingerprint", lambda t: None)
    monkeypatch.setattr(cpu_routes, "choose", lambda op, **kw: "onednn_split")


def _two_layers(cls_fp, fmt):
    torch.manual_seed(0)
    fp = cls_fp()
    cls = QuantLinear if isinstance(fp, nn.Linear) else QuantConv2d
    q = cls.from_float(fp, as_format(fmt))
    x = torch.randn(6, 48) if cls is QuantLinear else torch.randn(2, 8, 6, 6)
    q.set_act_range(x.min(), x.max())
    other = cls.from_float(cls_fp(), as_format(fmt))
    other.set_act_range(x.min(), x.max())
    other.bias = q.bias  # (only the weight changes)
    return q, other, x


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("cls_fp,fmt", [(lambda: nn.Linear(48, 24), "W8A8"), (lambda: nn.Linear(48, 24), "W4A8"),
                                        (lambda: nn.Conv2d(8, 16, 3, padding=1), "W8A8")])
def test_writes_through_data_reach_every_kernel_cache(cls_fp, fmt, inference, monkeypatch):
    """ComfyUI swaps hook-scheduled LoRA weights in and out with `param.data.copy_(...)` (copy_to_param), which on a
    plain Parameter keeps the version counter the per-layer caches (prepacked int8 weights, the Triton weight sums)
    key on; ComfyUI also runs every node under torch.inference_mode, where tensors have no version counter at all.
    The layer must still see such writes (its weight_epoch)."""
    _gpu_like_cpu_cache(monkeypatch)
    with (torch.inference_mode() if inference else torch.no_grad()):
        q, other, x = _two_layers(cls_fp, fmt)
        assert q.weight.is_inference() == inference
        before = q(x).clone()
        backup = q.weight.detach().clone()
        q.weight.data.copy_(other.weight)  # a hook's weights in
        assert torch.equal(q(x), other(x))
        q.weight.data.copy_(backup)  # and out again
        assert torch.equal(q(x), before)
        w = q.convert_weight(q.weight.to(torch.float32, copy=True))
        q.set_weight(w * 1.5, inplace_update=True)  # a LoRA through the layer's own hook, in place
        assert not torch.equal(q(x), before)
        assert any(k.startswith("cpu_onednn") for k in q._kernel_cache)  # (the cached route ran)


def test_a_new_weight_at_a_freed_weights_address_is_not_served_stale(monkeypatch):
    """LoRA strength changed between runs: ComfyUI restores the original (set_attr_param) and patches again with no
    forward in between; the new packed weight may land at the freed previous one's address, with the same version."""
    _gpu_like_cpu_cache(monkeypatch)
    q, _, x = _two_layers(lambda: nn.Linear(48, 24), "W8A8")
    w0 = q.convert_weight(q.weight.to(torch.float32, copy=True))
    with torch.no_grad():
        for strength in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
            backup = q.weight
            q.set_weight(w0 * strength)  # patch (not in place: a new Parameter)
            fresh = QuantLinear.from_float(nn.Linear(48, 24), LayerFormat(8, 8))
            fresh.weight, fresh.bias = nn.Parameter(q.weight.detach().clone(), requires_grad=False), q.bias
            fresh.set_act_range(x.min(), x.max())
            assert torch.equal(q(x), fresh(x)), strength
            q.weight = nn.Parameter(backup, requires_grad=False)  # unpatch


def test_quantized_layer_state_dict_saves_with_torch_save(tmp_path):
    """Not our file format (safetensors), but users may torch.save a quantized module's state dict: it must save and
    load back with weights_only=True."""
    q = QuantLinear.from_float(nn.Linear(16, 8), LayerFormat(8, 8))
    q.set_act_range(torch.tensor(-1.0), torch.tensor(1.0))
    path = tmp_path / "sd.pt"
    torch.save(q.state_dict(), path)
    back = torch.load(path, weights_only=True)
    assert torch.equal(back["weight"], q.weight) and type(back["weight"]) in (torch.Tensor, nn.Parameter)


def test_weight_stays_counted_through_comfyui_set_attr_param():
    """ComfyUI's set_attr_param puts back a backed-up weight as `nn.Parameter(backup)`, where the backup may be the
    layer's own (Counted)Parameter: that must work, share the storage, and keep counting writes through `.data`."""
    from mixquant.quant.layers import CountedParameter
    q = QuantLinear.from_float(nn.Linear(16, 8), LayerFormat(8, 8))
    backup = q.weight
    q.weight = nn.Parameter(backup, requires_grad=False)  # set_attr_param(model, key, bk.weight)
    assert isinstance(q.weight, CountedParameter) and q.weight.data_ptr() == backup.data_ptr()
    q.weight = nn.Parameter(torch.zeros_like(backup), requires_grad=False)  # a plain Parameter gets wrapped too
    assert isinstance(q.weight, CountedParameter)
    v = q.weight._version
    q.weight.data.copy_(backup)
    assert q.weight._version > v and torch.equal(q.weight, backup)
    assert isinstance(copy.deepcopy(q).weight, CountedParameter)
    q.to(torch.float64)  # (module moves assign through .data: the type stays)
    assert isinstance(q.weight, CountedParameter) and q.weight.dtype == torch.uint8
