"""The ComfyUI nodes without ComfyUI: contracts (INPUT_TYPES / RETURN_TYPES / VALIDATE_INPUTS), and the node
functions on a small diffusers UNet inside a stand-in for ComfyUI's ModelPatcher (the same duck-typed attributes
nodes/patching.py uses: clone, add_object_patch, get_model_object, object_patches(_backup), backup, model_options,
size). folder_paths is a stand-in module too."""
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import mixquant
from mixquant.kernels import dispatch
from mixquant.nodes import nodes as N
from mixquant.nodes import patching
from mixquant.quant.apply import quantize_model
from mixquant.quant.calibration import calibrate
from mixquant.quant.errors import InterruptedRun, MixQuantError
from mixquant.quant.fileformat import fingerprint
from mixquant.quant.layers import QuantLayer
from mixquant.quant.native import read_marker
from mixquant.quant.runner import DenoiserRunner, Progress, SamplerSettings


# --- stand-ins -------------------------------------------------------------------------------------------------------

class Patcher:
    """The parts of comfy.model_patcher.ModelPatcher the nodes use, with its semantics: clones share the model, the
    object-patch backups and the weight backups; object patches apply only while 'loaded'."""

    def __init__(self, dm, shared=None):
        self.model = types.SimpleNamespace(diffusion_model=dm, model_sampling=None)
        self.object_patches, self.model_options, self.patches, self.size = {}, {"transformer_options": {}}, {}, 0
        self.object_patches_backup, self.backup = shared if shared else ({}, {})
        self.offload_device = torch.device("cpu")

    def clone(self):
        n = Patcher(self.model.diffusion_model, (self.object_patches_backup, self.backup))
        n.model = self.model
        n.object_patches = dict(self.object_patches)
        n.model_options = copy.deepcopy(self.model_options)
        n.size = self.size
        return n

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        obj = self.model
        for p in name.split("."):
            obj = getattr(obj, p)
        return obj

    def model_size(self):
        if self.size > 0:
            return self.size
        return sum(t.numel() * t.element_size() for t in self.model.diffusion_model.state_dict().values())

    def _parent(self, key):
        parent_name, _, attr = key.rpartition(".")
        parent = self.model
        for p in parent_name.split("."):
            parent = getattr(parent, p)
        return parent, attr

    def patch(self):
        """Apply the object patches to the shared model, as ModelPatcher.patch_model does."""
        for k, obj in self.object_patches.items():
            parent, attr = self._parent(k)
            self.object_patches_backup.setdefault(k, getattr(parent, attr))
            setattr(parent, attr, obj)

    def unpatch(self):
        for k, obj in list(self.object_patches_backup.items()):
            parent, attr = self._parent(k)
            setattr(parent, attr, obj)
        self.object_patches_backup.clear()


class ToyRunner(DenoiserRunner):  # samples one prompt at a time, as ComfyRunner does (max_batch 1)
    """Three Euler-like steps of the UNet on seeded noise; prompts become seeded contexts."""

    def __init__(self, unet):
        self.denoiser = unet

    def timesteps(self):
        return [900.0, 500.0, 100.0]

    def expected_calls(self, n):
        return 3 * n

    def timestep_of(self, args, kwargs):
        return float(torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None)).reshape(-1)[0])

    def output_of(self, out):
        return out.sample

    def settings(self):
        return {"toy": 1}

    def sample(self, prompts, seeds):
        imgs = []
        for p, s in zip(prompts, seeds):
            g = torch.Generator().manual_seed(int(s) * 7919 + sum(map(ord, p)))
            x = torch.randn(1, 4, 8, 8, generator=g)
            ctx = torch.randn(1, 6, 32, generator=g)
            for t in self.timesteps():
                x = x - 0.3 * self.denoiser(x, torch.tensor([t]), encoder_hidden_states=ctx).sample
            imgs.append(torch.sigmoid(x[:, :3]))
        return torch.cat(imgs)


