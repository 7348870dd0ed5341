"""Sensitivity sharded over processes (torch.distributed, gloo on CPU; NCCL on GPUs under torchrun) gives the same
table, and so the same plan, as one process."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel
    from mixquant.quant import distributed, engine
    from mixquant.quant.calibration import calibrate
    from mixquant.quant.runner import DenoiserRunner

    SMALL_UNET = json.loads(sys.argv[2])
    mode, out = sys.argv[1], sys.argv[3]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        assert distributed.init_from_env()

    class Toy(DenoiserRunner):
        def __init__(self, unet):
            self.denoiser = unet
        def timesteps(self):
            return [900.0, 500.0, 100.0]
        def timestep_of(self, args, kwargs):
            return float(torch.as_tensor(kwargs.get("timestep", args[1])).reshape(-1)[0])
        def output_of(self, out):
            return out.sample
        def sample(self, prompts, seeds):
            imgs = []
            for p, s in zip(prompts, seeds):
                g = torch.Generator().manual_seed(int(s) * 7919 + sum(map(ord, p)))
                x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
                for t in self.timesteps():
                    x = x - 0.3 * self.denoiser(x, torch.tensor([t]), encoder_hidden_states=ctx).sample
                imgs.append(torch.sigmoid(x[:, :3]))
            return torch.cat(imgs)

    torch.manual_seed(0)
    runner = Toy(UNet2DConditionModel(**SMALL_UNET).eval())
    # untimed: the plans of separate runs are compared (layer timings differ from run to run)
    cfg = engine.QuantizeConfig(avg_w_bits=4, sens_mode=mode, coupling=(0.5,), weight_search="mse", sens_calls=2,
                                cache_dir="", speed="off")
    with torch.no_grad():
        prepared = engine.prepare(runner, ["a cat", "a dog"], cfg)
        alloc = engine.plan(runner, prepared, cfg)
        # timed: the first process measures, every process plans with its table
        timed = engine.QuantizeConfig(avg_w_bits=8, coupling=(0.5,), sens_calls=2, cache_dir="")
        prepared.speed = engine.time_layers(runner, prepared.calib, prepared.layers, timed)
        timed_plan = engine.plan(runner, prepared, timed).plan
    rank, world = distributed.world()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"loss": prepared.sens.loss, "plan": {k: v.name for k, v in alloc.plan.items()}, "world": world,
                   "measured": prepared.sens.measured, "times": prepared.speed.layer,
                   "timed_plan": {k: v.name for k, v in timed_plan.items()}}, f)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, mode, world, config):
    script = tmp_path / "sens.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{mode}-{world}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    args = [sys.executable, str(script), mode, json.dumps(config), str(out)]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return [json.loads((tmp_path / f"{out.name}.{r}").read_text()) for r in range(world)]


@pytest.mark.parametrize("mode", ["full", "local"])
def test_two_gloo_processes_give_the_plan_of_one(tmp_path, mode, small_unet_config):
    (one,), two = _run(tmp_path, mode, 1, small_unet_config), _run(tmp_path, mode, 2, small_unet_config)
    assert one["world"] == 1 and [r["world"] for r in two] == [2, 2]
    # each process measured its share, and every process ends with the whole table and the same plan as one
    assert two[0]["measured"] + two[1]["measured"] == one["measured"] and 0 < two[0]["measured"] < one["measured"]
    for r in two:
        assert r["loss"] == one["loss"] and len(one["loss"]) > 10
        assert r["plan"] == one["plan"]
    # layer timings: measured once, the same table and timed plan in every process of a run
    assert two[0]["times"] == two[1]["times"] and len(two[0]["times"]) > 10
    assert two[0]["timed_plan"] == two[1]["timed_plan"]
