"""The WebUI extension without a WebUI: webui/host.py on stand-ins with the semantics of WebUI Forge's patcher, LoRA
loader and memory manager (object patches applied while a patcher is loaded, one clone of a model loaded at a time,
LoRA merged in place with per-key backups restored at the next refresh with other LoRAs, GGUF-style dequantize /
requantize for a weight with a `gguf_cls`) and of A1111's plain UNet; the glue (scripts/mixquant_webui.py) on stand-in
`modules` (A1111's documented script API: scripts.Script, script_callbacks, shared, processing, call_queue) with its
HTTP routes on a real FastAPI app and its tab built by the installed gradio; install.py. The real Forge is in
test_webui_forge_integration.py."""
import copy
import importlib.util
import os
import sys
import threading
import types

import pytest
import torch
import torch.nn as nn
from mixquant.kernels import dispatch
from mixquant.nodes import patching
from mixquant.quant.layers import QuantLayer
from mixquant.webui import host as mq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA = "ab" * 32


# --- stand-ins -------------------------------------------------------------------------------------------------------

class LdmStyle(nn.Module):
    """A small diffusers UNet behind the LDM call the WebUIs make: (x, timesteps, context=...)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps=None, context=None, **kw):
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


def _get(obj, key):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _parent(obj, key):
    parent, _, attr = key.rpartition(".")
    return (_get(obj, parent) if parent else obj), attr


class LoraLoader:
    """Forge's LoraLoader (backend/patcher/lora.py) as it treats a key: restore backups when the LoRA set changed,
    back up the weight at the key (`weight.to(offload)`), dequantize a `gguf_cls` weight, merge, requantize it."""

    def __init__(self, model):
        self.model, self.backup, self.online_backup, self.loaded_hash = model, {}, [], str([])

    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        for k, w in self.backup.items():
            parent, attr = _parent(self.model, k)
            setattr(parent, attr, w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False))
        self.backup = {}
        for patches in lora_patches.values():
            for key, (up, down, strength) in patches.items():
                parent, attr = _parent(self.model, key)
                weight = getattr(parent, attr)
                assert isinstance(weight, nn.Parameter)
                if key not in self.backup:
                    self.backup[key] = weight.to(device=offload_device)
                codec, param = getattr(weight, "gguf_cls", None), weight
                if codec is not None:
                    weight = codec.dequantize_pytorch(weight)
                merged = weight.float() + strength * (up @ down).reshape(weight.shape)
                if codec is not None:
                    codec.quantize_pytorch(merged, param)
                    continue
                setattr(parent, attr, nn.Parameter(merged.to(weight.dtype), requires_grad=False))
        self.loaded_hash = hashes


class UnetPatcher:
    """Forge's UnetPatcher (backend/patcher/base.py, unet.py): clones share the model (and its LoRA loader), not the
    object-patch backups; forge_patch_model / forge_unpatch_model apply and restore the object patches."""

    def __init__(self, model):
        self.model, self.lora_loader = model, model.lora_loader
        self.lora_patches, self.object_patches, self.object_patches_backup = {}, {}, {}
        self.model_options = {"transformer_options": {}}
        self.size = 0
        self.load_device = self.offload_device = torch.device("cpu")

    def clone(self):
        n = UnetPatcher(self.model)
        n.lora_patches, n.object_patches = self.lora_patches.copy(), self.object_patches.copy()
        n.model_options, n.size = copy.deepcopy(self.model_options), self.size
        return n

    def add_lora(self, name, patches, strength=1.0):
        self.lora_patches[(name, strength, 1.0, False)] = {k: (u, d, strength) for k, (u, d) in patches.items()}

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return _get(self.model, name)

    def model_size(self):
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def forge_patch_model(self, target_device=None):
        for k, item in self.object_patches.items():
            parent, attr = _parent(self.model, k)
            self.object_patches_backup.setdefault(k, getattr(parent, attr))
            setattr(parent, attr, item)
        return self.model

    def forge_unpatch_model(self, target_device=None):
        for k, old in self.object_patches_backup.items():
            parent, attr = _parent(self.model, k)
            setattr(parent, attr, old)
        self.object_patches_backup = {}

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches, self.offload_device)


class Memory:
    """Forge's memory_management: loading a patcher first unloads a loaded clone of the same model; the patcher
    counts as loaded only once its LoRA refresh went through (LoadedModel.model_load)."""

    def __init__(self):
        self.loaded = None

    def load(self, patcher):
        if self.loaded is patcher:
            return
        self.unload_all()
        patcher.forge_patch_model()
        patcher.refresh_loras()
        self.loaded = patcher

    def unload_all(self):
        if self.loaded is not None:
            self.loaded.forge_unpatch_model()
            self.loaded = None


class KModel(nn.Module):
    def __init__(self, dm):
        super().__init__()
        self.diffusion_model = dm
        self.lora_loader = LoraLoader(self)


def _checkpoint(sha=SHA, name="tiny"):
    return types.SimpleNamespace(sha256=sha, name_for_extra=name, filename=f"/models/{name}.safetensors")


class Forge:
    """A loaded checkpoint in Forge: sd_model.forge_objects(.unet), processing's per-batch reset, sampling."""

    def __init__(self, dm, sha=SHA):
        self.mem = Memory()
        self.original = UnetPatcher(KModel(dm))
        self.sd_model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=self.original),
                                              forge_objects_original=types.SimpleNamespace(unet=self.original),
                                              sd_checkpoint_info=_checkpoint(sha))
        self.host = mq.ForgeHost(self.sd_model, self.mem.unload_all, lambda ps: self.mem.load(ps[0]))

    def run(self, x, t, ctx):
        unet = self.sd_model.forge_objects.unet
        self.mem.load(unet)
        with torch.no_grad(), dispatch.use_backend("reference"):
            return unet.model.diffusion_model(x, t, context=ctx)

    def generation(self, session=None, choice=None, lora=None, inputs=None):
        """One txt2img batch: fresh forge_objects, the LoRA extension's clone, our script, sampling."""
        self.sd_model.forge_objects = types.SimpleNamespace(unet=self.original)
        p = types.SimpleNamespace(sd_model=self.sd_model, extra_generation_params={}, prompt="a cat")
        if lora is not None:
            unet = self.original.clone()
            unet.add_lora("lora.safetensors", lora)
            self.sd_model.forge_objects.unet = unet
        text = session.apply(self.host, p, choice) if session is not None else None
        return self.run(*inputs), text, p

    def generate_images(self, inputs):
        """The `generate` the glue passes to the runner: one 'image' per prompt from the FP UNet."""
        x, t, ctx = inputs

        def generate(prompts, seeds):
            out = []
            for prompt, seed in zip(prompts, seeds):
                g = torch.Generator().manual_seed(int(seed) * 31 + len(prompt))
                c = torch.randn(1, ctx.shape[1], ctx.shape[2], generator=g)
                z = torch.randn(1, 4, 8, 8, generator=g)
                self.sd_model.forge_objects = types.SimpleNamespace(unet=self.original)
                for tt in (900, 500, 100):
                    self.mem.load(self.original)
                    z = z - 0.3 * self.original.model.diffusion_model(z, torch.tensor([tt]), context=c)
                out.append(torch.sigmoid(z[0, :3]).permute(1, 2, 0).numpy() * 255)
            return out
        return generate


