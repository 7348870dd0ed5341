"""`mixquant` command line. Each subcommand lives in its own module of this package exposing
``add_arguments(parser)`` and ``run(args) -> int``; a MixQuantError becomes one line on stderr and exit code 2.
The commands import the hosts (app.diffusers_host, app.digits, app.gradio_app); nothing imports this package except
the `mixquant` entry point."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, help)
COMMANDS = {
    "quantize": ("quantize", "calibrate on prompts, allocate bits under a budget, write the quantized file"),
    "generate": ("generate", "generate an image with an FP or quantized model"),
    "inspect": ("inspect", "show what a quantized file holds"),
    "export": ("export", "export a quantized file in another format (ComfyUI native)"),
    "demo": ("demo", "launch the Gradio app"),
}


def add_device_arguments(p) -> None:
    """--device and --dtype, as every command that loads a model takes them."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="the model's float type (default auto: fp16 on a GPU, bf16 for Flux/SD3; fp32 on a CPU)")
    p.add_argument("--offload", default="auto", choices=("auto", "off", "stream"),
                   help="a denoiser larger than the GPU: stream keeps it on the CPU and streams its blocks through the "
                        "GPU (calibration and the sensitivity run there, its backward block by block; the quantized "
                        "model is built in the GPU layer by layer); auto (default): where the model does not fit the "
                        "GPU's free memory")


def add_scheduler_argument(p) -> None:
    p.add_argument("--scheduler", default="auto", choices=("auto", "ddim", "dpm", "euler"),
                   help="the sampler: ddim, dpm (DPM-Solver++ 2M) or euler; auto (default): dpm, or for Flux/SD3 "
                        "their flow-matching Euler sampler")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixquant", description="Mixed-precision quantization of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f".{module}", __package__)
        except ModuleNotFoundError as e:  # a subcommand whose module is not there yet is simply not offered
            if e.name and e.name.endswith(module):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    from ...quant.errors import MixQuantError

    args = build_parser().parse_args(argv)
    try:
        from ...quant.distributed import init_from_env

        init_from_env()  # under torchrun: one process per GPU shares the sensitivity measurement
        return int(args._run(args) or 0)
    except MixQuantError as e:
        print(f"mixquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixquant: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # (torch.OutOfMemoryError is a RuntimeError)
        import torch

        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            raise
        print(_out_of_memory(e), file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output went into a program that stopped reading (`mixquant inspect ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error when Python flushes)
        return 1


def _out_of_memory(e: BaseException) -> str:
    """One message for a device (or the host) out of memory: what ran out, what to change; nothing was written."""
    from ...quant.errors import reason

    return (f"mixquant: error: out of memory ({reason(e)}). Nothing was written. Use fewer prompts, --steps or a "
            "smaller --size; on a GPU, --offload stream for a denoiser near the GPU's size, or --device cpu; "
            "--sens-mode local needs the least memory.")


if __name__ == "__main__":
    sys.exit(main())
