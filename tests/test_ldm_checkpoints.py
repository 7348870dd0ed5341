"""tests/ldm_checkpoints.py writes what diffusers' own single-file converters and ComfyUI's UNet detection expect of
the original LDM checkpoints: every key mapped, none left over, equal shapes, at the small test widths (files
written, loaded strictly, run) and at the released widths (shapes only, on the meta device: nothing allocated)."""
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("ldm_checkpoints", Path(__file__).with_name("ldm_checkpoints.py"))
ldm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ldm)

COMFYUI = os.environ.get("COMFYUI_PATH") or "/work/comfy/ComfyUI"


def _text_model_class(component):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel


def _convert(family, small, sd, models):
    """The file's tensors as diffusers state dicts, by diffusers' converters, per component."""
    from diffusers.loaders import single_file_utils as sfu

    cfg = ldm.diffusers_configs(family, small)
    out = {"unet": sfu.convert_ldm_unet_checkpoint(sd, cfg["unet"]),
           "vae": sfu.convert_ldm_vae_checkpoint(sd, cfg["vae"])}
    for component, prefix, layout, t in ldm.ldm_spec(family, small)["text"]:
        model = models[component]
        if layout == "hf":
            conv = sfu.convert_ldm_clip_checkpoint(sd)
        else:
            conv = sfu.convert_open_clip_checkpoint(model, sd, prefix=prefix)
        if family.startswith("sd2"):
            # SD2 conditions on the penultimate layer: diffusers' SD2 text encoder has one layer fewer than the file.
            # The converter drops that layer by its name at the released depth only (resblocks.23 in
            # SD_2_TEXT_ENCODER_KEYS_TO_IGNORE), and SD2's text_projection always; a loader drops a smaller file's
            # last layer itself.
            last = f"text_model.encoder.layers.{t['layers'] - 1}."
            assert any(k.startswith(last) for k in conv) == small
            assert "text_projection.weight" not in conv
            conv = {k: v for k, v in conv.items() if not k.startswith(last)}
        if not hasattr(model, "text_model"):  # CLIPTextModel is flat in transformers >= 5.6
            conv = {k.removeprefix("text_model."): v for k, v in conv.items()}
        out[component] = conv
    return out


