"""`reprpo data inspect`: what a source holds and what tokenisation at the configured lengths does."""

from __future__ import annotations

import numpy as np

from reprpo.data.prepare import DataSettings


def inspect_source(source: str, d: DataSettings, tok, *, tokenizer_name: str) -> str:
    """Counts, token-length percentiles and truncation of `source` with tokenizer `tok`."""
    from reprpo.data.readers import load_pairs
    from reprpo.data.tokenize import format_prompt, tokenize_pairs

    pairs, rep = load_pairs(source, pairing=d.pairing, strict=d.strict, tokenizer=tok, columns=d.columns)
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
    lines = [f"source: {source}", f"read: {rep.summary()}", f"tokenizer: {tokenizer_name}", "",
             "token lengths  " + "  ".join(f"{'p' + str(q) if q not in (0, 100) else ('min' if q == 0 else 'max'):>6}" for q in qs) + "    mean"]
    for k, v in lens.items():
        pct = np.percentile(np.asarray(v), qs)
        lines.append(f"{k:<13}  " + "  ".join(f"{x:6.0f}" for x in pct) + f"  {np.mean(v):6.1f}")
    lines += ["", f"at max_length={d.max_length}, max_prompt_length={d.max_prompt_length}: {trep.summary()}"]
    return "\n".join(lines)
