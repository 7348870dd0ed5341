"""MixQuant in Stable Diffusion WebUI Forge and A1111: what scripts/mixquant_webui.py (the thin WebUI glue) calls.

Nothing here imports the WebUI (`modules`, `backend`): the glue passes in what it needs (the loaded model, a function
that generates images with the WebUI's own txt2img, one that unloads models), so this file runs under the tests with
stand-ins, and the steps themselves are quant/'s and nodes/'s (the ModelPatcher helpers, which are duck-typed):

- `WebUIRunner`: quant/'s DenoiserRunner over the WebUI's own sampler (processing.process_images of a txt2img job),
  recording the UNet the WebUI runs.
- `Session`: the tab's calibrate -> plan -> quantize -> save on the loaded checkpoint, files keyed by its hash, and
  the quantized layers of a file, loaded once per (file, checkpoint).
- `ForgeHost`: Forge keeps the UNet in a ComfyUI-like UnetPatcher (`sd_model.forge_objects.unet`). A generation gets a
  clone with one object patch per quantized layer, as the ComfyUI pack does. Forge's LoRA loader merges LoRAs into
  whatever `.weight` sits at a key when the model is loaded, keeps backups per key, and restores them at its next
  refresh with other LoRAs; for a GGUF weight (one with a `gguf_cls`) it dequantizes, merges and requantizes. Our
  layers' packed weights carry such a codec (`ForgeLoraCodec`), and the clone's class takes every LoRA merge out of
  the tree before its layers go in or come out (`_LoraSafe`), so a backup is only ever restored into the module it
  was taken from.
- `A1111Host`: A1111 runs `sd_model.model.diffusion_model` directly; a generation swaps the quantized layers in and
  back out. A1111's LoRA patches nn.Linear / nn.Conv2d at class level, which our layers are not: a LoRA in the prompt
  is refused (the generation runs in full precision and says so).
"""
from __future__ import annotations

import os
import re
import time
import weakref

import torch
import torch.nn as nn

from ..nodes import patching
from ..nodes.nodes import (
    _report_summary,
    check_same_model,
    load_quantized_layers,
    report_text,
    report_view,
)
from ..nodes.planning import PlanResult, plan_from_calibration
from ..quant.calibration import calibrate
from ..quant.engine import QuantizeConfig
from ..quant.errors import MixQuantError
from ..quant.fileformat import fingerprint, read_header, save_quantized
from ..quant.runner import DenoiserRunner, Progress, SamplerSettings
from ..quant.util import images_to_tensor, json_safe, parse_prompts

OPTION = "MixQuant"  # the infotext key, the script's title
AUTO, OFF = "Automatic (this checkpoint's newest file)", "Off"


# --- the runner -------------------------------------------------------------------------------------------------------

class WebUIRunner(DenoiserRunner):
    """quant/'s runner over the WebUI: `generate(prompts, seeds)` makes one image per prompt with the WebUI's own
    txt2img (the user's sampler, steps, CFG and size), `denoiser` is the UNet module that txt2img runs."""

    def __init__(self, denoiser: nn.Module, generate, settings: SamplerSettings, identity: dict):
        settings.check()
        if settings.width is None or settings.height is None or not settings.sampler_name:
            raise MixQuantError("give the sampler, width and height to calibrate with.")
        self.denoiser, self.generate, self.s, self.identity = denoiser, generate, settings, dict(identity)

    def settings(self) -> dict:
        return {**self.s.trajectory(), **self.identity}

    def timestep_of(self, args, kwargs) -> float:
        t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        if t is None:
            raise MixQuantError("the UNet was called without a timestep")
        return float(torch.as_tensor(t).reshape(-1)[0])

    def context_of(self, args, kwargs):
        return kwargs.get("context", args[2] if len(args) > 2 else None)

    def expected_calls(self, n_prompts: int) -> int:
        return self.s.steps * n_prompts

    @torch.no_grad()
    def sample(self, prompts, seeds):
        images = self.generate(list(prompts), [int(s) for s in seeds])
        if len(images) != len(prompts):
            raise MixQuantError(f"the WebUI made {len(images)} images for {len(prompts)} prompts")
        return images_to_tensor(images)


# --- the hosts ----------------------------------------------------------------------------------------------------

