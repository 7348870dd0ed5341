import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch

from mixquant.app.diffusers_host.api import pipeline_with_denoiser
from mixquant.app.diffusers_host.harness import compare_pipelines, save_grid
from mixquant.app.diffusers_host.models import load_pipeline
from mixquant.bench.quality import damaged_unet, default_prompts, markdown_table


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The digits model is tiny: one thread is about as fast as two, and is not slowed down many times over when
    other jobs share the CPU. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

PROMPTS = ["the handwritten number two", "digit 5, bold", "a picture of the number seven", "please draw the number 9"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def fp():
    return load_pipeline("digits")


class Spy(torch.nn.Module):
    """A black-box denoiser: delegates to a unet, records the inputs it was given."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def forward(self, sample, timestep, *args, **kwargs):
        self.seen.append((sample.clone(), timestep.clone() if torch.is_tensor(timestep) else timestep))
        return self.inner(sample, timestep, *args, **kwargs)


def test_identical_pipelines_score_perfect(fp):
    r = compare_pipelines(fp, fp, PROMPTS, SEEDS, steps=4, guidance=4.0, scheduler="dpm")
    assert r["sqnr_db"] == math.inf and r["psnr_db"] == math.inf
    assert r["ssim"] == pytest.approx(1.0) and r["ssim_large_window"] == pytest.approx(1.0)
    assert r["n_images"] == 8 and len(r["sqnr_db_per_step"]) == 4
    assert r["content_accuracy_fp"] == r["content_accuracy"] >= 0.75  # the digits classifier is used automatically
    assert r["content_confidence_fp"] == r["content_confidence"] > 0.5


def test_black_box_unet_gets_the_fp_trajectory(fp):
    spy = Spy(fp.unet)
    q = pipeline_with_denoiser(fp, spy)
    rec = []
    h = fp.unet.register_forward_hook(lambda m, a, kw, o: rec.append(a[0].clone()), with_kwargs=True)
    try:
        r = compare_pipelines(fp, q, PROMPTS[:2], [3], steps=4, guidance=4.0, scheduler="ddim")
    finally:
        h.remove()
    assert r["sqnr_db"] == math.inf and r["ssim"] == pytest.approx(1.0)
    # FP run (4 calls) + teacher-forced replay (4 calls through the spy) + the spy's own end-to-end run (4 calls)
    assert len(spy.seen) == 8
    fp_inputs = rec[:4]
    for (x, _), x_fp in zip(spy.seen[:4], fp_inputs):
        assert torch.equal(x, x_fp)
    assert r["sqnr_db_per_step"] == [math.inf] * 4


def test_damage_scores_worse_and_monotonic(fp):
    mild = pipeline_with_denoiser(fp, damaged_unet(fp.unet, "noise", 0.02))
    hard = pipeline_with_denoiser(fp, damaged_unet(fp.unet, "noise", 0.6))  # destroys content
    rm = compare_pipelines(fp, mild, PROMPTS, SEEDS, steps=4, scheduler="dpm")
    rh = compare_pipelines(fp, hard, PROMPTS, SEEDS, steps=4, scheduler="dpm")
    assert math.isfinite(rm["sqnr_db"]) and rm["sqnr_db"] > rh["sqnr_db"]
    assert rm["psnr_db"] > rh["psnr_db"] and rm["ssim"] > rh["ssim"]
    assert rm["ssim"] < 1.0 and rm["psnr_db"] < math.inf
    assert rh["content_accuracy"] <= 0.5 < rh["content_accuracy_fp"]
    # per-image hits (prompt x seed order) agree with the accuracies and pair the two runs image by image
    from mixquant.app.digits import paired_content

    assert len(rh["content_hits"]) == len(rh["content_hits_fp"]) == len(PROMPTS) * len(SEEDS)
    assert sum(rh["content_hits"]) / len(rh["content_hits"]) == rh["content_accuracy"]
    pc = paired_content(rh["content_hits_fp"], rh["content_hits"])
    assert pc["only_a"] - pc["only_b"] == round((rh["content_accuracy_fp"] - rh["content_accuracy"]) * pc["images"])
    # the classifier's confidence in the prompted digit falls with the damage: finer than accuracy
    assert rh["content_confidence"] < rm["content_confidence"] <= rm["content_confidence_fp"] + 0.02
    # fp16 rounding is nearly harmless: far above the mild noise
    f16 = compare_pipelines(fp, pipeline_with_denoiser(fp, damaged_unet(fp.unet, "fp16")), PROMPTS, SEEDS, steps=4)
    assert f16["sqnr_db"] > rm["sqnr_db"] + 10


def test_teacher_forcing_isolates_the_denoiser(fp):
    """A denoiser whose output is off by exactly 1% everywhere must score exactly 40 dB, whatever the sampler
    makes of it downstream (no compounding along the trajectory)."""

    class Scaled(Spy):
        def forward(self, sample, timestep, *args, **kwargs):
            out = self.inner(sample, timestep, *args, **kwargs)
            return (out[0] * 1.01,) if isinstance(out, tuple) else out * 1.01

    r = compare_pipelines(fp, pipeline_with_denoiser(fp, Scaled(fp.unet)), PROMPTS, SEEDS, steps=4)
    assert r["sqnr_db"] == pytest.approx(40.0, abs=1e-3)


def test_save_grid(tmp_path):
    from PIL import Image

    a = torch.rand(12, 3, 16, 16)
    path = save_grid(a, a * 0.5, str(tmp_path / "g.png"), columns=5, tile=64, gap=2)
    img = Image.open(path)
    # 3 pairs of rows of 64 px tiles; 5 columns
    assert img.size == (5 * 64 + 4 * 2, 3 * (2 * 64 + 2) + 2 * 6)
    px = torch.tensor(list(img.convert("RGB").getdata()), dtype=torch.float32).view(img.size[1], img.size[0], 3)
    assert torch.allclose(px[0, 0] / 255, a[0, :, 0, 0], atol=1 / 255)
    assert torch.allclose(px[66, 0] / 255, a[0, :, 0, 0] * 0.5, atol=1 / 255)


def test_bench_helpers():
    p = default_prompts()
    assert len(p) == 20 and len(set(p)) == 20
    t = markdown_table([{"variant": "x", "sqnr_db": math.inf, "psnr_db": 31.25, "ssim": 0.99}])
    assert "| x | inf | 31.2 | 0.990 |" in t
