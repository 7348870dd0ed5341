"""quant/offload.py: a denoiser's blocks streamed through a device one at a time (#23 item 4)."""
import weakref

import pytest
import torch
import torch.nn as nn

from mixquant.quant import engine
from mixquant.quant.offload import streamed


def test_each_block_is_on_the_device_only_while_it_runs():
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)) for _ in range(3))
    model = nn.Module()
    model.inp, model.blocks, model.out = nn.Linear(8, 8), blocks, nn.Linear(8, 8)
    model.forward = lambda x: model.out(model.blocks[2](model.blocks[1](model.blocks[0](model.inp(x)))))
    params = [p for p in model.parameters()]
    seen = []
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: seen.append(
            (i, [p.device.type for bb in blocks for p in bb.parameters()], model.inp.weight.device.type)))
    with streamed(model, blocks, "meta"):
        y = model(torch.randn(2, 8, device="meta"))
        assert y.device.type == "meta"
    # (hooks registered before streamed() run before its own: each block is seen as it was just before onloading)
    for i, devices, inp in seen:
        assert inp == "meta" and all(d == "cpu" for d in devices)  # the rest on the device; no block left there
    assert [p for p in model.parameters()] == params and all(p.device.type == "cpu" for p in params)


@pytest.mark.parametrize("sens_mode", ["local", "fast"])
def test_engine_plans_the_same_through_a_streamed_model(tmp_path, sens_mode):
    """Calibration, sensitivity (local; fast, whose backward recomputes the blocks) and the plan of a small Flux with
    its blocks streamed ("cpu:0" is another torch.device than the tensors' "cpu": every swap and copy runs) equal the
    plain run's."""
    from mixquant.app.diffusers_host.random_models import random_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings

    pipe = random_pipeline("flux", "small", seed=0, outliers=20.0)
    runner = PipelineRunner(pipe, SamplerSettings(steps=2, guidance=3.5, width=32, height=32))
    model = runner.denoiser
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    cfg = engine.QuantizeConfig(avg_w_bits=5, speed="off", sens_mode=sens_mode, sweep_seconds=0, cache_dir="",
                                weight_search="mse")
    prompts = ["a red fox", "a blue car"]
    plain = engine.plan(runner, engine.prepare(runner, prompts, cfg), cfg)
    with streamed(model, blocks, "cpu:0"):
        prepared = engine.prepare(runner, prompts, cfg)
        alloc = engine.plan(runner, prepared, cfg)
    assert {n: f.name for n, f in alloc.plan.items()} == {n: f.name for n, f in plain.plan.items()}
    assert prepared.sens.loss == engine.prepare(runner, prompts, cfg).sens.loss
    q, _ = engine.quantize(model, alloc, prepared.calib, device="cpu:0")
    assert sum(1 for f in alloc.plan.values() if not f.is_float) > 0


def test_fast_sensitivity_backward_holds_one_block_on_the_device(monkeypatch):
    """The fast sensitivity's backward through a streamed model recomputes it block by block (offload.recomputed):
    while the gradients come back, the device holds the model's parts outside the blocks and at most one block's
    weights (without the recomputation autograd kept every block's device copies until the backward), the gains are
    the plain model's exactly, and every block's own tensors are back home after. Only the blocks' layers are tapped,
    as the engine does (the time embedders stay float): a block's modulation layer then gets its gradient through a
    leaf the tap makes, which the recomputation must make again."""
    from mixquant.app.diffusers_host.random_models import random_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings
    from mixquant.quant import offload, sensitivity
    from mixquant.quant.runner import capture_calls

    pipe = random_pipeline("flux", "small", seed=0)
    runner = PipelineRunner(pipe, SamplerSettings(steps=2, guidance=3.5, width=32, height=32))
    model = runner.denoiser
    call = sensitivity.subsample_call(capture_calls(runner, ["a red fox"], [0])[0][0], 2)
    blocks = offload.stream_blocks(model)
    names = [f"{n}.{m}" for n, b in model.named_children() if isinstance(b, nn.ModuleList)
             for m, layer in b.named_modules() if isinstance(layer, nn.Linear)]
    want = sensitivity.output_gains(model, runner, [call], names, seed=1)
    copies, peak = [], [0]
    moved, gains = offload._moved, sensitivity.coherent_gains

    def counted_moved(t, device, non_blocking=False):
        out = moved(t, device, non_blocking)
        copies.append(weakref.ref(out))
        return out

    def counted_gains(g, cd):  # (runs as each layer's gradient arrives)
        peak[0] = max(peak[0], sum(1 for r in copies if r() is not None))
        return gains(g, cd)

    monkeypatch.setattr(offload, "_moved", counted_moved)
    monkeypatch.setattr(sensitivity, "coherent_gains", counted_gains)
    homes = [id(t) for _, _, t in offload._tensors(model)]
    with offload.streamed(model, blocks, "cpu:0"):
        outside = len(copies)
        got = sensitivity.output_gains(model, runner, [call], names, seed=1)
    per_block = max(sum(1 for _ in offload._tensors(b)) for b in blocks)
    assert outside > 0 and peak[0] - outside <= per_block, (peak[0], outside, per_block, len(blocks))
    assert [id(t) for _, _, t in offload._tensors(model)] == homes
    assert all(b.__dict__.get("_call_impl") is None for b in blocks)
    for kind in want:
        for n in names:
            assert all(torch.equal(a, b) for a, b in zip(want[kind][n], got[kind][n])), (kind, n)


