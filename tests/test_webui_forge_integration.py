"""MixQuant inside a real Stable Diffusion WebUI Forge (skipped unless FORGE_PATH points at a Forge checkout).

Forge is started headless on CPU (--api --nowebui --always-cpu; Forge still builds its UI, so the MixQuant tab and the
script's controls are built by its gradio 4) on 127.0.0.1 with a free port and a data folder of the test's own
(--data-dir: models, extensions, caches), where this repository is the extension (a symlink under another name).
Everything goes over HTTP: the tab's calibrate -> plan -> quantize (/mixquant/v1/...), txt2img with the MixQuant
script on (image close to FP, infotext naming the file), a LoRA on the quantized UNet (it changes the image as on FP),
a damaged file (one message, an FP image), and FP images unchanged after all of it.

FORGE_PYTHON: the interpreter of Forge's environment. Without it the test setup makes one from the package registry
in FORGE_PATH/venv-mixquant (torch 2.14.1 + torchvision 0.29.1, Forge's requirements_versions.txt with setuptools
relaxed for that torch, joblib; a few minutes, once). Forge's launcher would git-clone huggingface_guess: put its
snapshot in FORGE_PATH/repositories/huggingface_guess first (see the README). MIXQUANT_RESULTS: a folder to write the
measured PSNRs to (bench/results/webui_forge.json)."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORGE = os.environ.get("FORGE_PATH")
pytestmark = pytest.mark.skipif(not FORGE or not os.path.isfile(os.path.join(FORGE or "", "launch.py")),
                                reason="set FORGE_PATH to a WebUI Forge checkout to run the Forge integration tests")

_spec = importlib.util.spec_from_file_location("mq_comfy_it",
                                               os.path.join(REPO, "tests", "test_comfyui_integration.py"))
_comfy_it = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_comfy_it)  # the reduced SD1.5 checkpoint, its LoRA and the HTTP helpers

START_TIMEOUT = 300
JOB_TIMEOUT = 900
CKPT, LORA = "mq_tiny_sd15.safetensors", "mq_tiny_lora.safetensors"
GEN = {"prompt": "a red car", "negative_prompt": "", "steps": 8, "width": 64, "height": 64, "cfg_scale": 5,
       "sampler_name": "Euler", "scheduler": "Automatic", "seed": 7, "batch_size": 1}


def forge_python() -> str:
    py = os.environ.get("FORGE_PYTHON")
    if py:
        return py
    venv = os.path.join(FORGE, "venv-mixquant")
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(py):
        return py
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["torch==2.14.1", "torchvision==0.29.1"], check=True, timeout=1800)
    reqs = os.path.join(venv, "forge-requirements.txt")
    with open(os.path.join(FORGE, "requirements_versions.txt")) as f, open(reqs, "w") as out:
        for line in f:
            if re.match(r"^torch\s*$", line):
                continue  # kept as installed
            if line.startswith("setuptools=="):  # torch 2.14 needs >= 77; Forge imports pkg_resources (< 81)
                line = "setuptools>=77.0.3,<81\n"
            out.write(line)
    pins = os.path.join(venv, "torch-pins.txt")
    with open(pins, "w") as f:
        f.write("torch==2.14.1\ntorchvision==0.29.1\n")
    subprocess.run(pip + ["-r", reqs, "-c", pins, "joblib"], check=True, timeout=1800)
    return py


class Forge(_comfy_it.Server):
    def txt2img(self, **kw) -> tuple:
        status, body = self.post("/sdapi/v1/txt2img", {**GEN, **kw}, timeout=JOB_TIMEOUT)
        assert status == 200, f"{status}: {body}\n{self.tail()}"
        info = json.loads(body["info"])
        return _image(body["images"][0]), info

    def quant(self, choice="Automatic", **kw) -> tuple:
        return self.txt2img(alwayson_scripts={"MixQuant": {"args": [True, choice]}}, **kw)


def _image(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float64)


def psnr(a, b) -> float:
    import numpy as np

    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    if not os.path.isdir(os.path.join(FORGE, "repositories", "huggingface_guess")):
        pytest.skip("Forge needs repositories/huggingface_guess (its launcher clones it from GitHub): put a snapshot "
                    "of lllyasviel/huggingface_guess there")
    py = forge_python()
    data = str(tmp_path_factory.mktemp("forge"))
    for d in ("models/Stable-diffusion", "models/Lora", "models/mixquant", "extensions", "outputs"):
        os.makedirs(os.path.join(data, d))
    _comfy_it.write_tiny_sd15(os.path.join(data, "models", "Stable-diffusion", CKPT))
    _comfy_it.write_lora(os.path.join(data, "models", "Lora", LORA))
    ext = os.path.join(data, "extensions", "sd-webui-mixquant-under-test")  # any folder name works
    os.symlink(REPO, ext)
    # what WebUI runs for an extension at start (--skip-install skips it there): requirements, never torch
    torch_before = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                  text=True, timeout=300).stdout
    for _ in range(2):
        r = subprocess.run([py, os.path.join(ext, "install.py")], capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout + r.stderr
    chk = subprocess.run([py, "-c", "import sys, runpy; m = runpy.run_path(sys.argv[1]); "
                          "print(m['missing'](m['requirements'](sys.argv[2])))", os.path.join(ext, "install.py"),
                          os.path.join(ext, "requirements.txt")], capture_output=True, text=True, timeout=300)
    assert chk.stdout.strip() == "[]", chk.stdout + chk.stderr
    torch_after = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                 text=True, timeout=300).stdout
    assert torch_after == torch_before

    port = _comfy_it._free_port()
    log = os.path.join(data, "forge.log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "MIXQUANT_CACHE": os.path.join(data, "cache"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log, "w") as out:
        proc = subprocess.Popen([py, "launch.py", "--skip-prepare-environment", "--skip-install",
                                 "--skip-torch-cuda-test", "--skip-version-check", "--always-cpu", "--api",
                                 "--nowebui", "--server-name", "127.0.0.1", "--port", str(port), "--data-dir", data],
                                cwd=FORGE, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    with _comfy_it.serving(Forge(data, port, proc, log), "/sdapi/v1/sd-models", "Forge", START_TIMEOUT) as srv:
        yield srv


def _log_since(srv, mark: int) -> str:
    with open(srv.log, errors="replace") as f:
        return f.read()[mark:]


def _log_size(srv) -> int:
    with open(srv.log, errors="replace") as f:
        return len(f.read())


def test_forge_quantizes_through_the_tab_api_and_generates_with_the_script(forge):
    scripts = forge.get("/sdapi/v1/scripts")
    assert "mixquant" in scripts["txt2img"] and "mixquant" in scripts["img2img"], scripts
    fp, _ = forge.txt2img()
    assert fp.shape == (64, 64, 3)

    # the tab's steps over its HTTP routes
    status, body = forge.post("/mixquant/v1/plan", {"budget": 8}, timeout=60)
    assert status == 400 and "calibrate first" in body["error"]
    status, body = forge.post("/mixquant/v1/calibrate", {"prompts": ["a red car", "a blue house"], "steps": 8,
                                                         "width": 64, "height": 64, "cfg_scale": 5,
                                                         "sampler_name": "Euler"}, timeout=JOB_TIMEOUT)
    assert status == 200, f"{body}\n{forge.tail()}"
    assert body["prompts"] == 2 and body["denoiser_calls"] >= 16 and body["checkpoint"]["sha256"]
    results = {}
    # 8 bits, and the lowest average this reduced UNet allows with room to choose (its protected layers, kept
    # 16-bit, are a large share of it: 4.03 bits is the floor)
    for bits in (8, 4.5):
        status, plan = forge.post("/mixquant/v1/plan", {"budget_kind": "bits", "budget": bits,
                                                        "activation_bits": 8}, timeout=JOB_TIMEOUT)
        assert status == 200, f"{plan}\n{forge.tail()}"
        assert plan["summary"]["avg_w_bits"] <= bits + 1e-6 and plan["layers"] and plan["curve"]
        status, saved = forge.post("/mixquant/v1/quantize", {"label": f"w{bits}"}, timeout=JOB_TIMEOUT)
        assert status == 200, f"{saved}\n{forge.tail()}"
        path = os.path.join(forge.base, "models", "mixquant", saved["file"])
        assert os.path.isfile(path) and saved["file"].startswith("mq_tiny_sd15-") and f"-w{bits}" in saved["file"]
        files = forge.get("/mixquant/v1/files")
        assert files[0]["file"] == saved["file"]  # newest first, keyed by this checkpoint's hash
        q, info = forge.quant()  # Automatic: the newest file of this checkpoint
        assert "MixQuant" in info["extra_generation_params"], info
        assert info["extra_generation_params"]["MixQuant"].startswith(saved["file"])
        assert f'MixQuant: "{saved["file"]} (' in info["infotexts"][0]  # (quoted: the text has a comma)
        results[f"w{bits}"] = {"file": saved["file"], "avg_w_bits": plan["summary"]["avg_w_bits"],
                               "bytes_quantized": saved["bytes_quantized"], "bytes_fp16": saved["bytes_fp16"],
                               "psnr_vs_fp_db": psnr(fp, q)}
        assert (q != fp).any()
    assert results["w8"]["psnr_vs_fp_db"] > 30, results
    assert results["w4.5"]["psnr_vs_fp_db"] > 20, results

    # batches, hires fix and img2img get the quantized UNet too (every sampling pass starts from fresh objects)
    imgs_b, info = forge.quant(n_iter=2)
    assert all("MixQuant: " in t for t in info["infotexts"]) and len(info["infotexts"]) == 2
    hr, info = forge.quant(enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.5,
                           hr_second_pass_steps=4, hr_additional_modules=["Use same choices"])  # (Forge's API needs it)
    assert hr.shape == (128, 128, 3) and info["extra_generation_params"]["MixQuant"].startswith(results["w4.5"]["file"])
    buf = io.BytesIO()
    from PIL import Image
    Image.fromarray(fp.astype("uint8")).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    status, body = forge.post("/sdapi/v1/img2img", {**GEN, "init_images": [init], "denoising_strength": 0.6,
                                                    "alwayson_scripts": {"MixQuant": {"args": [True, "Automatic"]}}},
                              timeout=JOB_TIMEOUT)
    assert status == 200, body
    assert json.loads(body["info"])["extra_generation_params"]["MixQuant"].startswith(results["w4.5"]["file"])

    # a LoRA acts on the quantized UNet as on the FP one
    lora = {"prompt": f"a red car <lora:{LORA[:-12]}:1>"}
    fpl, _ = forge.txt2img(**lora)
    ql, info = forge.quant(**lora)
    q, _ = forge.quant()
    assert info["extra_generation_params"]["MixQuant"].startswith(results["w4.5"]["file"])
    change_fp, change_q = float(abs(fpl - fp).mean()), float(abs(ql - q).mean())
    assert change_fp > 2 and 0.7 < change_q / change_fp < 1.4, (change_fp, change_q)
    results["lora"] = {"mean_abs_change_fp": change_fp, "mean_abs_change_quantized": change_q,
                       "psnr_quantized_lora_vs_fp_lora_db": psnr(fpl, ql)}
    assert psnr(fpl, ql) > psnr(fpl, q) + 3  # closer to FP+LoRA than the quantized image without it

    # a damaged file: one clear message, an FP image
    good = os.path.join(forge.base, "models", "mixquant", results["w4.5"]["file"])
    data = bytearray(open(good, "rb").read())
    data[len(data) // 2: len(data) // 2 + 256] = b"\xff" * 256
    with open(os.path.join(forge.base, "models", "mixquant", "damaged.safetensors"), "wb") as f:
        f.write(bytes(data))
    mark = _log_size(forge)
    img, info = forge.quant("damaged.safetensors")
    text = info["extra_generation_params"]["MixQuant"]
    assert text.startswith("failed: ") and "damaged.safetensors" in text and text.endswith("Full precision used.")
    assert psnr(img, fp) == float("inf")
    log = _log_since(forge, mark)
    assert log.count("[MixQuant] failed:") == 1 and "Traceback" not in log, log[-3000:]
    # and the checkpoint's own UNet is untouched by all of it
    again, info = forge.txt2img()
    assert psnr(again, fp) == float("inf") and "MixQuant" not in info["extra_generation_params"]
    lora_again, _ = forge.txt2img(**lora)
    assert psnr(lora_again, fpl) == float("inf")
    # no traceback of ours in the whole log (Forge prints one of its own at start for an extension folder that is a
    # git checkout without an 'origin' remote, as this repository's clone may be)
    ours = [b for b in re.split(r"\n(?=\S)", forge.tail(10 ** 8))
            if "Traceback" in b and ("mixquant-under-test/" in b or REPO + "/" in b)]  # a frame in our code
    assert not ours, ours[0][-3000:]

    out = os.environ.get("MIXQUANT_RESULTS")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "webui_forge.json"), "w") as f:
            json.dump({"generation": GEN, "results": results}, f, indent=1)


def test_interrupt_stops_calibration_and_leaves_the_model_as_it_was(forge):
    import threading

    fp, _ = forge.txt2img()
    res = {}
    body = {"prompts": [f"a red car number {i}" for i in range(40)], "steps": 8, "width": 64, "height": 64,
            "cfg_scale": 5, "sampler_name": "Euler"}
    job = threading.Thread(target=lambda: res.update(r=forge.post("/mixquant/v1/calibrate", body,
                                                                    timeout=JOB_TIMEOUT)))
    job.start()
    end = time.time() + 120
    while "calibrating" not in forge.get("/mixquant/v1/status")["status"] and time.time() < end:
        time.sleep(0.2)
    # a txt2img sent meanwhile waits for the calibration (the queue lock), then runs
    gen = threading.Thread(target=lambda: res.update(img=forge.txt2img(), img_done=time.time()))
    gen.start()
    time.sleep(2)
    assert gen.is_alive()
    status, _ = forge.post("/sdapi/v1/interrupt", {})
    assert status == 200
    job.join(timeout=JOB_TIMEOUT)
    calib_done = time.time()
    gen.join(timeout=JOB_TIMEOUT)
    assert res["img_done"] >= calib_done - 0.5 and psnr(res["img"][0], fp) == float("inf")
    status, out = res["r"]
    assert status == 400 and "interrupted" in out["error"], out
    assert forge.get("/mixquant/v1/status")["status"] == "calibrate: interrupted"
    again, info = forge.txt2img()  # the next generation runs, in full precision, as before
    assert psnr(again, fp) == float("inf") and "MixQuant" not in info["extra_generation_params"]
