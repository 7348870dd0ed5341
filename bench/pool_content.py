"""Pool the per-image content hits of several `bench/peers.py` digits runs made on disjoint blocks of seeds.

    python bench/peers.py ... --content-seeds 64                            # seeds 1000-1063
    python bench/peers.py ... --content-seeds 64 --content-seed-start 1064  # seeds 1064-1127, --out elsewhere
    python bench/pool_content.py run1/peers_partial.json run2/peers_partial.json > pooled.md

Why: at ~0.3x FP16 the quantizers differ from FP on a hundred or so ambiguous images out of 12,800, and which of those
flip depends on the exact rounding of every weight. One block of seeds can put either tool ahead; the pooled,
image-by-image comparison (and the per-block split beside it) says how much of a lead is the tool and how much the
images. Rows are matched by key; every run must use the same prompts, sampler and guidance.

A config added later on a block already run (`--only fp32,<key> --no-match` with that block's seeds) joins that
block: two runs of exactly the same seeds are merged row by row, after checking they drew the same FP images (same
FP hits; a row present in both must agree too). Blocks that overlap only in part are refused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peers import budget_table, hits_list, paired_rows  # noqa: E402


class PoolError(ValueError):
    pass


def _digits(run: dict, path: str) -> dict:
    d = run.get("digits")
    if not d or not d.get("meta", {}).get("content_hits_fp"):
        raise PoolError(f"{path}: no digits section with per-image content hits (run bench/peers.py with "
                        "--content-seeds)")
    return d


def load_runs(paths) -> list[dict]:
    """One digits section per block of seeds: runs of exactly the same seeds are merged (their rows joined), each
    block's `paths` lists the files it came from."""
    runs = []
    for p in paths:
        try:
            with open(p) as f:
                d = _digits(json.load(f), p)
        except (OSError, json.JSONDecodeError) as e:
            raise PoolError(f"{p}: cannot read it ({e})") from e
        runs.append((p, d))
    first = runs[0][1]["meta"] if runs else {}
    prompts = len(first["content_hits_fp"]) // len(first["content_seeds"]) if runs else 0
    blocks: list[dict] = []
    for p, d in runs:
        m = d["meta"]
        for k in ("steps", "guidance", "calibration_prompts"):
            if m.get(k) != first.get(k):
                raise PoolError(f"{p}: {k} = {m.get(k)} but the first run has {first.get(k)}: pool runs of one setting")
        if len(m["content_hits_fp"]) != prompts * len(m["content_seeds"]):
            raise PoolError(f"{p}: {len(m['content_hits_fp'])} images for {len(m['content_seeds'])} seeds: not the "
                            f"first run's {prompts} prompts")
        same = next((b for b in blocks if b["meta"]["content_seeds"] == m["content_seeds"]), None)
        if same is not None:
            _merge(same, d, p)
            continue
        for b in blocks:
            twice = set(b["meta"]["content_seeds"]) & set(m["content_seeds"])
            if twice:
                raise PoolError(f"{p}: seeds {sorted(twice)[:3]}... are in an earlier run too, which has other seeds "
                                "as well: pool disjoint blocks (--content-seed-start), or runs of exactly one block")
        blocks.append({"meta": m, "rows": list(d["rows"]), "paths": [p]})
    if len(blocks) < 2:
        raise PoolError("give runs of at least two disjoint seed blocks to pool")
    return blocks


def _merge(block: dict, d: dict, path: str) -> None:
    """Join run `d` (the same seeds as `block`) into `block`: only if both drew the same FP images."""
    if d["meta"]["content_hits_fp"] != block["meta"]["content_hits_fp"]:
        raise PoolError(f"{path}: the same seeds as {block['paths'][0]} but other FP images (FP hits differ): not "
                        "the same model, prompts or machine; cannot merge its rows into that block")
    have = {r["key"]: r for r in block["rows"]}
    for r in d["rows"]:
        old = have.get(r["key"])
        if old is None or old.get("status") != "ok":  # new, or a row that failed there
            block["rows"] = [x for x in block["rows"] if x is not old] + [r]
            have[r["key"]] = r
        elif r.get("status") == "ok" and r.get("content_hits") != old.get("content_hits"):
            raise PoolError(f"{path}: row {r['key']} drew other images than in {block['paths'][0]}: cannot merge")
    block["paths"].append(path)


def pool(runs: list[dict]) -> dict:
    """Rows present (with hits) in every run, their hits concatenated run after run, and FP's."""
    from mixquant.app.digits import hit_rate

    keyed = [{r["key"]: r for r in d["rows"] if r.get("status") == "ok" and r.get("content_hits")} for d in runs]
    common = [k for k in keyed[0] if all(k in kd for kd in keyed[1:])]
    rows = []
    for k in common:
        row = dict(keyed[0][k])
        row["content_hits_runs"] = [kd[k]["content_hits"] for kd in keyed]
        row["content_hits"] = "".join(row["content_hits_runs"])
        row["content_accuracy"] = hit_rate(hits_list(row["content_hits"]))  # (best_at_budgets ranks on these)
        sizes = [len(h) for h in row["content_hits_runs"]]
        confs = [kd[k].get("content_confidence") for kd in keyed]
        row["content_confidence"] = None if None in confs else sum(c * s for c, s in zip(confs, sizes)) / sum(sizes)
        rows.append(row)
    fp_runs = [d["meta"]["content_hits_fp"] for d in runs]
    return {"rows": rows, "fp_hits_runs": fp_runs, "fp_hits": "".join(fp_runs),
            "seed_blocks": [(d["meta"]["content_seeds"][0], d["meta"]["content_seeds"][-1]) for d in runs],
            "seeds_per_run": [len(d["meta"]["content_seeds"]) for d in runs], "paths": [d["paths"] for d in runs]}