def _fast_config(**kw):
    from mixquant.quant.engine import QuantizeConfig

    return QuantizeConfig(**{**kw, "coupling": (0.5,), "sens_calls": 2, "speed": "off"})  # (plans not timing-bound)


@pytest.fixture()
def dm(small_unet):
    return LdmStyle(copy.deepcopy(small_unet)).eval()


@pytest.fixture()
def inputs(unet_inputs):
    return unet_inputs


def _settings():
    from mixquant.quant.runner import SamplerSettings
    return SamplerSettings(steps=3, guidance=5.0, sampler_name="Euler", width=64, height=64)


def _quantized(tmp_path, forge, inputs, monkeypatch, bits=6.0, label=""):
    monkeypatch.setattr(mq, "QuantizeConfig", _fast_config)
    s = mq.Session(str(tmp_path / "mixquant"))
    cal = s.calibrate(forge.host, forge.generate_images(inputs), "a cat\na dog", _settings(), seed=0, groups=1)
    assert cal["prompts"] == 2 and cal["denoiser_calls"] == 6 and cal["checkpoint"]["sha256"] == SHA
    planned = s.plan(forge.host, "bits", bits, 8, "local")
    assert planned["layers"] and "avg weight bits" in planned["text"]
    saved = s.quantize_and_save(forge.host, label)
    return s, saved


