"""Smoke tests of bench/peers.py's helpers (bytes, the ComfyUI-format builders, equal-bytes selection, report)."""
import copy
import importlib
import importlib.util
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

PEERS_PY = os.path.join(os.path.dirname(__file__), "..", "bench", "peers.py")


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("mixquant_bench_peers", PEERS_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def test_measured_bytes_counts_floats_at_16_bit_and_shared_storage_once(peers):
    lin = nn.Linear(64, 32)
    assert peers.measured_bytes(lin) == (64 * 32 + 32) * 2
    assert peers.measured_bytes(lin, None) == (64 * 32 + 32) * 4
    tied = nn.Sequential(lin, nn.Linear(64, 32))
    tied[1].weight = lin.weight  # shared: counted once
    assert peers.measured_bytes(tied) == (64 * 32 + 32 + 32) * 2


def test_fp8_storage_is_one_byte_and_computes_with_the_rounded_weight(peers):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(3, 4, 3))
    q = peers.to_fp8_storage(copy.deepcopy(m))
    assert peers.measured_bytes(q) == sum(t.numel() for t in m.state_dict().values())
    x = torch.randn(2, 16)
    w8, b8 = (t.detach().to(torch.float8_e4m3fn).float() for t in (m[0].weight, m[0].bias))
    torch.testing.assert_close(q[0](x), nn.functional.linear(x, w8, b8))
    assert peers.coverage(m, q) == {"linear": [1, 1], "conv2d": [1, 1]}


def test_awq_rtn_matches_comfy_kitchen_decode(peers):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    packed, scale, zeros = peers.awq_rtn_quantize(w, 64)
    assert packed.shape == (16, 64) and packed.dtype == torch.int8 and scale.shape == (2, 16)
    u = packed.view(torch.uint8).to(torch.int32)
    codes = torch.stack((u & 15, u >> 4), -1).reshape(16, 128).float()
    deq = (codes.view(16, 2, 64) - 8) * scale.t().float().unsqueeze(-1) + zeros.t().float().unsqueeze(-1)
    err = (deq.reshape(16, 128) - w).pow(2).mean() / w.pow(2).mean()
    assert err < 0.01
    ck = pytest.importorskip("comfy_kitchen.tensor.awq_w4a16")
    params = ck.TensorCoreAWQW4A16Layout.Params(scale=scale, orig_dtype=torch.float32, orig_shape=(16, 128),
                                                zeros=zeros, group_size=64)
    torch.testing.assert_close(ck.TensorCoreAWQW4A16Layout.dequantize(packed, params), deq.reshape(16, 128),
                               rtol=1e-3, atol=1e-3)


def test_comfy_int8_builder_quantizes_every_linear(peers, small_unet, unet_inputs):
    pytest.importorskip("comfy_kitchen")
    env = peers.Env("digits", small_unet, lambda m: None)
    q = peers.build_comfy_int8(env)
    cov = peers.coverage(small_unet, q)
    assert cov["linear"][0] == cov["linear"][1] > 0 and cov["conv2d"][0] == 0
    x, t, ctx = unet_inputs
    with torch.no_grad():
        y, y_fp = q(x, t, encoder_hidden_states=ctx).sample, small_unet(x, t, encoder_hidden_states=ctx).sample
    assert peers._sqnr(y_fp, y) > 25
    assert peers.measured_bytes(q) < peers.measured_bytes(small_unet)


def test_best_at_budgets_and_report(peers):
    rows = [
        {"tool": "MixQuant", "key": "mixquant-a", "label": "a", "status": "ok", "x_fp16": 0.3, "ssim": 0.99,
         "content_accuracy": 1.0, "content_accuracy_fp": 1.0, "bytes": 3, "sqnr_db": 20.0, "psnr_db": 30.0},
        {"tool": "MixQuant", "key": "mixquant-b", "label": "b", "status": "ok", "x_fp16": 0.26, "ssim": 0.98,
         "content_accuracy": 0.9, "content_accuracy_fp": 1.0, "bytes": 2, "sqnr_db": 15.0, "psnr_db": 25.0},
        {"tool": "torchao", "key": "torchao-x", "label": "x", "status": "ok", "x_fp16": 0.8, "ssim": 1.0,
         "content_accuracy": 1.0, "content_accuracy_fp": 1.0, "bytes": 8, "sqnr_db": 40.0, "psnr_db": 50.0},
        {"tool": "torchao", "key": "torchao-y", "label": "y", "status": "failed", "reason": "ImportError: no"},
    ]
    best = peers.best_at_budgets(rows)
    assert best[0.3]["MixQuant"]["label"] == "a" and best[0.25]["MixQuant"]["label"] == "b"
    assert best[0.5]["torchao"] is None and peers.smallest(rows, "torchao") == 0.8
    text = peers.markdown({"env": {"cpu": "x", "threads": 1, "device": "cpu", "versions": {"torch": "t"},
                                   "seconds": 60.0},
                           "digits": {"rows": rows, "meta": {"n_images": 1, "seeds": [1], "steps": 8,
                                                             "fp16_bytes": 10}}})
    assert "could not run**: ImportError: no" in text and "smallest 0.80x" in text
    assert peers._jsonable({"a": math.inf, "b": [float("nan")]}) == {"a": "inf", "b": [None]}


