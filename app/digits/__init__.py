"""The embedded `digits` model: its prompt vocabulary, the training / held-out phrasings, the prompt -> digit
parser used for content accuracy, and the small digit classifier that judges generated images.

Torch only (no diffusers, no sklearn): this module is imported at run time by the harness, the CLI and the tests.
The training script (``app/digits/train.py``) imports the same definitions, so what is trained and what is
evaluated cannot drift apart.
"""
from __future__ import annotations

import json
import os
import random
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models",
                          "digits")
CLASSIFIER_DIR = os.path.join(DIGITS_DIR, "classifier")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_WORD_TO_DIGIT = {w: i for i, w in enumerate(DIGIT_WORDS)}
_WORD_TO_DIGIT.update({str(i): i for i in range(10)})

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MODEL_MAX_LENGTH = 24  # SD uses 77; prompts for a 16x16 digit are short. Longer prompts are truncated.

# ---------------------------------------------------------------------------------------------------------------
# Prompt grammar for training. A prompt is  prefix + 0..2 adjectives + noun + value + suffix,  e.g.
# "a picture of the bold digit 7, written in bold". {v} is the digit as a word ("seven") or a numeral ("7").
# Every word the tokenizer knows occurs in this grammar (the vocabulary is built from it), so no embedding is left
# untrained; any other word maps to the unknown token, which training also shows in random places (fillers).
# ---------------------------------------------------------------------------------------------------------------
PREFIXES = (
    "", "", "", "a", "the", "an", "an image of", "an image of a", "an image of the", "a picture of",
    "a picture of a", "a picture of the", "a photo of", "a photo of the", "a drawing of", "a drawing of the",
    "a sketch of", "a sketch of the", "this is", "this is a", "this is the", "draw", "draw a", "draw the",
    "write", "write the", "show", "show the", "generate", "generate a",
)
ADJECTIVES = (
    "handwritten", "bold", "thin", "thick", "small", "large", "big", "simple", "neat", "single", "white",
    "scribbled", "written", "hand drawn", "blurry", "clean", "clear", "centered", "pixelated", "low resolution",
    "grayscale", "black and white",
)
NOUNS = ("", "", "digit", "digit", "number", "number", "numeral", "figure", "character", "symbol")
SUFFIXES = (
    "", "", "", "", ", bold", ", written in bold", " written in bold", ", handwritten", " written by hand",
    " drawn by hand", " in bold", " in black and white", " on a black background", " with a pen", " in ink",
    " in handwriting", " in a bold style", ", in bold font", ".", "!", " digit", " please", ", 16x16 pixels",
    " in a handwritten style", ", high quality", ", sharp", ", centered",
)
# Words never in the vocabulary, inserted at random during training so that unknown words (-> UNK) are ignored.
FILLERS = ("qzx", "nice", "very", "cute", "art", "realistic")

# The phrasings of the original feasibility trial; the grammar generates all of them.
SEED_PHRASINGS = (
    "a handwritten digit {w}", "the number {d}", "{d}", "digit {w}, bold", "a picture of the digit {d}", "{w}",
    "handwritten {w}", "an image of the number {w}", "{d}, written in bold",
)

# Held out from training: no training prompt has the same token sequence as any of these (for any digit).
# Some contain words outside the vocabulary ("neatly", "lovely", "please draw" uses known words in a new order).
HELDOUT_PHRASINGS = (
    "the handwritten number {w}",
    "digit {d}, bold",
    "a picture of the number {w}",
    "an image of a handwritten {d}",
    "a drawing of the digit {w}, written in bold",
    "the numeral {d} written by hand",
    "a neatly drawn {w}",
    "please draw the number {d}",
    "a lovely handwritten {w}",
    "a photo of a digit {w}",
)


def phrase(template: str, digit: int) -> str:
    """Fill a phrasing template: {w} -> the digit as a word, {d} -> the numeral."""
    return template.format(w=DIGIT_WORDS[digit], d=str(digit))


_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")  # the same split as the tokenizers `Whitespace` pre-tokenizer


