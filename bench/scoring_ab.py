"""Interleaved A/B of W2 scoring settings in one process (what each scoring lever gives).

    python bench/scoring_ab.py [--pairs 64] [--chunk 8]

Settings: sdpa with one worker (torch's default threads), blocked attention with one worker,
blocked attention with `eval.workers` auto (one thread each). The pairs are taken `--chunk` at
a time and every setting scores each chunk, in alternating order, so machine drift hits all
alike; totals of wall and CPU time per setting are printed, with the largest score gap to the
first setting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpo_step  # noqa: E402  (bench helpers: W2 data and model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()
    import torch

    from reprpo.data.layout import Layout
    from reprpo.eval.scoring import cpu_workers, score_pairs
    from reprpo.model.memory import keep_freed_memory

    keep_freed_memory()
    model, tok, pairs = dpo_step._w2_pairs(args.pairs)
    settings = {"sdpa, 1 worker": ("sdpa", 1), "blocks, 1 worker": ("blocks", 1),
                f"blocks, {cpu_workers('cpu')} workers": ("blocks", cpu_workers("cpu"))}
    total = {k: [0.0, 0.0] for k in settings}
    scores: dict[str, list] = {k: [] for k in settings}
    print(f"# scoring A/B on {dpo_step.machine()}; command: python bench/scoring_ab.py {' '.join(sys.argv[1:])}")
    for n, s in enumerate(range(0, len(pairs), args.chunk)):
        names = list(settings) if n % 2 == 0 else list(settings)[::-1]
        for name in names:
            impl, workers = settings[name]
            layout = Layout(packed=True, share_prefix=True, share_response=True, attention=impl)
            t, c = time.perf_counter(), time.process_time()
            df = score_pairs(model, pairs[s : s + args.chunk], pad_id=tok.pad_token_id, batch_size=1, layout=layout,
                             workers=workers)
            total[name][0] += time.perf_counter() - t
            total[name][1] += time.process_time() - c
            scores[name].append(torch.tensor(df[["chosen_logp_mean", "rejected_logp_mean"]].values))
    first = list(settings)[0]
    base = torch.cat(scores[first])
    print(f"\n| setting | wall s ({len(pairs)} pairs) | CPU s | pairs/s | vs {first} | max score gap |\n|---|---|---|---|---|---|")
    for name, (wall, cpu) in total.items():
        gap = (torch.cat(scores[name]) - base).abs().max().item()
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {len(pairs) / wall:.3f} | {total[first][0] / wall:.2f}x | {gap:.1e} |")


if __name__ == "__main__":
    main()