def _sqnr(ref, x):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


# --- Forge -----------------------------------------------------------------------------------------------------------

def test_forge_tab_steps_file_keyed_by_checkpoint_and_generation(tmp_path, dm, inputs, monkeypatch):
    forge = Forge(dm)
    fp0 = forge.run(*inputs).clone()
    s, saved = _quantized(tmp_path, forge, inputs, monkeypatch)
    assert saved["file"].startswith(f"tiny-{SHA[:10]}-w6p0a8") and os.path.getsize(saved["path"]) == saved["file_bytes"]
    assert [e["file"] for e in s.files(mq.checkpoint_of(forge.sd_model))] == [saved["file"]]
    assert s.files({"name": "other", "sha256": "cd" * 32}) == []
    # a second file for the same checkpoint: the newest is the automatic choice
    os.utime(saved["path"], (1, 1))
    second = s.quantize_and_save(forge.host, "second")
    assert os.path.basename(s.choose(mq.AUTO, mq.checkpoint_of(forge.sd_model))) == second["file"]

    q, text, p = forge.generation(s, "Automatic", inputs=inputs)
    assert text.startswith(second["file"]) and "avg W" in text
    layers = patching.quantized_layers(p.sd_model.forge_objects.unet)
    assert layers and all(isinstance(m, QuantLayer) and m.mode == "packed" for m in layers.values())
    assert not torch.equal(q, fp0) and _sqnr(fp0, q) > 15  # the quantized UNet ran, and is close to FP
    # the next FP generation gets the checkpoint's UNet back, bit for bit
    assert torch.equal(forge.generation(inputs=inputs)[0], fp0)
    assert torch.equal(forge.generation(s, "Automatic", inputs=inputs)[0], q)
    # another checkpoint: no file fits -> full precision, and the infotext says so
    forge.sd_model.sd_checkpoint_info = _checkpoint("cd" * 32, "other")
    out, text, _ = forge.generation(s, "Automatic", inputs=inputs)
    assert torch.equal(out, fp0) and text.startswith("no MixQuant file for this checkpoint (other)")
    assert forge.generation(s, "Off", inputs=inputs)[1] is None


