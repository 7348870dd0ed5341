import os

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download must fail loudly
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import tempfile  # noqa: E402

os.environ["MIXQUANT_CACHE"] = tempfile.mkdtemp(prefix="mixquant-test-cache-")  # never the user's cache
# The CPU plan races fp32 / bf16 / fp16 for the float route and keeps the fastest; on some machines bf16 wins one run
# and fp32 the next. The tests compare routes with the fp32 reference at fp32 tolerances, so they pin fp32 (a
# reduced-precision float route is tested with its own tolerance, tests/test_kernels_cpu.py).
os.environ.setdefault("MIXQUANT_CPU_DTYPE", "float32")

import mixquant  # noqa: E402,F401  (first: its path hook keeps the checkout's kernels/ from shadowing HF's `kernels`)
import pytest  # noqa: E402
import torch  # noqa: E402

SMALL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)


@pytest.fixture(scope="session")
def small_unet_config():
    return dict(SMALL_UNET)


@pytest.fixture(scope="session")
def small_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SMALL_UNET).eval()


@pytest.fixture(scope="session")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500, 20])
    ctx = torch.randn(2, 6, 32, generator=g)
    return x, t, ctx
