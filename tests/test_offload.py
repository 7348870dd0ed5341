"""quant/offload.py: a denoiser's blocks streamed through a device one at a time (#23 item 4)."""
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


def test_engine_plans_the_same_through_a_streamed_model(tmp_path):
    """Calibration, local sensitivity and the plan of a small Flux with its blocks streamed ("cpu:0" is another
    torch.device than the tensors' "cpu": every swap and copy runs) equal the plain run's."""
    from mixquant.app.diffusers_host.random_models import random_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings

    pipe = random_pipeline("flux", "small", seed=0, outliers=20.0)
    runner = PipelineRunner(pipe, SamplerSettings(steps=2, guidance=3.5, width=32, height=32))
    model = runner.denoiser
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    cfg = engine.QuantizeConfig(avg_w_bits=5, speed="off", sens_mode="local", sweep_seconds=0, cache_dir="",
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
    than the tensors' "cpu", so every copy runs): the denoiser streams, the fast sensitivity gives way to the local
    one, the quantized model is built in the device, and `generate` uses the file."""
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
    assert report["streamed"] == {"device": "cpu:0", "sensitivity_mode": "local"}
    assert report["sensitivity_mode"] == "local" and not report.get("speed")
    img = tmp_path / "g.png"
    assert cli(["generate", "--model", str(folder), "--quantized", str(out), "--prompt", "a red fox",
                "--out", str(img), *common]) == 0, capsys.readouterr().err
    assert img.stat().st_size > 0