def _lora(dm, names, rank=2, scale=0.25, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        w = dm.get_submodule(n).weight
        n_out, n_in = w.shape[0], w[0].numel()
        out[f"diffusion_model.{n}.weight"] = (torch.randn(n_out, rank, generator=g) * scale,
                                               torch.randn(rank, n_in, generator=g) * scale)
    return out


def test_forge_lora_acts_on_the_quantized_unet_and_never_corrupts_it(tmp_path, dm, inputs, monkeypatch):
    forge = Forge(dm)
    fp0 = forge.run(*inputs).clone()
    s, saved = _quantized(tmp_path, forge, inputs, monkeypatch)
    q0 = forge.generation(s, saved["file"], inputs=inputs)[0].clone()
    names = [n for n in patching.quantized_layers(forge.sd_model.forge_objects.unet)
             if n.endswith(("to_q", "to_v", "ff.net.2", "proj_in"))][:4]
    assert len(names) >= 2
    assert torch.equal(forge.generation(inputs=inputs)[0], fp0)  # (the FP tree back in place: FP shapes below)
    lora = _lora(forge.original.model.diffusion_model, names)
    fpl = forge.generation(lora=lora, inputs=inputs)[0].clone()
    ql = forge.generation(s, saved["file"], lora=lora, inputs=inputs)[0].clone()
    # the LoRA acts on the quantized UNet as on the FP one: the same change of the output
    d_fp, d_q = (fpl - fp0).flatten(), (ql - q0).flatten()
    print("LoRA change", float(d_fp.norm() / fp0.norm()), "cosine", float(torch.nn.functional.cosine_similarity(
        d_fp, d_q, dim=0)), "error", float((d_q - d_fp).norm() / d_fp.norm()))
    assert d_fp.norm() > 0.05 * fp0.norm()
    assert torch.nn.functional.cosine_similarity(d_fp, d_q, dim=0) > 0.9
    assert (d_q - d_fp).norm() < 0.35 * d_fp.norm()
    # any order of generations gives every one of them back exactly: no merge is left in the wrong module
    for lora_on, quant in [(False, True), (True, False), (False, False), (True, True), (True, True), (False, True),
                           (True, False), (False, False)]:
        out = forge.generation(s if quant else None, saved["file"] if quant else None,
                               lora=lora if lora_on else None, inputs=inputs)[0]
        want = {(False, False): fp0, (True, False): fpl, (False, True): q0, (True, True): ql}[(lora_on, quant)]
        assert torch.equal(out, want), (lora_on, quant)


def test_forge_damaged_file_gives_one_message_and_full_precision(tmp_path, dm, inputs, monkeypatch):
    forge = Forge(dm)
    fp0 = forge.run(*inputs).clone()
    s, saved = _quantized(tmp_path, forge, inputs, monkeypatch)
    data = bytearray(open(saved["path"], "rb").read())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    bad = os.path.join(s.folder, "damaged.safetensors")
    open(bad, "wb").write(bytes(data))
    out, text, p = forge.generation(s, "damaged.safetensors", inputs=inputs)
    assert text.startswith("failed: ") and text.endswith("Full precision used.") and "\n" not in text
    assert p.sd_model.forge_objects.unet is forge.original and torch.equal(out, fp0)
    out, text, _ = forge.generation(s, "missing.safetensors", inputs=inputs)
    assert "no such file" in text and torch.equal(out, fp0)
    # a file of another model (the checkpoint's hash says ours, the weights say otherwise)
    other = Forge(LdmStyle(copy.deepcopy(dm.unet)).eval())
    with torch.no_grad():
        for prm in other.original.model.diffusion_model.parameters():
            prm.add_(0.5)
    out, text, _ = other.generation(s, saved["file"], inputs=inputs)
    assert text.startswith("failed: ") and patching.quantized_layers(other.sd_model.forge_objects.unet) == {}


def test_tab_steps_refuse_out_of_order_and_bad_input(tmp_path, dm, inputs):
    forge = Forge(dm)
    s = mq.Session(str(tmp_path / "mq"))
    with pytest.raises(mq.MixQuantError, match="calibrate first"):
        s.plan(forge.host)
    with pytest.raises(mq.MixQuantError, match="plan first"):
        s.quantize_and_save(forge.host)
    with pytest.raises(mq.MixQuantError, match="prompt list is empty"):
        s.calibrate(forge.host, forge.generate_images(inputs), "\n  \n# only a comment", _settings())
    forge.sd_model.sd_checkpoint_info = None
    with pytest.raises(mq.MixQuantError, match="no checkpoint is loaded"):
        s.calibrate(forge.host, forge.generate_images(inputs), "a cat", _settings())
    with pytest.raises(mq.MixQuantError, match="no model is loaded"):
        mq.host_for(types.SimpleNamespace())
    assert s.files() == []


# --- A1111 -----------------------------------------------------------------------------------------------------------

def test_a1111_swap_restore_and_lora_refusal(tmp_path, dm, inputs, monkeypatch):
    sd = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm), sd_checkpoint_info=_checkpoint())
    host = mq.host_for(sd)
    assert isinstance(host, mq.A1111Host)
    generate = Forge(dm).generate_images(inputs)  # (its image generator runs the same UNet module)
    with torch.no_grad():
        fp0 = dm(*inputs[:2], context=inputs[2]).clone()
    monkeypatch.setattr(mq, "QuantizeConfig", _fast_config)
    s = mq.Session(str(tmp_path / "mq"))
    s.calibrate(host, generate, "a cat", _settings())
    s.plan(host, "bits", 6.0, 8, "local")
    saved = s.quantize_and_save(host)
    p = types.SimpleNamespace(sd_model=sd, extra_generation_params={}, prompt="a cat", all_prompts=["a cat"])
    text = s.apply(mq.host_for(sd), p, "Automatic")
    assert text.startswith(saved["file"]), text
    assert any(isinstance(m, QuantLayer) for m in dm.modules())
    with torch.no_grad(), dispatch.use_backend("reference"):
        q = dm(*inputs[:2], context=inputs[2])
    assert _sqnr(fp0, q) > 15 and not torch.equal(q, fp0)
    mq.host_for(sd).restore(p)  # the script's postprocess (a new host object: the swap is kept on the model)
    assert not any(isinstance(m, QuantLayer) for m in dm.modules())
    with torch.no_grad():
        assert torch.equal(dm(*inputs[:2], context=inputs[2]), fp0)
    p.prompt, p.all_prompts = "a cat <lora:style:0.8>", ["a cat <lora:style:0.8>"]
    text = s.apply(mq.host_for(sd), p, "Automatic")
    assert text.startswith("A1111's LoRA") and not any(isinstance(m, QuantLayer) for m in dm.modules())