class ForgeLoraCodec:
    """Forge's GGUF protocol (backend/patcher/lora.py: `dequantize_tensor`, `gguf_cls.quantize_pytorch`), which its
    LoRA loader follows for any weight with a `gguf_cls`: the float weight of our packed layer for the merge, and the
    merged weight requantized (min-max ranges, as for ComfyUI's LoRA) into a NEW weight of the layer, so the backup
    the loader took (the original Parameter) stays as it was and comes back at its restore."""
    __name__ = "MixQuant"

    def __init__(self, layer):
        self.layer = layer

    def bake(self, parameter):  # Forge bakes GGUF tensors before their first use: ours are ready
        return

    def dequantize_pytorch(self, parameter) -> torch.Tensor:
        return self.layer.convert_weight(parameter.detach().float())

    def quantize_pytorch(self, weight: torch.Tensor, parent):
        new = self.layer.set_weight(weight.float(), return_weight=True)
        self.layer.weight = nn.Parameter(new, requires_grad=False)
        return self.layer.weight


def reset_loras(patcher) -> None:
    """Restore every weight Forge's LoRA loader merged into the model tree as it is now (and forget its state)."""
    loader = getattr(patcher, "lora_loader", None)
    if loader is not None and (loader.backup or getattr(loader, "online_backup", None)
                               or loader.loaded_hash != str([])):
        loader.refresh({}, offload_device=patcher.offload_device, force_refresh=True)


_LORA_SAFE: dict = {}


def _lora_safe(base: type) -> type:
    """`base` (Forge's UnetPatcher) whose clones keep this class and whose object patches go in and out of the shared
    model tree only with no LoRA merged into it (see the module docstring)."""
    if getattr(base, "_mixquant_lora_safe", False):
        return base
    cls = _LORA_SAFE.get(base)
    if cls is None:
        class _LoraSafe(base):
            _mixquant_lora_safe = True

            def clone(self):
                n = super().clone()
                n.__class__ = type(self)
                return n

            def forge_patch_model(self, target_device=None):
                reset_loras(self)  # merges made into the full-precision layers by an earlier generation
                out = super().forge_patch_model(target_device)
                # the full-precision layers our layers displaced wait off the GPU (Forge switches clones without
                # moving the model: they would stay in VRAM beside ours, unseen by its memory accounting)
                for m in self.object_patches_backup.values():
                    if isinstance(m, nn.Module):
                        m.to(self.offload_device)
                return out

            def forge_unpatch_model(self, target_device=None):
                reset_loras(self)  # merges made into our layers, before they leave the tree
                ours = [m for m in self.object_patches.values() if isinstance(m, nn.Module)]
                out = super().forge_unpatch_model(target_device)
                for m in ours:  # (kept for the next generation by the session, off the GPU)
                    m.to(self.offload_device)
                return out

            def refresh_loras(self):
                try:
                    return super().refresh_loras()
                except BaseException:
                    # Forge loads the model (our layers in the tree) before this and registers it as loaded only
                    # after: take both out again, or no later load would ever unpatch them
                    try:
                        self.forge_unpatch_model()
                    except Exception:  # (best effort: the refresh's own error is the one to report)
                        pass
                    raise

        _LoraSafe.__name__ = _LoraSafe.__qualname__ = f"MixQuant{base.__name__}"
        cls = _LORA_SAFE[base] = _LoraSafe
    return cls