@pytest.fixture()
def fake_folders(tmp_path, monkeypatch):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {"diffusion_models": ([str(tmp_path / "models" / "diffusion_models")], set())}

    def add_model_folder_path(name, path, is_default=False):
        fp.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0]

    def get_filename_list(name):
        out = []  # recursive, relative paths: as ComfyUI lists model folders
        for d in get_folder_paths(name):
            for root, _, files in os.walk(d):
                out += [os.path.relpath(os.path.join(root, f), d) for f in files]
        return sorted(out)

    def get_full_path(name, fname):
        for d in get_folder_paths(name):
            p = os.path.join(d, fname)
            if os.path.isfile(p):
                return p
        return None

    fp.add_model_folder_path, fp.get_folder_paths = add_model_folder_path, get_folder_paths
    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


@pytest.fixture()
def unet(small_unet):
    return copy.deepcopy(small_unet)  # a test may patch it: every test gets its own


def _calibration(unet, groups=2):
    runner = ToyRunner(unet)
    calib = calibrate(runner, ["a cat", "a dog"], [0, 1], groups)
    return N.CalibrationResult(runner, calib, fingerprint(unet), "toy")


def _fast_config(**kw):
    """The Plan node's QuantizeConfig, made cheap for tests: one coupling ratio (no candidate sampling), two calls,
    no speed target (the plans these tests check must not depend on how fast this machine ran each layer;
    test_plan_node_speed_target covers the timed plan)."""
    from mixquant.quant.engine import QuantizeConfig

    return QuantizeConfig(**{"coupling": (0.5,), "sens_calls": 2, **kw, "speed": "off"})


def _plan(cal, target="mixquant", bits=6.0, sensitivity="local"):
    return N.MixQuantPlan().plan(cal, "average weight bits", bits, "8", target, sensitivity)[0]


