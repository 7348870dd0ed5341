"""Model loading for the app layer (diffusers adapter): the embedded `digits` model, diffusers folders, and
single-file checkpoints (single_file.py: SD1.x / SD2.x / SDXL; dit_file.py: Flux.1 and SD3, in one file or the
diffusion model joined to its text encoders and VAE files with '+'). Everything loads offline; nothing here downloads.

    pipe = load_pipeline("digits")                  # the shipped tiny text-to-image model
    pipe = load_pipeline("/path/to/diffusers/folder")
    set_scheduler(pipe, "dpm")                      # ddim | dpm | euler

The digits model's vocabulary, prompt parser and classifier are in app/digits (``mixquant.app.digits``).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings

import torch

from ...quant.errors import MixQuantError
from ...quant.offload import fits, stream, stream_blocks
from ...quant.sizes import model_bytes
from ..digits import DIGITS_DIR
from .dit_file import Source, dit_family, load_dit_files
from .single_file import load_single_file, read_shapes

__all__ = ["load_pipeline", "resolve_model", "set_scheduler", "SCHEDULERS", "denoiser_of", "set_denoiser",
           "denoiser_attr", "is_flow", "resolve_scheduler"]

SCHEDULERS = ("ddim", "dpm", "euler")
# The denoisers MixQuant quantizes, by pipeline attribute: UNets (SD1.x, SD2.x, SDXL) and the diffusion transformers
# of the Flux and SD3 families (MMDiT); each pipeline holds one of them.
DIT_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel")
DIT_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")


def denoiser_attr(pipe) -> str:
    """"unet" or "transformer": where the pipeline keeps its denoiser (a pipeline with a transformer and no UNet)."""
    if isinstance(getattr(pipe, "transformer", None), torch.nn.Module) and \
            not isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        return "transformer"
    return "unet"


def denoiser_of(pipe) -> torch.nn.Module:
    return getattr(pipe, denoiser_attr(pipe))


def set_denoiser(pipe, module: torch.nn.Module) -> None:
    setattr(pipe, denoiser_attr(pipe), module)


def is_flow(pipe) -> bool:
    """Does the pipeline sample by flow matching (Flux, SD3: its own FlowMatchEuler sampler, not DDIM/DPM/Euler)?"""
    return "FlowMatch" in type(getattr(pipe, "scheduler", None)).__name__


def resolve_scheduler(pipe, name: str) -> str:
    """"auto": euler (the flow-matching sampler) for Flux/SD3, dpm for UNet pipelines; any other name as given."""
    return ("euler" if is_flow(pipe) else "dpm") if name in (None, "", "auto") else name


def resolve_model(model: str) -> tuple[str, str]:
    """(kind, path) for a MODEL argument: kind is "diffusers" (a folder with model_index.json) or "single_file"
    (a .safetensors checkpoint). Raises MixQuantError for anything else."""
    if not model:
        raise MixQuantError("no model given; use --model digits, a diffusers folder, or a .safetensors checkpoint")
    if model.strip().lower() == "digits":
        if not os.path.isfile(os.path.join(DIGITS_DIR, "model_index.json")):
            raise MixQuantError(f"the embedded digits model is missing from {DIGITS_DIR}; reinstall mixquant, or "
                                "rebuild it with `python -m mixquant.app.digits.train`")
        return "diffusers", DIGITS_DIR
    path = os.path.abspath(os.path.expanduser(model))
    if "+" in model and not os.path.exists(path):  # a diffusion model and its text encoders / VAE, each a file
        paths = [resolve_model(p.strip())[1] for p in model.split("+")]
        if any(not p.lower().endswith(".safetensors") for p in paths):
            raise MixQuantError(f"{model}: files joined with '+' are a diffusion model's parts, each a .safetensors "
                                "file")
        return "single_file", "+".join(paths)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return "diffusers", path
        raise MixQuantError(f"{model} is a folder but not a diffusers pipeline (no model_index.json); give the "
                            "pipeline's root folder, a .safetensors checkpoint, or `digits`")
    if os.path.isfile(path):
        if path.lower().endswith(".safetensors"):
            return "single_file", path
        raise MixQuantError(f"{model} is not a .safetensors file; only safetensors checkpoints are loaded "
                            "(never pickle: .ckpt/.bin/.pt). Convert it to .safetensors or a diffusers folder")
    raise MixQuantError(f"model {model!r} not found; use `digits` (the embedded model), a diffusers folder, or a "
                        ".safetensors checkpoint path")


@contextlib.contextmanager
def _quiet_loading():
    """Silence the loaders' info/warning chatter (missing accelerate / torchvision, progress bars)."""
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog
    except Exception:  # noqa: BLE001
        yield
        return
    dv, tv = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dpb = dlog.is_progress_bar_enabled()
    tpb = tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(dv)
        tlog.set_verbosity(tv)
        if dpb:
            dlog.enable_progress_bar()
        if tpb:
            tlog.enable_progress_bar()


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device | None) -> str:
    """"auto" (or nothing): CUDA when available (the LOCAL_RANK-th GPU under torchrun), else the CPU; a CUDA device that
    is not there is a MixQuantError."""
    name = str(name) if name is not None else "auto"
    if name in ("", "auto"):  # (under torchrun, each process its own GPU)
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MixQuantError("CUDA was asked for but is not available; use --device cpu (or auto)")
    return name