def words(prompt: str) -> list[str]:
    """Lower-cased word/punctuation tokens of a prompt, as the shipped tokenizer splits it."""
    return _TOKEN_RE.findall(prompt.lower())


def heldout_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) for every held-out phrasing and digit."""
    return [(phrase(t, d), d) for t in HELDOUT_PHRASINGS for d in range(10)]


_HELDOUT_KEYS: set | None = None


def _token_key(prompt: str) -> tuple:
    vocab = set(vocabulary())
    return tuple(w if w in vocab else UNK for w in words(prompt))


def is_heldout(prompt: str) -> bool:
    """True when `prompt` tokenizes (unknown words -> UNK) exactly as some held-out prompt does."""
    global _HELDOUT_KEYS
    if _HELDOUT_KEYS is None:
        _HELDOUT_KEYS = {_token_key(p) for p, _ in heldout_prompts()}
    return _token_key(prompt) in _HELDOUT_KEYS


def sample_training_prompt(digit: int, rng: random.Random, filler_p: float = 0.15) -> str:
    """One random training phrasing for `digit` from the grammar (never a held-out one)."""
    while True:
        v = DIGIT_WORDS[digit] if rng.random() < 0.5 else str(digit)
        if rng.random() < 0.2:
            p = phrase(rng.choice(SEED_PHRASINGS), digit)
        else:
            n_adj = rng.choices((0, 1, 2), weights=(0.45, 0.4, 0.15))[0]
            parts = [rng.choice(PREFIXES)] + rng.sample(ADJECTIVES, n_adj) + [rng.choice(NOUNS), v]
            p = " ".join(x for x in parts if x) + rng.choice(SUFFIXES)
        if rng.random() < filler_p:  # unknown words in random places
            toks = p.split(" ")
            toks.insert(rng.randrange(len(toks) + 1), rng.choice(FILLERS))
            p = " ".join(toks)
        if not is_heldout(p):
            return p


def vocabulary() -> list[str]:
    """The tokenizer's vocabulary: special tokens first (bos=0, eos=1, unk=2), then every grammar word, sorted."""
    seen: set[str] = set()
    for group in (PREFIXES, ADJECTIVES, NOUNS, SUFFIXES, DIGIT_WORDS, tuple(str(i) for i in range(10))):
        for s in group:
            seen.update(words(s.replace("{w}", "").replace("{d}", "")))
    for s in SEED_PHRASINGS:
        seen.update(words(s.replace("{w}", "").replace("{d}", "")))
    return [BOS, EOS, UNK] + sorted(seen)


def parse_digit(prompt: str) -> int | None:
    """The digit a prompt asks for: the numeral (0-9) or number word it contains; None when it names none, or
    names two different digits. Used to score content accuracy ("does the image show the prompted digit")."""
    found = {_WORD_TO_DIGIT[t] for t in words(prompt) if t in _WORD_TO_DIGIT}
    return found.pop() if len(found) == 1 else None


# ---------------------------------------------------------------------------------------------------------------
# Digit classifier (the judge): a tiny CNN on 16x16 grayscale images in [0, 1] (white digit on black).
# ---------------------------------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B,1,16,16] in [0,1] -> logits [B,10]."""
        x = F.max_pool2d(F.relu(self.conv1(x * 2 - 1)), 2)  # 8x8
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4
        return self.fc(x.flatten(1))

    @staticmethod
    def prepare(images) -> torch.Tensor:
        """Images as [B,C,H,W] / [B,H,W,C] (numpy or torch, values in [0,1]) or a list of PIL images ->
        [B,1,16,16] float in [0,1] (channel mean, area-resized to 16x16)."""
        if isinstance(images, (list, tuple)):
            import numpy as np

            images = torch.from_numpy(np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images]))
        x = torch.as_tensor(images).float()
        if x.ndim == 3:  # [B,H,W]
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # channels last
            x = x.permute(0, 3, 1, 2)
        x = x[:, :3].mean(1, keepdim=True)
        if x.shape[-2:] != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="area")
        return x.clamp(0, 1)

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        """Predicted digit per image (LongTensor [B])."""
        x = self.prepare(images).to(next(self.parameters()).device)
        return self(x).argmax(1).cpu()

    @torch.no_grad()
    def probabilities(self, images) -> torch.Tensor:
        """Softmax over the ten digits per image ([B, 10])."""
        x = self.prepare(images).to(next(self.parameters()).device)
        return self(x).float().softmax(1).cpu()


