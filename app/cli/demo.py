"""`mixquant demo`: the standalone Gradio app (app/gradio_app.py) with the embedded `digits` model preloaded.

    mixquant demo                        # http://127.0.0.1:7860, this machine only
    mixquant demo --port 0               # any free port
    mixquant demo --model /path/to/diffusers-folder --out-dir ./quantized

Nothing goes to the internet: analytics off, no share link, no hub downloads (HF_HUB_OFFLINE), system fonts only.
One job (load / calibrate / quantize / save) runs at a time; others wait in the queue.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

from . import add_device_arguments

_OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "TRANSFORMERS_OFFLINE": "1", "GRADIO_SSR_MODE": "False"}


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the app to "
                        "your network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--model", default="digits",
                   help="model preloaded at start: digits (embedded, default), a diffusers folder, or a .safetensors "
                        "checkpoint (Flux / SD3 parts joined with '+'); another one can be loaded from the page")
    p.add_argument("--out-dir", default="mixquant_out", help="where Save writes quantized files (default "
                                                             "./mixquant_out)")
    p.add_argument("--cache-dir", default=None, help="where sensitivity results are cached (default "
                                                     "~/.cache/mixquant or $MIXQUANT_CACHE)")
    add_device_arguments(p)
    p.add_argument("--steps", type=int, default=8, help="sampling steps preset in the form (default 8)")
    p.add_argument("--open", action="store_true", help="open the page in your browser")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def offline_env() -> None:
    for k, v in _OFFLINE_ENV.items():
        os.environ[k] = v if k in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_SSR_MODE") else os.environ.get(k, v)


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True, open_browser: bool = False,
           quiet: bool = False) -> str:
    """Queue (one job at a time) and serve `app`; returns the local URL (with block=False, at once)."""
    from ..gradio_app import CSS, theme

    be = getattr(app, "mixquant_backend", None)
    if port == 0:
        port = free_port(host)
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, inbrowser=open_browser,
                           prevent_thread_lock=not block, show_error=True, quiet=quiet,
                           allowed_paths=[be.out_dir] if be is not None else None, ssr_mode=False,
                           mcp_server=False, enable_monitoring=False, footer_links=["api"], theme=theme(), css=CSS)
    return url


def run(args) -> int:
    from ...quant.errors import MixQuantError

    offline_env()
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise MixQuantError("the demo needs Gradio: pip install 'mixquant[demo]' (or pip install gradio)") from None
    from ..gradio_app import DemoBackend, build_app

    if args.port < 0 or args.port > 65535:
        raise MixQuantError(f"--port {args.port} is not a port number (0..65535; 0 picks a free one)")
    if args.port:
        try:
            with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((args.host, args.port))
        except OSError as e:
            raise MixQuantError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); choose another --port (0 "
                                "picks a free one)") from None
    if not _is_loopback(args.host):
        print(f"mixquant: warning: listening on {args.host}: other machines on your network can use this app.",
              file=sys.stderr)
    from ..gradio_app import have_matplotlib

    if not have_matplotlib():
        print("mixquant: warning: matplotlib is not installed: the bit chart and the quality/size curve are off "
              "(pip install matplotlib).", file=sys.stderr)
    backend = DemoBackend(model=args.model, out_dir=args.out_dir, cache_dir=args.cache_dir, device=args.device,
                          dtype=args.dtype, offload=args.offload)
    print(f"mixquant demo: loading {args.model} on {backend.device}…", file=sys.stderr)
    app = build_app(backend, steps=args.steps)
    try:
        launch(app, args.host, args.port, block=True, open_browser=args.open)
    except OSError as e:
        raise MixQuantError(f"cannot listen on {args.host}:{args.port} ({e}); choose another --port (0 picks a free "
                            "one)") from None
    return 0
