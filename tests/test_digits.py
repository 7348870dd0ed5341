import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import random

import pytest
import torch

from mixquant.app import digits as D
from mixquant.app.diffusers_host.models import load_pipeline, set_scheduler
from mixquant.app.digits import DIGITS_DIR, digits_classifier, parse_digit
from mixquant.quant.errors import MixQuantError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The digits model is tiny: one thread is about as fast as two, and is not slowed down many times over when
    other jobs share the CPU. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("digits")


def heldout_batch(n_per_digit: int = 10):
    """10 images per digit; held-out phrasings cycled so every phrasing meets every digit."""
    items = []
    for d in range(10):
        for k in range(n_per_digit):
            items.append(D.phrase(D.HELDOUT_PHRASINGS[(d + k) % len(D.HELDOUT_PHRASINGS)], d))
    return items


def sample(pipe, prompts, seeds, steps, guidance=4.0):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    output_type="np").images


def test_folder_is_a_real_sd_layout():
    from diffusers import StableDiffusionPipeline

    with open(os.path.join(DIGITS_DIR, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]  # loads on transformers 4.x and 5.x
    with open(os.path.join(DIGITS_DIR, "tokenizer", "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
    files = [os.path.join(r, f) for r, _, fs in os.walk(DIGITS_DIR) for f in fs]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt", ".joblib"))]
    weights = [f for f in files if f.endswith(".safetensors")]
    assert len(weights) == 4  # unet, vae, text encoder, classifier
    assert 2e6 < sum(os.path.getsize(f) for f in files) < 12e6

    p = StableDiffusionPipeline.from_pretrained(DIGITS_DIR, local_files_only=True)  # plain diffusers, offline
    assert type(p.text_encoder).__name__ == "CLIPTextModel"
    assert type(p.vae).__name__ == "AutoencoderKL"
    assert "CrossAttnDownBlock2D" in p.unet.config.down_block_types
    ids = p.tokenizer("the number 7").input_ids
    assert ids[0] == p.tokenizer.bos_token_id and ids[-1] == p.tokenizer.eos_token_id


def test_tokenizer_unknown_words_map_to_unk(pipe):
    tok = pipe.tokenizer
    ids = tok("a glorious xylophone seven", padding="max_length", max_length=tok.model_max_length,
              truncation=True).input_ids
    assert ids[:5] == [tok.bos_token_id, tok.convert_tokens_to_ids("a"), tok.unk_token_id, tok.unk_token_id,
                       tok.convert_tokens_to_ids("seven")]
    long = tok("seven " * 100, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long) == tok.model_max_length and long[-1] == tok.eos_token_id


def test_deterministic_for_a_seed(pipe):
    set_scheduler(pipe, "dpm")
    a = sample(pipe, ["the number 4", "eight"], [5, 6], steps=4)
    b = sample(pipe, ["the number 4", "eight"], [5, 6], steps=4)
    c = sample(pipe, ["the number 4", "eight"], [7, 8], steps=4)
    assert a.shape == (2, 16, 16, 3)
    assert (a == b).all()
    assert not (a == c).all()


@pytest.mark.parametrize("steps", [4, 20])
def test_content_accuracy_heldout_phrasings(pipe, steps):
    set_scheduler(pipe, "dpm")
    prompts = heldout_batch()
    for p in prompts:
        assert D.is_heldout(p)
    images = sample(pipe, prompts, list(range(1000, 1000 + len(prompts))), steps=steps, guidance=4.0)
    acc = D.content_accuracy(images, prompts, digits_classifier())
    assert acc >= 0.9, f"{steps} steps: accuracy {acc:.2f} on held-out phrasings"


def test_text_matters(pipe):
    """The same noise with two different prompts must give two different digits."""
    set_scheduler(pipe, "dpm")
    seeds = list(range(20))
    a = digits_classifier().predict(sample(pipe, ["the number one"] * 20, seeds, steps=8))
    b = digits_classifier().predict(sample(pipe, ["the number zero"] * 20, seeds, steps=8))
    assert (a == 1).float().mean() >= 0.9 and (b == 0).float().mean() >= 0.9


def test_heldout_phrasings_never_trained(pipe):
    tok = pipe.tokenizer
    held = {tuple(tok(p).input_ids) for p, _ in D.heldout_prompts()}
    assert len(held) == len(D.HELDOUT_PHRASINGS) * 10
    rng = random.Random(0)
    for i in range(5000):
        p = D.sample_training_prompt(i % 10, rng)
        assert tuple(tok(p).input_ids) not in held
        assert parse_digit(p) == i % 10, p  # every training prompt names exactly its digit


def test_parse_digit():
    assert parse_digit("a handwritten digit three") == 3
    assert parse_digit("the number 7") == 7
    assert parse_digit("7, written in bold") == 7
    assert parse_digit("A picture of the number NINE!") == 9
    assert parse_digit("digit 0") == 0
    assert parse_digit("a cat") is None
    assert parse_digit("one or two") is None
    assert parse_digit("seven seven") == 7
    assert parse_digit("someone 17") is None  # no whole-word digit


def test_classifier_on_dataset():
    skd = pytest.importorskip("sklearn.datasets")
    import torch.nn.functional as F

    data = skd.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    pred = digits_classifier().predict(x)
    assert (pred == torch.tensor(data.target)).float().mean() >= 0.97


def test_load_errors(tmp_path, pipe):
    with pytest.raises(MixQuantError, match="not found"):
        load_pipeline("no/such/model")
    with pytest.raises(MixQuantError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"0")
    with pytest.raises(MixQuantError, match="safetensors"):
        load_pipeline(str(bad))
    with pytest.raises(MixQuantError, match="scheduler"):
        set_scheduler(pipe, "plms")


def test_cli_generate(tmp_path, capsys):
    from PIL import Image

    from mixquant.app.cli import main

    out = tmp_path / "three.png"
    assert main(["generate", "--model", "digits", "--prompt", "a handwritten digit three", "--steps", "8",
                 "--seed", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.size == (128, 128)
    assert int(digits_classifier().predict([img])[0]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["three.png"]  # no temp file left behind
    native = tmp_path / "n.png"
    assert main(["generate", "--prompt", "five", "--native-size", "--steps", "4", "--out", str(native)]) == 0
    assert Image.open(native).size == (16, 16)
    assert main(["generate", "--model", "nope", "--prompt", "x", "--out", str(tmp_path / "y.png")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()
