"""Diffusion transformers (#23): what DiTs need, measured on the small Flux- and SD3-layout configs (random weights).

    python bench/dit.py                 # CPU: both families, writes bench/results/dit_cpu.md (~3 min)
    python bench/dit.py --families flux --out /tmp/dit.md
    python bench/dit.py --real          # GPU: Flux.1-dev at its real size, streamed, quantized into the GPU (#23)

1. Activations: every non-protected Linear layer at W8A8 / W4g64A8, its input quantized per tensor with one static
   range, per tensor with a range per timestep group, per tensor after channel balancing, per token (dynamic), and per
   token after channel balancing; scored by the denoiser-output SQNR on held-out prompts (teacher-forced: the
   quantized denoiser gets exactly the FP trajectory's inputs). With and without the outlier channels trained DiTs
   have (random_models.with_outlier_channels: random weights lack them).
2. A mixed avg-W4 plan (MixQuant's sensitivity + integer program) against uniform W4 at the same bytes, weight-only
   and with 8-bit activations; SQNR and the held-out images' PSNR against FP.
3. Time: calibrate / sensitivity / allocate of the mixed plan, and its step time against FP32 in the same process.
4. The peers at equal bytes: ComfyUI's fp8 weights and int8 (comfy-kitchen), GGUF Q8_0 / Q4_K_S, SDNQ int8 / uint4
   (bench/peers.py's builders, each on the whole transformer as those tools do it), and beside each a MixQuant plan
   whose budget is that peer's bytes (weight-only, like them); bytes counted alike (bench/peers.measured_bytes).
Bytes are real (deploy bytes: packed weights as stored, float parts in fp16) against the bf16 denoiser.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import mixquant  # noqa: E402,F401  (first: it hides our kernels/ from `import kernels`)
import torch  # noqa: E402

from common import cpu_name  # noqa: E402
from mixquant.app.diffusers_host.random_models import random_pipeline  # noqa: E402
from mixquant.app.diffusers_host.runner import PipelineRunner  # noqa: E402
from mixquant.quant import engine  # noqa: E402
from mixquant.quant.apply import quantize_, uniform_plan  # noqa: E402
from mixquant.quant.calibration import calibrate  # noqa: E402
from mixquant.quant.formats import LayerFormat  # noqa: E402
from mixquant.quant.metrics import psnr_db  # noqa: E402
from mixquant.quant.runner import SamplerSettings, capture_calls  # noqa: E402
from mixquant.quant.sizes import deploy_bytes, fp16_bytes  # noqa: E402
from mixquant.quant.speed import compare_calls, timing_call  # noqa: E402

CALIB = ["a red fox in the snow", "a city street at night, rain", "a bowl of fruit on a table",
         "portrait of an old sailor", "a mountain lake at sunrise", "an astronaut riding a horse"]
EVAL = ["a green parrot on a branch", "a lighthouse in a storm", "a cup of coffee, top view"]
STEPS, SIZE, GROUPS = 8, 64, 4


class Family:
    def __init__(self, name: str, outliers: float):
        self.name, self.outliers = name, outliers
        self.pipe = random_pipeline(name, "small", seed=0, outliers=outliers)
        self.settings = SamplerSettings(steps=STEPS, guidance=3.5, width=SIZE, height=SIZE)
        self.runner = PipelineRunner(self.pipe, self.settings)
        self.model = self.runner.denoiser
        self.layers = engine.discover_layers(self.model)
        t0 = time.time()
        self.calib = {g: calibrate(self.runner, CALIB, list(range(len(CALIB))), n_groups=g) for g in (1, GROUPS)}
        self.calib_s = (time.time() - t0) / 2
        self.eval_calls, self.eval_images = capture_calls(self.runner, EVAL, [100 + i for i in range(len(EVAL))])

    def sqnr(self, qmodel) -> float:
        sig = noise = 0.0
        with torch.no_grad():
            for c in self.eval_calls:
                y = self.runner.output_of(qmodel(*c.args, **c.kwargs)).double()
                sig += float((c.output.double() ** 2).sum())
                noise += float(((y - c.output.double()) ** 2).sum())
        return 10 * math.log10(sig / noise) if noise else math.inf

    def images(self, qmodel):
        from mixquant.app.diffusers_host.models import set_denoiser

        try:
            set_denoiser(self.pipe, qmodel)
            self.runner.denoiser = qmodel
            return self.runner.sample(EVAL, [100 + i for i in range(len(EVAL))])
        finally:
            set_denoiser(self.pipe, self.model)
            self.runner.denoiser = self.model

    def uniform(self, fmt: LayerFormat, groups: int, balance: str):
        calib = self.calib[groups]
        calib.set_balance(self.model, balance)
        plan = uniform_plan(self.layers, fmt, kinds=("linear",))
        q, _ = quantize_(self.model, plan, calib, inplace=False)
        n_bal = len(calib.balance)
        calib.set_balance(self.model, "off")
        return q, n_bal


TREATMENTS = [  # (label, a_mode, timestep groups, balancing)
    ("per-tensor static, one range", "static", 1, "off"),
    (f"per-tensor static, {GROUPS} timestep groups", "static", GROUPS, "off"),
    (f"per-tensor static, {GROUPS} groups + balancing", "static", GROUPS, "auto"),
    ("per-token dynamic", "dynamic", 1, "off"),
    ("per-token dynamic + balancing", "dynamic", 1, "auto"),
]


def activations_section(fams: list[Family], log) -> list[str]:
    lines = ["## 1. Activation quantization of the transformer blocks (denoiser-output SQNR, dB, held-out prompts)", "",
             "Every non-protected Linear layer in the format; protected layers (embedders, final layer) float. "
             "Balancing: `auto` (layers whose input's largest channel is ≥ 8× the median channel).", ""]
    head = "| treatment | " + " | ".join(f"{f.name}{' + outliers' if f.outliers else ''} {w}"
                                        for f in fams for w in ("W8A8", "W4A8")) + " |"
    lines += [head, "|" + "---|" * (1 + 2 * len(fams))]
    for label, mode, groups, bal in TREATMENTS:
        cells = []
        for f in fams:
            for w in (8, 4):
                fmt = LayerFormat(w, 8, 64 if w < 8 else None, mode)
                q, n_bal = f.uniform(fmt, groups, bal)
                cells.append(f"{f.sqnr(q):.1f}" + (f" ({n_bal} bal.)" if bal != "off" and w == 8 else ""))
                log(f"  {f.name} outliers={f.outliers} {fmt.name} {label}: {cells[-1]}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def mixed_section(fam: Family, log) -> list[str]:
    lines = [f"## 2. Mixed avg-W4 plan vs uniform W4 at equal bytes ({fam.name}"
             f"{' with outlier channels' if fam.outliers else ''})", "",
             "The mixed plan's budget is the uniform plan's bytes; everything else the defaults (the coupling sweep "
             "picks the content/quality weighting by the images). Sensitivity `fast` (the default: first-order gains, "
             "minutes at Flux size) and `full` (MixDQ's exhaustive metrics, the reference: one run per layer and "
             "format).", "",
             "| plan | bytes vs bf16 | SQNR dB | PSNR dB (images) | avg W bits | plan time |", "|---|---|---|---|---|---|"]
    bf16 = fp16_bytes(fam.model)
    for a_bits, modes in ((16, ("fast", "full")), (8, ("fast",))):
        uni_fmt = LayerFormat(4, a_bits, 64, "dynamic" if a_bits < 16 else "static")
        uq, _ = fam.uniform(uni_fmt, 1, "auto" if a_bits < 16 else "off")
        ub = deploy_bytes(uq)
        rows = [(f"uniform {uni_fmt.name}" + (" + balancing" if a_bits < 16 else ""), uq, 4.0, "—")]
        for mode in modes:
            cfg = engine.QuantizeConfig(budget_mb=ub / 1e6, a_bits=a_bits, speed="off", cache_dir="",
                                        sens_mode=mode)
            t0 = time.time()
            prepared = engine.prepare(fam.runner, CALIB, cfg, list(range(len(CALIB))))
            alloc = engine.plan(fam.runner, prepared, cfg)
            mq, _ = engine.quantize(fam.model, alloc, prepared.calib)
            rep = engine.report(prepared, alloc, cfg, fam.model, mq)
            rows.append((f"MixQuant mixed, A{a_bits}, sensitivity {mode}", mq, rep["avg_w_bits"],
                         f"{time.time() - t0:.0f} s"))
            if a_bits == 8:
                fam.mixed = (mq, rep)
        for label, q, bits, secs in rows:
            s = fam.sqnr(q)
            p = psnr_db(fam.eval_images, fam.images(q), data_range=1.0)
            lines.append(f"| {label} | {deploy_bytes(q) / bf16:.3f} | {s:.1f} | {p:.1f} | {bits:.2f} | {secs} |")
            log(f"  {lines[-1]}")
    return lines + [""]


PEERS = [("ComfyUI fp8 (e4m3 weights)", lambda env, peers: peers.build_comfy_fp8(env)),
         ("ComfyUI int8_tensorwise (comfy-kitchen)", lambda env, peers: peers.build_comfy_int8(env)),
         ("GGUF Q8_0", lambda env, peers: peers.build_gguf(env, "Q8_0")),
         ("GGUF Q4_K_S", lambda env, peers: peers.build_gguf(env, "Q4_K_S")),
         ("SDNQ int8", lambda env, peers: peers.build_sdnq(env, "int8", False)),
         ("SDNQ uint4", lambda env, peers: peers.build_sdnq(env, "uint4", False))]


def peers_section(fam: Family, log) -> list[str]:
    import peers

    lines = [f"## 4. Against the peers at equal bytes ({fam.name}{' with outlier channels' if fam.outliers else ''})",
             "", "Each peer quantizes the whole transformer its own way; the MixQuant plan beside it has that peer's "
             "bytes as its budget (weight-only, 16-bit activations like the peers; sensitivity fast, a 20 s coupling "
             "sweep). Bytes: every tensor as stored, float parts at 2 bytes, against bf16.", "",
             "| peer | bytes vs bf16 | SQNR dB | MixQuant at those bytes: bytes | SQNR dB | avg W bits |",
             "|---|---|---|---|---|---|"]
    env = peers.Env(kind="sd15", fp_model=fam.model, calibrate=lambda m: None)
    bf16 = fp16_bytes(fam.model)
    prepared = None
    for label, build in PEERS:
        try:
            pm = build(env, peers)
        except Exception as e:  # noqa: BLE001  (a peer that is not installed here: said in the table)
            lines.append(f"| {label} | not run: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | |")
            log(f"  {lines[-1]}")
            continue
        pb = peers.measured_bytes(pm)
        cfg = engine.QuantizeConfig(budget_mb=pb / 1e6, a_bits=16, speed="off", cache_dir="", sweep_seconds=20)
        try:
            if prepared is None:
                prepared = engine.prepare(fam.runner, CALIB, cfg, list(range(len(CALIB))))
            alloc = engine.plan(fam.runner, prepared, cfg)
            mq, _ = engine.quantize(fam.model, alloc, prepared.calib)
            rep = engine.report(prepared, alloc, cfg, fam.model, mq)
            ours = (f"{peers.measured_bytes(mq) / bf16:.3f} | {fam.sqnr(mq):.1f} | {rep['avg_w_bits']:.2f}")
        except Exception as e:  # noqa: BLE001  (a budget below what MixQuant can reach: its message)
            ours = f"— | {str(e).splitlines()[0][:90]} | —"
        lines.append(f"| {label} | {pb / bf16:.3f} | {fam.sqnr(pm):.1f} | {ours} |")
        log(f"  {lines[-1]}")
    return lines + [""]


def speed_section(fam: Family, log) -> list[str]:
    mq, rep = fam.mixed
    call = timing_call(fam.calib[1].calls)
    t = compare_calls({"fp": fam.model, "q": mq}, call, rounds=5)
    lines = ["## 3. Step time of the mixed A8 plan on this CPU (same process, interleaved)", "",
             f"FP32 {t['fp'] * 1e3:.1f} ms, mixed plan {t['q'] * 1e3:.1f} ms per denoiser call "
             f"({t['fp'] / t['q']:.2f}× FP32 speed; planned with speed off: these small widths are too narrow for "
             "quantized kernels to pay on a CPU, which `--speed auto` would see and keep float)", ""]
    log(lines[2])
    return lines


def _pinned(model: torch.nn.Module) -> bool:
    """The model's CPU weights moved into page-locked memory, so that each block streamed to the GPU copies at full
    PCIe speed (about twice pageable memory's: the real Flux streams its 24 GB some 20-30 times). False where the
    host refuses (the model is then left as it was, or part pinned)."""
    try:
        with torch.no_grad():
            for m in model.modules():
                for store in (m._parameters, m._buffers):
                    for k, v in list(store.items()):
                        if v is not None and v.device.type == "cpu" and not v.is_pinned():
                            p = v.pin_memory()
                            store[k] = torch.nn.Parameter(p, requires_grad=v.requires_grad) \
                                if isinstance(v, torch.nn.Parameter) else p
        return True
    except RuntimeError:
        return False


def real_section(device: str, size: int, steps: int, n_prompts: int, outliers: float, log,
                 config: str = "dev", avg_w_bits: float = 4.0) -> list[str]:
    """#23's GPU line: the Flux.1-dev transformer at its real size (random weights, bf16, kept on the CPU), planned
    with its blocks streamed through the device (quant/offload.py; the fast sensitivity's backward recomputes it block
    by block) and quantized into it layer by layer: peak device memory of the whole run against the bf16 size, bytes,
    the step's SQNR and speed against bf16 (the bf16 model moved to the device after the peak is read)."""
    from mixquant.quant.offload import stream_blocks, streamed
    from mixquant.quant.sizes import model_bytes

    cuda = torch.device(device).type == "cuda"
    t0 = time.time()
    pipe = random_pipeline("flux", config, seed=0, outliers=outliers, dtype=torch.bfloat16,
                           build_device=device if cuda else "cpu")  # (drawn on the GPU: the CPU's generator is serial)
    t_build = time.time() - t0
    for name in ("text_encoder", "text_encoder_2", "vae"):
        getattr(pipe, name).to(device, torch.bfloat16)
    model = pipe.transformer
    bf16 = model_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"  built flux_{config}, {n_params / 1e9:.2f}B parameters, {bf16 / 2**30:.1f} GiB bf16, in {t_build:.0f} s")
    if cuda:
        t0 = time.time()
        log(f"  weights in page-locked memory: {_pinned(model)} ({time.time() - t0:.0f} s)")
    blocks = stream_blocks(model)
    # the random VAE downsamples by pipe.vae_scale_factor, Flux.1's by 8: images of size * factor / 8 px give the
    # transformer the latents (tokens) Flux.1 sees at size x size
    px = size * pipe.vae_scale_factor // 8
    runner = PipelineRunner(pipe, SamplerSettings(steps=steps, guidance=3.5, width=px, height=px))
    cfg = engine.QuantizeConfig(avg_w_bits=avg_w_bits, speed="off", sens_mode="fast", sweep_seconds=0, cache_dir="",
                                weight_search="mse", sens_calls=2, sens_inputs_mb=8192)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = {}
    with streamed(model, blocks, device):
        t0 = time.time()
        prepared = engine.prepare(runner, CALIB[:n_prompts], cfg)
        times["calibrate"] = prepared.timings["calibrate"]
        times["sensitivity (fast)"] = prepared.timings["sensitivity"]
        t0 = time.time()
        alloc = engine.plan(runner, prepared, cfg)
        times["allocate"] = time.time() - t0
    log(f"  planned: {times}")
    t0 = time.time()
    qmodel, _ = engine.quantize(model, alloc, prepared.calib, device=device)
    times["quantize into the device"] = time.time() - t0
    call = timing_call(prepared.calib.calls, batch=1)
    y = runner.output_of(qmodel(*call.args, **call.kwargs)).float()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    ref = call.output.float()
    sqnr = 10 * math.log10(float((ref ** 2).sum()) / max(float(((y - ref) ** 2).sum()), 1e-30))
    qbytes = deploy_bytes(qmodel)
    rep = engine.report(prepared, alloc, cfg, model, qmodel)
    lines = [f"## Flux (configs/dit/flux_{config}.json) on {torch.cuda.get_device_name() if cuda else device} "
             f"({n_params / 1e9:.2f}B parameters, random weights with outlier channels)", "",
             f"Flux.1's {size}×{size} ({(size // 16) ** 2} tokens), {len(CALIB[:n_prompts])} calibration prompts × "
             f"{steps} steps, guidance 3.5; the "
             f"transformer stays on the CPU in bf16, its {len(blocks)} blocks stream through the device one at a time "
             "while it is calibrated and measured (fast sensitivity, its backward recomputing block by block), then "
             "it is quantized into the GPU layer by layer. "
             "Peak: torch.cuda.max_memory_allocated over all of it and one denoiser step of the quantized model.", "",
             "| bf16 size | peak GPU memory | peak / bf16 | quantized bytes | bytes / bf16 | avg W bits "
             "| step SQNR dB |",
             "|---|---|---|---|---|---|---|",
             f"| {bf16 / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB | {peak / bf16:.3f} | {qbytes / 2**30:.2f} GiB | "
             f"{qbytes / bf16:.3f} | {rep['avg_w_bits']:.2f} | {sqnr:.1f} |", "",
             "Seconds: build " + f"{t_build:.0f}; " + "; ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    log("\n".join(lines))
    if cuda:  # step time against bf16 (now the bf16 model may sit beside the quantized one)
        try:
            model.to(device)
            t = compare_calls({"bf16": model, "q": qmodel}, call, rounds=3)
            lines.append(f"Step time: bf16 {t['bf16'] * 1e3:.0f} ms, quantized {t['q'] * 1e3:.0f} ms "
                         f"({t['bf16'] / t['q']:.2f}× bf16 speed).")
        except torch.cuda.OutOfMemoryError:
            lines.append("Step time: the bf16 model does not fit beside the quantized one on this GPU.")
        finally:
            model.to("cpu")
        log(lines[-1])
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="flux,sd3")
    ap.add_argument("--outliers", type=float, default=20.0, help="gain of the injected outlier channels")
    ap.add_argument("--real", action="store_true",
                    help="only the GPU line: Flux.1-dev at its real size, streamed and quantized into the GPU")
    ap.add_argument("--device", default="cuda", help="with --real: the device (cuda)")
    ap.add_argument("--size", type=int, default=1024, help="with --real: image size in px")
    ap.add_argument("--steps", type=int, default=4, help="with --real: sampling steps of the calibration")
    ap.add_argument("--prompts", type=int, default=2, help="with --real: calibration prompts")
    ap.add_argument("--config", default="dev", help="with --real: configs/dit/flux_<config>.json (small: a check)")
    ap.add_argument("--avg-w-bits", type=float, default=4.0, help="with --real: the plan's budget")
    ap.add_argument("--out", default=None, help="default: bench/results/dit_cpu.md, with --real dit_gpu.md")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    t0 = time.time()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.real:
        out = args.out or os.path.join(HERE, "results", "dit_gpu.md")
        lines = ["# Diffusion transformers at real size (bench/dit.py --real)", "",
                 f"torch {torch.__version__}, CPU {cpu_name()}.", ""]
        lines += real_section(args.device, args.size, args.steps, args.prompts, args.outliers, log, args.config,
                              args.avg_w_bits)
        lines += [f"Total {time.time() - t0:.0f} s.", ""]
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write("\n".join(lines))
        print("\n".join(lines))
        return
    args.out = args.out or os.path.join(HERE, "results", "dit_cpu.md")
    names = [f.strip() for f in args.families.split(",") if f.strip()]
    fams = []
    for n in names:
        for gain in (0.0, args.outliers):
            log(f"{n}, outliers {gain}: calibrating")
            fams.append(Family(n, gain))
    lines = ["# Diffusion transformers on the CPU (bench/dit.py)", "",
             f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads. Small configs "
             f"(configs/dit/*_small.json), random weights; {len(CALIB)} calibration prompts, {len(EVAL)} held-out "
             f"prompts, {STEPS} steps, {SIZE}×{SIZE} images; Flux guidance 3.5 (distilled, one pass), SD3 cfg 3.5.", ""]
    lines += activations_section(fams, log)
    first = next(f for f in fams if f.outliers)  # (the full sensitivity costs minutes: one family)
    lines += mixed_section(first, log)
    lines += speed_section(first, log)
    lines += peers_section(first, log)
    lines += [f"Total {time.time() - t0:.0f} s.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
