"""The Gradio demo (`mixquant demo`) driven through its API with gradio_client, against the app served in-process on
a free 127.0.0.1 port: calibrate -> preview a budget -> quantize -> compare returns images and numbers -> save.
Errors reach the caller as gr.Error messages. Small settings (2 prompts, 2 steps, the default fast sensitivity) keep it short.
MIXQUANT_DEMO_TEST_MODEL overrides the model (default: the embedded `digits`)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import json  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from mixquant.app.gradio_app import SENS_MODES  # noqa: E402

PROMPTS = ["a handwritten digit three", "the number seven"]
MODEL = os.environ.get("MIXQUANT_DEMO_TEST_MODEL", "digits")


def _model_or_skip():
    from mixquant.app.diffusers_host.models import resolve_model
    from mixquant.quant.errors import MixQuantError

    try:
        resolve_model(MODEL)
    except MixQuantError as e:
        pytest.skip(f"demo model not available: {e}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _model_or_skip()
    from mixquant.app.cli.demo import launch, offline_env
    from mixquant.app.gradio_app import DemoBackend, build_app

    offline_env()
    root = tmp_path_factory.mktemp("demo")
    be = DemoBackend(MODEL, out_dir=str(root / "out"), cache_dir=str(root / "cache"), device="cpu")
    app = build_app(be, prompts=PROMPTS, steps=2, sens_mode="fast")
    url = launch(app, "127.0.0.1", 0, block=False, quiet=True)
    try:
        yield app, be, url
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[2], verbose=False, download_files=True)


def _settings(prompts=PROMPTS, steps=2):
    # model, prompts, steps, guidance, scheduler, seed, negative prompt, activation bits, sensitivity mode
    return [MODEL, "\n".join(prompts), steps, 4.0, "dpm", 0, "", 8, SENS_MODES["fast"]]


def BITS(bits, mb=1.0):
    # budget unit, average-bits slider, MB slider
    return ["average weight bits", bits, mb]


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_served_on_loopback_only_with_one_job_queue(served):
    app, _, url = served
    assert url.startswith("http://127.0.0.1:")
    heavy = {f.name: f for f in app.fns.values() if f.name in ("calibrate", "quantize", "save", "load_model")}
    assert set(heavy) == {"calibrate", "quantize", "save", "load_model"}
    assert {f.concurrency_id for f in heavy.values()} == {"mixquant-job"}
    assert all(f.concurrency_limit == 1 for f in heavy.values())


def test_calibrate_quantize_compare_save(served, client):
    _, be, _ = served
    t0 = time.time()
    # 2. calibrate: ranges + sensitivity, then the predicted curve
    calib_md, pred_md, curve = client.predict(*_settings(), *BITS(4.0), api_name="/calibrate")
    assert "Calibrated" in calib_md
    assert "Predicted" in pred_md and "MB" in pred_md
    assert _is_png(curve)
    # 3. the budget slider: exact prediction at another budget, in MB too
    pred_md, curve = client.predict(*_settings(), "MB (whole denoiser)", 4.0, 1.0, api_name="/preview_budget")
    assert "Predicted size:** 0.9" in pred_md or "Predicted size:** 1.0" in pred_md, pred_md
    assert _is_png(curve)
    # 4. quantize + compare (sensitivity comes from the cache written by calibrate)
    head, gal_fp, gal_q, numbers_md, bits, numbers, curve, name = client.predict(
        *_settings(), *BITS(4.0), api_name="/quantize")
    assert "W4.0" in head and "seed (0)" in head
    assert len(gal_fp) == len(gal_q) == len(PROMPTS)
    for a, b in zip(gal_fp, gal_q):
        assert _is_png(a["image"]) and _is_png(b["image"])
    assert [a["caption"] for a in gal_fp] == [b["caption"] for b in gal_q] == PROMPTS  # same prompts, same seed
    from PIL import Image

    assert Image.open(gal_fp[0]["image"]).size[0] >= 128  # 16 px digits shown upscaled
    assert _is_png(bits) and _is_png(curve)
    q = numbers["quality"]
    for k in ("sqnr_db", "psnr_db", "ssim"):
        assert isinstance(q[k], float), (k, q)
    assert 0 < q["ssim"] <= 1 and q["sqnr_db"] > 0
    assert numbers["bytes_quantized"] < numbers["bytes_fp16"] and numbers["size_ratio"] < 0.5
    assert numbers["memory_quantized_bytes"] < numbers["memory_fp_bytes"]
    t = numbers["time_s"]
    assert t["fp_sampling"] > 0 and t["quantized_sampling"] > 0 and t["fp_denoiser"] > 0
    assert abs(numbers["avg_w_bits"] - 4.0) < 0.05
    # the app's calibration step measured exactly what quantize_pipeline looks up
    assert numbers["sensitivity_cached"] is True
    assert "Quality vs FP" in numbers_md and "| ratio |" in numbers_md
    assert name.endswith(".safetensors")
    # 5. save: atomic file + report under the output folder, offered for download
    files, save_md = client.predict(name, api_name="/save")
    assert "Wrote" in save_md
    path = os.path.join(be.out_dir, name)
    assert os.path.isfile(path) and os.path.isfile(path.replace(".safetensors", ".report.json"))
    assert [os.path.basename(f) for f in files] == [name, name.replace(".safetensors", ".report.json")]
    from mixquant.app.diffusers_host.files import load_denoiser

    pipe, _ = be.pipeline(MODEL)
    qunet = load_denoiser(path, base=pipe.unet)  # fingerprint checked against the FP model
    assert sum(1 for _ in qunet.modules()) > 10
    report = json.load(open(path.replace(".safetensors", ".report.json")))
    assert report["file"]["bytes_on_disk"] == os.path.getsize(path)
    assert time.time() - t0 < 90


def test_errors_reach_the_user(served, client, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="plain file name"):
        client.predict("../escape.safetensors", api_name="/save")
    with pytest.raises(AppError, match="prompt list is empty"):
        client.predict(*_settings(prompts=[" ", "# comment"]), *BITS(4.0), api_name="/calibrate")
    with pytest.raises(AppError, match="less than minimum"):  # the slider's bounds are the feasible budgets
        client.predict(*_settings(), *BITS(1.0), api_name="/quantize")
    with pytest.raises(AppError, match="not found"):
        client.predict(str(tmp_path / "nope"), "a", "average weight bits", api_name="/load_model")
    from safetensors.torch import save_file
    import torch

    ckpt = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(ckpt))
    with pytest.raises(AppError, match="no text encoder"):  # a UNet-only file: one clear message
        client.predict(str(ckpt), "a", "average weight bits", api_name="/load_model")
    # the app still works after errors
    md, _ = client.predict(*_settings(), *BITS(5.0), api_name="/preview_budget")
    assert "size" in md


def test_stop_interrupts_a_running_job(served, client):
    from gradio_client.exceptions import AppError
    from gradio_client.utils import Status

    # full sensitivity at other settings: long enough to be stopped in the middle
    settings = _settings(steps=3)
    settings[-1] = SENS_MODES["full"]
    job = client.submit(*settings, *BITS(4.0), api_name="/calibrate")
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the job reports progress (the stop flag is reset when a job starts)
        st = job.status()
        if st.code == Status.PROGRESS and st.progress_data and "sensitivity" in (st.progress_data[0].desc or ""):
            break
        time.sleep(0.2)
    client.predict(api_name="/stop")
    with pytest.raises(AppError, match="interrupted"):
        job.result(timeout=60)


def test_cli_arguments():
    from mixquant.app.cli import build_parser
    from mixquant.app.cli.demo import free_port

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, "digits")
    args = build_parser().parse_args(["demo", "--host", "127.0.0.1", "--port", "0", "--out-dir", "x"])
    assert args.port == 0 and args.out_dir == "x"
    assert 0 < free_port() < 65536


def test_model_info_names_the_size_the_pipeline_samples_at():
    """The demo's model line gives the size sampling runs at: the pipeline's own default (a Flux transformer's config
    has no sample_size: the pipeline's default_sample_size, 1024² for Flux.1, not a guess of 64 latents), digits'
    small images as before."""
    from mixquant.app.diffusers_host.models import load_pipeline
    from mixquant.app.diffusers_host.random_models import random_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings
    from mixquant.app.gradio_app import DemoBackend

    flux = random_pipeline("flux", "small", seed=0)
    assert "sample_size" not in flux.transformer.config
    info = DemoBackend._model_info(flux, "flux", "")
    side = flux.default_sample_size * flux.vae_scale_factor
    assert info.image_size == PipelineRunner(flux, SamplerSettings(steps=1))._size() == (side, side)
    assert side != 64 * flux.vae_scale_factor  # (what the config-only guess gave)
    digits = load_pipeline("digits", device="cpu")
    info = DemoBackend._model_info(digits, "digits", "digits")
    assert info.image_size == PipelineRunner(digits, SamplerSettings(steps=1))._size() and info.image_size[0] <= 32