def save_classifier(model: DigitClassifier, folder: str, info: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"class": "DigitClassifier", "width": model.width, "input": "[B,1,16,16] in [0,1], white on black",
                   **(info or {})}, f, indent=2)


def load_classifier(folder: str = CLASSIFIER_DIR) -> DigitClassifier:
    from safetensors.torch import load_file

    from ...quant.errors import MixQuantError

    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise MixQuantError(f"digit classifier not found at {path}; reinstall mixquant or run "
                            "`python -m mixquant.app.digits.train` to rebuild models/digits")
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    model = DigitClassifier(width=int(cfg.get("width", 32)))
    model.load_state_dict(load_file(path))
    return model.eval()


_CLASSIFIER: DigitClassifier | None = None


def digits_classifier() -> DigitClassifier:
    """The shipped digit classifier (loaded once, eval mode, CPU)."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        _CLASSIFIER = load_classifier()
    return _CLASSIFIER


def content_hits(images, prompts: list[str], classifier: DigitClassifier | None = None) -> list[bool | None]:
    """Per image: whether the classifier reads the digit its prompt names (None for a prompt naming no single
    digit). Two models' hits on the same prompts and seeds pair up image by image (`paired_content`)."""
    targets = [parse_digit(p) for p in prompts]
    if all(t is None for t in targets):
        return [None] * len(targets)
    pred = (classifier or digits_classifier()).predict(images)
    return [None if t is None else int(pred[i]) == t for i, t in enumerate(targets)]


def hit_rate(hits) -> float:
    """The accuracy of per-image hits (None: no digit named, skipped; nan when none is left)."""
    scored = [h for h in hits if h is not None]
    return float(sum(scored) / len(scored)) if scored else float("nan")


def content_accuracy(images, prompts: list[str], classifier: DigitClassifier | None = None) -> float:
    """Fraction of images the classifier reads as the digit their prompt names (prompts naming no single digit are
    skipped; nan when none is left)."""
    return hit_rate(content_hits(images, prompts, classifier))


def paired_content(hits_a, hits_b) -> dict:
    """Compare two models on the same images (same prompts and seeds): how many images only A draws right, only B,
    and the exact two-sided binomial (McNemar) p-value of that split. Pairing removes the images both get right or
    both get wrong, which makes a difference of a few images out of thousands measurable where two accuracies'
    separate standard errors would not."""
    from scipy.stats import binomtest

    if len(hits_a) != len(hits_b):
        raise ValueError(f"paired comparison needs the same images ({len(hits_a)} vs {len(hits_b)})")
    pairs = [(a, b) for a, b in zip(hits_a, hits_b) if a is not None and b is not None]
    only_a = sum(1 for a, b in pairs if a and not b)
    only_b = sum(1 for a, b in pairs if b and not a)
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"images": len(pairs), "only_a": only_a, "only_b": only_b, "p_value": float(p)}


def content_confidence(images, prompts: list[str], classifier: DigitClassifier | None = None) -> float:
    """Mean probability the classifier gives the digit each prompt names: a finer reading of content than accuracy
    (which saturates at 1.0 when every digit is still drawn recognisably, as on this model even at 0.25x bytes)."""
    targets = [parse_digit(p) for p in prompts]
    keep = [i for i, t in enumerate(targets) if t is not None]
    if not keep:
        return float("nan")
    prob = (classifier or digits_classifier()).probabilities(images)
    return float(sum(float(prob[i, targets[i]]) for i in keep) / len(keep))