class ForgeHost:
    """WebUI Forge: the UNet is `sd_model.forge_objects.unet` (a UnetPatcher). `unload_all` and `load_models` are
    Forge's memory_management.unload_all_models / load_models_gpu."""
    name = "forge"

    def __init__(self, sd_model, unload_all=None, load_models=None):
        self.sd_model, self.unload_all, self.load_models = sd_model, unload_all, load_models

    def patcher(self):
        """The checkpoint's own UnetPatcher (after a MixQuant generation `forge_objects.unet` is still our clone
        until the next generation resets it; the tab's steps work on the original)."""
        original = getattr(self.sd_model, "forge_objects_original", None)
        return original.unet if original is not None else self.sd_model.forge_objects.unet

    @property
    def denoiser(self) -> nn.Module:
        return patching.diffusion_model(self.patcher())

    def clean(self):
        """The shared model tree as the checkpoint has it: no quantized layers loaded in it, no LoRA merged."""
        if self.unload_all is not None:
            self.unload_all()
        reset_loras(self.patcher())

    def load(self):
        """The FP UNet loaded where Forge samples (measuring sensitivity calls it directly with recorded inputs that
        live on that device)."""
        self.clean()
        if self.load_models is not None:
            self.load_models([self.patcher()])

    def refusal(self, p) -> str | None:
        unet = p.sd_model.forge_objects.unet
        if any(len(k) > 3 and k[3] for k in getattr(unet, "lora_patches", {})):
            return ("Forge's online LoRA (the \"fp16 LoRA\" setting of Diffusion in Low Bits) is applied only by "
                    "Forge's own layers, so it would skip the quantized ones: this generation uses the "
                    "full-precision UNet. Turn that setting off to use a LoRA with MixQuant.")
        return None  # Forge's own LoRA loader works on our layers

    def apply(self, p, layers: dict, info: dict) -> None:
        unet = p.sd_model.forge_objects.unet
        if patching.quantized_layers(unet):
            return  # already in place (hires fix: the second pass asks again)
        for q in layers.values():
            if not isinstance(q.__dict__.get("_weight_attrs", {}).get("gguf_cls"), ForgeLoraCodec):
                q.set_weight_attrs(gguf_cls=ForgeLoraCodec(q))
        out = patching.patched_clone(unet, layers, json_safe(info), info.get("group_bounds") or [],
                                     model_sampling=getattr(unet.model, "predictor", None))
        out.__class__ = _lora_safe(type(out))
        p.sd_model.forge_objects.unet = out

    def restore(self, p=None) -> None:
        return  # Forge starts every batch from its original objects


class _TreePatcher:
    """The few ModelPatcher attributes nodes/patching reads, over a plain UNet module (A1111)."""

    def __init__(self, denoiser: nn.Module):
        self.model = type("Holder", (), {})()
        self.model.diffusion_model = denoiser
        self.object_patches, self.object_patches_backup = {}, {}
        self.offload_device = torch.device("cpu")

    def get_model_object(self, name: str):
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj


_LORA_TAG = re.compile(r"<\s*(lora|lyco|locon)\s*:", re.IGNORECASE)


class A1111Host:
    """A1111 1.10: the UNet is `sd_model.model.diffusion_model`, run as is; a generation swaps the quantized layers
    into it and `restore` swaps the originals back (also before any other job, should a generation have failed)."""
    name = "a1111"

    def __init__(self, sd_model, unload_all=None, load_models=None):
        self.sd_model = sd_model
        # (parent, attribute, original module), kept on the model: the script's hooks each make their own host
        self._swapped: list = sd_model.__dict__.setdefault("_mixquant_swapped", [])

    def patcher(self):
        self.clean()
        return _TreePatcher(self.sd_model.model.diffusion_model)

    @property
    def denoiser(self) -> nn.Module:
        return self.sd_model.model.diffusion_model

    def clean(self):
        """The UNet as the checkpoint has it: our swap undone, and any LoRA A1111's built-in extension merged into
        the weights in place taken out (it keeps the originals in `network_weights_backup` / `network_bias_backup`
        and restores them lazily, at the next forward with other networks; calibration, fingerprints and
        quantization must read the checkpoint's own weights)."""
        self.restore()
        with torch.no_grad():
            for m in self.sd_model.model.diffusion_model.modules():
                if not getattr(m, "network_current_names", ()):
                    continue
                w, b = getattr(m, "network_weights_backup", None), getattr(m, "network_bias_backup", None)
                if w is not None and isinstance(getattr(m, "weight", None), torch.Tensor):
                    m.weight.copy_(w)
                if b is not None and isinstance(getattr(m, "bias", None), torch.Tensor):
                    m.bias.copy_(b)
                m.network_current_names = ()

    def load(self):
        self.clean()

    def refusal(self, p) -> str | None:
        other = [getattr(p, "refiner_checkpoint", None), getattr(p, "hr_checkpoint_name", None)]
        if any(c and c not in ("None", "Use same checkpoint") for c in other):
            return ("a refiner or a second checkpoint for hires fix loads other weights into this UNet: this "
                    "generation uses the full-precision UNet.")
        prompts = [getattr(p, "prompt", ""), getattr(p, "hr_prompt", "")]
        prompts += list(getattr(p, "all_prompts", None) or []) + list(getattr(p, "all_hr_prompts", None) or [])
        if any(_LORA_TAG.search(x or "") for x in prompts if isinstance(x, str)):
            return ("A1111's LoRA patches full-precision Linear/Conv2d layers only, so it would skip the quantized "
                    "ones: this generation uses the full-precision UNet. Use WebUI Forge for LoRA on a MixQuant UNet, "
                    "or leave the LoRA out.")
        return None

    def apply(self, p, layers: dict, info: dict) -> None:
        self.restore()
        dm = self.denoiser
        for name, q in layers.items():
            parent_name, _, attr = name.rpartition(".")
            parent = dm.get_submodule(parent_name) if parent_name else dm
            orig = getattr(parent, attr)
            w = getattr(orig, "weight", None)
            if w is not None:
                q.to(w.device)
            self._swapped.append((parent, attr, orig))
            setattr(parent, attr, q)

    def restore(self, p=None) -> None:
        while self._swapped:
            parent, attr, orig = self._swapped.pop()
            setattr(parent, attr, orig)


