"""MixQuant inside a real ComfyUI (skipped unless COMFYUI_PATH points at a ComfyUI checkout).

The test writes a reduced SD1.5-layout checkpoint with random weights (one UNet level, full-size CLIP-L and VAE: what
ComfyUI detects as SD15, see shared/comfyui.md) and a LoRA for it, starts ComfyUI headless on CPU on 127.0.0.1 with a
free port, loads the pack from this repository through --extra-model-paths-config (under another folder name), and
talks to it over HTTP only: /object_info lists every node, the example workflow runs to a PNG, a stock LoRA loader
changes the quantized model's output as it changes the FP one's, an interrupted calibration leaves the server serving
and the model unchanged, and a bad file in Load Quantized gives one clear message.

COMFYUI_PYTHON: the interpreter of ComfyUI's environment (default: this one). Everything is bounded in time.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
CKPT = "mq_tiny_sd15.safetensors"
LORA = "mq_tiny_lora.safetensors"

# the reduced SD1.5 UNet (diffusers config): one level, one res block, transformer depth 1
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
LORA_LAYERS = ["input_blocks.1.1.transformer_blocks.0.attn2.to_k", "input_blocks.1.1.transformer_blocks.0.ff.net.2",
               "middle_block.1.transformer_blocks.0.attn1.to_q", "output_blocks.0.1.transformer_blocks.0.attn2.to_v"]


def write_tiny_sd15(path: str, seed: int = 0) -> None:
    """An SD1.5-layout single-file checkpoint with random weights: LDM UNet names (through quant/native's
    diffusers -> LDM map), CLIP-L under cond_stage_model.transformer, a diffusers-named VAE (ComfyUI converts it)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from mixquant.quant.native import diffusers_to_ldm, rename_tensor

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    rename = diffusers_to_ldm(dict(unet.config))
    sd = {"model.diffusion_model." + rename_tensor(k, rename): v for k, v in unet.state_dict().items()}
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu"))
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip.state_dict().items()
               if not k.endswith("position_ids")})
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=64)
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}, path)


