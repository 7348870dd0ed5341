"""Single-file checkpoints with random weights in the original (CompVis / Stability "LDM") layout, for tests.

`write_checkpoint(path, family)` writes a `.safetensors` file with exactly the keys, tensor ranks and naming of the
single-file checkpoints artists download (v1-5-pruned-emaonly, v2-1_512 / 768-v, sd_xl_base_1.0, ...); `small=True`
(the default) shrinks the widths and depths but keeps every structural pattern a loader has to read from the keys:
levels with and without attention, depths that vary per level (SDXL), conv vs linear transformer projections,
the VAE's 4 levels (x8), a decoder with one res block more per level than the encoder, the text encoders' own
layouts (Hugging Face CLIP vs open_clip), a real vocabulary and 77 positions (a real tokenizer can drive them).
Not a test module itself: import it by path, e.g.

    spec = importlib.util.spec_from_file_location("ldm_checkpoints", Path(__file__).with_name("ldm_checkpoints.py"))

Families: "sd1" (SD1.x), "sd1-inpaint" (SD1.x inpainting, UNet in_channels 9), "sd2" (SD2.x 512-base),
"sd2-v" (SD2.x 768-v: same layout, told apart only by weights: see below), "sdxl" (SDXL base 1.0),
"sdxl-refiner" (SDXL refiner 1.0: only conditioner.embedders.0.model., an OpenCLIP bigG).

Layout (prefixes): UNet `model.diffusion_model.` (time_embed / label_emb / input_blocks / middle_block /
output_blocks / out), VAE `first_stage_model.` (encoder / decoder / quant_conv / post_quant_conv, mid attention
q/k/v/proj_out as 1x1 convs), text encoders: SD1 `cond_stage_model.transformer.text_model.` (HF CLIP-L), SD2
`cond_stage_model.model.` (open_clip ViT-H: in_proj_weight, text_projection, logit_scale), SDXL
`conditioner.embedders.0.transformer.text_model.` (HF CLIP-L) + `conditioner.embedders.1.model.` (open_clip bigG),
refiner `conditioner.embedders.0.model.` (open_clip bigG). SD1/SD2 files also carry the top-level `betas` and
`alphas_cumprod` buffers (scaled-linear, 0.00085..0.012, 1000 steps) as LDM files do; SDXL (sgm) files do not. No
`position_ids` buffer is written.

Small sizes (`small=True`) and the diffusers configs they correspond to (`diffusers_configs(family)`):

  UNet  sd1, sd1-inpaint: model_channels 32, channel_mult (1, 2, 2), 2 res blocks per level, transformer depth
          per level (1, 1, 0) and 1 in the middle, 8 heads (SD1's fixed head count), conv 1x1 proj_in/proj_out,
          context 64 -> UNet2DConditionModel(block_out_channels=(32, 64, 64), layers_per_block=2,
          down=(CrossAttnDown, CrossAttnDown, Down), up=(Up, CrossAttnUp, CrossAttnUp), attention_head_dim=8,
          cross_attention_dim=64, use_linear_projection=False, transformer_layers_per_block=1, in_channels 4 / 9)
        sd2, sd2-v: model_channels 64, channel_mult (1, 2, 2), depths (1, 1, 0), middle 1, head dim 64 (SD2's
          num_head_channels), linear proj_in/proj_out, context 64 -> block_out_channels (64, 128, 128),
          attention_head_dim [1, 2, 2] (diffusers' "head dim" is the head count here, as in SD2's [5, 10, 20, 20])
        sdxl: model_channels 64, channel_mult (1, 2, 2), depths (0, 1, 2), middle 2, head dim 64, linear, context
          128 (= 64 CLIP-L + 64 bigG), adm_in_channels 1600 (= 64 pooled + 6 x 256) -> block_out_channels
          (64, 128, 128), down=(Down, CrossAttnDown, CrossAttnDown), transformer_layers_per_block [1, 1, 2],
          attention_head_dim [1, 2, 2], addition_embed_type "text_time", addition_time_embed_dim 256,
          projection_class_embeddings_input_dim 1600
        sdxl-refiner: model_channels 64, channel_mult (1, 2, 2, 2), depths (0, 2, 2, 0), middle 2, context 64,
          adm 1344 (= 64 + 5 x 256)
  VAE   all: ch 32 (real 128), ch_mult (1, 2, 4, 4) as the real one, 2 res blocks per level (decoder 3), z 4 ->
          AutoencoderKL(block_out_channels (32, 64, 128, 128), layers_per_block 2, latent_channels 4): the same
          248 keys as the real VAE, x8 downsampling
  Text  every encoder: hidden 64 (SDXL's second: 128, 2 heads), 2 layers, 1 head (head dim 64 as in every real CLIP-L / ViT-H / bigG, so a
          loader that derives heads as hidden // 64 gets it right), intermediate 128, vocab 49408, 77 positions;
          open_clip ones with text_projection (64, 64) and logit_scale. -> CLIPTextConfig(hidden_size 64, ...);
          SD2's diffusers text encoder has one layer fewer than the file (1 of 2; real 23 of 24): SD2 conditions
          on the penultimate layer.

Real sizes (`small=False`) are those of the released checkpoints (SD1.x ~1.07 G parameters, SDXL base ~3.5 G).

v-prediction: ComfyUI tells SD2 768-v from 512-base by the spread of
`output_blocks.11.1.transformer_blocks.0.norm1.bias` (std > 0.09 means v). The norm1.bias of the first transformer
block of the last output block with attention (output_blocks.11 at real size, output_blocks.8 small; see
`v_marker_key`) is written with std exactly 0.2 for "sd2-v" and 0.01 for every other family.

Weights: N(0, 0.02) (embeddings, linear and conv weights), biases N(0, 0.01), norm weights 1, logit_scale
log(100), from a torch.Generator seeded with `seed`, generated in float32 and stored in `dtype`.
"""
from __future__ import annotations