# --- the glue on stand-in WebUI modules ---------------------------------------------------------------------------

class _State:
    def __init__(self):
        self.interrupted, self.job_count, self.job_no, self.textinfo, self.jobs = False, 0, 0, "", []

    def begin(self, job=""):
        self.jobs.append(job)

    def end(self):
        pass


def _webui_modules(tmp_path, forge, inputs):
    """A1111's documented extension API as stand-in modules (modules.scripts, script_callbacks, shared, processing,
    paths, call_queue), with txt2img producing images from the stand-in Forge's FP UNet."""
    mods = {n: types.ModuleType(n) for n in ("modules", "modules.scripts", "modules.script_callbacks",
                                              "modules.shared", "modules.processing", "modules.paths",
                                              "modules.call_queue", "modules.sd_models")}
    pkg = mods["modules"]
    for n, m in mods.items():
        if n != "modules":
            setattr(pkg, n.split(".")[1], m)
    mods["modules.paths"].models_path = str(tmp_path / "models")

    class Script:
        pass
    mods["modules.scripts"].Script, mods["modules.scripts"].AlwaysVisible = Script, object()
    cb = mods["modules.script_callbacks"]
    cb.registered = {}
    for name in ("on_ui_tabs", "on_ui_settings", "on_app_started"):
        setattr(cb, name, (lambda n: lambda fn: cb.registered.setdefault(n, fn))(name))
    shared = mods["modules.shared"]
    # Forge loads the checkpoint picked in the UI at the first generation (sd_models.forge_model_reload)
    shared.sd_model, shared.state = None, _State()

    def forge_model_reload():
        shared.sd_model = forge.sd_model
    mods["modules.sd_models"].forge_model_reload = forge_model_reload
    shared.opts = types.SimpleNamespace(add_option=lambda *a: None)
    shared.OptionInfo = lambda *a, **k: (a, k)
    mods["modules.call_queue"].queue_lock = threading.Lock()
    gen = forge.generate_images(inputs)

    class Txt2Img:
        def __init__(self, **kw):
            self.kw = kw

        def close(self):
            pass
    mods["modules.processing"].StableDiffusionProcessingTxt2Img = Txt2Img
    mods["modules.processing"].process_images = lambda p: types.SimpleNamespace(
        images=[_to_pil(gen([p.kw["prompt"]], [p.kw["seed"]])[0])])
    return mods


def _to_pil(arr):
    import numpy as np
    from PIL import Image
    return Image.fromarray(np.clip(arr, 0, 255).astype("uint8"))


