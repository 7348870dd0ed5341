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
