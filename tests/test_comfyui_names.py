"""quant/native's diffusers -> LDM layer names against ComfyUI's own map (comfy.utils.unet_to_diffusers), for the
SD1.5, SDXL and reduced test UNet layouts. Skipped unless COMFYUI_PATH points at a ComfyUI checkout whose
dependencies are importable here (run it with ComfyUI's Python)."""
import os
import sys

import pytest

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout")

# transformer_depth_output is read with pop() from the end by unet_to_diffusers: the last entry is output_blocks.0
SD15_LDM = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
SD15_DIFFUSERS = dict(in_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                      cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_LDM = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
SDXL_DIFFUSERS = dict(in_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
                      cross_attention_dim=2048, addition_embed_type="text_time",
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
TINY_LDM = dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                transformer_depth_middle=1)
TINY_DIFFUSERS = dict(in_channels=4, block_out_channels=[320], layers_per_block=1, cross_attention_dim=768,
                      down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"])


@pytest.fixture(scope="module")
def comfy_utils():
    sys.path.insert(0, COMFYUI)
    try:
        import comfy.utils
    except Exception as e:  # noqa: BLE001  (ComfyUI's dependencies are not installed in this environment)
        pytest.skip(f"ComfyUI does not import here: {e}")
    return comfy.utils


@pytest.mark.parametrize("ldm,diffusers,family", [(SD15_LDM, SD15_DIFFUSERS, "SD1.x"),
                                                  (SDXL_LDM, SDXL_DIFFUSERS, "SDXL"),
                                                  (TINY_LDM, TINY_DIFFUSERS, "SD1.x")])
def test_name_map_matches_comfyui(comfy_utils, ldm, diffusers, family):
    from mixquant.quant.native import diffusers_to_ldm, rename_tensor, sd_family

    assert sd_family(diffusers) == family
    theirs = comfy_utils.unet_to_diffusers(ldm)  # diffusers tensor key -> LDM tensor key
    assert len(theirs) > 100
    rename = diffusers_to_ldm(diffusers)
    wrong = {k: (rename_tensor(k, rename), v) for k, v in theirs.items() if rename_tensor(k, rename) != v}
    assert not wrong, list(wrong.items())[:5]