def write_lora(path: str, rank: int = 4, seed: int = 1) -> None:
    """A LoRA in the kohya naming ComfyUI's LoRA loaders read (lora_unet_<ldm key with _>.lora_up/down/alpha)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dims = {"attn2.to_k": (768, 320), "ff.net.2": (1280, 320), "attn1.to_q": (320, 320), "attn2.to_v": (768, 320)}
    t = {}
    for name in LORA_LAYERS:
        k_in, n_out = next(v for s, v in dims.items() if name.endswith(s))
        key = "lora_unet_" + name.replace(".", "_")
        t[key + ".lora_down.weight"] = torch.randn(rank, k_in, generator=g) * 0.5
        t[key + ".lora_up.weight"] = torch.randn(n_out, rank, generator=g) * 0.5
        t[key + ".alpha"] = torch.tensor(float(rank))
    save_file(t, path)


# --- the server ----------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.skipif(not COMFYUI or not os.path.isfile(os.path.join(COMFYUI or "", "main.py")),
                                reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI integration tests")

START_TIMEOUT = 240  # s: importing ComfyUI and every pack on a busy 2-core machine
PROMPT_TIMEOUT = 1800  # s: CPU, and the machine may be shared (the defaults graph at 512x512 on the full-size test
# UNet takes ~12 min alone on a 2-core EPYC, over 15 beside another test run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, port: int, proc: subprocess.Popen, log: str):
        self.base, self.port, self.proc, self.log = base, port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, data, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def submit(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "mixquant-test"})
        assert status == 200, body
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            h = self.get(f"/history/{prompt_id}")
            if h and prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st.get("status_str") in ("success", "error") or st.get("completed"):
                    return h[prompt_id]
            if self.proc.poll() is not None:
                raise AssertionError("ComfyUI exited:\n" + self.tail())
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s\n" + self.tail())

    def run(self, prompt: dict) -> dict:
        h = self.wait(self.submit(prompt))
        assert h["status"]["status_str"] == "success", json.dumps(h["status"], indent=1)[-3000:]
        return h

    def tail(self, n: int = 4000) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-n:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy"))
    for d in ("checkpoints", "loras", "mixquant", "diffusion_models", "output", "custom_nodes"):
        os.makedirs(os.path.join(base, d))
    write_tiny_sd15(os.path.join(base, "checkpoints", CKPT))
    write_lora(os.path.join(base, "loras", LORA))
    # the pack under another folder name than "mixquant": ComfyUI may name it anything
    os.symlink(REPO, os.path.join(base, "custom_nodes", "ComfyUI-MixQuant-under-test"))
    cfg = os.path.join(base, "extra_model_paths.yaml")
    with open(cfg, "w") as f:
        f.write(f"mixquant_test:\n  base_path: {base}\n  checkpoints: checkpoints\n  loras: loras\n"
                f"  mixquant: mixquant\n  diffusion_models: diffusion_models\n  custom_nodes: custom_nodes\n"
                f"  is_default: true\n")  # what the nodes save lands here, not in the ComfyUI checkout
    port = _free_port()
    log = os.path.join(base, "comfyui.log")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "MIXQUANT_CACHE": os.path.join(base, "cache"), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--disable-auto-launch", "--extra-model-paths-config", cfg,
                                 "--output-directory", os.path.join(base, "output")],
                                cwd=COMFYUI, stdout=out, stderr=subprocess.STDOUT, env=env)
    with serving(Server(base, port, proc, log), "/object_info/KSampler", "ComfyUI", START_TIMEOUT) as srv:
        yield srv


@contextlib.contextmanager
def serving(srv, probe: str, name: str, timeout: float):
    """`srv` once `probe` answers (its process is stopped on the way out, whatever happened)."""
    try:
        end = time.time() + timeout
        while True:
            try:
                srv.get(probe, timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if srv.proc.poll() is not None or time.time() > end:
                    raise AssertionError(f"{name} did not start:\n" + srv.tail())
                time.sleep(1)
        yield srv
    finally:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=30)


def _example(name: str) -> dict:
    with open(os.path.join(REPO, "examples", name)) as f:
        prompt = json.load(f)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = CKPT
    return prompt


NODES = ["MixQuantCalibrate", "MixQuantPlan", "MixQuantQuantizeModel", "MixQuantSaveQuantized", "MixQuantLoadQuantized",
         "MixQuantSaveNative", "MixQuantKSampler", "MixQuantReport"]


def test_pack_loads_and_lists_every_node(server):
    log = server.tail(10 ** 7)
    ours = [ln for ln in log.splitlines() if "ComfyUI-MixQuant-under-test" in ln]
    assert ours and not any("IMPORT FAILED" in ln for ln in ours), "\n".join(ours) or log[-3000:]
    info = server.get("/object_info")
    for name in NODES:
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["category"] == "MixQuant"
    assert "MixQuant" in info["MixQuantKSampler"]["display_name"]
    # the web extension is served
    exts = server.get("/extensions")
    assert any(e.endswith(".js") and "ComfyUI-MixQuant-under-test" in e for e in exts), exts


def test_example_workflow_makes_a_png(server):
    h = server.run(_example("comfyui_quantize_api.json"))
    images = [img for out in h["outputs"].values() for img in out.get("images", [])]
    assert images, h["outputs"]
    path = os.path.join(server.base, "output", images[0].get("subfolder", ""), images[0]["filename"])
    assert os.path.getsize(path) > 0 and path.endswith(".png")
    report = next(out for out in h["outputs"].values() if "mixquant_report" in out)["mixquant_report"][0]
    s = report["summary"]
    assert s["bytes_quantized"] < s["bytes_fp16"] and report["blocks"]


def test_native_export_workflow(server):
    h = server.run(_example("comfyui_native_export_api.json"))
    native = next(out for out in h["outputs"].values() if "mixquant_native" in out)["mixquant_native"][0]
    assert native["native_layers"] > 0 and native["native_bytes"] > 0
    files = os.listdir(os.path.join(server.base, "diffusion_models"))
    assert any(f.startswith("mixquant_native") for f in files)
    # the stock Load Diffusion Model node lists it
    unets = server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert any(f.startswith("mixquant_native") for f in unets)
    stats = next(out["text"][0] for k, out in h["outputs"].items() if "text" in out and "latent SQNR" in out["text"][0])
    assert "quantized vs" in stats and "FP" in stats
    # the saved MixQuant file appears in the Load node's list (ComfyUI refreshes model folders)
    listed = server.get("/object_info/MixQuantLoadQuantized")["MixQuantLoadQuantized"]["input"]["required"]
    assert any(f.startswith("mixquant_model") for f in listed["quantized_file"][0])


def _sampler_graph(model_ref, extra=None, seed=7):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red car", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": model_ref, "seed": seed, "steps": 3, "cfg": 5.0,
              "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
              "latent_image": ["4", 0], "denoise": 1.0}},
    }
    g.update(extra or {})
    return g


def _latent_after(server, graph, prefix):
    from safetensors.torch import load_file

    graph = dict(graph)
    graph["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/{prefix}"}}
    server.run(graph)
    folder = os.path.join(server.base, "output", "latents")
    name = sorted(f for f in os.listdir(folder) if f.startswith(prefix))[-1]
    return load_file(os.path.join(folder, name))["latent_tensor"].float()


def _quant_nodes(budget=6.0, sensitivity=None, prompts="a red car"):
    """Calibrate -> Plan -> Quantize Model; `sensitivity` None leaves Plan's input at its default (fast)."""
    plan = {"calibration": ["5", 0], "budget_kind": "average weight bits", "budget": budget, "activation_bits": "8",
            "target": "mixquant", **({"sensitivity": sensitivity} if sensitivity else {})}
    return {
        "5": {"class_type": "MixQuantCalibrate", "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompts": prompts,
              "negative": "", "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "width": 64,
              "height": 64, "seed": 0, "timestep_groups": 1}},
        "6": {"class_type": "MixQuantPlan", "inputs": plan},
        "7": {"class_type": "MixQuantQuantizeModel", "inputs": {"model": ["1", 0], "plan": ["6", 0]}},
    }


