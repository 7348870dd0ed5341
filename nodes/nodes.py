"""The ComfyUI nodes (V1 API): thin adapters over quant/. Every node takes and returns ordinary ComfyUI types; a
quantized MODEL is the FP MODEL's clone with quantized layers swapped in (nodes/patching.py), so every other node
accepts it. ComfyUI modules are imported inside functions only: this module imports without ComfyUI."""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..quant.engine import FP8_MODES, SPEEDS, QuantizeConfig
from ..quant.errors import InterruptedRun, MixQuantError
from ..quant.fileformat import fingerprint, load_quantized, read_header, same_base, save_quantized
from ..quant.native import export_native, save_native, split_model
from ..quant.runner import Progress
from ..quant.speed import speed_text
from ..quant.util import json_safe, parse_prompts
from . import patching
from .planning import PlanResult, plan_from_calibration
from ..quant.runner import SamplerSettings
from .runner import ComfyRunner, interrupted

CATEGORY = "MixQuant"
FOLDER = "mixquant"  # models/mixquant: our quantized files
NATIVE_FOLDER = "diffusion_models"  # where the stock Load Diffusion Model node looks
_FALLBACK_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
_FALLBACK_SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]
BUDGET_KINDS = ["average weight bits", "megabytes"]
TARGETS = ["mixquant", "comfyui-native"]


# --- ComfyUI access (lazy, with fallbacks so the contracts can be tested without ComfyUI) ---------------------------

def _samplers():
    try:
        import comfy.samplers
        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return list(_FALLBACK_SAMPLERS), list(_FALLBACK_SCHEDULERS)