def by_prompt(hits_runs_a, hits_runs_b, seeds_per_run) -> dict:
    """The paired split counted per prompt (images are prompt-major: prompt i holds images i*S .. i*S + S - 1 of a
    run with S seeds), summed over runs, and an exact sign test over the prompts where one side draws more images
    right. Images of one prompt are not independent (some prompts are ambiguous for every tool): this test counts
    each prompt once, so a cluster of flips on one prompt cannot pass for many independent images."""
    from scipy.stats import binomtest

    diff: dict[int, int] = {}
    for ha, hb, s in zip(hits_runs_a, hits_runs_b, seeds_per_run):
        for i, (a, b) in enumerate(zip(hits_list(ha), hits_list(hb))):
            if a is not None and b is not None and a != b:
                diff[i // s] = diff.get(i // s, 0) + (1 if a else -1)
    ahead_a = sum(1 for d in diff.values() if d > 0)
    ahead_b = sum(1 for d in diff.values() if d < 0)
    p = binomtest(ahead_a, ahead_a + ahead_b, 0.5).pvalue if ahead_a + ahead_b else 1.0
    return {"prompts_a": ahead_a, "prompts_b": ahead_b, "p_value": float(p)}


def vs_fp(hits: str, fp: str) -> tuple[int, int]:
    """(images this config draws right that FP draws wrong, images FP draws right that it draws wrong)."""
    h, f = hits_list(hits), hits_list(fp)
    return (sum(1 for a, b in zip(h, f) if a and b is False),
            sum(1 for a, b in zip(h, f) if a is False and b))


def markdown(pooled: dict, note: str = "") -> str:
    from mixquant.app.digits import hit_rate, paired_content

    blocks = pooled["seed_blocks"]
    heads = [f"seeds {a}-{b}" for a, b in blocks]
    n = len(pooled["fp_hits"])
    L = [f"# Content on digits, pooled over {len(blocks)} runs ({n} images)", "",
         "Runs: " + "; ".join(f"{h}: " + ", ".join(f"`{p}`" for p in ps) for h, ps in zip(heads, pooled["paths"]))
         + ".", ""] + ([note, ""] if note else []) + [
         "## Quality at equal bytes", "",
         f"Content accuracy and confidence pooled over the {n} images; SSIM on the 800-image eval (the same prompts "
         "and seeds in every run).", ""] + budget_table(pooled["rows"]) + ["",
         "## Image by image: only MixQuant right / only the peer right", "",
         "p: exact two-sided binomial (McNemar) test of the pooled split, image by image. By prompt: the prompts on "
         "which MixQuant draws more images right than the peer / fewer, and the exact sign test over them (images of "
         "one prompt are not independent draws; this test counts each prompt once, whatever its number of flips).", "",
         "| MixQuant | peer | " + " | ".join(heads) + " | pooled | p | by prompt | p (by prompt) |",
         "|---|---|" + "---|" * len(heads) + "---|---|---|---|"]
    for a, b, pc in paired_rows(pooled["rows"]):
        per = [paired_content(hits_list(x), hits_list(y)) for x, y in zip(a["content_hits_runs"], b["content_hits_runs"])]
        bp = by_prompt(a["content_hits_runs"], b["content_hits_runs"], pooled["seeds_per_run"])
        L.append(f"| {a['label']} ({a['x_fp16']:.3f}x) | {b['tool']} {b['label']} ({b['x_fp16']:.3f}x) | "
                 + " | ".join(f"{q['only_a']} / {q['only_b']}" for q in per)
                 + f" | {pc['only_a']} / {pc['only_b']} | {pc['p_value']:.3g} | {bp['prompts_a']} / {bp['prompts_b']}"
                 f" | {bp['p_value']:.3g} |")
    L += ["", "## Each config against FP (+ images it draws right that FP draws wrong, − the reverse)", "",
          "| tool | config | x FP16 | " + " | ".join(heads) + " | pooled | content acc |",
          "|---|---|---|" + "---|" * len(heads) + "---|---|",
          "| torch | FP32 | 2.000 | " + " | ".join("+0 / −0" for _ in heads) + f" | +0 / −0 | "
          f"{hit_rate(hits_list(pooled['fp_hits'])):.4f} |"]
    for r in pooled["rows"]:
        if r["key"] == "fp32":
            continue
        per = [vs_fp(h, f) for h, f in zip(r["content_hits_runs"], pooled["fp_hits_runs"])]
        g, l = vs_fp(r["content_hits"], pooled["fp_hits"])
        L.append(f"| {r['tool']} | {r['label']} | {r['x_fp16']:.3f} | " + " | ".join(f"+{x} / −{y}" for x, y in per)
                 + f" | +{g} / −{l} | {hit_rate(hits_list(r['content_hits'])):.4f} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="peers*.json of digits runs on disjoint seed blocks (runs of exactly the "
                    "same block are merged)")
    ap.add_argument("--out", help="write the markdown here (default: print it)")
    ap.add_argument("--note", default="", help="a paragraph to put under the title (how the runs were made)")
    args = ap.parse_args(argv)
    try:
        text = markdown(pool(load_runs(args.runs)), args.note)
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