@pytest.mark.parametrize("sensitivity", ["fast", "full", "local"])
def test_plan_runs_in_every_sensitivity_mode(server, sensitivity):
    """ComfyUI samples one prompt at a time (batch 2 with guidance): Plan must not assume all probes in one batch."""
    graph = _sampler_graph(["7", 0], {**_quant_nodes(sensitivity=sensitivity, prompts="a red car\na blue house"),
                                      "11": {"class_type": "MixQuantReport", "inputs": {"plan": ["6", 0]}}})
    h = server.run(graph)
    report = next(out for out in h["outputs"].values() if "mixquant_report" in out)["mixquant_report"][0]
    assert report["summary"]["bytes_quantized"] < report["summary"]["bytes_fp16"] and report["layers"]


def _at_defaults(server, cls: str, links: dict) -> dict:
    """Every input of a node at the default its INPUT_TYPES declares (a list's first entry), links where given."""
    spec = server.get(f"/object_info/{cls}")[cls]["input"]
    out = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if name in links:
                out[name] = links[name]
                continue
            kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(kind, list) and kind:
                out[name] = kind[0]
            elif kind == "COMBO" and opts.get("options"):
                out[name] = opts["options"][0]
    return out


def test_every_node_at_its_defaults(server):
    """What a user meets first: Calibrate, Plan and Quantize Model with nothing changed from their defaults (only
    the links), then a stock KSampler on the quantized MODEL."""
    nodes = {
        "5": {"class_type": "MixQuantCalibrate",
              "inputs": _at_defaults(server, "MixQuantCalibrate", {"model": ["1", 0], "clip": ["1", 1]})},
        "6": {"class_type": "MixQuantPlan", "inputs": _at_defaults(server, "MixQuantPlan", {"calibration": ["5", 0]})},
        "7": {"class_type": "MixQuantQuantizeModel",
              "inputs": _at_defaults(server, "MixQuantQuantizeModel", {"model": ["1", 0], "plan": ["6", 0]})},
        "11": {"class_type": "MixQuantReport", "inputs": {"plan": ["6", 0]}},
    }
    assert nodes["6"]["inputs"].get("sensitivity", "fast") == "fast"
    h = server.run(_sampler_graph(["7", 0], nodes))
    report = next(out for out in h["outputs"].values() if "mixquant_report" in out)["mixquant_report"][0]
    assert report["summary"]["bytes_quantized"] < report["summary"]["bytes_fp16"] and report["layers"]