def sampler_inputs(steps: int, cfg: float, max_steps: int) -> dict:
    """The sampler widgets of a node, as the stock KSampler has them: steps, cfg, sampler and scheduler."""
    samplers, schedulers = _samplers()
    return {"steps": ("INT", {"default": steps, "min": 1, "max": max_steps}),
            "cfg": ("FLOAT", {"default": cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (samplers,), "scheduler": (schedulers,)}


def register_folder() -> None:
    """models/mixquant as a model folder (dropdowns list it; refreshed by ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


def quantized_files() -> list[str]:
    try:
        import folder_paths
    except ImportError:
        return []
    register_folder()
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith(".safetensors")]


def _full_path(folder: str, name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise MixQuantError(f"{name}: no such file in models/{folder}. Refresh the node (press R) and pick a file "
                            "from the list.")
    return path


def _save_path(folder: str, prefix: str) -> str:
    """models/<folder>/<prefix>.safetensors, with _00001, _00002... when the name is taken."""
    import folder_paths

    prefix = (prefix or "model").strip().replace("\\", "/").lstrip("/")
    if ".." in prefix.split("/"):
        raise MixQuantError("the file name may not contain '..'")
    if prefix.lower().endswith(".safetensors"):
        prefix = prefix[: -len(".safetensors")]
    base = folder_paths.get_folder_paths(folder)[0]
    path = os.path.join(base, prefix + ".safetensors")
    i = 1
    while os.path.exists(path):
        path = os.path.join(base, f"{prefix}_{i:05d}.safetensors")
        i += 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def comfy_progress(node_id=None) -> Progress:
    """quant/'s Progress on ComfyUI's ProgressBar (real done/total per phase; it also checks for /interrupt) plus a
    `mixquant.progress` message with the phase name for the web extension."""
    state = {"bar": None, "phase": None}

    def cb(done, total, phase):
        try:
            import comfy.utils
        except ImportError:
            return
        total = max(1, int(total))
        if phase != state["phase"]:
            state["bar"], state["phase"] = comfy.utils.ProgressBar(total, node_id=node_id), phase
        state["bar"].update_absolute(min(int(done), total), total)
        try:
            from server import PromptServer
            PromptServer.instance.send_sync("mixquant.progress", {"node": node_id, "phase": phase, "done": int(done),
                                                                  "total": total})
        except Exception:  # noqa: BLE001  (no server: a script or a test)
            pass

    return Progress(callback=cb, should_stop=interrupted)


def _interruptible(fn):
    """Run fn; a cooperative stop (InterruptedRun) becomes ComfyUI's own interruption, so the UI shows
    'interrupted' (not an error) and the flag is reset for the next prompt."""
    try:
        return fn()
    except InterruptedRun as stopped:
        try:
            import comfy.model_management as mm
        except ImportError:
            raise stopped from None
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException() from None


# --- values passed between nodes -------------------------------------------------------------------------------------

@dataclass
class CalibrationResult:
    """MIXQUANT_CALIBRATION: the runner (FP MODEL, CLIP, sampler settings) and what calibration recorded."""
    runner: object
    calib: object
    base_fingerprint: dict
    model_name: str = ""

    def __repr__(self):
        return f"MixQuant calibration ({len(self.calib.prompts)} prompts, {len(self.calib.calls)} denoiser calls)"


def _model_name(model) -> str:
    try:
        return type(model.model).__name__
    except AttributeError:
        return type(model).__name__


# --- nodes -------------------------------------------------------------------------------------------------------------

class MixQuantNode:
    """Every MixQuant node: listed under the MixQuant category."""
    CATEGORY = CATEGORY


class MixQuantCalibrate(MixQuantNode):
    DESCRIPTION = ("Runs your sampler on your prompts with the full-precision model and records what every layer "
                   "sees (per group of timesteps). The model is not changed. Interruptible.")
    RETURN_TYPES, RETURN_NAMES = ("MIXQUANT_CALIBRATION",), ("calibration",)
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The full-precision model to quantize."}),
                "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na watercolor landscape",
                                       "tooltip": "One prompt per line: the kind of images you will make. "
                                                  "Not used with a conditioning input."}),
                "negative": ("STRING", {"multiline": True, "default": ""}),
                **sampler_inputs(steps=8, cfg=7.0, max_steps=200),
                "width": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8}),
                "height": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                 "tooltip": "Seed of the first prompt; the next prompts use seed+1, ..."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Encodes the calibration prompts (or connect a conditioning instead)."}),
                "vae": ("VAE", {"tooltip": "Decode images for the quality metric (default: a fast latent preview)."}),
                "timestep_groups": ("INT", {"default": 1, "min": 1, "max": 8,
                                            "tooltip": "Groups of timesteps with their own activation ranges."}),
                "conditioning": ("CONDITIONING", {
                    "tooltip": "Instead of a CLIP and the prompts: calibrate on this conditioning (from any node: "
                               "a text encoder loaded elsewhere, an img2img or edit workflow), one image per seed."}),
                "negative_conditioning": ("CONDITIONING", {
                    "tooltip": "The negative for the conditioning input (default: the conditioning zeroed)."}),
                "conditioning_images": ("INT", {"default": 4, "min": 1, "max": 64,
                                                "tooltip": "With a conditioning input: how many images (seeds)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):  # (the prompts are checked at run time: a conditioning
        for name, v in (("width", width), ("height", height)):  # input makes them unnecessary)
            if v is not None and (v < 8 or v % 8):
                return f"{name} must be a multiple of 8"
        return True

    def calibrate(self, model, prompts, negative, steps, cfg, sampler_name, scheduler, width, height, seed,
                  clip=None, vae=None, timestep_groups=1, conditioning=None, negative_conditioning=None,
                  conditioning_images=4, unique_id=None):
        from ..quant.calibration import calibrate

        settings = SamplerSettings(steps=int(steps), guidance=float(cfg), scheduler=scheduler,
                                   sampler_name=sampler_name, width=int(width), height=int(height),
                                   negative_prompt=negative or "")
        runner = ComfyRunner(model, clip, settings, vae, conditioning, negative_conditioning)
        if conditioning is not None:  # one image per seed; the labels keep cache keys apart per conditioning
            plist = [f"<conditioning {runner.clip_id()} #{i}>" for i in range(int(conditioning_images))]
        else:
            plist = parse_prompts(prompts, hint="the prompts box (one per line), or connect a conditioning")
        base_fp = fingerprint(patching.fp_view(model))
        runner.load()

        def go():
            calib = calibrate(runner, plist, [int(seed) + i for i in range(len(plist))], int(timestep_groups),
                              progress=comfy_progress(unique_id))
            return (CalibrationResult(runner, calib, base_fp, _model_name(model)),)

        return _interruptible(go)


class MixQuantPlan(MixQuantNode):
    DESCRIPTION = ("Measures each layer's sensitivity (cached on disk: re-planning at another budget takes seconds) "
                   "and allocates bits per layer under the budget. target comfyui-native: only the formats stock "
                   "ComfyUI runs (W8A8 int8_tensorwise, W4A16 awq), for 'Save for stock ComfyUI'.")
    RETURN_TYPES, RETURN_NAMES = ("MIXQUANT_PLAN",), ("plan",)
    FUNCTION = "plan"

    @classmethod
    def INPUT_TYPES(cls):
        budget = ("FLOAT", {"default": 4.0, "min": 1.0, "max": 1e6, "step": 0.1,
                            "tooltip": "Average weight bits (1-16), or the denoiser's size in MB."})
        sensitivity = (["fast", "full", "local"], {
            "tooltip": "fast (default): each layer's noise weighted by its measured effect on the denoiser output "
                       "(minutes for SDXL); full: MixDQ's exhaustive image-level metrics (the reference, slow); "
                       "local: each layer's own output noise"})
        speed = (list(SPEEDS), {
            "tooltip": "auto (default): the plan runs at least min_speed x the float model's speed on this GPU/CPU "
                       "(every layer timed in every format) where the budget allows, else as fast as the budget "
                       "allows, and says what size would reach that speed; require: that speed or an error naming "
                       "what is feasible; off: no timing"})
        min_speed = ("FLOAT", {"default": 1.0, "min": 0.05, "max": 100.0, "step": 0.05,
                               "tooltip": "The speed to hold, as a factor of the float model's (1 = never slower)."})
        fp8 = (list(FP8_MODES), {
            "tooltip": "float8 e4m3 formats in the menu of Linear layers: auto (default) where this GPU has fp8 "
                       "tensor cores (RTX 40xx/50xx, H100: compute capability >= 8.9); on: everywhere (elsewhere "
                       "they run dequantized); off: int formats only"})
        return {"required": {"calibration": ("MIXQUANT_CALIBRATION",), "budget_kind": (BUDGET_KINDS,),
                             "budget": budget, "activation_bits": (["8", "16", "4"],), "target": (TARGETS,)},
                "optional": {"sensitivity": sensitivity, "speed": speed, "min_speed": min_speed, "fp8": fp8},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, budget_kind=None, budget=None):
        if budget_kind == BUDGET_KINDS[0] and budget is not None and not (1.0 <= budget <= 16.0):
            return "an average weight bit-width must be between 1 and 16"
        if budget is not None and budget <= 0:
            return "the budget must be positive"
        return True

    def plan(self, calibration, budget_kind, budget, activation_bits, target, sensitivity="fast", speed="auto",
             min_speed=1.0, fp8="auto", unique_id=None):
        if not isinstance(calibration, CalibrationResult):
            raise MixQuantError("connect the output of MixQuant Calibrate.")
        bits = budget_kind == BUDGET_KINDS[0]
        cfg = QuantizeConfig(avg_w_bits=float(budget) if bits else None, budget_mb=None if bits else float(budget),
                             a_bits=int(activation_bits), target=target, act_groups=calibration.calib.n_groups,
                             bos=target != "comfyui-native",  # BOS handling has no native form
                             sens_mode=sensitivity, speed=speed, min_speed=float(min_speed), fp8=fp8)
        runner = calibration.runner
        runner.load()

        def go():
            return (plan_from_calibration(runner, calibration.calib, cfg, comfy_progress(unique_id),
                                          calibration.model_name, calibration.base_fingerprint),)

        return _interruptible(go)


def check_same_model(model, plan: PlanResult):
    fp = fingerprint(patching.fp_view(model))
    if plan.base_fingerprint and not same_base(fp, plan.base_fingerprint):
        raise MixQuantError("this plan was made for a different model (fingerprints differ): connect the MODEL that "
                            "was calibrated, or calibrate this one.")
    return fp


def quantize_from_plan(model, plan: PlanResult):
    """The quantized clone of `model` for `plan` (layers cached on the plan for this model)."""
    if not isinstance(plan, PlanResult):
        raise MixQuantError("connect the output of MixQuant Plan.")
    if patching.quantized_layers(model):
        raise MixQuantError("this MODEL is already quantized: connect the full-precision MODEL.")
    key = (id(patching.diffusion_model(model)), tuple(sorted(getattr(model, "object_patches", {}))))
    cache = plan.__dict__.setdefault("_layers", {})
    if key not in cache:
        fp = check_same_model(model, plan)
        _, layers, stats = patching.quantize_layers(model, plan.plan, plan.ranges, plan.bos, plan.search)
        cache.clear()
        cache[key] = (layers, fp)
    layers, fp = cache[key]
    info = {"base_fingerprint": fp, "group_bounds": plan.group_bounds, "report": _report_summary(plan.report),
            "source": "plan"}
    return patched_clone_checked(model, layers, info, plan.group_bounds)


def patched_clone_checked(model, layers, info, bounds):
    if patching.quantized_layers(model):
        raise MixQuantError("this MODEL is already quantized: connect the full-precision MODEL.")
    return patching.patched_clone(model, layers, json_safe(info), bounds)


class QuantizedModelNode(MixQuantNode):
    """A node that returns a quantized MODEL and its size summary."""
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")

    @staticmethod
    def output(model) -> tuple:
        return (model, _size_summary(model))


class QuantizedFileNode(QuantizedModelNode):
    """A node that loads a MixQuant file from models/mixquant, checked (`check(path)`) when the graph is validated."""
    FUNCTION = "load"

    @staticmethod
    def file_input() -> tuple:
        return (quantized_files() or ["(none in models/mixquant)"],)

    @staticmethod
    def check(path: str) -> None:
        read_header(path)

    @classmethod
    def VALIDATE_INPUTS(cls, quantized_file=None):
        if quantized_file is None:
            return True
        try:
            cls.check(_full_path(FOLDER, quantized_file))
        except MixQuantError as e:
            return str(e)
        except ImportError:
            return True
        return True


class MixQuantQuantizeModel(QuantizedModelNode):
    DESCRIPTION = ("Returns a clone of the MODEL with the plan's quantized layers swapped in (the input is "
                   "untouched). Works with the stock KSampler, LoRA loaders and other model patches.")
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "plan": ("MIXQUANT_PLAN",)}}

    def quantize(self, model, plan):
        return self.output(quantize_from_plan(model, plan))


def _size_summary(model) -> str:
    info = getattr(model, "model_options", {}).get(patching.OPTIONS_KEY, {})
    fp, q = info.get("fp_bytes", 0), info.get("quantized_bytes", 0)
    return (f"{info.get('layers', 0)} quantized layers; model {q / 1e6:.1f} MB vs {fp / 1e6:.1f} MB full precision "
            f"({q / max(1, fp):.3f}x)")


def _quantized_info(model):
    layers = patching.quantized_layers(model)
    if not layers:
        raise MixQuantError("this MODEL has no MixQuant layers: connect the output of MixQuant Quantize Model or "
                            "Load Quantized.")
    return layers, getattr(model, "model_options", {}).get(patching.OPTIONS_KEY, {})


def _quantized_view(model, layers):
    view = patching.fp_view(model, list(layers))
    for name, q in layers.items():
        got = view.get_submodule(name)
        if not isinstance(got, type(q)):
            raise MixQuantError(f"layer {name} is not the quantized one in this MODEL's view")
    return view


def architecture_of(model) -> dict:
    dm = patching.diffusion_model(model)
    arch = {"library": "comfyui", "class": type(dm).__name__, "base_model": _model_name(model)}
    cfg = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if isinstance(cfg, dict):
        arch["unet_config"] = json_safe(cfg)
    return arch


class QuantizedSaveNode(MixQuantNode):
    """A node that writes a quantized MODEL to a file (`filename` under a model folder)."""
    FUNCTION = "save"
    OUTPUT_NODE = True
    DEFAULT_NAME = "mixquant_model"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "filename": ("STRING", {"default": cls.DEFAULT_NAME})}}

    @staticmethod
    def quantized(model):
        """(quantized layers, the MODEL's MixQuant facts, the diffusion model with the layers in place)."""
        layers, info = _quantized_info(model)
        return layers, info, _quantized_view(model, layers)


class MixQuantSaveQuantized(QuantizedSaveNode):
    DESCRIPTION = "Saves the quantized model (MixQuant file) under models/mixquant for Load Quantized."
    RETURN_TYPES = ()

    def save(self, model, filename):
        layers, info, view = self.quantized(model)
        register_folder()
        path = _save_path(FOLDER, filename)
        extra = {"act_group_bounds": info.get("group_bounds") or None, "summary": info.get("report", {}),
                 "model": _model_name(model)}
        size = save_quantized(view, path, architecture=architecture_of(model),
                              base_fingerprint=info.get("base_fingerprint") or fingerprint(patching.fp_view(model)),
                              extra=json_safe(extra))
        text = f"saved {os.path.basename(path)} ({size / 1e6:.2f} MB, {len(layers)} quantized layers)"
        return {"ui": {"text": [text]}, "result": ()}


def _meta_skeleton(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers live on the meta device (no memory)."""
    new = copy.copy(module)
    new._modules = type(module._modules)((k, None if v is None else _meta_skeleton(v))
                                         for k, v in module._modules.items())
    new._parameters = type(module._parameters)(
        (k, None if v is None else nn.Parameter(torch.empty(v.shape, dtype=v.dtype, device="meta"),
                                                requires_grad=False))
        for k, v in module._parameters.items())
    new._buffers = type(module._buffers)((k, None if v is None else torch.empty(v.shape, dtype=v.dtype,
                                                                                device="meta"))
                                         for k, v in module._buffers.items())
    return new


# hosts whose diffusion models have the original (LDM) layer names: a file made in one loads in the others
LDM_HOSTS = ("comfyui", "webui")


def load_quantized_layers(model, path: str) -> tuple[dict, dict]:
    """The file's quantized layers for the FP MODEL (a ModelPatcher: ComfyUI's, or WebUI Forge's UnetPatcher, which
    descends from it) and the MixQuant facts a patched clone carries; every check of quant/fileformat runs first."""
    meta = read_header(path)
    arch = meta["architecture"]
    if arch.get("library") not in LDM_HOSTS:
        raise MixQuantError(f"{os.path.basename(path)} was quantized from a {arch.get('library')} "
                            f"{arch.get('class')} (other layer names than ComfyUI's and the WebUIs'). Quantize this model in "
                            "ComfyUI (Calibrate -> Plan -> Quantize Model -> Save Quantized) or the WebUI's MixQuant "
                            "tab, or export it with `mixquant "
                            "export --to comfyui` and load that with Load Diffusion Model.")
    view = patching.fp_view(model)
    patching.check_fp(view)
    fp = fingerprint(view)
    skeleton = load_quantized(path, _meta_skeleton(view), fp)
    layers = {n: skeleton.get_submodule(n) for n in meta["layers"]}
    dev = getattr(model, "offload_device", None)
    if dev is not None:
        for q in layers.values():
            q.to(dev)
    extra = meta.get("extra", {})
    info = {"base_fingerprint": meta["base_model"], "group_bounds": extra.get("act_group_bounds") or [],
            "report": extra.get("summary", {}), "source": os.path.basename(path)}
    return layers, info


def load_quantized_model(model, path: str):
    """The FP MODEL's clone with the file's quantized layers (every check of quant/fileformat runs first)."""
    layers, info = load_quantized_layers(model, path)
    return patched_clone_checked(model, layers, info, info["group_bounds"])


class MixQuantLoadQuantized(QuantizedFileNode):
    DESCRIPTION = ("Loads a MixQuant file onto the full-precision MODEL it was made from (no recalibration). The "
                   "file is checked first: a wrong or damaged file gives one message saying what to do.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "quantized_file": cls.file_input()}}

    def load(self, model, quantized_file):
        return self.output(load_quantized_model(model, _full_path(FOLDER, quantized_file)))


class MixQuantSaveNative(QuantizedSaveNode):
    DESCRIPTION = ("Saves the quantized diffusion model in ComfyUI's own quantized format (per-layer "
                   ".comfy_quant markers) under models/diffusion_models: the stock Load Diffusion Model node loads "
                   "it (ComfyUI >= v0.27 with comfy-kitchen), no MixQuant needed. Linear W8A8 -> int8_tensorwise, "
                   "W4A16 -> awq_w4a16; everything else (convs, static activation ranges, 2-bit) stays float.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("summary",)
    DEFAULT_NAME = "mixquant_native"

    def save(self, model, filename):
        layers, info, view = self.quantized(model)
        exp = export_native(*split_model(view), naming="LDM names (ComfyUI's diffusion model)")
        path = _save_path(NATIVE_FOLDER, filename)
        size = save_native(exp, path, {"base_model": (info.get("base_fingerprint") or {}).get("id", "")})
        s = exp.summary()
        fmts = ", ".join(f"{k} x{v}" for k, v in sorted(s["native_formats"].items())) or "none"
        text = (f"saved {os.path.basename(path)} ({size / 1e6:.2f} MB): {s['native_layers']} layers in native form "
                f"({fmts}), {s['native_bytes']:,} bytes; {s['float_quantized_layers']} quantized layers kept float")
        if s["native_layers"] == 0:
            text += ". No layer has a native format: plan with target comfyui-native."
        return {"ui": {"text": [text], "mixquant_native": [s]}, "result": (text,)}


class MixQuantKSampler(MixQuantNode):
    DESCRIPTION = ("KSampler with the quantized layers swapped in for this run (from a plan or a MixQuant file), "
                   "activation ranges switched per group of timesteps. Also returns memory and time vs full "
                   "precision (compare_fp also times the FP run).")
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "stats")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        model = ("MODEL", {"tooltip": "The full-precision model (or an already quantized one)."})
        seed = ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True})
        required = {"model": model, "seed": seed, **sampler_inputs(steps=20, cfg=8.0, max_steps=10000),
                    "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                    "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}
        return {"required": required, "optional": {"plan": ("MIXQUANT_PLAN",),
                                                   "quantized_file": (["none"] + quantized_files(),),
                                                   "compare_fp": ("BOOLEAN", {"default": False})}}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               plan=None, quantized_file="none", compare_fp=False):
        if patching.quantized_layers(model):
            qmodel = model
        elif plan is not None:
            qmodel = quantize_from_plan(model, plan)
        elif quantized_file and quantized_file != "none":
            qmodel = load_quantized_model(model, _full_path(FOLDER, quantized_file))
        else:
            raise MixQuantError("connect a plan or pick a quantized file (or connect a quantized MODEL).")
        args = (seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
        t0 = time.perf_counter()
        peak0 = _reset_peak()
        out = _ksample(qmodel, *args)
        tq, mq = time.perf_counter() - t0, _peak(peak0)
        info = qmodel.model_options.get(patching.OPTIONS_KEY, {})
        fp_b, q_b = info.get("fp_bytes", 0), info.get("quantized_bytes", 0)
        lines = [f"model: {q_b / 1e6:.1f} MB quantized vs {fp_b / 1e6:.1f} MB FP ({q_b / max(1, fp_b):.3f}x)",
                 f"time: {tq:.2f} s quantized"]
        if mq is not None:
            lines.append(f"peak GPU memory: {mq / 1e6:.0f} MB quantized")
        if compare_fp and qmodel is not model:
            t0 = time.perf_counter()
            peak0 = _reset_peak()
            ref = _ksample(model, *args)
            tf, mf = time.perf_counter() - t0, _peak(peak0)
            lines[1] += f" vs {tf:.2f} s FP ({tq / max(tf, 1e-9):.2f}x)"
            if mq is not None and mf:
                lines[-1] += f" vs {mf / 1e6:.0f} MB FP ({mq / mf:.2f}x)"
            a, b = out["samples"].float(), ref["samples"].float()
            noise = float(((a - b) ** 2).mean())
            lines.append(f"latent SQNR vs FP: {10 * math.log10(float((b ** 2).mean()) / max(noise, 1e-30)):.1f} dB")
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (out, text)}


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return None


def _peak(base):
    if base is None or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated()


def _ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise):
    """The stock KSampler's sampling (nodes.common_ksampler), written against comfy.sample."""
    import comfy.sample
    import comfy.utils
    import latent_preview

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                                  denoise=denoise, noise_mask=latent.get("noise_mask"), callback=callback,
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


# --- report ----------------------------------------------------------------------------------------------------------

_STACKS = ("input_blocks", "output_blocks", "down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks",
           "joint_blocks", "double_blocks", "single_blocks", "blocks", "layers")


def block_of(name: str) -> str:
    """The block a layer belongs to, for the bar chart: input_blocks.4 / middle_block / down_blocks.1 / time_embed."""
    parts = name.split(".")
    if parts[0] in _STACKS and len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _report_summary(report: dict) -> dict:
    keys = ("model", "target", "avg_w_bits", "avg_a_bits", "bytes_fp16", "bytes_quantized", "quality", "act_groups",
            "speed")
    return json_safe({k: report.get(k) for k in keys if k in report})


def report_view(report: dict) -> dict:
    """What the web extension draws: per-block bars (weighted average bits, bytes) and per-layer rows, the curve."""
    blocks: dict[str, dict] = {}
    for li in report.get("layers", []):
        b = blocks.setdefault(block_of(li["name"]), {"block": block_of(li["name"]), "params": 0, "bits_x_params": 0,
                                                      "bytes": 0, "layers": 0, "formats": {}})
        b["params"] += li["params"]
        b["bits_x_params"] += li["w_bits"] * li["params"]
        b["bytes"] += li.get("bytes", 0)
        b["layers"] += 1
        fmt = li.get("format", f"W{li['w_bits']}A{li['a_bits']}")
        b["formats"][fmt] = b["formats"].get(fmt, 0) + 1
    out_blocks = [{"block": b["block"], "avg_w_bits": b["bits_x_params"] / max(1, b["params"]), "params": b["params"],
                   "bytes": b["bytes"], "layers": b["layers"], "formats": b["formats"]} for b in blocks.values()]
    layers = [{k: li.get(k) for k in ("name", "role", "w_bits", "a_bits", "format", "params", "bytes")}
              for li in report.get("layers", [])]
    return json_safe({"summary": _report_summary(report), "blocks": out_blocks, "layers": layers,
                       "curve": report.get("curve", [])})


def report_text(report: dict) -> str:
    s = _report_summary(report)
    q = s.get("quality") or {}
    lines = [f"avg weight bits {s.get('avg_w_bits', 0):.2f}, avg activation bits {s.get('avg_a_bits', 0):.2f}",
             f"{(s.get('bytes_quantized') or 0) / 1e6:.1f} MB vs {(s.get('bytes_fp16') or 0) / 1e6:.1f} MB fp16"]
    if q:
        lines.append("quality: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items() if isinstance(v, (int, float))))
    if report.get("speed"):
        lines.append(speed_text(report["speed"]))
    counts = {}
    for li in report.get("layers", []):
        counts[li.get("format")] = counts.get(li.get("format"), 0) + 1
    lines.append("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))))
    return "\n".join(lines)


class MixQuantReport(MixQuantNode):
    DESCRIPTION = "Per-layer bits, bytes and quality of a plan; draws the bit allocation per block on the node."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report_json",)
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"plan": ("MIXQUANT_PLAN",)}}

    def report(self, plan):
        if not isinstance(plan, PlanResult):
            raise MixQuantError("connect the output of MixQuant Plan.")
        view = report_view(plan.report)
        text = report_text(plan.report)
        full = json.dumps(json_safe(plan.report))
        return {"ui": {"mixquant_report": [view], "text": [text]}, "result": (full,)}


from .loader import MixQuantLoadQuantizedFileOnly  # noqa: E402  (nodes/loader.py builds on the classes above)

NODE_CLASS_MAPPINGS = {
    "MixQuantCalibrate": MixQuantCalibrate,
    "MixQuantPlan": MixQuantPlan,
    "MixQuantQuantizeModel": MixQuantQuantizeModel,
    "MixQuantSaveQuantized": MixQuantSaveQuantized,
    "MixQuantLoadQuantized": MixQuantLoadQuantized,
    "MixQuantSaveNative": MixQuantSaveNative,
    "MixQuantKSampler": MixQuantKSampler,
    "MixQuantReport": MixQuantReport,
    "MixQuantLoadQuantizedFileOnly": MixQuantLoadQuantizedFileOnly,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MixQuantCalibrate": "MixQuant Calibrate",
    "MixQuantPlan": "MixQuant Plan (sensitivity + bits)",
    "MixQuantQuantizeModel": "MixQuant Quantize Model",
    "MixQuantSaveQuantized": "MixQuant Save Quantized",
    "MixQuantLoadQuantized": "MixQuant Load Quantized",
    "MixQuantSaveNative": "MixQuant Save for stock ComfyUI",
    "MixQuantKSampler": "KSampler (MixQuant)",
    "MixQuantReport": "MixQuant Report",
    "MixQuantLoadQuantizedFileOnly": "MixQuant Load Quantized Model (file only)",
}
