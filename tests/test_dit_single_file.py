"""Single-file Flux.1 and SD3 checkpoints (app/diffusers_host/dit_file.py), laid out as the released files are
(random weights, small widths): the whole model in one file as ComfyUI's Save Checkpoint writes it, or the diffusion
model alone joined to its text-encoder and VAE files with '+'. They load offline into the pipeline they describe (the
tensors exactly the ones written), and go through `mixquant quantize` / `generate`; a file missing a part or damaged
gets one clear message."""
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixquant.app.cli import main as cli
from mixquant.app.diffusers_host.models import load_pipeline
from mixquant.quant.dit_names import layout_for, to_original
from mixquant.quant.errors import MixQuantError

_spec = importlib.util.spec_from_file_location("ldm_checkpoints", Path(__file__).with_name("ldm_checkpoints.py"))
LDM = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(LDM)
VAE_SPEC = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, in_channels=3, out_ch=3)
# widths whose attention heads the files imply (CLIP: 64 per head; Flux's RoPE axes 1/8, 7/16, 7/16 of a head; SD3's
# heads 64 wide): what a loader that reads only shapes can rebuild
FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=[4, 14, 14])
# SD3: CLIP-L and the wider CLIP-G side by side are as wide as T5 (the pipeline pads the first to the second)
SD3 = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
           joint_attention_dim=192, caption_projection_dim=128, pooled_projection_dim=192, out_channels=16,
           pos_embed_max_size=32)


def _clip(hidden, projection, seed, gelu=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=max(1, hidden // 64), projection_dim=hidden, vocab_size=49408,
                         max_position_embeddings=77, hidden_act="gelu" if gelu else "quick_gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d, seed):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(d_model=d, d_ff=2 * d, num_layers=2, num_heads=2, d_kv=d // 2, vocab_size=32128,
                                   feed_forward_proj="gated-gelu")).eval()


def _sd(model):
    """A text encoder's tensors as the released files name them (CLIP under text_model., T5 without the tied copy)."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
          if not k.endswith("position_ids") and k != "encoder.embed_tokens.weight"}
    if type(model).__name__ == "CLIPTextModel" and not any(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}
    return sd


def _parts(family):
    """{part: (state dict in the file's own layout, the model it came from)}."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    tr = cls.from_config(FLUX if family == "flux" else SD3).eval()
    g = torch.Generator().manual_seed(1)
    vae = {k[len("first_stage_model."):]: torch.randn(shape, generator=g) * 0.05
           for k, shape, _ in LDM._vae_keys(VAE_SPEC) if "quant_conv" not in k}
    parts = {"transformer": (to_original(tr.state_dict(), layout_for(cls.__name__, dict(tr.config))), tr),
             "vae": (vae, None)}
    if family == "flux":
        clip, t5 = _clip(64, False, 2), _t5(64, 3)
        parts.update(clip_l=(_sd(clip), clip), t5xxl=(_sd(t5), t5))
    else:
        cl, cg, t5 = _clip(64, True, 2), _clip(128, True, 3, gelu=True), _t5(192, 4)
        parts.update(clip_l=(_sd(cl), cl), clip_g=(_sd(cg), cg), t5xxl=(_sd(t5), t5))
    return parts


PREFIX = {"transformer": "model.diffusion_model.", "vae": "first_stage_model.",
          "clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
          "t5xxl": "text_encoders.t5xxl.transformer."}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def files(request, tmp_path_factory):
    family = request.param
    d = tmp_path_factory.mktemp(family)
    parts = _parts(family)
    whole = {PREFIX[p] + k: v.half() for p, (sd, _) in parts.items() for k, v in sd.items()}
    save_file(whole, str(d / "all_in_one.safetensors"))
    split = []
    for p, (sd, _) in parts.items():  # the released names: flux1-dev, clip_l, t5xxl_fp16, ae
        path = d / f"{p}.safetensors"
        save_file({k: v.half() for k, v in sd.items()}, str(path))
        split.append(str(path))
    return family, parts, str(d / "all_in_one.safetensors"), split


def _same(model, sd):
    got = model.state_dict()
    got = {**got, **{"text_model." + k: v for k, v in got.items()}}
    for k, v in sd.items():
        assert torch.equal(got[k].float(), v.half().float()), k


def test_loads_every_part_as_written(files):
    family, parts, whole, split = files
    for model in (whole, "+".join(split)):
        pipe = load_pipeline(model)
        assert type(pipe).__name__ == ("FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline")
        tr = pipe.transformer
        want = parts["transformer"][1]
        assert {k: v for k, v in tr.config.items() if not k.startswith("_")} == \
            {k: v for k, v in want.config.items() if not k.startswith("_")}
        for k, v in want.state_dict().items():  # the tensors written, through the original layout and back
            assert torch.equal(tr.state_dict()[k], v.half().float()), k
        _same(pipe.text_encoder, parts["clip_l"][0])
        _same(pipe.text_encoder_3 if family == "sd3" else pipe.text_encoder_2, parts["t5xxl"][0])
        if family == "sd3":
            _same(pipe.text_encoder_2, parts["clip_g"][0])
        assert pipe.vae.config.latent_channels == 16 and not pipe.vae.config.use_quant_conv
        assert pipe.mixquant_source["family"] == family


def test_cli_quantize_and_generate_from_single_files(files, tmp_path, capsys):
    family, _, whole, split = files
    out = tmp_path / "q.safetensors"
    common = ["--steps", "2", "--size", "64x64"]
    rc = cli(["quantize", "--model", whole, "--prompt", "a red fox", "--prompt", "a blue car", "--avg-w-bits", "6",
              "--sens-mode", "local", "--out", str(out), *common])
    assert rc == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
    img = tmp_path / "g.png"
    rc = cli(["generate", "--model", "+".join(split), "--quantized", str(out), "--prompt", "a red fox",
              "--out", str(img), *common])
    assert rc == 0, capsys.readouterr().err
    assert img.stat().st_size > 0


def test_missing_parts_and_damaged_files(files, tmp_path, capsys):
    family, _, whole, split = files
    with pytest.raises(MixQuantError, match="needs .*T5-XXL|needs .*CLIP"):
        load_pipeline(split[0])  # the diffusion model alone
    with pytest.raises(MixQuantError, match="in both"):
        load_pipeline(whole + "+" + split[1])
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(open(whole, "rb").read()[:-1000])
    out = tmp_path / "never.safetensors"
    assert cli(["quantize", "--model", str(bad), "--prompt", "a fox", "--avg-w-bits", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "download it again" in err and "Traceback" not in err and not out.exists()