def test_stock_lora_loader_on_the_quantized_model(server):
    import torch

    lora = {"20": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": None, "lora_name": LORA,
                                                                   "strength_model": 1.0}}}
    # the quantized graphs first and back to back: ComfyUI keeps the Quantize output cached between them
    q = _latent_after(server, _sampler_graph(["7", 0], _quant_nodes()), "q_")
    q_l = _latent_after(server, _sampler_graph(["20", 0], {**_quant_nodes(), "20": {**lora["20"], "inputs": {
        **lora["20"]["inputs"], "model": ["7", 0]}}}), "qlora_")
    q_again = _latent_after(server, _sampler_graph(["7", 0], _quant_nodes(), seed=7), "qagain_")
    fp = _latent_after(server, _sampler_graph(["1", 0]), "fp_")
    fp_l = _latent_after(server, _sampler_graph(["20", 0], {**lora, "20": {**lora["20"], "inputs": {
        **lora["20"]["inputs"], "model": ["1", 0]}}}), "fplora_")
    d_fp, d_q = (fp_l - fp).flatten(), (q_l - q).flatten()
    assert d_fp.norm() > 0.05 * fp.norm(), "the LoRA should change the FP output"
    ratio = float(d_q.norm() / d_fp.norm())
    cos = float(torch.nn.functional.cosine_similarity(d_fp, d_q, dim=0))
    assert 0.5 < ratio < 2.0 and cos > 0.3, (ratio, cos)  # the quantized model moves as the FP one does
    assert torch.allclose(q_again, q), "the LoRA must not stay on the quantized MODEL without the loader"


def test_stock_torch_compile_on_the_quantized_model(server):
    """ComfyUI's own TorchCompileModel node (inductor) on the quantized MODEL samples what the eager quantized model
    does: torch.compile traces the quantized layers (their ops registered for it) instead of breaking on them."""
    import torch

    q = _latent_after(server, _sampler_graph(["7", 0], _quant_nodes()), "qeager_")
    compiled = {"20": {"class_type": "TorchCompileModel", "inputs": {"model": ["7", 0], "backend": "inductor"}}}
    qc = _latent_after(server, _sampler_graph(["20", 0], {**_quant_nodes(), **compiled}), "qcompiled_")
    fp = _latent_after(server, _sampler_graph(["1", 0]), "fpc_")
    fpc = _latent_after(server, _sampler_graph(["21", 0], {"21": {**compiled["20"], "inputs": {
        **compiled["20"]["inputs"], "model": ["1", 0]}}}), "fpcompiled_")
    assert qc.shape == q.shape and torch.isfinite(qc).all()
    d, dq, dfp = float((qc - q).norm()), float((q - fp).norm()), float((fpc - fp).norm())
    # compiled float ops round a little differently (the FP model moves ~4e-6); in the quantized model that moves
    # the few activations on a rounding boundary by a whole code step, which three sampling steps spread (0.7-2.4%
    # over runs, as inductor's kernels vary): small, and below what quantization itself moves
    assert dfp <= 1e-3 * float(fp.norm())
    assert d <= 0.05 * float(q.norm()) and d < dq, (d / float(q.norm()), d / dq)


def test_interrupted_calibration_leaves_server_and_model_intact(server):
    fp_before = _latent_after(server, _sampler_graph(["1", 0]), "int_before_")
    slow = _sampler_graph(["1", 0])
    slow.update({"5": {"class_type": "MixQuantCalibrate", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                 "prompts": "\n".join(f"prompt number {i}" for i in range(40)), "negative": "", "steps": 50,
                 "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64, "seed": 0,
                 "timestep_groups": 2}},
                 "6": {"class_type": "MixQuantPlan", "inputs": {"calibration": ["5", 0], "budget_kind":
                       "average weight bits", "budget": 6.0, "activation_bits": "8", "target": "mixquant",
                       "sensitivity": "local"}},
                 "11": {"class_type": "MixQuantReport", "inputs": {"plan": ["6", 0]}}})
    del slow["8"]
    pid = server.submit(slow)
    end = time.time() + 120
    while time.time() < end:  # wait until the calibration is running
        q = server.get("/queue")
        if q["queue_running"] and q["queue_running"][0][1] == pid:
            break
        time.sleep(0.2)
    time.sleep(3)
    assert server.post("/interrupt", {})[0] == 200
    h = server.wait(pid, timeout=120)
    msgs = [m[0] for m in h["status"].get("messages", [])]
    assert "execution_interrupted" in msgs, h["status"]
    assert server.get("/object_info/MixQuantCalibrate")  # still serving
    fp_after = _latent_after(server, _sampler_graph(["1", 0]), "int_after_")
    assert torch_equal(fp_before, fp_after), "the MODEL changed after an interrupted calibration"


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


