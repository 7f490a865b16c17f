"""Scoring in fp32 vs under bf16 autocast (`eval.mixed_precision bf16`): speed and agreement.

    python bench/scoring_bf16.py [--shift arc] [--pairs 48] [--chunk 8]

SmolLM2-135M-Instruct (fp32 weights, no adapter) scores the first --pairs pairs of a GENIES
shift's test split (`../shared/data/genies`, chat template, max_length 192, max_prompt_length
128: the genies-smollm2 study's settings) with the study's scoring layout and workers, --chunk
pairs at a time, fp32 and bf16 alternating so machine drift hits both alike. Prints pairs/s of
each, the largest |margin| difference, and how many pairs change correctness (margin sign).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

GENIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "genies"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shift", default="arc")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()
    import torch

    from reprpo.config import RunConfig, apply_overrides
    from reprpo.data.prepare import prepare
    from reprpo.data.shifts import sources_of
    from reprpo.eval.scoring import score_pairs, scoring_setup
    from reprpo.model.loading import load_model
    from reprpo.model.memory import keep_freed_memory

    if not (GENIES / "shifts.json").is_file():
        raise SystemExit(f"no GENIES data at {GENIES}")
    keep_freed_memory()
    cfg = apply_overrides(RunConfig(), {"data.shift": f"{GENIES}/shifts.json:{args.shift}", "data.chat_template": True,
                                        "data.max_length": 192, "data.max_prompt_length": 128}, where="bench")
    model, tok = load_model(cfg.model, device="cpu")
    _, splits = sources_of(cfg.data)
    pairs = prepare(splits["test"], tok, cfg.data, limit=args.pairs).tokenized
    kw = scoring_setup(cfg, model, device_type="cpu")
    kw.pop("autocast")  # set per setting below
    score_pairs(model, pairs[:2], pad_id=tok.pad_token_id, progress=False, **kw)  # warm-up
    wall = {"fp32": 0.0, "bf16": 0.0}
    out = {"fp32": [], "bf16": []}
    for i, s in enumerate(range(0, len(pairs), args.chunk)):
        chunk = pairs[s : s + args.chunk]
        for name in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            t0 = time.perf_counter()
            df = score_pairs(model, chunk, pad_id=tok.pad_token_id, progress=False,
                             autocast=torch.bfloat16 if name == "bf16" else None, **kw)
            wall[name] += time.perf_counter() - t0
            out[name].append(df)
    import pandas as pd

    a, b = pd.concat(out["fp32"]), pd.concat(out["bf16"])
    n = len(a)
    flips = int((a.correct.to_numpy() != b.correct.to_numpy()).sum())
    gap = float((a.margin - b.margin).abs().max())
    print(f"{n} pairs of {args.shift}/test, the study's layout, "
          f"{kw['workers']} worker(s), batch {kw['batch_size']}")
    for name in wall:
        print(f"  {name}: {n / wall[name]:.2f} pairs/s ({wall[name]:.1f} s)")
    print(f"  bf16/fp32 time: {wall['bf16'] / wall['fp32']:.2f}; max |margin gap| {gap:.4f} nats/token; "
          f"correctness changed on {flips} of {n} pairs; fp32 acc {a.correct.mean():.3f}, bf16 acc {b.correct.mean():.3f}; "
          f"mean |margin| fp32 {a.margin.abs().mean():.4f}")


if __name__ == "__main__":
    main()