def resolve_dtype(name: str | torch.dtype | None, device: str, family: str | None = None) -> torch.dtype:
    """"auto" (or nothing): fp16 on a GPU, fp32 on a CPU (where half-precision matmuls are slow or inexact); on a GPU
    bf16 for the diffusion transformers (`family`: the pipeline class), whose activations overflow fp16."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "", "auto"):
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if family in DIT_PIPELINES else torch.float16  # (their activations overflow fp16)
    if name not in DTYPES:
        raise MixQuantError(f"unknown dtype {name!r}: use auto, fp32, fp16 or bf16")
    return DTYPES[name]


OFFLOAD = ("auto", "off", "stream")


def load_pipeline(model: str = "digits", device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                  offload: str = "auto"):
    """Load a text-to-image pipeline offline. `model`: "digits" (the embedded model), a diffusers folder, a
    single-file .safetensors checkpoint of SD1.x, SD2.x or SDXL (single_file.py) or of Flux.1 / SD3 (dit_file.py; a
    diffusion-model-only file joined to its text encoders and VAE with '+': "flux1-dev.safetensors+clip_l.safetensors
    +t5xxl_fp16.safetensors+ae.safetensors"). `device` "auto": CUDA when
    available; `dtype` (None / "auto": fp16 on a GPU, fp32 on a CPU). `offload`: "stream" keeps the denoiser on the
    CPU and streams its blocks through the device at every call (quant/offload.py; the rest of the pipeline on the
    device); "auto" (default) does so where the denoiser does not fit the device's free memory; "off" never.
    Progress bars are disabled."""
    kind, path = resolve_model(model)
    dev = torch.device(resolve_device(device))
    family = _pipeline_class(path) if kind == "diffusers" else _file_pipeline_class(path)
    dtype = resolve_dtype(dtype, dev.type, family)
    with _quiet_loading(), warnings.catch_warnings():  # (the loaders' deprecation and info chatter)
        warnings.simplefilter("ignore")
        if kind == "diffusers":
            pipe = _load_folder(path, dtype)
        elif family in DIT_PIPELINES:
            pipe = load_dit_files(path.split("+"), dtype)
        else:
            pipe = load_single_file(path, dtype)
    check_supported(pipe, model)
    if offload not in OFFLOAD:
        raise MixQuantError(f"unknown offload {offload!r}: use {', '.join(OFFLOAD)}")
    den = denoiser_of(pipe)
    comps = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    if offload == "stream" or (offload == "auto" and not fits(dev, sum(model_bytes(c) for c in comps))):
        for comp in comps:  # everything but the denoiser on the device; the denoiser streamed through it
            if comp is not den:
                comp.to(dev)
        stream(den, stream_blocks(den), dev)
    else:
        pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_supported(pipe, model: str = "the model") -> None:
    """A text-to-image pipeline whose denoiser is a UNet, a Flux transformer or an SD3 (MMDiT) transformer; anything
    else (a video model, another transformer family, an image-to-image-only pipeline) is one clear MixQuantError."""
    if isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        if type(pipe.unet).__name__ != "UNet2DConditionModel":
            raise MixQuantError(f"{model} is a {type(pipe).__name__} with a {type(pipe.unet).__name__} (a video or "
                                "other special UNet); MixQuant quantizes text-to-image denoisers: SD1.x, SD2.x, "
                                "SDXL, Flux and SD3.")
        return
    tr = getattr(pipe, "transformer", None)
    name = type(tr).__name__ if tr is not None else "none"
    if name not in DIT_CLASSES or type(pipe).__name__ not in DIT_PIPELINES:
        raise MixQuantError(f"{model} is a {type(pipe).__name__} (denoiser: {name}); MixQuant quantizes the "
                            "text-to-image denoisers of SD1.x, SD2.x, SDXL (UNets), Flux (FluxPipeline) and SD3 "
                            "(StableDiffusion3Pipeline); this family is not supported.")


def _file_pipeline_class(path: str) -> str | None:
    """FluxPipeline / StableDiffusion3Pipeline for single files of a diffusion transformer (several files joined by
    '+' are always one), else None (a UNet checkpoint, whose loader says what any other file is)."""
    if "+" in path and not os.path.isfile(path):
        return "FluxPipeline" if Source(path.split("+")).family == "flux" else "StableDiffusion3Pipeline"
    fam = dit_family(read_shapes(path)[0])
    return {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}.get(fam)


def _pipeline_class(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None  # (_load_folder says what is wrong with the folder)


def _load_folder(path: str, dtype: torch.dtype):
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    extra = {}
    if "safety_checker" in index:  # never load (or download) a safety checker
        extra.update(safety_checker=None, requires_safety_checker=False)
    if "feature_extractor" in index:
        extra.update(feature_extractor=None)
    from diffusers import DiffusionPipeline

    if dtype != torch.float32:
        extra["torch_dtype"] = dtype  # (named `dtype` in newer diffusers; the old name still works)
    try:
        return DiffusionPipeline.from_pretrained(path, local_files_only=True, **extra)
    except (OSError, ValueError, EnvironmentError) as e:
        raise MixQuantError(f"could not load the diffusers pipeline in {path}: {str(e).splitlines()[0]}; "
                            "check that the folder is complete") from None


def set_scheduler(pipe, name: str):
    """Swap the pipeline's sampler: "ddim", "dpm" (DPM-Solver++ 2M) or "euler"; built from its scheduler config.
    "auto": dpm, or for a flow-matching pipeline (Flux, SD3) its own Euler sampler, the one it supports."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    key = resolve_scheduler(pipe, (name or "").lower())
    if key not in classes:
        raise MixQuantError(f"unknown scheduler {name!r}; use one of auto, {', '.join(SCHEDULERS)}")
    if is_flow(pipe):
        if key != "euler":
            raise MixQuantError(f"{type(pipe).__name__} samples by flow matching with its Euler sampler; use "
                                f"scheduler euler (or auto), not {key}.")
        return pipe
    pipe.scheduler = classes[key].from_config(pipe.scheduler.config)
    return pipe
