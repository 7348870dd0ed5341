"""Every GPU check of the open issues in one command, under 8 minutes on an H100/H200, into one table file:

    python bench/gpu.py                      # all steps; writes bench/results/gpu_<gpu>.md (+ each step's own table)
    python bench/gpu.py --only unet,speed    # some steps (--list names them)
    python bench/gpu.py --out DIR            # e.g. $OUT on a lent device machine

On a lent device machine (no network, no diffusers): `bash bench/gpu_wheels.sh` here, then one device call of
`bash bench/gpu_checks.sh $OUT` carrying .whl (bench/gpu_checks.sh says how). Each step runs as its own process
under its own time limit (plus what earlier steps left unused, within what is left of --budget, 480 s by default),
so one that fails or hangs leaves the others' tables. The steps, in priority order (the acceptance lines first):
- unet (#22): the SD1.5-architecture UNet step, batch 2, at 128x128 latents: FP16, W8A8 int8, W8A8 with fp8 Linear
  layers, mixed W4A8; in CUDA graphs and eager, with peak memory, the host time per eager layer call and its profile
  (bench/kernels.py --part unet);
- speed (#22): plans made with the speed target on this GPU (the SD1.5 architecture at 128x128 latents, batch 2):
  predicted vs measured speed vs FP16 for W8A8 and the default avg-W4 plan (bench/speed.py --models sd15);
- dit (#23): the Flux.1-dev transformer at its real size (random weights, bf16 on the CPU) at the token count of
  Flux.1 at 1024x1024, calibrated and measured with its blocks streamed through the GPU, quantized into it layer by
  layer: peak GPU memory against its bf16 size, bytes against bf16, SQNR and step speed (bench/dit.py --real);
- scale (#21): the whole method on the SDXL-architecture UNet at its real widths at 1024x1024 (2 prompts x 8 steps):
  time and CUDA peak of each phase vs FP sampling (bench/scale.py --models sdxl --real);
- kernels (#22): GEMMs at SD1.5 / SDXL widths and 3x3 convs, fp16 vs every quantized route through the dispatcher
  (the route race's choice), our fp8 format (W8A8d-fp8), raw fp8 `_scaled_mm` (ComfyUI's fp8 path) and
  comfy-kitchen's int8 linear where it is installed, in the same process (bench/kernels.py --part gemm,conv --quick);
- peers (#22): ComfyUI fp8, torchao int8 dynamic, fp8 `_scaled_mm` on the SD1.5 architecture, same process
  (bench/peers.py --device cuda --skip-digits).
Without CUDA it says so and exits 2 (the CPU tables come from each script on its own).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import mixquant  # noqa: E402,F401  (first, as in every bench script: it hides our kernels/ from `import kernels`)

# (name, issue, seconds at most, what it measures, argv after `python`; {out} is the output folder), in priority
# order: the acceptance lines first (#22, #23, #21), then the benchmark tables; the limits sum to the 480 s budget.
# The first step pays Triton's compiles (~1 s per kernel variant, dozens in a UNet); later steps find them on disk
STEPS = [
    ("unet", "#22", 110, "SD1.5-architecture UNet step, batch 2, 128x128 latents, CUDA graphs and eager, host time "
     "per eager layer call and its profile, peak memory",
     ["bench/kernels.py", "--device", "cuda", "--part", "unet", "--out", "{out}/unet_gpu.md"]),
    ("speed", "#22", 70, "plans with the speed target: predicted vs measured speed vs FP16",
     ["bench/speed.py", "--device", "cuda", "--models", "sd15", "--out", "{out}/speed_gpu.md"]),
    ("dit", "#23", 160, "Flux.1-dev at its real size (12B, random weights) at Flux.1's 1024x1024 token count: "
     "planned with its blocks streamed through the GPU, quantized into it layer by layer: peak GPU memory vs bf16, "
     "bytes, SQNR, step speed",
     ["bench/dit.py", "--real", "--device", "cuda", "--out", "{out}/dit_gpu.md"]),
    ("scale", "#21", 60, "the method on the SDXL-architecture UNet (real widths) at 1024x1024: time, CUDA peak",
     ["bench/scale.py", "--models", "sdxl", "--real", "--size", "1024", "--prompts", "2", "--steps", "8",
      "--out", "{out}/scale_gpu.md"]),
    ("kernels", "#22", 45, "GEMM / 3x3 conv routes vs fp16 (CUDA graphs; fp8, comfy-kitchen int8 beside)",
     ["bench/kernels.py", "--device", "cuda", "--part", "gemm,conv", "--quick", "--out", "{out}/kernels_gpu.md"]),
    ("peers", "#22", 35, "ComfyUI fp8, torchao int8 dynamic, fp8 _scaled_mm on the SD1.5 architecture",
     ["bench/peers.py", "--device", "cuda", "--skip-digits", "--only", "fp16,comfy-fp8,torchao-int8dq,scaled-mm-fp8",
      "--out", "{out}/peers_gpu"]),
]
NAMES = [s[0] for s in STEPS]


def device_line() -> str:
    import torch
    if not torch.cuda.is_available():
        return ""
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}; torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}")


def _table_of(argv: list[str], out: str) -> str | None:
    """The markdown a step wrote (its --out file), if any."""
    if "--out" not in argv:
        return None
    path = argv[argv.index("--out") + 1]
    if os.path.isdir(path):
        mds = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".md"))
        return "\n\n".join(open(p).read() for p in mds) or None
    return open(path).read() if os.path.isfile(path) else None


def run_step(step, out: str, seconds: float, python: str = sys.executable) -> dict:
    name, issue, limit, what, argv = step
    argv = [a.replace("{out}", out) for a in argv]
    log = os.path.join(out, f"gpu_{name}.log")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([python, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                timeout=max(1.0, seconds)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    secs = time.time() - t0
    tail = open(log).read().splitlines()[-60:]  # (a step cut off by its limit leaves what it printed so far)
    return {"name": name, "issue": issue, "what": what, "cmd": "python " + " ".join(argv), "rc": rc,
            "seconds": secs, "limit": seconds, "table": _table_of(argv, out), "tail": tail, "log": log}


def allowance(limit: float, left: float, later: float) -> float:
    """Seconds a step may run: its limit, plus what the steps before it left unused (the budget that is left beyond
    the limits of the steps after it), within what is left."""
    return min(left, max(limit, left - later))


def write(results: list, out: str, device: str, part: str = "") -> str:
    slug = "".join(c if c.isalnum() else "_" for c in device.split(",")[0]).strip("_").lower() or "gpu"
    path = os.path.join(out, f"gpu_{slug}{'_' + part if part else ''}.md")
    lines = [f"# GPU checks on {device}", "", f"`python bench/gpu.py`, {datetime.date.today()}; each step in its own "
             "process under its own time limit.", "", "| step | issue | what | exit | seconds |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['issue']} | {r['what']} | {r['rc']} | {r['seconds']:.0f} of "
                     f"{r['limit']:.0f} |")
    for r in results:
        lines += ["", f"## {r['name']} ({r['issue']}): `{r['cmd']}`", ""]
        if r["table"]:
            lines.append(r["table"].strip())
        if r["rc"] != 0 or not r["table"]:
            lines += ["", f"exit {r['rc']}; the log's last lines ({os.path.basename(r['log'])}):", "", "```",
                      *r["tail"], "```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--only", help="comma-separated steps (default: all): " + ", ".join(NAMES))
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all the steps together")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    args = ap.parse_args(argv)
    steps = STEPS
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(want) - set(NAMES))
        if unknown:
            print(f"unknown steps {', '.join(unknown)}; the steps are {', '.join(NAMES)}", file=sys.stderr)
            return 2
        steps = [s for s in STEPS if s[0] in want]
    if args.list:
        for name, issue, limit, what, argv_ in steps:
            print(f"{name:<8} {issue}  <= {limit:>3} s  {what}\n{'':<8} python {' '.join(argv_)}")
        return 0
    device = device_line()
    if not device:
        print("bench/gpu.py needs a CUDA GPU (none here). The CPU tables come from the scripts themselves: "
              "python bench/kernels.py, bench/speed.py, bench/scale.py, bench/dit.py.", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f"GPU checks on {device}", flush=True)
    t_end = time.time() + args.budget
    results = []
    for i, step in enumerate(steps):
        left = t_end - time.time()
        if left < 10:
            print(f"== {step[0]}: skipped (the budget of {args.budget:.0f} s is spent)", flush=True)
            continue
        seconds = allowance(step[2], left, sum(s[2] for s in steps[i + 1:]))
        print(f"== {step[0]} ({step[1]}, at most {seconds:.0f} s): {step[3]}", flush=True)
        r = run_step(step, out, seconds)
        print(f"   exit {r['rc']} after {r['seconds']:.0f} s", flush=True)
        print("\n".join("   " + line for line in r["tail"][-8:]), flush=True)
        results.append(r)
    path = write(results, out, device, "" if steps is STEPS else "_".join(s[0] for s in steps))
    print(f"wrote {path}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