@pytest.fixture(scope="module")
def plans(small_unet):
    """Plans made by the Plan node (once per module) on a copy of the small UNet; each test quantizes its own copy
    (same weights, so the same fingerprint)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(N, "QuantizeConfig", _fast_config)
    try:
        cal = _calibration(copy.deepcopy(small_unet))
        return {"mixquant": _plan(cal), "native": _plan(cal, "comfyui-native", 14.0)}
    finally:
        mp.undo()


def _run_view(model, x, t, ctx):
    view = patching.fp_view(model, list(patching.quantized_layers(model)))
    with torch.no_grad(), dispatch.use_backend("reference"):
        return view(x, t, encoder_hidden_states=ctx).sample


# --- contracts ---------------------------------------------------------------------------------------------------------

def test_import_needs_no_comfyui():
    # in a fresh interpreter: other tests in this process may import ComfyUI themselves (COMFYUI_PATH set)
    probe = ("import sys, mixquant, mixquant.nodes.nodes, mixquant.nodes.patching; "
             "bad = [m for m in ('comfy', 'folder_paths') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert mixquant.NODE_CLASS_MAPPINGS is N.NODE_CLASS_MAPPINGS
    assert set(mixquant.NODE_DISPLAY_NAME_MAPPINGS) == set(N.NODE_CLASS_MAPPINGS)
    assert mixquant.WEB_DIRECTORY == "./web" and os.path.isfile(os.path.join(os.path.dirname(mixquant.__file__),
                                                                             "web", "mixquant.js"))


@pytest.mark.parametrize("node_id", sorted(N.NODE_CLASS_MAPPINGS))
def test_node_contract(node_id):
    cls = N.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("MixQuant") and cls.CATEGORY == "MixQuant"
    it = cls.INPUT_TYPES()
    assert set(it) <= {"required", "optional", "hidden"} and it["required"]
    for section in ("required", "optional"):
        for name, spec in it.get(section, {}).items():
            assert isinstance(spec, tuple) and spec, (name, spec)
            assert isinstance(spec[0], (str, list)), (name, spec)
            if isinstance(spec[0], list):
                assert spec[0] and all(isinstance(v, str) for v in spec[0]), name
    assert isinstance(cls.RETURN_TYPES, tuple)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls(), cls.FUNCTION))
    assert cls.DESCRIPTION
    if not cls.RETURN_TYPES:
        assert cls.OUTPUT_NODE


def test_validate_inputs():
    v = N.MixQuantCalibrate.VALIDATE_INPUTS
    assert v(width=512, height=64) is True
    assert "multiple of 8" in v(width=500)
    assert v() is True  # linked inputs are not passed
    p = N.MixQuantPlan.VALIDATE_INPUTS
    assert p(budget_kind="average weight bits", budget=4) is True
    assert "between 1 and 16" in p(budget_kind="average weight bits", budget=20)
    assert p(budget_kind="megabytes", budget=20) is True
    assert N.MixQuantLoadQuantized.VALIDATE_INPUTS() is True


def test_sampler_lists_have_fallbacks_and_prompts_parse():
    samplers, schedulers = N._samplers()
    assert "euler" in samplers and "normal" in schedulers
    assert N.parse_prompts(" a \n\n#x\n b\n") == ["a", "b"]


# --- node functions on a torch denoiser ----------------------------------------------------------------------------------

def test_plan_quantize_clone_leaves_input_untouched(unet, plans):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    plan = plans["mixquant"]
    assert plan.report["avg_w_bits"] <= 6.0 + 1e-6 and plan.group_bounds and len(plan.group_bounds) == 2
    model = Patcher(unet)
    qm, summary = N.MixQuantQuantizeModel().quantize(model, plan)
    assert qm is not model and not model.object_patches  # the input MODEL is not changed
    assert not any(isinstance(m, QuantLayer) for m in unet.modules())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    layers = patching.quantized_layers(qm)
    assert set(layers) == set(plan.quantized_names()) and layers
    assert all(k.startswith("diffusion_model.") for k in qm.object_patches)
    assert qm.model_size() < model.model_size()
    assert "quantized layers" in summary and qm.model_options["mixquant"]["quantized_bytes"] < \
        qm.model_options["mixquant"]["fp_bytes"]
    # the clone computes what quant/'s quantize_model computes from the same plan
    assert plan.search in ("auto", "minmax") and plan.report["weight_search"] == \
        ("minmax" if plan.search == "minmax" else "mse")
    ref, _ = quantize_model(unet, plan.plan, plan.ranges, bos=plan.bos, search=plan.search)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([900, 900]), torch.randn(2, 6, 32)
    with torch.no_grad(), dispatch.use_backend("reference"):
        y_ref = ref(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(_run_view(qm, x, t, ctx), y_ref)
    # the weight ranges the plan chose reach the Quantize node's layers
    other = dataclasses.replace(plan, search="minmax" if plan.search == "auto" else "auto")
    ql = patching.quantized_layers(N.MixQuantQuantizeModel().quantize(Patcher(unet), other)[0])
    ref2, _ = quantize_model(unet, plan.plan, plan.ranges, bos=plan.bos, search=other.search)
    low = [n for n, m in ql.items() if m.fmt.w_bits < 8]
    assert low and all(torch.equal(ql[n].weight, ref2.get_submodule(n).weight) for n in low)
    assert any(not torch.equal(ql[n].weight, layers[n].weight) for n in low)
    with pytest.raises(MixQuantError, match="already quantized"):
        N.MixQuantQuantizeModel().quantize(qm, plan)


def test_plan_for_another_model_is_refused(unet, plans):
    plan = plans["mixquant"]
    other = copy.deepcopy(unet)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    with pytest.raises(MixQuantError, match="different model"):
        N.MixQuantQuantizeModel().quantize(Patcher(other), plan)


def test_fp_view_sees_through_other_clones_patches(unet, plans):
    plan = plans["mixquant"]
    model = Patcher(unet)
    qm, _ = N.MixQuantQuantizeModel().quantize(model, plan)
    qm.patch()  # the quantized clone is 'loaded': the shared UNet now holds QuantLayers
    try:
        assert any(isinstance(m, QuantLayer) for m in unet.modules())
        view = patching.fp_view(model)
        assert not any(isinstance(m, QuantLayer) for m in view.modules())
        assert fingerprint(view)["id"] == plan.base_fingerprint["id"]
        qm2, _ = N.MixQuantQuantizeModel().quantize(model, plan)  # quantizing again reads the FP weights
        assert set(patching.quantized_layers(qm2)) == set(plan.quantized_names())
    finally:
        qm.unpatch()
    assert not any(isinstance(m, QuantLayer) for m in unet.modules())


def test_timestep_groups_switch_through_the_wrapper(unet, plans):
    plan = plans["mixquant"]
    qm, _ = N.MixQuantQuantizeModel().quantize(Patcher(unet), plan)
    wrapper = qm.model_options["model_function_wrapper"]
    layers = [m for m in patching.quantized_layers(qm).values() if m.input_scale is not None]
    assert layers and all(m.input_scale.shape[0] == 2 for m in layers)
    seen = []

    def apply_model(x, t, **c):
        seen.append({m.act_group for m in layers})
        return x

    for t, group in ((900.0, 0), (100.0, 1), (500.0, 0 if plan.group_bounds[0] <= 500 else 1)):
        wrapper(apply_model, {"input": torch.zeros(1), "timestep": torch.tensor([t]), "c": {}, "cond_or_uncond": [0]})
        assert seen[-1] == {group}


def test_save_load_roundtrip_and_bad_files(unet, plans, fake_folders, tmp_path):
    plan = plans["mixquant"]
    model = Patcher(unet)
    qm, _ = N.MixQuantQuantizeModel().quantize(model, plan)
    out = N.MixQuantSaveQuantized().save(qm, "sub/my_model")
    assert "saved my_model.safetensors" in out["ui"]["text"][0]
    files = N.quantized_files()
    assert files == [os.path.join("sub", "my_model.safetensors")]
    N.MixQuantSaveQuantized().save(qm, "sub/my_model")  # a second save never overwrites
    assert any(f.endswith("my_model_00001.safetensors") for f in os.listdir(tmp_path / "models" / "mixquant" / "sub"))
    name = os.path.join("sub", "my_model.safetensors")
    assert N.MixQuantLoadQuantized.VALIDATE_INPUTS(quantized_file=name) is True
    lq, summary = N.MixQuantLoadQuantized().load(model, name)
    assert set(patching.quantized_layers(lq)) == set(patching.quantized_layers(qm))
    assert lq.model_options["mixquant"]["group_bounds"] == plan.group_bounds
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([100, 100]), torch.randn(2, 6, 32)
    for m in list(patching.quantized_layers(lq).values()) + list(patching.quantized_layers(qm).values()):
        m.act_group = 1
    assert torch.equal(_run_view(lq, x, t, ctx), _run_view(qm, x, t, ctx))
    # a damaged file: one clear message, before and at execution
    bad = tmp_path / "models" / "mixquant" / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    msg = N.MixQuantLoadQuantized.VALIDATE_INPUTS(quantized_file="broken.safetensors")
    assert isinstance(msg, str) and "broken.safetensors" in msg and "corrupt" in msg
    with pytest.raises(MixQuantError, match="corrupt"):
        N.MixQuantLoadQuantized().load(model, "broken.safetensors")
    # the right file on the wrong model
    other = copy.deepcopy(unet)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    with pytest.raises(MixQuantError, match="different base model"):
        N.MixQuantLoadQuantized().load(Patcher(other), name)
    with pytest.raises(MixQuantError, match="no MixQuant layers"):
        N.MixQuantSaveQuantized().save(model, "x")


def test_save_for_stock_comfyui(unet, plans, fake_folders, tmp_path):
    from safetensors.torch import load_file

    plan = plans["native"]
    assert {f.name for f in plan.plan.values()} <= {"W8A8d", "W4g64A16", "W16A16"}
    qm, _ = N.MixQuantQuantizeModel().quantize(Patcher(unet), plan)
    out = N.MixQuantSaveNative().save(qm, "native")
    s = out["ui"]["mixquant_native"][0]
    assert s["native_layers"] > 0 and "layers in native form" in out["result"][0]
    t = load_file(str(tmp_path / "models" / "diffusion_models" / "native.safetensors"))
    markers = {k.rsplit(".", 1)[0]: read_marker(v) for k, v in t.items() if k.endswith(".comfy_quant")}
    assert len(markers) == s["native_layers"]
    convs = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert not (set(markers) & convs)
    for name, conf in markers.items():
        if conf["format"] == "int8_tensorwise":
            assert t[name + ".weight"].dtype == torch.int8 and t[name + ".weight_scale"].dtype == torch.float32
        else:
            assert conf == {"format": "awq_w4a16", "group_size": 64} and name + ".weight_zeros" in t


def test_report_node(unet, plans):
    plan = plans["mixquant"]
    out = N.MixQuantReport().report(plan)
    view = out["ui"]["mixquant_report"][0]
    json.dumps(view)  # what the web extension gets must be plain JSON
    blocks = {b["block"]: b for b in view["blocks"]}
    assert "down_blocks.0" in blocks and "mid_block" in blocks
    total = sum(b["params"] for b in blocks.values())
    assert total == sum(li["params"] for li in plan.report["layers"])
    avg = sum(b["avg_w_bits"] * b["params"] for b in blocks.values()) / total
    assert abs(avg - plan.report["avg_w_bits"]) < 1e-6
    assert view["curve"] and "avg weight bits" in out["ui"]["text"][0]
    assert json.loads(out["result"][0])["layers"]
    assert N.block_of("input_blocks.4.1.transformer_blocks.0.attn2.to_k") == "input_blocks.4"
    assert N.block_of("time_embed.0") == "time_embed" and N.block_of("middle_block.1.proj_in") == "middle_block"


def test_interruption_is_cooperative_and_leaves_the_model(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    asked = []

    def stop():  # /interrupt arrives during the second denoiser call
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(InterruptedRun):
        calibrate(ToyRunner(unet), ["a"], [0], progress=Progress(should_stop=stop))
    assert not any(m._forward_pre_hooks for m in unet.modules())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    with pytest.raises(InterruptedRun):  # outside ComfyUI the node helper re-raises our own error
        N._interruptible(lambda: (_ for _ in ()).throw(InterruptedRun("stopped")))


class BatchedToyRunner(ToyRunner):
    """ToyRunner's sampling with every prompt in one batch (each prompt's noise and context as ToyRunner draws them)."""
    max_batch = 64

    def sample(self, prompts, seeds):
        xs, ctxs = [], []
        for p, s in zip(prompts, seeds):
            g = torch.Generator().manual_seed(int(s) * 7919 + sum(map(ord, p)))
            xs.append(torch.randn(1, 4, 8, 8, generator=g))
            ctxs.append(torch.randn(1, 6, 32, generator=g))
        x, ctx = torch.cat(xs), torch.cat(ctxs)
        for t in self.timesteps():
            x = x - 0.3 * self.denoiser(x, torch.tensor([t] * len(prompts)), encoder_hidden_states=ctx).sample
        return torch.sigmoid(x[:, :3])


def test_full_sensitivity_does_not_depend_on_how_the_sampler_batches(unet, tmp_path):
    """The content probes batch several formats of a layer into one sampling run only when the sampler takes them in one
    batch; a sampler that runs one prompt at a time (ComfyUI's) gets one format per run and the same losses."""
    from mixquant.quant import engine
    from mixquant.quant.roles import discover_layers
    from mixquant.quant.sensitivity import measure_sensitivity

    cfg = _fast_config(avg_w_bits=4.0)
    layers = discover_layers(unet)
    w_menu, a_menu, layers_s = engine.menus(cfg, layers)
    content = [li for li in layers_s if li.role == "content" and not li.protected][:3]
    quality = [li for li in layers_s if li.role == "quality" and not li.protected][:2]
    prompts, seeds = ["a cat", "a dog", "a fish"], [0, 1, 2]
    out, phases = {}, []
    for cls in (ToyRunner, BatchedToyRunner):
        runner = cls(unet)
        calib = calibrate(runner, prompts, seeds)
        out[cls] = measure_sensitivity(runner, calib, content + quality, w_menu, a_menu, "toy", n_calls=2,
                                       cache_dir=str(tmp_path / cls.__name__), mode="full",
                                       progress=Progress(callback=lambda d, t, phase: phases.append(phase)))
    # the time left is said once both kinds of probe were timed (before the last probes)
    assert any(re.fullmatch(r"measuring sensitivity \(about \d+ s left\)", p) for p in phases), set(phases)
    one, batched = out[ToyRunner], out[BatchedToyRunner]
    assert set(one.loss) == set(batched.loss) == {li.name for li in content + quality}
    for li in content:  # (quality layers are scored on recorded calls, which the two samplers batch differently)
        table = batched.loss[li.name]
        assert set(one.loss[li.name]) == set(table) and len(table) >= 3
        for fmt, loss in table.items():
            assert one.loss[li.name][fmt] == pytest.approx(loss, rel=1e-3, abs=1e-7), (li.name, fmt)
    # and the probes measured something: 2-bit weights cost a content layer more than 8-bit ones
    assert all(one.loss[li.name]["W2g64A16"] > one.loss[li.name]["W8A16"] for li in content)


@pytest.mark.parametrize("sensitivity", ["fast", "full", "local"])
def test_plan_node_runs_in_every_sensitivity_mode(unet, monkeypatch, tmp_path, sensitivity):
    """ComfyUI's runner samples one prompt at a time: every mode must work with it (full: the content probes one
    format per sampling run), on 3 prompts; fast is the default."""
    monkeypatch.setattr(N, "QuantizeConfig", lambda **kw: _fast_config(cache_dir=str(tmp_path), **kw))
    runner = ToyRunner(unet)
    cal = N.CalibrationResult(runner, calibrate(runner, ["a cat", "a dog", "a fish"], [0, 1, 2]), fingerprint(unet),
                              "toy")
    assert N.MixQuantPlan.INPUT_TYPES()["optional"]["sensitivity"][0][0] == "fast"  # the default
    plan = _plan(cal, bits=4.0, sensitivity=sensitivity)
    assert plan.report["sensitivity_mode"] == sensitivity
    assert plan.quantized_names() and 3.5 <= plan.report["avg_w_bits"] <= 4.0 + 1e-6
    scored = [li for li in plan.report["layers"] if "sensitivity" in li]
    assert {li["role"] for li in scored} == {"content", "quality"}


def test_plan_node_speed_target(unet, monkeypatch, tmp_path):
    """The Plan node's default speed target: the plan's predicted speed in its report and text; a target no plan can
    reach, required, is one clear error naming what is feasible."""
    from mixquant.quant.engine import QuantizeConfig

    monkeypatch.setattr(N, "QuantizeConfig", lambda **kw: QuantizeConfig(
        **{"coupling": (0.5,), "sens_calls": 2, "cache_dir": str(tmp_path), **kw}))
    opt = N.MixQuantPlan.INPUT_TYPES()["optional"]
    assert opt["speed"][0][0] == "auto" and opt["min_speed"][1]["default"] == 1.0
    cal = _calibration(copy.deepcopy(unet))
    plan = N.MixQuantPlan().plan(cal, "average weight bits", 8.0, "8", "mixquant", "local")[0]
    sp = plan.report["speed"]
    assert sp["predicted_speed"] > 0 and sp["min_speed"] == 1.0 and sp["batch"] == 1  # (no guidance here)
    assert N.report_text(plan.report).count("speed vs float on ") == 1
    with pytest.raises(MixQuantError, match=r"no plan reaches 1000x here .*Lower the minimum speed"):
        N.MixQuantPlan().plan(cal, "average weight bits", 8.0, "8", "mixquant", "local", "require", 1000.0)


def test_local_sensitivity_holds_recorded_inputs_within_a_budget(unet, tmp_path):
    """Local mode records layer inputs a chunk of layers at a time: the same losses with a budget that takes every
    layer in one chunk and with one so small that each layer is its own chunk, and never more than the budget held
    (except a single layer larger than it)."""
    from mixquant.quant import engine
    from mixquant.quant.roles import discover_layers
    from mixquant.quant.sensitivity import StreamedInputs, measure_sensitivity, subsample_call

    cfg = _fast_config(avg_w_bits=4.0)
    w_menu, a_menu, layers_s = engine.menus(cfg, discover_layers(unet))
    runner = ToyRunner(unet)
    calib = calibrate(runner, ["a cat", "a dog"], [0, 1])
    losses = {budget: measure_sensitivity(runner, calib, layers_s, w_menu, a_menu, "toy", n_calls=2, mode="local",
                                          cache_dir=None, inputs_budget=budget).loss for budget in (1 << 40, 1)}
    assert losses[1] == losses[1 << 40] and len(losses[1]) > 10

    calls = [subsample_call(c, 8) for c in calib.calls[:2]]
    names = [li.name for li in layers_s if not li.protected]
    whole = StreamedInputs(unet, calls, names, calib.group_of, 1 << 40)
    budget = 3 * max(t.numel() * t.element_size() for n in names[:3] for t, _ in whole[n])
    streamed = StreamedInputs(unet, calls, names, calib.group_of, budget)
    assert len(whole.chunks) == 1 and len(streamed.chunks) > 3
    for n in names:
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(streamed[n], whole[n]))
        held = sum(t.numel() * t.element_size() for m in streamed.data for t, _ in streamed.data[m])
        assert held <= budget or len(streamed.data) == 1
    assert streamed.passes == len(streamed.chunks)  # each chunk recorded once, in order


