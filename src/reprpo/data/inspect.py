"""`reprpo data inspect`: what a source holds and what tokenisation at the configured lengths does."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reprpo.config import RunConfig

import numpy as np


def inspect_source(source: str, cfg: RunConfig) -> str:
    from reprpo.data.readers import load_pairs
    from reprpo.data.tokenize import format_prompt, tokenize_pairs
    from reprpo.model.loading import load_tokenizer

    tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    pairs, rep = load_pairs(source, pairing=cfg.data.pairing, strict=cfg.data.strict, tokenizer=tok)
    d = cfg.data
    # untruncated lengths
    eos = 1 if d.append_eos else 0
    lens = {
        "prompt": [len(tok(format_prompt(tok, p.prompt, chat_template=d.chat_template), add_special_tokens=not d.chat_template)["input_ids"]) for p in pairs],
        "chosen": [len(tok(p.chosen, add_special_tokens=False)["input_ids"]) + eos for p in pairs],
        "rejected": [len(tok(p.rejected, add_special_tokens=False)["input_ids"]) + eos for p in pairs],
    }
    lens["total"] = [a + max(b, c) for a, b, c in zip(lens["prompt"], lens["chosen"], lens["rejected"])]
    _, trep = tokenize_pairs(pairs, tok, max_length=d.max_length, max_prompt_length=d.max_prompt_length, chat_template=d.chat_template, append_eos=d.append_eos)
    qs = (0, 50, 90, 95, 99, 100)
    lines = [f"source: {source}", f"read: {rep.summary()}", f"tokenizer: {cfg.model.name}", "",
             "token lengths  " + "  ".join(f"{'p' + str(q) if q not in (0, 100) else ('min' if q == 0 else 'max'):>6}" for q in qs) + "    mean"]
    for k, v in lens.items():
        pct = np.percentile(np.asarray(v), qs)
        lines.append(f"{k:<13}  " + "  ".join(f"{x:6.0f}" for x in pct) + f"  {np.mean(v):6.1f}")
    lines += ["", f"at max_length={d.max_length}, max_prompt_length={d.max_prompt_length}: {trep.summary()}"]
    return "\n".join(lines)