@pytest.fixture()
def glue(tmp_path, dm, inputs, monkeypatch):
    forge = Forge(dm)
    for name, mod in _webui_modules(tmp_path, forge, inputs).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "backend", None)  # A1111: no Forge backend
    monkeypatch.setattr(mq, "QuantizeConfig", _fast_config)
    spec = importlib.util.spec_from_file_location("mixquant_webui", os.path.join(ROOT, "scripts", "mixquant_webui.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, forge


def test_glue_registers_the_tab_settings_and_routes_and_the_api_runs_the_steps(glue):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    mod, forge = glue
    cb = sys.modules["modules.script_callbacks"].registered
    assert set(cb) == {"on_ui_tabs", "on_ui_settings", "on_app_started"}
    script = mod.MixQuantScript()
    assert script.title() == "MixQuant" and script.show(False) is sys.modules["modules.scripts"].AlwaysVisible
    app = FastAPI()
    cb["on_app_started"](None, app)
    client = TestClient(app)
    r = client.post("/mixquant/v1/plan", json={"budget": 6})
    assert r.status_code == 400 and "calibrate first" in r.json()["error"]
    r = client.post("/mixquant/v1/calibrate", json={"prompts": ["a cat", "a dog"], "steps": 3, "width": 64,
                                                     "height": 64, "sampler_name": "Euler"})
    assert r.status_code == 200, r.text
    assert r.json()["prompts"] == 2 and r.json()["denoiser_calls"] == 6
    r = client.post("/mixquant/v1/plan", json={"budget_kind": "bits", "budget": 6, "sensitivity": "local"})
    assert r.status_code == 200, r.text
    assert r.json()["summary"]["avg_w_bits"] <= 6.0 + 1e-6
    r = client.post("/mixquant/v1/quantize", json={"label": "api"})
    assert r.status_code == 200, r.text
    name = r.json()["file"]
    assert os.path.isfile(os.path.join(mod.FOLDER, name)) and name.endswith("-api.safetensors")
    assert [e["file"] for e in client.get("/mixquant/v1/files").json()] == [name]
    assert client.get("/mixquant/v1/status").json()["status"].startswith("saved")
    jobs = sys.modules["modules.shared"].state.jobs
    assert jobs == ["mixquant-plan", "mixquant-calibrate", "mixquant-plan", "mixquant-quantize"]
    r = client.post("/mixquant/v1/calibrate", json={"prompts": []})
    assert r.status_code == 400 and "prompt list is empty" in r.json()["error"]


def test_glue_tab_builds_and_the_script_applies_with_infotext(glue):
    import gradio as gr

    mod, forge = glue
    tabs = sys.modules["modules.script_callbacks"].registered["on_ui_tabs"]()
    (block, title, elem_id), = tabs
    assert isinstance(block, gr.Blocks) and title == "MixQuant" and elem_id == "mixquant"
    with gr.Blocks():
        comps = mod.MixQuantScript().ui(False)
    assert len(comps) == 2
    # an A1111-style generation with no file yet: full precision, said in the infotext
    sd = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=forge.original.model.diffusion_model),
                               sd_checkpoint_info=_checkpoint())
    p = types.SimpleNamespace(sd_model=sd, extra_generation_params={}, prompt="a cat")
    mod.MixQuantScript().process(p, True, "Automatic")
    assert p.extra_generation_params["MixQuant"].startswith("no MixQuant file")
    p = types.SimpleNamespace(sd_model=sd, extra_generation_params={}, prompt="a cat")
    mod.MixQuantScript().process(p, False, "Automatic")
    assert p.extra_generation_params == {}


# --- install.py ------------------------------------------------------------------------------------------------------