@pytest.mark.parametrize("dims,kind", [(3, "video"), (1, "audio")])
def test_calibrate_refuses_a_model_without_image_latents(unet, dims, kind):
    """A video or audio MODEL gets one clear message before anything runs (not a shape error deep in sampling)."""
    model = Patcher(unet)
    model.model.latent_format = types.SimpleNamespace(latent_dimensions=dims, latent_channels=16)
    with pytest.raises(MixQuantError, match=f"{kind} model.*text-to-image"):
        N.MixQuantCalibrate().calibrate(model, "a cat", "", 2, 5.0, "euler", "normal", 64, 64, 0, clip=object())


def test_calibrate_takes_a_conditioning_instead_of_a_clip(unet):
    """A model whose text encoder does not fit here (Flux's T5-XXL), img2img and edit workflows: Calibrate takes a
    CONDITIONING from any node; every calibration image uses it (one per seed), the negative defaults to it zeroed
    (ConditioningZeroOut), and the cache keys tell two conditionings apart."""
    from mixquant.nodes.runner import ComfyRunner, zeroed

    model = Patcher(unet)
    model.model.latent_format = types.SimpleNamespace(latent_dimensions=2, latent_channels=4)
    settings = SamplerSettings(steps=2, sampler_name="euler", scheduler="normal", width=64, height=64)
    cond = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 16)}]]
    r = ComfyRunner(model, None, settings, conditioning=cond)
    assert r._encode("<anything>") is cond
    other = ComfyRunner(model, None, settings, conditioning=[[cond[0][0] + 1, dict(cond[0][1])]])
    assert r.settings()["clip"] != other.settings()["clip"]
    assert r.settings()["clip"] == ComfyRunner(model, None, settings, conditioning=cond).settings()["clip"]
    zero = zeroed(cond)
    assert not zero[0][0].any() and not zero[0][1]["pooled_output"].any() and cond[0][0].any()
    with pytest.raises(MixQuantError, match="CLIP.*or a CONDITIONING"):
        ComfyRunner(model, None, settings)
    with pytest.raises(MixQuantError, match="not a CONDITIONING"):
        ComfyRunner(model, None, settings, conditioning="a cat")
    with pytest.raises(MixQuantError, match="prompt list is empty"):
        N.MixQuantCalibrate().calibrate(model, "  \n# only a comment", "", 2, 5.0, "euler", "normal", 64, 64, 0,
                                        clip=object())
