"""MixQuant as a Stable Diffusion WebUI extension (WebUI Forge; A1111 1.10): the WebUI loads this file from the
extension's scripts/ folder. It is glue only: the steps are the `mixquant` package's (webui/host.py, which calls
quant/ through nodes/'s ModelPatcher helpers).

- A "MixQuant" tab: calibration prompts and sampler settings -> 1. Calibrate (the WebUI's own txt2img on the loaded
  checkpoint) -> 2. Plan under a budget (predicted quality/size curve, bits per block and layer) -> 3. Quantize and
  save to models/mixquant, the file named and keyed by the checkpoint's hash.
- An always-visible "MixQuant" script in txt2img / img2img: puts the saved file of the current checkpoint (or one
  picked) into each generation's UNet (Forge: a cloned UnetPatcher with object patches before every sampling; A1111:
  a swap for the generation). Whatever fails, the generation runs in full precision and the infotext and console say
  why; the infotext names the file used.
- The same steps over HTTP under /mixquant/v1/ (with --api or --nowebui): calibrate, plan, quantize, files, status.
Every long job holds the WebUI's queue lock (it waits for a running txt2img and a txt2img waits for it), shows its
progress in the tab and in the WebUI's progress state, and stops at the WebUI's Interrupt.
"""
import importlib.util
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package():
    """This extension folder as the package `mixquant` (its modules import each other relatively)."""
    mod = sys.modules.get("mixquant")
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location("mixquant", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mixquant"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["mixquant"]
        raise
    return mod


_package()

import gradio as gr  # noqa: E402
from mixquant.quant.errors import InterruptedRun, MixQuantError  # noqa: E402
from mixquant.quant.runner import SamplerSettings  # noqa: E402
from mixquant.webui import host as mq  # noqa: E402
from modules import paths, processing, script_callbacks, scripts, shared  # noqa: E402

try:  # Forge
    from backend import memory_management as _mm
    _unload_all, _load_models = _mm.unload_all_models, _mm.load_models_gpu
except ImportError:  # A1111
    _unload_all = _load_models = None

FOLDER = os.path.join(paths.models_path, "mixquant")
SESSION = mq.Session(FOLDER)
DEFAULT_PROMPTS = "a photo of a cat on a sofa\na watercolor landscape with mountains\na portrait of an old man"


def _log(text: str) -> None:
    print(f"[MixQuant] {text}", flush=True)


def _host():
    """The loaded checkpoint's host. Forge loads the checkpoint picked in the UI lazily, at the first generation:
    load it now, as a generation would."""
    from modules import sd_models

    if hasattr(sd_models, "forge_model_reload"):
        try:
            sd_models.forge_model_reload()
        except Exception as e:  # e.g. "You do not have any model!"
            raise MixQuantError(f"the WebUI could not load a checkpoint ({e}): pick one at the top of the page.") from e
    return mq.host_for(shared.sd_model, _unload_all, _load_models)


# --- long jobs: the queue lock, progress, interruption ---------------------------------------------------------------

def _job(name: str, fn, *args, **kwargs):
    """Run a tab / API step under the WebUI's queue lock with its progress state. Returns (result, error text)."""
    from modules.call_queue import queue_lock

    with queue_lock:
        shared.state.begin(job=f"mixquant-{name}")
        SESSION.status = f"{name}: starting"
        try:
            return fn(*args, **kwargs), None
        except InterruptedRun as e:
            SESSION.status = f"{name}: interrupted"
            return None, str(e)
        except MixQuantError as e:
            SESSION.status = f"{name}: failed"
            return None, str(e)
        except Exception as e:  # a bug: the log gets the traceback, the user one line
            traceback.print_exc()
            SESSION.status = f"{name}: failed"
            return None, f"{type(e).__name__}: {e} (details in the WebUI console)"
        finally:
            shared.state.end()


def _progress():
    def also(done, total, phase):
        shared.state.textinfo = f"MixQuant: {phase}"
        shared.state.job_count = max(1, int(total or 1))
        shared.state.job_no = int(done or 0)
    return SESSION.progress(should_stop=lambda: bool(shared.state.interrupted), also=also)


def _generate(settings: SamplerSettings):
    """The WebUI's own txt2img with the user's sampler settings, one image per (prompt, seed), nothing saved."""
    def generate(prompts, seeds):
        images = []
        for prompt, seed in zip(prompts, seeds):
            if shared.state.interrupted:
                raise InterruptedRun("calibration was interrupted; nothing changed. Start it again when ready.")
            kw = dict(sd_model=shared.sd_model, prompt=prompt, negative_prompt=settings.negative_prompt, seed=seed,
                      steps=settings.steps, cfg_scale=settings.guidance, sampler_name=settings.sampler_name,
                      width=settings.width, height=settings.height, batch_size=1, n_iter=1,
                      do_not_save_samples=True, do_not_save_grid=True)
            p = processing.StableDiffusionProcessingTxt2Img(**kw)
            if settings.scheduler and hasattr(p, "scheduler"):
                p.scheduler = settings.scheduler
            try:
                res = processing.process_images(p)
            finally:
                p.close()
            if shared.state.interrupted:
                raise InterruptedRun("calibration was interrupted; nothing changed. Start it again when ready.")
            if not res.images:
                raise MixQuantError("the WebUI returned no image for a calibration prompt (see its console).")
            images.append(res.images[0])
        return images
    return generate


def calibrate(prompts, negative="", steps=20, cfg_scale=7.0, sampler_name="Euler", scheduler="Automatic", width=512,
              height=512, seed=0):
    settings = SamplerSettings(steps=int(steps), guidance=float(cfg_scale), scheduler=scheduler or "",
                               sampler_name=sampler_name, width=int(width), height=int(height),
                               negative_prompt=negative or "")
    host = _host()
    return SESSION.calibrate(host, _generate(settings), prompts, settings, int(seed), 1, _progress())


def plan(budget_kind="bits", budget=4.0, activation_bits=8, sensitivity="fast"):
    return SESSION.plan(_host(), budget_kind, float(budget), int(activation_bits), sensitivity, _progress())


def quantize(label=""):
    return SESSION.quantize_and_save(_host(), label)


def files(current_only=True):
    ckpt = mq.checkpoint_of(shared.sd_model) if current_only else None
    return SESSION.files(ckpt)


# --- the always-visible script ------------------------------------------------------------------------------------

def _file_choices():
    return [mq.AUTO, mq.OFF] + [e["file"] for e in SESSION.files() if "error" not in e]


class MixQuantScript(scripts.Script):
    sorting_priority = 30

    def title(self):
        return mq.OPTION

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion("MixQuant", open=False):
            enabled = gr.Checkbox(label="Use the quantized UNet (MixQuant)",
                                  value=bool(getattr(shared.opts, "mixquant_default_on", False)))
            with gr.Row():
                choice = gr.Dropdown(label="MixQuant file", choices=_file_choices(), value=mq.AUTO)
                refresh = gr.Button("Refresh", size="sm") if _gradio4() else gr.Button("Refresh")
            refresh.click(fn=lambda: gr.update(choices=_file_choices()), inputs=[], outputs=[choice])
        return [enabled, choice]

    def _apply(self, p, enabled, choice):
        if not enabled:
            return
        try:
            host = mq.host_for(p.sd_model, _unload_all, _load_models)
        except MixQuantError as e:
            text = f"failed: {e} Full precision used."
        else:
            text = SESSION.apply(host, p, choice or mq.AUTO)
        if text:
            p.extra_generation_params[mq.OPTION] = text
            _log(text)  # (the file used, or why full precision was used)

    def process(self, p, enabled=False, choice=mq.AUTO, *args, **kwargs):
        if _unload_all is None:  # A1111: swap the layers in for this generation
            try:  # a generation that failed before its postprocess left them in: out first, whatever is chosen now
                mq.host_for(p.sd_model).restore(p)
            except MixQuantError:
                pass
            self._apply(p, enabled, choice)

    def process_before_every_sampling(self, p, enabled=False, choice=mq.AUTO, *args, **kwargs):
        if _unload_all is not None:  # Forge: every sampling starts from fresh forge_objects
            self._apply(p, enabled, choice)

    def postprocess(self, p, processed, *args):
        if _unload_all is None:
            try:
                mq.host_for(p.sd_model).restore(p)
            except MixQuantError:
                pass


def _gradio4() -> bool:
    return int(gr.__version__.split(".")[0]) >= 4


# --- the tab ---------------------------------------------------------------------------------------------------------

def _samplers():
    try:
        from modules import sd_samplers
        return [s.name for s in sd_samplers.visible_samplers()] or ["Euler"]
    except Exception:
        return ["Euler"]


def _schedulers():
    try:
        from modules import sd_schedulers
        return [s.label for s in sd_schedulers.schedulers]
    except Exception:
        return []


def _round(v, digits):
    return round(v, digits) if isinstance(v, (int, float)) else v


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("### MixQuant: mixed-precision quantization of the loaded checkpoint's UNet\n"
                    "1. Calibrate on prompts like yours with your sampler -> 2. Plan bits per layer under a budget -> "
                    "3. Quantize and save. Then turn on **MixQuant** under txt2img / img2img: the newest file made "
                    "from the loaded checkpoint is used automatically.")
        with gr.Row():
            with gr.Column(scale=3):
                prompts = gr.Textbox(label="Calibration prompts (one per line)", lines=6, value=DEFAULT_PROMPTS)
                negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Column(scale=2):
                sampler = gr.Dropdown(label="Sampler", choices=_samplers(), value=_samplers()[0])
                sched = _schedulers()
                scheduler = gr.Dropdown(label="Schedule type", choices=sched, value=sched[0] if sched else None,
                                        visible=bool(sched))
                steps = gr.Slider(label="Steps", minimum=1, maximum=150, step=1, value=20)
                cfg = gr.Slider(label="CFG scale", minimum=0.0, maximum=30.0, step=0.5, value=7.0)
                with gr.Row():
                    width = gr.Slider(label="Width", minimum=64, maximum=2048, step=8, value=512)
                    height = gr.Slider(label="Height", minimum=64, maximum=2048, step=8, value=512)
                seed = gr.Number(label="Seed (first prompt)", value=0, precision=0)
        with gr.Row():
            calib_btn = gr.Button("1. Calibrate", variant="primary")
            stop_btn = gr.Button("Interrupt")
        with gr.Row():
            budget_kind = gr.Radio(label="Budget", choices=["bits", "mb"], value="bits")
            budget = gr.Number(label="Average weight bits, or the UNet's megabytes", value=4.0)
            a_bits = gr.Dropdown(label="Activation bits", choices=["8", "16", "4"], value="8")
            sens = gr.Dropdown(label="Sensitivity", choices=["fast", "full", "local"], value="fast")
        plan_btn = gr.Button("2. Plan")
        with gr.Row():
            label = gr.Textbox(label="File label (optional)")
            save_btn = gr.Button("3. Quantize and save", variant="primary")
        gr.Textbox(label="Progress", value=lambda: SESSION.status, every=1, interactive=False)
        result = gr.Markdown()
        curve = gr.Dataframe(label="Predicted quality / size curve", interactive=False,
                             headers=["avg weight bits", "MB", "predicted SSIM", "predicted SQNR dB"])
        blocks = gr.Dataframe(label="Bits per block", interactive=False,
                              headers=["block", "avg weight bits", "layers", "MB"])
        layers = gr.Dataframe(label="Bits per layer", interactive=False,
                              headers=["layer", "role", "weight bits", "activation bits", "format", "MB"])
        files_table = gr.Dataframe(label="MixQuant files (models/mixquant)", interactive=False,
                                   headers=["file", "checkpoint", "avg weight bits", "MB"])

        def _files_rows():
            return [[e["file"], (e.get("checkpoint") or {}).get("name", "") or e.get("error", ""),
                     (e.get("summary") or {}).get("avg_w_bits"),
                     round(((e.get("summary") or {}).get("bytes_quantized") or 0) / 1e6, 2)]
                    for e in SESSION.files()]

        def do_calibrate(*a):
            res, err = _job("calibrate", calibrate, *a)
            if err:
                return f"**Calibration failed:** {err}"
            return (f"Calibrated **{res['checkpoint']['name']}** on {res['prompts']} prompts "
                    f"({res['denoiser_calls']} UNet calls, {res['seconds']} s). Now plan under a budget.")

        def do_plan(kind, value, abits, mode):
            res, err = _job("plan", plan, kind, value, abits, mode)
            if err:
                return f"**Planning failed:** {err}", None, None, None
            c = [[_round(r.get("avg_w_bits"), 2), round((r.get("bytes") or 0) / 1e6, 2),
                  _round(r.get("predicted_ssim"), 4), _round(r.get("predicted_sqnr_db"), 1)]
                 for r in res.get("curve", [])]
            b = [[r["block"], round(r["avg_w_bits"], 2), r["layers"], round(r["bytes"] / 1e6, 3)]
                 for r in res["blocks"]]
            ly = [[r["name"], r["role"], r["w_bits"], r["a_bits"], r["format"], round((r["bytes"] or 0) / 1e6, 3)]
                  for r in res["layers"]]
            return "```\n" + res["text"] + "\n```\nNow quantize and save.", c, b, ly

        def do_save(lbl):
            res, err = _job("quantize", quantize, lbl)
            if err:
                return f"**Quantizing failed:** {err}", _files_rows()
            return (f"Saved **{res['file']}** ({res['file_bytes'] / 1e6:.2f} MB, {res['layers']} quantized layers). "
                    "Turn on MixQuant under txt2img to use it.", _files_rows())

        calib_btn.click(do_calibrate, inputs=[prompts, negative, steps, cfg, sampler, scheduler, width, height, seed],
                        outputs=[result])
        plan_btn.click(do_plan, inputs=[budget_kind, budget, a_bits, sens], outputs=[result, curve, blocks, layers])
        save_btn.click(do_save, inputs=[label], outputs=[result, files_table])
        stop_btn.click(lambda: shared.state.interrupt(), inputs=[], outputs=[])
        tab.load(_files_rows, inputs=[], outputs=[files_table])
    return [(tab, "MixQuant", "mixquant")]


def on_ui_settings():
    section = ("mixquant", "MixQuant")
    shared.opts.add_option("mixquant_default_on", shared.OptionInfo(
        False, "Use the quantized UNet (MixQuant) by default in txt2img / img2img", section=section))


# --- the HTTP API --------------------------------------------------------------------------------------------------

def _api_auth():
    """The WebUI's --api-auth (user:password,...) for our routes too, as its own API checks it."""
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    spec = getattr(getattr(shared, "cmd_opts", None), "api_auth", None)
    if not spec:
        return []
    users = dict(item.split(":", 1) for item in spec.split(",") if ":" in item)

    def check(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):  # noqa: B008
        want = users.get(credentials.username)
        if want is None or not compare_digest(credentials.password, want):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True
    return [Depends(check)]


def on_app_started(demo, app):
    from fastapi import APIRouter, Body
    from fastapi.responses import JSONResponse
    from mixquant.quant.util import json_safe

    api = APIRouter(dependencies=_api_auth())

    def answer(name, fn, *args, **kwargs):
        res, err = _job(name, fn, *args, **kwargs)
        if err:
            return JSONResponse(status_code=400, content={"error": err})
        return json_safe(res)

    @api.post("/mixquant/v1/calibrate")
    def api_calibrate(body: dict = Body(default={})):
        keys = ("negative", "steps", "cfg_scale", "sampler_name", "scheduler", "width", "height", "seed")
        return answer("calibrate", calibrate, body.get("prompts") or [], **{k: body[k] for k in keys if k in body})

    @api.post("/mixquant/v1/plan")
    def api_plan(body: dict = Body(default={})):
        keys = ("budget_kind", "budget", "activation_bits", "sensitivity")
        return answer("plan", plan, **{k: body[k] for k in keys if k in body})

    @api.post("/mixquant/v1/quantize")
    def api_quantize(body: dict = Body(default={})):
        return answer("quantize", quantize, body.get("label", ""))

    @api.get("/mixquant/v1/files")
    def api_files(all: bool = False):
        try:
            return json_safe(files(current_only=not all))
        except MixQuantError as e:
            return JSONResponse(status_code=400, content={"error": str(e)})

    @api.get("/mixquant/v1/status")
    def api_status():
        return {"status": SESSION.status}

    app.include_router(api)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