import math

import torch

FAMILIES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl", "sdxl-refiner")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
VOCAB, POSITIONS = 49408, 77
TIME_EMBED_DIM_SDXL = 256  # sgm's ConcatTimestepEmbedderND: 256 per size / crop / aesthetic-score value
V_MARKER_STD, EPS_MARKER_STD = 0.2, 0.01

# text encoders: hidden, layers, heads, intermediate (projection = hidden for the open_clip ones, as in the real ones)
_CLIP_L = dict(hidden=768, layers=12, heads=12, inter=3072, act="quick_gelu")
_VIT_H = dict(hidden=1024, layers=24, heads=16, inter=4096, act="gelu")
_BIG_G = dict(hidden=1280, layers=32, heads=20, inter=5120, act="gelu")
_SMALL_TEXT = dict(hidden=64, layers=2, heads=1, inter=128)


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def ldm_spec(family: str, small: bool = True) -> dict:
    """The LDM (original-code) hyperparameters of the file `write_checkpoint` writes: unet (model_channels,
    channel_mult, num_res_blocks, transformer_depth per level, transformer_depth_middle, context_dim,
    use_linear_in_transformer, num_heads / num_head_channels, adm_in_channels, in/out channels), vae (ch, ch_mult,
    num_res_blocks, z_channels), text (a list of (component, prefix, layout, sizes)), schedule (whether betas /
    alphas_cumprod are written) and prediction_type."""
    _check(family)
    base = family.split("-")[0] if family != "sdxl-refiner" else "sdxl-refiner"
    if base in ("sd1", "sd2"):
        mc = (32 if base == "sd1" else 64) if small else 320
        unet = dict(model_channels=mc, channel_mult=(1, 2, 2) if small else (1, 2, 4, 4),
                    transformer_depth=(1, 1, 0) if small else (1, 1, 1, 0), transformer_depth_middle=1,
                    adm_in_channels=None)
        if base == "sd1":
            unet.update(use_linear_in_transformer=False, num_heads=8, num_head_channels=-1)
        else:
            unet.update(use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
    elif base == "sdxl":
        unet = dict(model_channels=64 if small else 320, channel_mult=(1, 2, 2) if small else (1, 2, 4),
                    transformer_depth=(0, 1, 2) if small else (0, 2, 10),
                    transformer_depth_middle=2 if small else 10, use_linear_in_transformer=True, num_heads=-1,
                    num_head_channels=64)
    else:  # sdxl-refiner
        unet = dict(model_channels=64 if small else 384, channel_mult=(1, 2, 2, 2) if small else (1, 2, 4, 4),
                    transformer_depth=(0, 2, 2, 0) if small else (0, 4, 4, 0),
                    transformer_depth_middle=2 if small else 4, use_linear_in_transformer=True, num_heads=-1,
                    num_head_channels=64)

    def text(real):
        return {**real, **_SMALL_TEXT} if small else dict(real)

    if base == "sd1":
        texts = [("text_encoder", "cond_stage_model.transformer.text_model.", "hf", text(_CLIP_L))]
    elif base == "sd2":
        texts = [("text_encoder", "cond_stage_model.model.", "open_clip", text(_VIT_H))]
    elif base == "sdxl":
        # the two encoders differ in width as in the real files (768 / 1280): diffusers tells them apart by it, and
        # with equal widths it would read the CLIP-L weights into the second encoder
        big_g = {**text(_BIG_G), **(dict(hidden=128, heads=2, inter=256) if small else {})}
        texts = [("text_encoder", "conditioner.embedders.0.transformer.text_model.", "hf", text(_CLIP_L)),
                 ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip", big_g)]
    else:
        texts = [("text_encoder_2", "conditioner.embedders.0.model.", "open_clip", text(_BIG_G))]
    for _, _, layout, t in texts:
        if layout == "open_clip":
            t["projection"] = t["hidden"]
    if base == "sdxl":
        unet["context_dim"] = texts[0][3]["hidden"] + texts[1][3]["hidden"]
        unet["adm_in_channels"] = texts[1][3]["projection"] + 6 * TIME_EMBED_DIM_SDXL
    elif base == "sdxl-refiner":
        unet["context_dim"] = texts[0][3]["hidden"]
        unet["adm_in_channels"] = texts[0][3]["projection"] + 5 * TIME_EMBED_DIM_SDXL
    else:
        unet["context_dim"] = texts[0][3]["hidden"]
    unet.update(in_channels=9 if family == "sd1-inpaint" else 4, out_channels=4, num_res_blocks=2)
    vae = dict(ch=32 if small else 128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
               z_channels=4, in_channels=3, out_ch=3)
    return dict(unet=unet, vae=vae, text=texts, schedule=base in ("sd1", "sd2"),
                prediction_type="v_prediction" if family == "sd2-v" else "epsilon")


def diffusers_configs(family: str, small: bool = True) -> dict:
    """The diffusers configs matching the file `write_checkpoint(path, family, small=small)` writes:
    {"unet": UNet2DConditionModel kwargs, "vae": AutoencoderKL kwargs, "text_encoder": CLIPTextConfig kwargs
    (a CLIPTextModel; absent for the refiner), "text_encoder_2": CLIPTextConfig kwargs (a
    CLIPTextModelWithProjection; SDXL and the refiner only)}. They are what diffusers' single-file converters
    (diffusers.loaders.single_file_utils) map the file onto, key for key and shape for shape, as in the released
    diffusers repositories (e.g. SD2's text encoder stops one layer before the file's last one)."""
    spec = ldm_spec(family, small)
    u, v = spec["unet"], spec["vae"]
    widths = [u["model_channels"] * m for m in u["channel_mult"]]
    depths = list(u["transformer_depth"])
    tl = [d if d else 1 for d in depths]
    if not depths[-1]:
        tl[-1] = u["transformer_depth_middle"]  # diffusers' middle block takes the last level's depth
    if tl[-1] != u["transformer_depth_middle"]:
        raise AssertionError("diffusers cannot express a middle block deeper than the last level")
    unet = dict(
        sample_size=8 if small else (96 if family == "sd2-v" else 128 if family.startswith("sdxl") else 64),
        in_channels=u["in_channels"], out_channels=u["out_channels"], block_out_channels=tuple(widths),
        layers_per_block=u["num_res_blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)),
        cross_attention_dim=u["context_dim"],
        attention_head_dim=u["num_heads"] if u["num_heads"] > 0 else [w // u["num_head_channels"] for w in widths],
        use_linear_projection=u["use_linear_in_transformer"],
        transformer_layers_per_block=tl[0] if len(set(tl)) == 1 else tl,
    )
    if u["adm_in_channels"]:
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM_SDXL,
                    projection_class_embeddings_input_dim=u["adm_in_channels"])
    xl = family.startswith("sdxl")
    vae = dict(in_channels=v["in_channels"], out_channels=v["out_ch"], latent_channels=v["z_channels"],
               block_out_channels=tuple(v["ch"] * m for m in v["ch_mult"]), layers_per_block=v["num_res_blocks"],
               down_block_types=("DownEncoderBlock2D",) * len(v["ch_mult"]),
               up_block_types=("UpDecoderBlock2D",) * len(v["ch_mult"]), norm_num_groups=32,
               sample_size=64 if small else (768 if family == "sd2-v" else 1024 if xl else 512),
               scaling_factor=0.13025 if xl else 0.18215)
    out = {"unet": unet, "vae": vae}
    for component, _, layout, t in spec["text"]:
        layers = t["layers"] - 1 if family in ("sd2", "sd2-v") else t["layers"]
        out[component] = dict(vocab_size=VOCAB, hidden_size=t["hidden"], intermediate_size=t["inter"],
                              num_hidden_layers=layers, num_attention_heads=t["heads"],
                              max_position_embeddings=POSITIONS, hidden_act=t["act"],
                              projection_dim=t.get("projection", t["hidden"]), layer_norm_eps=1e-5,
                              bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the released configs' ids
    return out


# ---- the key layout: (key, shape, init) with init one of "w" (N(0, 0.02)), "b" (N(0, 0.01)), "one", a float ----

def _linear(out, name, cin, cout, bias=True):
    out.append((name + ".weight", (cout, cin), "w"))
    if bias:
        out.append((name + ".bias", (cout,), "b"))


def _conv(out, name, cin, cout, k):
    out.append((name + ".weight", (cout, cin, k, k), "w"))
    out.append((name + ".bias", (cout,), "b"))


def _norm(out, name, c):
    out.append((name + ".weight", (c,), "one"))
    out.append((name + ".bias", (c,), "b"))


def _unet_resblock(out, p, cin, cout, temb):
    _norm(out, p + "in_layers.0", cin)
    _conv(out, p + "in_layers.2", cin, cout, 3)
    _linear(out, p + "emb_layers.1", temb, cout)
    _norm(out, p + "out_layers.0", cout)
    _conv(out, p + "out_layers.3", cout, cout, 3)
    if cin != cout:
        _conv(out, p + "skip_connection", cin, cout, 1)


def _spatial_transformer(out, p, c, depth, context, linear):
    inner = c  # heads x head dim == channels in every SD family
    _norm(out, p + "norm", c)
    (_linear if linear else lambda o, n, a, b: _conv(o, n, a, b, 1))(out, p + "proj_in", c, inner)
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for attn, kv in (("attn1", inner), ("attn2", context)):
            _linear(out, f"{b}{attn}.to_q", inner, inner, bias=False)
            _linear(out, f"{b}{attn}.to_k", kv, inner, bias=False)
            _linear(out, f"{b}{attn}.to_v", kv, inner, bias=False)
            _linear(out, f"{b}{attn}.to_out.0", inner, inner)
        _linear(out, b + "ff.net.0.proj", inner, inner * 8)  # GEGLU: 2 x 4 x inner
        _linear(out, b + "ff.net.2", inner * 4, inner)
        for n in ("norm1", "norm2", "norm3"):
            _norm(out, b + n, inner)
    (_linear if linear else lambda o, n, a, b: _conv(o, n, a, b, 1))(out, p + "proj_out", inner, c)


def _unet_keys(u):
    out, P = [], UNET
    mc, temb = u["model_channels"], 4 * u["model_channels"]
    ctx, lin, nrb = u["context_dim"], u["use_linear_in_transformer"], u["num_res_blocks"]
    mult, depth = u["channel_mult"], u["transformer_depth"]
    _linear(out, P + "time_embed.0", mc, temb)
    _linear(out, P + "time_embed.2", temb, temb)
    if u["adm_in_channels"]:
        _linear(out, P + "label_emb.0.0", u["adm_in_channels"], temb)
        _linear(out, P + "label_emb.0.2", temb, temb)
    _conv(out, P + "input_blocks.0.0", u["in_channels"], mc, 3)
    skips, ch, i = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            _unet_resblock(out, f"{P}input_blocks.{i}.0.", ch, mc * m, temb)
            ch = mc * m
            if depth[level]:
                _spatial_transformer(out, f"{P}input_blocks.{i}.1.", ch, depth[level], ctx, lin)
            skips.append(ch)
            i += 1
        if level != len(mult) - 1:
            _conv(out, f"{P}input_blocks.{i}.0.op", ch, ch, 3)
            skips.append(ch)
            i += 1
    _unet_resblock(out, P + "middle_block.0.", ch, ch, temb)
    _spatial_transformer(out, P + "middle_block.1.", ch, u["transformer_depth_middle"], ctx, lin)
    _unet_resblock(out, P + "middle_block.2.", ch, ch, temb)
    i = 0
    for level in reversed(range(len(mult))):
        for r in range(nrb + 1):
            _unet_resblock(out, f"{P}output_blocks.{i}.0.", ch + skips.pop(), mc * mult[level], temb)
            ch = mc * mult[level]
            sub = 1
            if depth[level]:
                _spatial_transformer(out, f"{P}output_blocks.{i}.1.", ch, depth[level], ctx, lin)
                sub = 2
            if level and r == nrb:
                _conv(out, f"{P}output_blocks.{i}.{sub}.conv", ch, ch, 3)
            i += 1
    _norm(out, P + "out.0", ch)
    _conv(out, P + "out.2", mc, u["out_channels"], 3)
    return out


def _vae_resblock(out, p, cin, cout):
    _norm(out, p + "norm1", cin)
    _conv(out, p + "conv1", cin, cout, 3)
    _norm(out, p + "norm2", cout)
    _conv(out, p + "conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, p + "nin_shortcut", cin, cout, 1)


def _vae_mid(out, p, c):
    _vae_resblock(out, p + "mid.block_1.", c, c)
    _norm(out, p + "mid.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(out, f"{p}mid.attn_1.{n}", c, c, 1)
    _vae_resblock(out, p + "mid.block_2.", c, c)


def _vae_keys(v):
    out, P = [], VAE
    ch, mult, nrb, z = v["ch"], v["ch_mult"], v["num_res_blocks"], v["z_channels"]
    _conv(out, P + "encoder.conv_in", v["in_channels"], ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            _vae_resblock(out, f"{P}encoder.down.{i}.block.{j}.", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            _conv(out, f"{P}encoder.down.{i}.downsample.conv", cin, cin, 3)
    _vae_mid(out, P + "encoder.", cin)
    _norm(out, P + "encoder.norm_out", cin)
    _conv(out, P + "encoder.conv_out", cin, 2 * z, 3)
    _conv(out, P + "quant_conv", 2 * z, 2 * z, 1)
    _conv(out, P + "post_quant_conv", z, z, 1)
    _conv(out, P + "decoder.conv_in", z, cin, 3)
    _vae_mid(out, P + "decoder.", cin)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            _vae_resblock(out, f"{P}decoder.up.{i}.block.{j}.", cin, ch * mult[i])
            cin = ch * mult[i]
        if i:
            _conv(out, f"{P}decoder.up.{i}.upsample.conv", cin, cin, 3)
    _norm(out, P + "decoder.norm_out", cin)
    _conv(out, P + "decoder.conv_out", cin, v["out_ch"], 3)
    return out


def _text_keys(prefix, layout, t):
    out, h, inter = [], t["hidden"], t["inter"]
    if layout == "hf":
        out.append((prefix + "embeddings.token_embedding.weight", (VOCAB, h), "w"))
        out.append((prefix + "embeddings.position_embedding.weight", (POSITIONS, h), "w"))
        for i in range(t["layers"]):
            p = f"{prefix}encoder.layers.{i}."
            for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
                _linear(out, p + "self_attn." + n, h, h)
            _norm(out, p + "layer_norm1", h)
            _linear(out, p + "mlp.fc1", h, inter)
            _linear(out, p + "mlp.fc2", inter, h)
            _norm(out, p + "layer_norm2", h)
        _norm(out, prefix + "final_layer_norm", h)
    else:
        out.append((prefix + "positional_embedding", (POSITIONS, h), "w"))
        out.append((prefix + "text_projection", (h, t["projection"]), "w"))  # x @ text_projection
        out.append((prefix + "logit_scale", (), math.log(100.0)))
        out.append((prefix + "token_embedding.weight", (VOCAB, h), "w"))
        for i in range(t["layers"]):
            p = f"{prefix}transformer.resblocks.{i}."
            _norm(out, p + "ln_1", h)
            out.append((p + "attn.in_proj_weight", (3 * h, h), "w"))
            out.append((p + "attn.in_proj_bias", (3 * h,), "b"))
            _linear(out, p + "attn.out_proj", h, h)
            _norm(out, p + "ln_2", h)
            _linear(out, p + "mlp.c_fc", h, inter)
            _linear(out, p + "mlp.c_proj", inter, h)
        _norm(out, prefix + "ln_final", h)
    return out


def v_marker_key(family: str, small: bool = True) -> str:
    """The norm1.bias ComfyUI reads to tell SD2 768-v from 512-base (output_blocks.11 at real size): the first
    transformer block of the last output block that has attention."""
    u = ldm_spec(family, small)["unet"]
    nrb, depth = u["num_res_blocks"], u["transformer_depth"]
    lowest = min(level for level, d in enumerate(depth) if d)  # output blocks run from the deepest level up
    block = (len(depth) - 1 - lowest) * (nrb + 1) + nrb
    return f"{UNET}output_blocks.{block}.1.transformer_blocks.0.norm1.bias"


def _layout(family: str, small: bool):
    spec = ldm_spec(family, small)
    keys = _unet_keys(spec["unet"]) + _vae_keys(spec["vae"])
    for _, prefix, layout, t in spec["text"]:
        keys += _text_keys(prefix, layout, t)
    if spec["schedule"]:
        keys += [("betas", (1000,), "betas"), ("alphas_cumprod", (1000,), "alphas_cumprod")]
    return keys


def checkpoint_shapes(family: str, small: bool = True) -> dict:
    """key -> shape of every tensor `write_checkpoint` writes (nothing allocated: usable at real size)."""
    _check(family)
    return {k: tuple(s) for k, s, _ in _layout(family, small)}


def _schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return {"betas": betas, "alphas_cumprod": torch.cumprod(1.0 - betas, 0)}


def make_state_dict(family: str, *, small: bool = True, seed: int = 0, dtype=torch.float16) -> dict:
    """The tensors `write_checkpoint` writes, as a dict (key -> tensor in `dtype`)."""
    _check(family)
    g = torch.Generator().manual_seed(seed)
    marker = v_marker_key(family, small)
    sched = _schedule()
    sd = {}
    for key, shape, init in _layout(family, small):
        if init == "w" or init == "b":
            t = torch.randn(shape, generator=g, dtype=torch.float32) * (0.02 if init == "w" else 0.01)
        elif init == "one":
            t = torch.ones(shape)
        elif isinstance(init, str):
            t = sched[init]
        else:
            t = torch.full(shape, float(init))
        if key == marker:
            std = V_MARKER_STD if family == "sd2-v" else EPS_MARKER_STD
            t = (t - t.mean()) / t.std(unbiased=False) * std
        sd[key] = t.to(dtype).contiguous()
    return sd


def write_checkpoint(path, family: str, *, small: bool = True, seed: int = 0, dtype=torch.float16) -> None:
    """Write a single-file `.safetensors` checkpoint of `family` (see the module docstring) with random weights.
    small=False writes the released sizes (SD1.x ~2 GB in fp16, SDXL ~7 GB: it needs as much free memory)."""
    from safetensors.torch import save_file

    save_file(make_state_dict(family, small=small, seed=seed, dtype=dtype), str(path))