def _build(family, small, device=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    cfg = ldm.diffusers_configs(family, small)
    with torch.device(device or "cpu"):
        torch.manual_seed(0)
        models = {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"])}
        for component in ("text_encoder", "text_encoder_2"):
            if component in cfg:
                models[component] = _text_model_class(component)(CLIPTextConfig(**cfg[component]))
    return models


@pytest.mark.parametrize("small", [True, False], ids=["small", "real"])
@pytest.mark.parametrize("family", ldm.FAMILIES)
def test_layout_is_what_diffusers_converters_map(family, small):
    """Key for key and shape for shape, at both sizes (the released ones on the meta device)."""
    shapes = ldm.checkpoint_shapes(family, small)
    sd = {k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in shapes.items()}
    models = _build(family, small, device="meta")
    converted = _convert(family, small, sd, models)
    for component, model in models.items():
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted[component].items()}
        assert sorted(set(want) - set(got)) == [], f"{component}: missing"
        assert sorted(set(got) - set(want)) == [], f"{component}: unexpected"
        assert {k: s for k, s in got.items() if want[k] != s} == {}, f"{component}: shapes"
    if ldm.ldm_spec(family, small)["schedule"]:
        assert shapes["betas"] == shapes["alphas_cumprod"] == (1000,)
    assert not any(k.endswith("position_ids") for k in shapes)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_small_file_loads_strictly_and_runs(family, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / f"{family}.safetensors"
    ldm.write_checkpoint(path, family)
    sd = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in sd.items()} == ldm.checkpoint_shapes(family)
    assert all(v.dtype == torch.float16 for v in sd.values())
    sd = {k: v.float() for k, v in sd.items()}
    models = _build(family, True)
    for component, state in _convert(family, True, sd, models).items():
        models[component].load_state_dict(state, strict=True)

    cfg = ldm.diffusers_configs(family)
    ids = torch.randint(0, ldm.VOCAB, (1, ldm.POSITIONS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, pooled = [], None
        for component in ("text_encoder", "text_encoder_2"):
            if component in models:
                out = models[component](ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2] if family == "sdxl" else out.last_hidden_state)
                pooled = getattr(out, "text_embeds", None)
        context = torch.cat(hidden, -1)
        assert context.shape == (1, ldm.POSITIONS, cfg["unet"]["cross_attention_dim"])
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        kwargs = {}
        if family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
        eps = models["unet"](x, torch.tensor([500]), encoder_hidden_states=context, **kwargs).sample
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        image = models["vae"].decode(x).sample
        assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()  # a x8 VAE, as the real one


def test_v_prediction_marker_and_determinism():
    """ComfyUI's test for SD2 768-v (std of that norm1.bias > 0.09) tells sd2-v from sd2; seeds reproduce."""
    key = ldm.v_marker_key("sd2", small=False)
    assert key == "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    assert key in ldm.checkpoint_shapes("sd2", small=False)
    stds = {}
    for family in ("sd2", "sd2-v"):
        sd = ldm.make_state_dict(family, dtype=torch.float32)
        stds[family] = float(sd[ldm.v_marker_key(family)].std(unbiased=False))
    assert stds["sd2"] < 0.09 < stds["sd2-v"]
    assert stds["sd2-v"] == pytest.approx(0.2, rel=1e-3) and stds["sd2"] == pytest.approx(0.01, rel=1e-3)
    a, b = ldm.make_state_dict("sd1", seed=3), ldm.make_state_dict("sd1", seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = ldm.make_state_dict("sd1", seed=4)
    assert not torch.equal(a[ldm.UNET + "out.2.weight"], c[ldm.UNET + "out.2.weight"])
    assert ldm.make_state_dict("sd1-inpaint")[ldm.UNET + "input_blocks.0.0.weight"].shape[1] == 9


@pytest.fixture(scope="module")
def detect_unet_config():
    """ComfyUI's comfy.model_detection.detect_unet_config, from its model_detection.py alone: its three comfy imports
    (supported_models, supported_models_base, utils: unused by detect_unet_config, which needs torch alone) are
    stubbed for the load only, so neither ComfyUI's dependencies nor its import-time side effects are needed, and
    nothing of ComfyUI stays in sys.modules."""
    path = os.path.join(COMFYUI, "comfy", "model_detection.py")
    if not os.path.isfile(path):
        pytest.skip("no ComfyUI checkout (set COMFYUI_PATH)")
    names = ("comfy", "comfy.supported_models", "comfy.supported_models_base", "comfy.utils")
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    stubs = {n: types.ModuleType(n) for n in names}
    stubs["comfy"].__path__ = []
    for n in names[1:]:
        setattr(stubs["comfy"], n.split(".")[1], stubs[n])
    try:
        sys.modules.update(stubs)
        spec = importlib.util.spec_from_file_location("_comfyui_model_detection", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.detect_unet_config
    except Exception as e:  # noqa: BLE001  (a ComfyUI whose model_detection.py imports more than these)
        pytest.skip(f"ComfyUI's model_detection.py does not load on its own here: {e}")
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


@pytest.mark.parametrize("small", [True, False], ids=["small", "real"])
@pytest.mark.parametrize("family", ldm.FAMILIES)
def test_comfyui_detects_the_unet_structure(detect_unet_config, family, small):
    sd = {k: torch.empty(s, device="meta") for k, s in ldm.checkpoint_shapes(family, small).items()
          if k.startswith(ldm.UNET)}
    u = ldm.ldm_spec(family, small)["unet"]
    levels, nrb = len(u["channel_mult"]), u["num_res_blocks"]
    got = detect_unet_config(sd, ldm.UNET)
    want = dict(model_channels=u["model_channels"], channel_mult=list(u["channel_mult"]), num_res_blocks=[nrb] * levels,
                transformer_depth=[d for d in u["transformer_depth"] for _ in range(nrb)],
                transformer_depth_output=[d for d in u["transformer_depth"] for _ in range(nrb + 1)],
                transformer_depth_middle=u["transformer_depth_middle"], context_dim=u["context_dim"],
                use_linear_in_transformer=u["use_linear_in_transformer"], adm_in_channels=u["adm_in_channels"],
                in_channels=u["in_channels"], out_channels=4, use_temporal_attention=False)
    assert {k: got.get(k) for k in want} == want
    if not small:  # the values ComfyUI's supported_models match on (SD15 / SD20 / SDXL / SDXLRefiner)
        real = {"sd1": (320, 768, False, None), "sd2": (320, 1024, True, None), "sdxl": (320, 2048, True, 2816),
                "sdxl-refiner": (384, 1280, True, 2560)}[family.removesuffix("-inpaint").removesuffix("-v")]
        assert (got["model_channels"], got["context_dim"], got["use_linear_in_transformer"],
                got["adm_in_channels"]) == real
        if family == "sdxl":
            assert got["transformer_depth"] == [0, 0, 2, 2, 10, 10]
        if family == "sdxl-refiner":
            assert got["transformer_depth"] == [0, 0, 4, 4, 4, 4, 0, 0]