def host_for(sd_model, unload_all=None, load_models=None):
    """The host of a loaded WebUI model: Forge has `forge_objects`, A1111 `model.diffusion_model`."""
    if getattr(sd_model, "forge_objects", None) is not None:
        return ForgeHost(sd_model, unload_all, load_models)
    if getattr(getattr(sd_model, "model", None), "diffusion_model", None) is not None:
        return A1111Host(sd_model, unload_all)
    raise MixQuantError("no model is loaded, or it is not one MixQuant knows (SD1.x, SD2.x, SDXL): load a "
                        "checkpoint first.")


# --- the session: the tab's steps and the files ----------------------------------------------------------------------

def checkpoint_of(sd_model) -> dict:
    """{"name", "sha256"} of the loaded checkpoint (the WebUI's own hash; computed once if it is not cached yet)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    if info is None:
        raise MixQuantError("no checkpoint is loaded: pick one in the WebUI first.")
    sha = getattr(info, "sha256", None)
    if not sha and hasattr(info, "calculate_shorthash"):
        info.calculate_shorthash()
        sha = getattr(info, "sha256", None)
    name = getattr(info, "name_for_extra", None) or os.path.splitext(os.path.basename(info.filename))[0]
    return {"name": name, "sha256": sha or ""}


def _safe_label(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", (text or "").strip()).strip("-.")
    return text[:64]


class Session:
    """One per WebUI process: the last calibration and plan of the tab, the files under `folder`, and the quantized
    layers of a file loaded once per (file, its size and time, the UNet it was loaded onto)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.calibration = None  # (runner, Calibration, base fingerprint, checkpoint)
        self.plan_result: PlanResult | None = None
        self.plan_checkpoint: dict | None = None
        self._layers: dict = {}
        self.status = "idle"

    # --- progress shown in the tab ---
    def progress(self, should_stop=None, also=None) -> Progress:
        def cb(done, total, phase):
            self.status = f"{phase}: {done}/{total}" if total else phase
            if also is not None:
                also(done, total, phase)
        return Progress(callback=cb, should_stop=should_stop)

    # --- step 1 ---
    def calibrate(self, host, generate, prompts, settings: SamplerSettings, seed: int = 0, groups: int = 1,
                  progress: Progress | None = None) -> dict:
        if int(groups) != 1:  # (calibration sorts calls into groups by the schedule, known before sampling)
            raise MixQuantError("timestep groups need the sampler's schedule before sampling, which the WebUI does "
                                "not give: calibrate with one group here.")
        plist = parse_prompts(prompts)
        ckpt = checkpoint_of(host.sd_model)
        host.clean()
        runner = WebUIRunner(host.denoiser, generate, settings, {"checkpoint": ckpt["sha256"] or ckpt["name"]})
        base_fp = fingerprint(patching.fp_view(host.patcher()))
        t0 = time.time()
        calib = calibrate(runner, plist, [int(seed) + i for i in range(len(plist))], max(1, int(groups)),
                          progress=progress or self.progress())
        self.calibration = (runner, calib, base_fp, ckpt)
        self.plan_result = None
        self.status = "calibrated"
        return {"checkpoint": ckpt, "prompts": len(plist), "denoiser_calls": len(calib.calls),
                "timestep_groups": calib.n_groups, "seconds": round(time.time() - t0, 2)}

    # --- step 2 ---
    def plan(self, host, budget_kind: str = "bits", budget: float = 4.0, activation_bits: int = 8,
             sensitivity: str = "fast", progress: Progress | None = None) -> dict:
        if self.calibration is None:
            raise MixQuantError("calibrate first (step 1): the plan is made from what calibration recorded.")
        runner, calib, base_fp, ckpt = self.calibration
        if checkpoint_of(host.sd_model) != ckpt:
            raise MixQuantError("the loaded checkpoint changed since calibration: calibrate again.")
        if budget_kind not in ("bits", "mb"):
            raise MixQuantError("the budget kind is 'bits' (average weight bits) or 'mb' (megabytes).")
        budget = float(budget)
        if budget_kind == "bits" and not 1.0 <= budget <= 16.0:
            raise MixQuantError("an average weight bit-width must be between 1 and 16.")
        if budget <= 0:
            raise MixQuantError("the budget must be positive.")
        cfg = QuantizeConfig(avg_w_bits=budget if budget_kind == "bits" else None,
                             budget_mb=budget if budget_kind == "mb" else None, a_bits=int(activation_bits),
                             act_groups=calib.n_groups, sens_mode=sensitivity)
        host.load()
        runner.denoiser = host.denoiser
        try:
            res = plan_from_calibration(runner, calib, cfg, progress or self.progress(),
                                        type(host.denoiser).__name__, base_fp)
        finally:
            host.clean()  # (the tree's modules back where Forge expects them, whatever the plan left loaded)
        self.plan_result, self.plan_checkpoint = res, ckpt
        self.status = "planned"
        return {"text": report_text(res.report), **report_view(res.report)}

    # --- step 3 ---
    def quantize_and_save(self, host, label: str = "") -> dict:
        if self.plan_result is None:
            raise MixQuantError("plan first (step 2): quantization follows the plan.")
        ckpt = checkpoint_of(host.sd_model)
        if ckpt != self.plan_checkpoint:
            raise MixQuantError("the loaded checkpoint changed since planning: calibrate and plan again.")
        plan = self.plan_result
        host.clean()
        patcher = host.patcher()
        check_same_model(patcher, plan)
        qview, layers, stats = patching.quantize_layers(patcher, plan.plan, plan.ranges, plan.bos, plan.search)
        s = _report_summary(plan.report)
        label = _safe_label(label) or f"w{s.get('avg_w_bits', 0):.1f}a{plan.config.get('a_bits', 8)}".replace(".", "p")
        os.makedirs(self.folder, exist_ok=True)
        stem = f"{_safe_label(ckpt['name']) or 'model'}-{(ckpt['sha256'] or 'nohash')[:10]}-{label}"
        path = os.path.join(self.folder, stem + ".safetensors")
        i = 1
        while os.path.exists(path):
            path = os.path.join(self.folder, f"{stem}_{i:03d}.safetensors")
            i += 1
        extra = {"act_group_bounds": plan.group_bounds or None, "summary": s, "model": type(host.denoiser).__name__,
                 "checkpoint": ckpt}
        arch = {"library": "webui", "class": type(host.denoiser).__name__, "host": host.name}
        size = save_quantized(qview, path, architecture=arch, base_fingerprint=plan.base_fingerprint,
                              extra=json_safe(extra))
        info = {"base_fingerprint": plan.base_fingerprint, "group_bounds": plan.group_bounds or [], "report": s,
                "source": os.path.basename(path)}
        self._remember(self._key(path, host), host, layers, info)
        self.status = f"saved {os.path.basename(path)}"
        return {"file": os.path.basename(path), "path": path, "file_bytes": size, "layers": len(layers),
                "bytes_quantized": s.get("bytes_quantized"), "bytes_fp16": s.get("bytes_fp16")}

    # --- the files ---
    def files(self, checkpoint: dict | None = None) -> list[dict]:
        """MixQuant files under the folder (newest first), each with the checkpoint it was made from; only those of
        `checkpoint` (by hash) when given. Unreadable files are listed with their error."""
        out = []
        if not os.path.isdir(self.folder):
            return out
        for fn in os.listdir(self.folder):
            if not fn.lower().endswith(".safetensors"):
                continue
            path = os.path.join(self.folder, fn)
            entry = {"file": fn, "mtime": os.path.getmtime(path)}
            try:
                meta = read_header(path)
                entry["checkpoint"] = (meta.get("extra") or {}).get("checkpoint") or {}
                entry["summary"] = (meta.get("extra") or {}).get("summary") or {}
            except MixQuantError as e:
                entry["error"] = str(e)
                entry["checkpoint"] = {}
            out.append(entry)
        if checkpoint is not None:
            out = [e for e in out if _matches(e["checkpoint"], checkpoint)]
        return sorted(out, key=lambda e: -e["mtime"])

    def choose(self, choice: str, checkpoint: dict) -> str | None:
        """The file a generation uses: AUTO = the newest file made from this checkpoint (None when there is none)."""
        choice = normalize_choice(choice)
        if choice == OFF:
            return None
        if choice == AUTO:
            files = [e for e in self.files(checkpoint) if "error" not in e]
            if not files:  # an unreadable file named as the tab names this checkpoint's files
                stem = f"{_safe_label(checkpoint.get('name', '')) or 'model'}-{(checkpoint.get('sha256') or '')[:10]}-"
                bad = [e for e in self.files() if "error" in e and checkpoint.get("sha256")
                       and e["file"].startswith(stem)]
                if bad:
                    raise MixQuantError(bad[0]["error"])
                return None
            return os.path.join(self.folder, files[0]["file"])
        path = os.path.join(self.folder, os.path.basename(choice))
        if not os.path.isfile(path):
            raise MixQuantError(f"{choice}: no such file in {self.folder}. Pick one from the list (refresh it).")
        return path

    def _key(self, path: str, host) -> tuple:
        """A file's layers are reused only for the same file (size, time) on the same UNet object holding the same
        checkpoint (A1111 loads another checkpoint of the same architecture into the same module)."""
        st = os.stat(path)
        return (os.path.realpath(path), st.st_size, st.st_mtime_ns, id(host.denoiser),
                checkpoint_of(host.sd_model)["sha256"])

    def _remember(self, key, host, layers, info):
        self._layers = {key: (weakref.ref(host.denoiser), layers, info)}  # one file at a time in memory

    def layers(self, host, path: str) -> tuple[dict, dict]:
        """The quantized layers of `path` for the loaded UNet (every check of the file format runs first)."""
        key = self._key(path, host)
        hit = self._layers.get(key)
        if hit is None or hit[0]() is not host.denoiser:
            host.clean()
            layers, info = load_quantized_layers(host.patcher(), path)
            self._remember(key, host, layers, info)
        return self._layers[key][1:]

    # --- a generation ---
    def apply(self, host, p, choice: str) -> str | None:
        """Swap the chosen file's layers into this generation's UNet. Returns the infotext (None: nothing to do).
        Never raises: whatever goes wrong, the generation runs in full precision and the text says why."""
        try:
            ckpt = checkpoint_of(p.sd_model)
            path = self.choose(choice, ckpt)
            if path is None:
                return (f"no MixQuant file for this checkpoint ({ckpt['name']}); full precision used"
                        if normalize_choice(choice) == AUTO else None)
            refusal = host.refusal(p)
            if refusal:
                return refusal
            layers, info = self.layers(host, path)
            host.apply(p, layers, info)
            s = info.get("report") or {}
            fp, q = s.get("bytes_fp16") or 0, s.get("bytes_quantized") or 0
            ratio = f", {q / fp:.2f}x fp16" if fp and q else ""
            return f"{os.path.basename(path)} (avg W{s.get('avg_w_bits', 0):.2f}{ratio})"
        except MixQuantError as e:
            host.restore(p)
            return f"failed: {e} Full precision used."
        except Exception as e:  # a bug or the host's own error: still one line and a full-precision image
            host.restore(p)
            return f"failed: {type(e).__name__}: {e}. Full precision used."


def normalize_choice(choice) -> str:
    """The script's file choice as the UI or an API caller gives it: AUTO, OFF or a file name."""
    text = str(choice or "").strip()
    if not text or text == AUTO or text.lower() in ("auto", "automatic") or text.lower().startswith("automatic ("):
        return AUTO
    if text.lower() in ("off", "none", "fp", "full precision"):
        return OFF
    return text


def _matches(a: dict, b: dict) -> bool:
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return bool(a.get("name")) and a.get("name") == b.get("name")
