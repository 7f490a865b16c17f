"""SAE learning rate on a short budget: held-out FVU after 46 steps at three rates (docs/performance.md).

    python bench/sae_lr.py     # SmolLM2-135M-Instruct, block 15, 100 pairs of six GENIES training files
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from reprpo.config import RunConfig
from reprpo.data.prepare import prepare
from reprpo.model.loading import load_model
from reprpo.model.sae import TopKSAE
from reprpo.sae_train import block_activations, fit_sae

GENIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "genies"
FILES = ("code_easy", "math", "alpaca_low_quality", "us_history", "arc_easy", "unhelpful_alpaca")


def main() -> None:
    cfg = RunConfig()
    cfg.data.chat_template, cfg.data.max_length = True, 256
    model, tok = load_model(cfg.model)
    model.eval()
    pairs = [p for d in FILES for p in prepare(str(GENIES / d / "train.json"), tok, cfg.data, limit=100).tokenized]
    pairs.sort(key=lambda p: p.length)
    t = time.time()
    acts = torch.cat(list(block_activations(model, pairs, layer=15, pad_id=tok.pad_token_id, batch_size=8)))
    print(f"activations {tuple(acts.shape)} in {time.time() - t:.0f} s", flush=True)
    acts = acts[torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(0))]
    held, tr = acts[:8192], acts[8192:]
    batches = [tr[i : i + 4096] for i in range(0, tr.shape[0] - 4095, 4096)]
    for lr in (2.67e-4, 1e-3, 3e-3):
        sae = TopKSAE(d=576, width=9216, k=32)
        t = time.time()
        st = fit_sae(sae, itertools.chain(batches, batches), lr=lr, aux_k=288, aux_alpha=1 / 32, dead_tokens=50000, progress=False)
        with torch.no_grad():
            fvu = (held - sae.reconstruct(held)).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
        print(f"lr {lr:g}: {st.steps} steps, held-out FVU {float(fvu):.4f}, dead {st.dead_fraction:.1%}, {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