def test_bad_file_in_load_node_gives_one_clear_message(server):
    with open(os.path.join(server.base, "mixquant", "broken.safetensors"), "wb") as f:
        f.write(b"\x00" * 100)
    g = _sampler_graph(["9", 0], {"9": {"class_type": "MixQuantLoadQuantized",
                                        "inputs": {"model": ["1", 0], "quantized_file": "broken.safetensors"}},
                                  "99": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0],
                                                                                "filename_prefix": "latents/bad"}}})
    status, body = server.post("/prompt", {"prompt": g, "client_id": "mixquant-test"})
    assert status == 400, body
    errs = body["node_errors"].get("9", {}).get("errors")
    assert errs, body
    assert len(errs) == 1
    msg = errs[0]["details"] + " " + errs[0]["message"]
    assert "broken.safetensors" in msg and "corrupt" in msg, errs
    assert server.get("/object_info/KSampler")


@pytest.mark.skipif(not os.environ.get("MIXQUANT_SCREENSHOT"), reason="set MIXQUANT_SCREENSHOT=FILE.png to take it")
def test_screenshot_of_the_graph(server):
    """docs/comfyui_graph.png: the example workflow in ComfyUI's page (headless Debian Chromium), the Report node
    drawing the allocation from the ui output of the run above (test_example_workflow); also writes the UI-format
    workflow next to the screenshot (examples/comfyui_quantize.json was made this way)."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not shutil.which("chromium"):
        pytest.skip("no chromium (apt-get install chromium)")
    with open(os.path.join(REPO, "examples", "comfyui_quantize_api.json")) as f:
        api = json.load(f)
    report = next((out for h in server.get("/history").values() for out in h.get("outputs", {}).values()
                   if "mixquant_report" in out), None)
    png = os.environ["MIXQUANT_SCREENSHOT"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1900, "height": 1000})
            page.goto(server.url, timeout=120000)
            page.wait_for_function("!!(window.app && window.app.graph && typeof window.app.loadApiJson === 'function')",
                                   timeout=120000)
            page.wait_for_timeout(3000)
            page.evaluate("async (api) => { await window.app.loadApiJson(api, 'mixquant'); }", api)
            page.wait_for_timeout(1500)
            if report:
                page.evaluate("(out) => { const n = window.app.graph._nodes.find(n => n.type === 'MixQuantReport');"
                              " if (n) n.onExecuted(out); }", report)
            page.evaluate("() => { window.app.graph.arrange(60); window.app.canvas.ds.scale = 0.72;"
                          " window.app.canvas.ds.offset = [20, 20]; window.app.graph.setDirtyCanvas(true, true); }")
            page.wait_for_timeout(1500)
            workflow = page.evaluate("() => window.app.graph.serialize()")
            page.screenshot(path=png)
        finally:
            browser.close()
    with open(os.path.splitext(png)[0] + "_workflow.json", "w") as f:
        json.dump(workflow, f, indent=1)
    assert os.path.getsize(png) > 10000 and report is not None
    assert {n["type"] for n in workflow["nodes"]} >= {"MixQuantCalibrate", "MixQuantPlan", "MixQuantQuantizeModel",
                                                     "MixQuantReport", "KSampler", "CheckpointLoaderSimple"}


# --- MixQuant Load Quantized Model (file only) --------------------------------------------------------------------------

def _write_clip(server) -> str:
    """The checkpoint's CLIP-L as a text-encoder file for the stock CLIPLoader, so the file-only graph has no
    checkpoint loader at all. It goes into the ComfyUI checkout's models/text_encoders (the server's model paths are
    fixed at start) under a unique name; the caller removes it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefix = "cond_stage_model.transformer."
    with safe_open(os.path.join(server.base, "checkpoints", CKPT), "pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    # CLIP-L's own layout (as stock clip_l files): text_model.* (a newer transformers saves it without the prefix,
    # which ComfyUI's checkpoint loader adds for SD1.x)
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    folder = os.path.join(COMFYUI, "models", "text_encoders")
    os.makedirs(folder, exist_ok=True)
    name = f"mq_test_clip_{os.getpid()}_{server.port}.safetensors"
    save_file(sd, os.path.join(folder, name))
    return name


def _fileonly_graph(model_nodes: dict, model_ref, clip_name: str, lora: bool = False) -> dict:
    g = {
        "41": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": "stable_diffusion"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red car", "clip": ["41", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["41", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["42", 0] if lora else model_ref, "seed": 11, "steps": 3,
              "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
              "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
    }
    if lora:
        g["42"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model_ref, "lora_name": LORA,
                                                                   "strength_model": 1.0}}
    g.update(model_nodes)
    return g


def test_file_only_loader_samples_the_same_image(server):
    """A file written by Save Quantized loads with MixQuant Load Quantized Model (file only), in a graph without any
    checkpoint loader, and samples exactly what the quantized MODEL it was saved from samples (also under a stock
    LoRA loader)."""
    import torch

    assert "MixQuantLoadQuantizedFileOnly" in server.get("/object_info/MixQuantLoadQuantizedFileOnly")
    clip = _write_clip(server)
    try:
        quant = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "35": {"class_type": "MixQuantCalibrate", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                   "prompts": "a red car", "negative": "", "steps": 3, "cfg": 5.0, "sampler_name": "euler",
                   "scheduler": "normal", "width": 64, "height": 64, "seed": 0, "timestep_groups": 2}},
            "36": {"class_type": "MixQuantPlan", "inputs": {"calibration": ["35", 0], "budget_kind":
                   "average weight bits", "budget": 5.0, "activation_bits": "8", "target": "mixquant",
                   "sensitivity": "local"}},
            "37": {"class_type": "MixQuantQuantizeModel", "inputs": {"model": ["1", 0], "plan": ["36", 0]}},
            "38": {"class_type": "MixQuantSaveQuantized", "inputs": {"model": ["37", 0], "filename": "mq_fileonly"}},
        }
        q = _latent_after(server, _fileonly_graph(quant, ["37", 0], clip), "fo_q_")
        q_lora = _latent_after(server, _fileonly_graph(quant, ["37", 0], clip, lora=True), "fo_qlora_")
        files = sorted(f for f in os.listdir(os.path.join(server.base, "mixquant")) if f.startswith("mq_fileonly"))
        assert files, os.listdir(os.path.join(server.base, "mixquant"))
        loader = {"40": {"class_type": "MixQuantLoadQuantizedFileOnly", "inputs": {"quantized_file": files[-1]}}}
        graph = _fileonly_graph(loader, ["40", 0], clip)
        assert not any("Checkpoint" in n["class_type"] or n["class_type"] in ("UNETLoader", "MixQuantLoadQuantized")
                       for n in graph.values())
        f = _latent_after(server, graph, "fo_file_")
        f_lora = _latent_after(server, _fileonly_graph(loader, ["40", 0], clip, lora=True), "fo_filelora_")
        assert bool(torch.isfinite(q).all()) and q.abs().max() > 0
        assert torch.equal(f, q), float((f - q).abs().max())
        assert torch.equal(f_lora, q_lora), float((f_lora - q_lora).abs().max())
        assert not torch.equal(q_lora, q)  # the LoRA did something
        # a damaged file: one clear message at validation, nothing run
        with open(os.path.join(server.base, "mixquant", files[-1]), "rb") as src:
            data = bytearray(src.read())
        data[len(data) // 2] ^= 0xFF  # one byte of tensor data: the digest catches it at load
        with open(os.path.join(server.base, "mixquant", "mq_damaged.safetensors"), "wb") as dst:
            dst.write(data)
        bad = _fileonly_graph({"40": {"class_type": "MixQuantLoadQuantizedFileOnly",
                                      "inputs": {"quantized_file": "mq_damaged.safetensors"}}}, ["40", 0], clip)
        bad["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "latents/bad"}}
        h = server.wait(server.submit(bad))
        assert h["status"]["status_str"] == "error", h["status"]
        err = next(m[1] for m in h["status"]["messages"] if m[0] == "execution_error")
        assert "mq_damaged.safetensors" in err["exception_message"] and "digest" in err["exception_message"], err
        assert "\n" not in err["exception_message"].strip()
    finally:
        os.remove(os.path.join(COMFYUI, "models", "text_encoders", clip))
