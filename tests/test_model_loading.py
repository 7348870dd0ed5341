"""Loading for the diffusers host: device and dtype choice, a pipeline MixQuant cannot quantize gets one clear
message, and the CLI passes --dtype and --sens-mode through."""
import types

import pytest
import torch

from mixquant.app.cli import build_parser
from mixquant.app.diffusers_host import models
from mixquant.quant.errors import MixQuantError


def test_device_and_dtype_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == models.resolve_device(None) == "cpu"
    with pytest.raises(MixQuantError, match="--device cpu"):
        models.resolve_device("cuda:0")
    assert models.resolve_dtype("auto", "cpu") is torch.float32
    assert models.resolve_dtype(None, "cuda") is torch.float16  # fp16 on a GPU by default
    assert models.resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert models.resolve_dtype(torch.float16, "cpu") is torch.float16
    with pytest.raises(MixQuantError, match="unknown dtype"):
        models.resolve_dtype("int8", "cpu")


def test_digits_loads_in_the_dtype_asked():
    pipe = models.load_pipeline("digits", dtype="bf16")
    assert pipe.unet.dtype is torch.bfloat16
    assert models.load_pipeline("digits").unet.dtype is torch.float32  # auto on a CPU


def test_a_pipeline_without_a_unet_gets_one_clear_message(monkeypatch):
    """A pipeline whose denoiser is a transformer of a family MixQuant does not handle (Flux and SD3 it does:
    tests/test_dit.py) must not end in an AttributeError."""
    import diffusers

    class FluxLike:
        transformer = torch.nn.Linear(2, 2)

        def to(self, *a, **k):
            return self

        def set_progress_bar_config(self, **k):
            pass

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: FluxLike()))
    with pytest.raises(MixQuantError, match="FluxLike.*Linear.*not supported"):
        models.load_pipeline("digits")


def test_cli_passes_dtype_and_sensitivity_mode(monkeypatch, tmp_path):
    from mixquant.app.cli import quantize as cmd
    from mixquant.app.diffusers_host import api, files

    seen = {}

    def fake_load(model, device, dtype, offload):
        seen.update(model=model, device=device, dtype=dtype, offload=offload)
        return types.SimpleNamespace(unet=None)

    def fake_quantize(pipe, prompts, **kw):
        seen.update(kw)
        return types.SimpleNamespace(unet=None), {"quality": {}, "avg_w_bits": 4.0, "avg_a_bits": 8.0,
                                                  "bytes_quantized": 1, "bytes_fp16": 4, "timings_s": {}}

    monkeypatch.setattr(models, "load_pipeline", fake_load)
    monkeypatch.setattr(api, "quantize_pipeline", fake_quantize)
    monkeypatch.setattr(files, "save_outputs", lambda *a, **k: 10)
    args = build_parser().parse_args(["quantize", "--model", "digits", "--prompt", "a", "--avg-w-bits", "4",
                                      "--dtype", "fp16", "--sens-mode", "local", "--out", str(tmp_path / "q.st")])
    assert cmd.run(args) == 0
    assert seen["dtype"] == "fp16" and seen["device"] == "auto" and seen["sens_mode"] == "local"
    assert seen["offload"] == "auto"
    defaults = build_parser().parse_args(["quantize", "--prompt", "a", "--avg-w-bits", "4", "--out", "q"])
    assert (defaults.sens_mode, defaults.dtype, defaults.device) == ("fast", "auto", "auto")