def test_a_layer_swapped_into_a_streamed_block_streams_too():
    """The sweep and the sensitivity swap quantized layers into the blocks: their tensors go to the device with the
    block (found at each call), and a deep copy of a streamed model (the quantized model is one) runs as it is."""
    import copy

    from mixquant.quant.offload import stream, streamed_device, unstream

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Sequential(nn.Linear(4, 4))]))
    block = model[1][0]
    stream(model, [block], "meta")
    try:
        assert streamed_device(model) == torch.device("meta") and model[0].weight.device.type == "meta"
        block[0] = nn.Linear(4, 4)  # swapped in after stream(): on the CPU
        seen = []
        block[0].register_forward_pre_hook(lambda m, a: seen.append(m.weight.device.type))
        block(torch.randn(2, 4, device="meta"))
        assert seen == ["meta"] and block[0].weight.device.type == "cpu"  # onloaded for the call, home after
        twin = copy.deepcopy(model)
        assert streamed_device(twin) is None
        twin[1][0](torch.randn(2, 4))  # the copied hooks leave the copy alone: it runs on the CPU
    finally:
        unstream(model)
    assert model[0].weight.device.type == "cpu" and streamed_device(model) is None


def test_fits_reads_the_devices_free_memory(monkeypatch):
    from mixquant.quant.offload import fits

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2 ** 30, 16 * 2 ** 30))
    assert fits("cuda", 6 * 2 ** 30) and not fits("cuda", 8 * 2 ** 30)  # (20% of 16 GB kept for activations)
    assert fits("cpu", 10 ** 15)


def test_cli_streams_a_model_that_does_not_fit(tmp_path, monkeypatch, capsys):
    """`mixquant quantize` on a model that does not fit the device (told so here: "cpu:0" is another torch.device
    than the tensors' "cpu", so every copy runs): the denoiser streams, the fast sensitivity runs (its backward
    recomputing block by block), nothing is timed, the quantized model is built in the device, and `generate` uses
    the file."""
    import json

    from mixquant.app.cli import main as cli
    from mixquant.app.diffusers_host import models
    from mixquant.app.diffusers_host.random_models import random_pipeline

    folder = tmp_path / "flux"
    random_pipeline("flux", "small", seed=0).save_pretrained(str(folder))
    monkeypatch.setattr(models, "fits", lambda device, nbytes: False)
    pipe = models.load_pipeline(str(folder), device="cpu:0")
    from mixquant.quant.offload import streamed_device, unstream

    assert streamed_device(pipe.transformer) == torch.device("cpu:0")
    unstream(pipe.transformer)
    out, rep = tmp_path / "q.safetensors", tmp_path / "q.json"
    common = ["--steps", "2", "--size", "32x32", "--device", "cpu:0"]
    rc = cli(["quantize", "--model", str(folder), "--prompt", "a red fox", "--avg-w-bits", "6", "--out", str(out),
              "--report", str(rep), *common])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "stream through cpu:0" in err
    report = json.loads(rep.read_text())
    assert report["streamed"] == {"device": "cpu:0", "sensitivity_mode": "fast"}
    assert report["sensitivity_mode"] == "fast" and not report.get("speed")
    img = tmp_path / "g.png"
    assert cli(["generate", "--model", str(folder), "--quantized", str(out), "--prompt", "a red fox",
                "--out", str(img), *common]) == 0, capsys.readouterr().err
    assert img.stat().st_size > 0