def test_select_peers_keeps_the_reference(peers):
    keys = [p.key for p in peers.select_peers("torchao", None, "cpu")]
    assert keys[0] == "fp32" and all(k == "fp32" or k.startswith("torchao") for k in keys) and len(keys) > 2
    assert "scaled-mm-fp8" not in [p.key for p in peers.select_peers(None, None, "cpu")]


def test_frontier_keeps_the_best_up_to_each_size(peers):
    pts = [(0.5, 0.8), (0.3, 0.9), (0.5, 0.95), (0.7, 0.93), (0.8, 0.99)]
    assert peers.frontier(pts) == [(0.3, 0.9), (0.5, 0.95), (0.8, 0.99)]


def test_report_from_merges_saved_runs(peers, tmp_path):
    """--report-from: the digits section of one saved run and the SD1.5 section of another make one report."""
    import json

    pytest.importorskip("matplotlib")
    row = {"tool": "MixQuant", "key": "mixquant-a", "label": "a", "status": "ok", "x_fp16": 0.3, "ssim": 0.99,
           "content_accuracy": 1.0, "content_accuracy_fp": 1.0, "bytes": 3, "sqnr_db": 20.0, "psnr_db": 30.0}
    env = {"cpu": "cpu A", "threads": 1, "device": "cpu", "versions": {"torch": "t"}, "seconds": 60.0}
    d = {"env": env, "digits": {"rows": [row], "meta": {"n_images": 400, "seeds": [1, 2], "steps": 8,
                                                         "fp16_bytes": 10}}}
    s = {"env": {**env, "cpu": "cpu B", "seconds": 120.0},
         "sd15": {"rows": [{**row, "section": "sd15", "latency_s": 1.0, "latency_ratio": "inf", "build_s": 2.0}],
                  "meta": {"params": 1e6, "fp32_forward_s": [1.0, 1.2]}}}
    d2 = {"env": env, "digits": {"rows": [{**row, "key": "fp32", "tool": "torch"}, {**row, "key": "mixquant-a",
                                                                                    "ssim": 0.5}],
                                  "meta": d["digits"]["meta"]}}
    paths = []
    for name, r in (("d.json", d), ("s.json", s), ("d2.json", d2)):
        paths.append(str(tmp_path / name))
        json.dump(r, open(paths[-1], "w"))
    assert peers.main(["--report-from", *paths, "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "peers.md").read_text()
    assert "400 images" in text and "SD1.5-architecture UNet" in text and "cpu B" in text and "4.0 min" in text
    merged = json.load(open(tmp_path / "out" / "peers.json"))
    assert [r["key"] for r in merged["digits"]["rows"]] == ["fp32", "mixquant-a"]  # first of a key wins; usual order
    assert merged["digits"]["rows"][0]["ssim"] == 0.99
    assert (tmp_path / "out" / "peers_quality_vs_bytes.png").stat().st_size > 1000


def test_paired_content_counts_the_images_only_one_side_gets_right():
    from mixquant.app.digits import paired_content

    a = [True] * 90 + [True] * 8 + [False] * 2 + [None] * 5
    b = [True] * 90 + [False] * 8 + [True] * 2 + [True] * 5  # the 5 with no digit named do not count
    pc = paired_content(a, b)
    assert (pc["images"], pc["only_a"], pc["only_b"]) == (100, 8, 2)
    assert abs(pc["p_value"] - 2 * sum(math.comb(10, k) for k in range(3)) / 2 ** 10) < 1e-12  # exact binomial
    assert paired_content([True, False], [True, False])["p_value"] == 1.0  # no discordant image: no evidence
    with pytest.raises(ValueError, match="same images"):
        paired_content([True], [True, False])


def test_report_pairs_match_rows_with_their_peer_image_by_image(peers):
    """The paired table compares a MixQuant row made at a peer's size with that peer on the same images; the hits
    strings round-trip, and a row without per-image hits (older JSON) is left out instead of failing."""
    hits_q = [True] * 50 + [False] * 10 + [None] * 3
    hits_m = [True] * 50 + [True] * 7 + [False] * 3 + [None] * 3
    assert peers.hits_list(peers.hits_str(hits_q)) == hits_q
    base = {"status": "ok", "content_accuracy_fp": 1.0, "sqnr_db": 20.0, "psnr_db": 30.0, "ssim": 0.98, "bytes": 3}
    rows = [{**base, "tool": "optimum-quanto", "key": "quanto-w4", "label": "qint4 weights", "x_fp16": 0.283,
             "content_accuracy": 50 / 60, "content_hits": peers.hits_str(hits_q)},
            {**base, "tool": "MixQuant", "key": "mixquant-match-quanto-w4-a8", "label": "mixed A8", "x_fp16": 0.283,
             "content_accuracy": 57 / 60, "content_hits": peers.hits_str(hits_m)},
            {**base, "tool": "torchao", "key": "torchao-int4", "label": "int4", "x_fp16": 0.29,
             "content_accuracy": 0.5}]
    pairs = peers.paired_rows(rows)
    assert [(a["key"], b["key"]) for a, b, _ in pairs] == [("mixquant-match-quanto-w4-a8", "quanto-w4")]
    assert (pairs[0][2]["only_a"], pairs[0][2]["only_b"], pairs[0][2]["images"]) == (7, 0, 60)
    text = peers.markdown({"env": {"cpu": "x", "threads": 1, "device": "cpu", "versions": {}, "seconds": 1.0},
                           "digits": {"rows": rows, "meta": {"n_images": 63, "seeds": [1], "steps": 8,
                                                             "fp16_bytes": 10}}})
    assert "| mixed A8 (0.283x) | optimum-quanto qint4 weights (0.283x) | 7 | 0 | 0.0156 |" in text


def _pool_module():
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "pool_content.py")
    spec = importlib.util.spec_from_file_location("mixquant_bench_pool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(peers, seeds, hits_fp, hits_q, hits_m, **meta):
    base = {"status": "ok", "sqnr_db": 20.0, "psnr_db": 30.0, "ssim": 0.98, "bytes": 3, "content_confidence": 0.9}
    rows = [{**base, "tool": "torch", "key": "fp32", "label": "FP32", "x_fp16": 2.0,
             "content_hits": peers.hits_str(hits_fp)},
            {**base, "tool": "optimum-quanto", "key": "quanto-w4", "label": "qint4 weights", "x_fp16": 0.283,
             "content_hits": peers.hits_str(hits_q)},
            {**base, "tool": "MixQuant", "key": "mixquant-match-quanto-w4-a16", "label": "mixed W-only",
             "x_fp16": 0.283, "content_hits": peers.hits_str(hits_m)}]
    return {"digits": {"rows": rows, "meta": {"steps": 8, "guidance": 2, "calibration_prompts": 8,
                                              "content_seeds": seeds, "content_hits_fp": peers.hits_str(hits_fp),
                                              **meta}}}


def test_pool_content_adds_the_blocks_image_by_image(peers, tmp_path):
    """Two runs on disjoint seeds: the pooled split is the sum of the blocks' splits (one block has the peer ahead,
    the other MixQuant), p is the exact binomial of the pooled split, gains/losses vs FP add up; runs that overlap in
    seeds or differ in settings are refused with a message, not pooled."""
    import json

    from scipy.stats import binomtest

    pool = _pool_module()
    t, f = True, False
    # block 1 (2 seeds x 10 prompts): quanto right on 4 images MixQuant misses, MixQuant on 1
    fp1 = [t] * 18 + [f] * 2
    q1 = [t] * 15 + [t, t, t] + [f, t]
    m1 = [t] * 15 + [f, f, f] + [t, f]
    # block 2: MixQuant right on 5 images quanto misses, quanto on 0; one FP-wrong image MixQuant gets right
    fp2 = [t] * 19 + [f]
    q2 = [t] * 14 + [f] * 5 + [f]
    m2 = [t] * 14 + [t] * 5 + [t]
    paths = []
    for i, (seeds, hs) in enumerate((([1000, 1001], (fp1, q1, m1)), ([1002, 1003], (fp2, q2, m2)))):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(_run(peers, seeds, *hs)))
        paths.append(str(p))
    pooled = pool.pool(pool.load_runs(paths))
    mq = next(r for r in pooled["rows"] if r["key"].startswith("mixquant-"))
    assert mq["content_hits"] == peers.hits_str(m1 + m2) and abs(mq["content_accuracy"] - 36 / 40) < 1e-12
    text = pool.markdown(pooled)
    p_pooled = binomtest(1 + 6, 1 + 4 + 6 + 0, 0.5).pvalue
    # by prompt (10 prompts x 2 seeds, prompt-major): prompt 7 nets -1 then +2, prompt 8 -2 then +2, prompt 9 0 then
    # +2 -> MixQuant ahead on 2 prompts, behind on none
    assert f"| mixed W-only (0.283x) | optimum-quanto qint4 weights (0.283x) | 1 / 4 | 6 / 0 | 7 / 4 | " \
           f"{p_pooled:.3g} | 2 / 0 | 0.5 |" in text
    assert "| MixQuant | mixed W-only | 0.283 | +1 / −3 | +1 / −0 | +2 / −3 | 0.9000 |" in text
    assert "| torch | FP32 | 2.000 | +0 / −0 | +0 / −0 | +0 / −0 | 0.9250 |" in text

    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps(_run(peers, [1001, 1005], fp2, q2, m2)))
    with pytest.raises(pool.PoolError, match="earlier run too"):
        pool.load_runs([paths[0], str(clash)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"digits": {**_run(peers, [7, 8], fp2, q2, m2)["digits"]}}))
    data = json.loads(other.read_text())
    data["digits"]["meta"]["guidance"] = 4
    other.write_text(json.dumps(data))
    with pytest.raises(pool.PoolError, match="guidance"):
        pool.load_runs([paths[0], str(other)])
    assert pool.main([paths[0]]) == 2  # one run: a message and exit code 2, no traceback
    assert pool.main([paths[0], paths[0]]) == 2  # one block twice is still one block

    # a config run later on block 1 alone (FP32 + the new row) joins block 1; its FP images must be block 1's
    later = _run(peers, [1000, 1001], fp1, q1, m1)
    later["digits"]["rows"] = [r for r in later["digits"]["rows"] if r["key"] == "fp32"] + [
        {**later["digits"]["rows"][2], "key": "mixquant-b0.3", "label": "mixed A8 at 0.3x FP16", "x_fp16": 0.3,
         "content_hits": peers.hits_str(fp1)}]
    (tmp_path / "later.json").write_text(json.dumps(later))
    blocks = pool.load_runs([paths[0], str(tmp_path / "later.json"), paths[1]])
    assert [b["paths"] for b in blocks] == [[paths[0], str(tmp_path / "later.json")], [paths[1]]]
    merged = pool.pool(blocks)
    assert "mixquant-b0.3" not in {r["key"] for r in merged["rows"]}  # block 2 lacks it: not pooled
    later2 = _run(peers, [1002, 1003], fp2, q2, m2)
    later2["digits"]["rows"] = [later2["digits"]["rows"][0], {**later["digits"]["rows"][1],
                                                              "content_hits": peers.hits_str(fp2)}]
    (tmp_path / "later2.json").write_text(json.dumps(later2))
    merged = pool.pool(pool.load_runs([paths[0], paths[1], str(tmp_path / "later.json"), str(tmp_path / "later2.json")]))
    b03 = next(r for r in merged["rows"] if r["key"] == "mixquant-b0.3")
    assert b03["content_hits"] == peers.hits_str(fp1 + fp2)
    text = pool.markdown(merged)
    assert f"seeds 1000-1001: `{paths[0]}`, `{tmp_path / 'later.json'}`" in text
    # the budget rows rank on the pooled accuracy: b0.3 (0.925 pooled) over the mixed W-only plan (0.900)
    assert "| 0.3 | — (no run) | mixed A8 at 0.3x FP16 (0.30x): acc 0.9250, conf 0.900, SSIM 0.980 |" in text
    # at the 0.3x budget the best MixQuant (here b0.3, drawing FP's images) is compared with quanto image by image
    assert "| mixed A8 at 0.3x FP16 (0.300x) | optimum-quanto qint4 weights (0.283x) | 0 / 1 | 5 / 0 | 5 / 1 |" in text
    out = tmp_path / "pooled.md"
    assert pool.main([paths[0], paths[1], "--note", "How: two blocks.", "--out", str(out)]) == 0
    assert out.read_text().split("\n")[4] == "How: two blocks."
    wrong_fp = _run(peers, [1000, 1001], [f] + fp1[1:], q1, m1)
    (tmp_path / "wrong.json").write_text(json.dumps(wrong_fp))
    with pytest.raises(pool.PoolError, match="other FP images"):
        pool.load_runs([paths[0], str(tmp_path / "wrong.json")])
    other_row = _run(peers, [1000, 1001], fp1, q1, m2[:20])
    other_row["digits"]["rows"][2]["content_hits"] = peers.hits_str([not h for h in m1])
    (tmp_path / "other_row.json").write_text(json.dumps(other_row))
    with pytest.raises(pool.PoolError, match="other images"):
        pool.load_runs([paths[0], str(tmp_path / "other_row.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert pool.main([paths[0], str(bad)]) == 2


# --- GGUF, SDNQ, Model Optimizer --------------------------------------------------------------------------------

def _bench_module(name: str, needs: str):
    """bench/<name>.py, skipping the test where the package it wraps (`needs`) is not installed."""
    pytest.importorskip(needs)
    sys.path.insert(0, os.path.dirname(PEERS_PY))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _gguf_peer():
    return _bench_module("gguf_peer", "gguf")


def _sqnr_np(ref, y):
    import numpy as np

    return 10 * np.log10((ref ** 2).sum() / ((ref - y) ** 2).sum())


@pytest.mark.parametrize("kq,floor,legacy", [("Q6_K", 34.0, "Q8_0"), ("Q5_K", 28.0, "Q5_0"), ("Q4_K", 22.3, "Q4_0"),
                                            ("Q3_K", 15.8, None), ("Q2_K", 10.0, None)])
def test_gguf_kquants_decode_with_gguf_to_what_they_encode(kq, floor, legacy):
    """The numpy port of llama.cpp's K-quant quantizers (the gguf package only decodes them): its bytes, decoded by
    the gguf package's own dequantizer, give each type's known accuracy on Gaussian weights, and a K-quant beats
    the block-32 type of the same bits (its point: finer scales from a second-level quantization)."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize, quantize

    gp = _gguf_peer()
    w = (np.random.default_rng(0).standard_normal((96, 512)) * 0.02).astype(np.float32)
    raw = gp.quantize_np(w, QT[kq])
    assert raw.dtype == np.uint8 and raw.shape == (96, 512 // 256 * __import__("gguf").GGML_QUANT_SIZES[QT[kq]][1])
    s = _sqnr_np(w, dequantize(raw, QT[kq]))
    assert floor <= s <= floor + 3
    if legacy and legacy != "Q8_0":
        assert s > _sqnr_np(w, dequantize(quantize(w, QT[legacy]), QT[legacy]))
    zero = np.zeros((2, 256), np.float32)  # an all-zero block stays zero (no division by a zero scale)
    assert np.all(dequantize(gp.quantize_np(zero, QT[kq]), QT[kq]) == 0)


def test_gguf_plan_follows_comfyui_gguf_on_the_sd15_unet():
    """Which SD1.5 weights a ComfyUI-GGUF file quantizes and to what: every Linear / Conv2d weight except conv_in,
    conv_out and the time embedding (kept F16); Q4_K_S bumps the first 4 attention values and every feed-forward
    output to Q5_K; Q8_0 is one type throughout."""
    from diffusers import UNet2DConditionModel

    gp = _gguf_peer()
    cfg = json.load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "sd15_unet.json")))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    for ftype, want in (("Q8_0", {"Q8_0": 278, "F16": 4}), ("Q4_K_S", {"Q4_K": 258, "Q5_K": 20, "F16": 4}),
                        ("Q4_K_M", {"Q4_K": 230, "Q6_K": 48, "F16": 4})):
        plans = gp.plan_model(unet, ftype)
        counts = {}
        for p in plans:
            counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
        assert counts == want, (ftype, counts)
        kept = sorted(p.name for p in plans if p.qtype.name == "F16")
        assert kept == ["conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight",
                        "time_embedding.linear_2.weight"]
    conv = next(p for p in gp.plan_model(unet, "Q4_K_S") if p.name == "down_blocks.0.resnets.0.conv1.weight")
    assert conv.file_shape == (320 * 320 * 9 // 256, 256)  # a 3x3 conv laid out as rows of 256 (convert.py)


def test_gguf_builder_stores_blocks_and_computes_with_their_values(peers, small_unet, unet_inputs):
    gp = _gguf_peer()
    env = peers.Env("digits", small_unet, lambda m: None)
    q = peers.build_gguf(env, "Q8_0")
    x, t, ctx = unet_inputs
    with torch.no_grad():
        y, y_fp = q(x, t, encoder_hidden_states=ctx).sample, small_unet(x, t, encoder_hidden_states=ctx).sample
    assert peers._sqnr(y_fp, y) > 30
    layers = [m for m in q.modules() if isinstance(m, (gp.GGUFLinear, gp.GGUFConv2d))]
    assert layers and all(m.weight.dtype in (torch.uint8, torch.float16) for m in layers)
    cov = peers.coverage(small_unet, q)
    assert cov["linear"][0] > 0 and cov["conv2d"][0] > 0
    assert peers.measured_bytes(q) < 0.7 * peers.fp16_bytes(small_unet)
    lin = next(m for m in layers if isinstance(m, gp.GGUFLinear) and m.qweight.qtype.name == "Q8_0")
    w = next(mod for name, mod in small_unet.named_modules() if mod.__class__ is nn.Linear
             and tuple(mod.weight.shape) == lin.qweight.orig_shape)
    assert w is not None and lin.qweight.dequant(torch.float32, "cpu").shape == w.weight.shape


def test_sdnq_builder_uniform_and_dynamic(peers, small_unet, unet_inputs):
    pytest.importorskip("sdnq")
    env = peers.Env("digits", small_unet, lambda m: None)
    x, t, ctx = unet_inputs
    fp16 = peers.fp16_bytes(small_unet)
    with torch.no_grad():
        y_fp = small_unet(x, t, encoder_hidden_states=ctx).sample
        out = {}
        for name, kw in (("int8", dict(dtype="int8", conv=True)), ("uint4", dict(dtype="uint4", conv=True)),
                         ("dyn", dict(dtype="uint4", conv=True, threshold=1e-4))):
            q = peers.build_sdnq(env, **kw)
            out[name] = (peers._sqnr(y_fp, q(x, t, encoder_hidden_states=ctx).sample), peers.measured_bytes(q),
                         peers.coverage(small_unet, q))
    assert out["int8"][0] > 30 and out["int8"][1] < fp16 and out["int8"][2]["conv2d"][0] > 0
    assert out["uint4"][1] < out["int8"][1] and out["uint4"][0] < out["int8"][0]
    # the dynamic mode raises the layers whose 4-bit loss is over the threshold: more bytes, less error than uint4
    assert out["dyn"][1] > out["uint4"][1] and out["dyn"][0] > out["uint4"][0]


def test_modelopt_builder_calibrates_and_stores_8_bit_weights(peers, small_unet, unet_inputs):
    pytest.importorskip("modelopt.torch.quantization")
    x, t, ctx = unet_inputs

    def calibrate(m):  # two runs of 3 steps, in timestep order
        for _ in range(2):
            for ts in (900.0, 500.0, 100.0):
                m(x, torch.tensor(ts), encoder_hidden_states=ctx)

    env = peers.Env("digits", small_unet, calibrate, calib_steps=3)
    with torch.no_grad():
        y_fp = small_unet(x, t, encoder_hidden_states=ctx).sample
        for recipe in ("int8", "fp8"):
            q = peers.build_modelopt(env, recipe)
            y = q(x, t, encoder_hidden_states=ctx).sample
            assert torch.isfinite(y).all() and peers._sqnr(y_fp, y) > 10
            cov = peers.coverage(small_unet, q)
            assert cov["linear"][0] > 0 and cov["conv2d"][0] > 0
            assert peers.measured_bytes(q) < 0.75 * peers.fp16_bytes(small_unet)
            # conv_in / conv_out and the time embedding stay high precision, as in the example
            assert not q.conv_in.weight_quantizer.is_enabled and not q.conv_out.weight_quantizer.is_enabled


def test_percentile_calibrator_takes_the_smallest_step_mean():
    """The example's per-step ranges: each step's mean amax over the runs (x its 0.8 factor), the minimum over steps."""
    modelopt_peer = _bench_module("modelopt_peer", "modelopt.torch.quantization")
    cal = modelopt_peer._percentile_calibrator(n_steps=2)(num_bits=8, axis=None)
    for amax in (4.0, 1.0, 2.0, 3.0):  # run 1: steps 0, 1; run 2: steps 0, 1
        cal.collect(torch.tensor([amax, -amax / 2]))
    assert abs(float(cal.compute_amax()) - 0.8 * min((4 + 2) / 2, (1 + 3) / 2)) < 1e-6