def _install_module():
    spec = importlib.util.spec_from_file_location("mq_install", os.path.join(ROOT, "install.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_install_is_idempotent_and_leaves_torch_alone(monkeypatch, tmp_path):
    inst = _install_module()
    calls = []
    monkeypatch.setattr(inst.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert inst.main() == 0 and calls == []  # everything installed here: no pip at all
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy>=999\ntorch>=99\nsurely-not-installed-pkg-xyz>=1.0  # why\nscipy>=0.1\n")
    monkeypatch.setattr(inst, "HERE", str(tmp_path))
    assert inst.main() == 0
    # only what is not installed at all; numpy stays at the host's version (said), torch is never asked for
    assert len(calls) == 1 and calls[0][-1] == "surely-not-installed-pkg-xyz>=1.0"
    assert not any("torch" in c or "numpy" in c for c in calls[0])
    assert inst.older(["numpy>=999"])[0].startswith("numpy ") and inst.missing(["numpy>=999"]) == []


# --- what a review of the first version found --------------------------------------------------------------------

def test_tab_steps_right_after_a_quantized_generation(tmp_path, dm, inputs, monkeypatch):
    """After a MixQuant generation `forge_objects.unet` is still the quantized clone: the tab's next calibrate ->
    plan -> quantize works on the checkpoint's own UNet (same fingerprint, a file that loads)."""
    forge = Forge(dm)
    fp0 = forge.run(*inputs).clone()
    s, saved = _quantized(tmp_path, forge, inputs, monkeypatch)
    q, text, _ = forge.generation(s, saved["file"], inputs=inputs)
    assert text.startswith(saved["file"]) and patching.quantized_layers(forge.sd_model.forge_objects.unet)
    s.calibrate(forge.host, forge.generate_images(inputs), "a cat", _settings())
    s.plan(forge.host, "bits", 6.0, 8, "local")
    again = s.quantize_and_save(forge.host, "again")
    out, text, _ = forge.generation(s, again["file"], inputs=inputs)
    assert text.startswith(again["file"]) and _sqnr(fp0, out) > 15
    assert torch.equal(forge.generation(inputs=inputs)[0], fp0)


def test_cached_layers_are_not_reused_for_another_checkpoint_in_the_same_module(tmp_path, dm, inputs, monkeypatch):
    """A1111 loads another checkpoint of the same architecture into the same UNet object: a file picked by name is
    checked against the weights again, not served from the cache."""
    forge = Forge(dm)
    s, saved = _quantized(tmp_path, forge, inputs, monkeypatch)
    assert forge.generation(s, saved["file"], inputs=inputs)[1].startswith(saved["file"])
    forge.generation(inputs=inputs)  # (the FP tree back in place)
    with torch.no_grad():
        for prm in forge.original.model.diffusion_model.parameters():
            prm.mul_(1.5).add_(0.1)
    forge.sd_model.sd_checkpoint_info = _checkpoint("ef" * 32, "other")
    out, text, p = forge.generation(s, saved["file"], inputs=inputs)
    assert text.startswith("failed: ") and "different" in text and not patching.quantized_layers(
        p.sd_model.forge_objects.unet)


def test_online_lora_unexpected_errors_and_file_names(tmp_path, dm, inputs, monkeypatch):
    forge = Forge(dm)
    fp0 = forge.run(*inputs).clone()
    s, saved = _quantized(tmp_path, forge, inputs, monkeypatch)
    # Forge's online LoRA would skip our layers: refused, full precision
    unet = forge.original.clone()
    unet.lora_patches[("x.safetensors", 1.0, 1.0, True)] = {}
    forge.sd_model.forge_objects = types.SimpleNamespace(unet=unet)
    p = types.SimpleNamespace(sd_model=forge.sd_model, extra_generation_params={}, prompt="a cat")
    assert s.apply(forge.host, p, saved["file"]).startswith("Forge's online LoRA")
    assert p.sd_model.forge_objects.unet is unet
    # an error that is not ours: one line, full precision
    monkeypatch.setattr(mq.ForgeHost, "apply", lambda self, p, layers, info: (_ for _ in ()).throw(
        RuntimeError("out of memory")))
    out, text, p = forge.generation(s, saved["file"], inputs=inputs)
    assert text == "failed: RuntimeError: out of memory. Full precision used." and torch.equal(out, fp0)
    assert mq.normalize_choice("automix_v2.safetensors") == "automix_v2.safetensors"
    assert mq.normalize_choice("Automatic") == mq.AUTO == mq.normalize_choice(mq.AUTO)
    with pytest.raises(mq.MixQuantError, match="one group"):
        s.calibrate(forge.host, forge.generate_images(inputs), "a cat", _settings(), groups=3)


def test_a_lora_refresh_that_fails_leaves_no_quantized_layer_in_the_tree(tmp_path, dm, inputs, monkeypatch):
    """Forge registers a model as loaded only after its LoRA refresh: if the refresh raises (out of memory), nothing
    would unpatch our layers later; the clone takes them out itself and the error goes on."""
    forge = Forge(dm)
    fp0 = forge.run(*inputs).clone()
    s, saved = _quantized(tmp_path, forge, inputs, monkeypatch)
    forge.generation(inputs=inputs)
    names = [n for n in s.layers(forge.host, os.path.join(s.folder, saved["file"]))[0]][:2]
    lora = {f"diffusion_model.{n}.weight": (torch.zeros(1, 1), torch.zeros(1, 1)) for n in names}
    real = LoraLoader.refresh

    def failing(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        if lora_patches:
            raise RuntimeError("out of memory")
        return real(self, lora_patches, offload_device, force_refresh)
    monkeypatch.setattr(LoraLoader, "refresh", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        forge.generation(s, saved["file"], lora=lora, inputs=inputs)
    assert not any(isinstance(m, QuantLayer) for m in forge.original.model.diffusion_model.modules())
    monkeypatch.setattr(LoraLoader, "refresh", real)
    assert torch.equal(forge.generation(inputs=inputs)[0], fp0)


def test_a1111_generation_that_failed_is_undone_by_the_next(glue, tmp_path):
    mod, forge = glue
    dm = forge.original.model.diffusion_model
    sd = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm), sd_checkpoint_info=_checkpoint())
    host = mq.host_for(sd)
    s = mod.SESSION
    s.calibrate(host, forge.generate_images(forge_inputs(dm)), "a cat", _settings())
    s.plan(host, "bits", 6.0, 8, "local")
    saved = s.quantize_and_save(host)
    p = types.SimpleNamespace(sd_model=sd, extra_generation_params={}, prompt="a cat")
    mod.MixQuantScript().process(p, True, saved["file"])
    assert any(isinstance(m, QuantLayer) for m in dm.modules())
    # ... the generation fails before postprocess; the next one, MixQuant off, runs the FP UNet
    mod.MixQuantScript().process(types.SimpleNamespace(sd_model=sd, extra_generation_params={}, prompt="a"), False,
                                 mq.AUTO)
    assert not any(isinstance(m, QuantLayer) for m in dm.modules())
    p = types.SimpleNamespace(sd_model=sd, extra_generation_params={}, prompt="a cat", refiner_checkpoint="xl.ckpt")
    mod.MixQuantScript().process(p, True, saved["file"])
    assert p.extra_generation_params["MixQuant"].startswith("a refiner") and not any(
        isinstance(m, QuantLayer) for m in dm.modules())


def forge_inputs(dm):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 6, 32, generator=g)


def test_a1111_lora_merged_in_place_is_taken_out_before_the_tab_reads_weights(tmp_path, dm, inputs, monkeypatch):
    """A1111's LoRA merges into Linear/Conv2d weights in place (originals in network_weights_backup, restored only at
    a later forward): calibrating, fingerprinting and quantizing right after such a generation read the checkpoint's
    own weights, and the module is marked as holding no network any more."""
    sd = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm), sd_checkpoint_info=_checkpoint())
    host = mq.host_for(sd)
    from mixquant.quant.fileformat import fingerprint
    clean_fp = fingerprint(dm)
    layer = next(m for m in dm.modules() if isinstance(m, nn.Linear))
    layer.network_weights_backup = layer.weight.detach().clone()
    layer.network_bias_backup = None if layer.bias is None else layer.bias.detach().clone()
    layer.network_current_names = (("style", 1.0, 1.0, None),)
    with torch.no_grad():
        layer.weight.add_(0.5)  # what the merged LoRA did
    assert fingerprint(dm)["id"] != clean_fp["id"]  # (the merge shows in the fingerprint)
    monkeypatch.setattr(mq, "QuantizeConfig", _fast_config)
    s = mq.Session(str(tmp_path / "mq"))
    s.calibrate(host, Forge(dm).generate_images(inputs), "a cat", _settings())
    assert torch.equal(layer.weight, layer.network_weights_backup) and layer.network_current_names == ()
    assert s.calibration[2] == fingerprint(dm) and s.calibration[2]["id"] == clean_fp["id"]


def test_an_infeasible_budget_is_refused_before_sensitivity_is_measured(tmp_path, dm, inputs, monkeypatch):
    """The tab's default budget (4 bits) on a model whose protected layers make that impossible: one message naming
    the smallest feasible budget, at once, not after minutes of measuring (as `engine.run` already did)."""
    from mixquant.quant import engine

    forge = Forge(dm)
    s = mq.Session(str(tmp_path / "mq"))
    s.calibrate(forge.host, forge.generate_images(inputs), "a cat", _settings())
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: pytest.fail("sensitivity measured for an infeasible plan"))
    with pytest.raises(mq.MixQuantError, match="cannot be met: the smallest feasible average"):
        s.plan(forge.host, "bits", 1.0, 8, "fast")
