"""Greedy-generation coherence check: does the adapter still write varied, non-looping text?

repetition = 1 − Σ_g |uniq 3-grams(g)| / Σ_g |3-grams(g)|  (0 = no 3-gram repeats within a generation)
distinct_n = |∪_g n-grams(g)| / Σ_g |n-grams(g)|            (Li et al. 2016, "distinct-n", corpus level)
mean_length = mean generated tokens per prompt (up to, not counting, EOS)

All counts are over token ids. Ours: DESIGN §6 asks for "a generation check on a few prompts
(repetition / distinct-n)"; the definitions above are the common ones. Ratios with no n-grams
to count (every generation shorter than n) are 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from reprpo.data.tokenize import format_prompt
from reprpo.model import interventions
from reprpo.model.forward import adapter_disabled
from reprpo.progress import bar

N_PROMPTS = 4
MAX_NEW_TOKENS = 32


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def ngram_metrics(generations: Sequence[Sequence[int]]) -> dict[str, float]:
    """repetition, distinct_1, distinct_2 and mean_length of generated token-id lists."""
    out: dict[str, float] = {}
    tri = [ngrams(g, 3) for g in generations]
    total3 = sum(len(t) for t in tri)
    repeated3 = sum(len(t) - len(set(t)) for t in tri)  # within each generation
    out["repetition"] = repeated3 / total3 if total3 else 0.0
    for n in (1, 2):
        grams = [x for g in generations for x in ngrams(g, n)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    out["mean_length"] = sum(len(g) for g in generations) / len(generations) if generations else 0.0
    return out


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, chat_template: bool,
                    max_prompt_length: int | None = None, desc: str = "generate", progress: bool = True,
                    context=None) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (one prompt at a time: no padding effects),
    cut at the first EOS. A progress bar `desc` counts the prompts. `context(prompt_len)`: a
    context each generation runs in (a method that acts during the forward, e.g. steer-mean's
    `generating`)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    gcfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    out = []
    for prompt in bar(prompts, desc=desc, unit="prompt", enabled=progress):
        text = format_prompt(tokenizer, prompt, chat_template=chat_template)
        ids = tokenizer(text, add_special_tokens=not chat_template)["input_ids"]  # as tokenize_pairs does
        if max_prompt_length:
            ids = ids[-max_prompt_length:]
        x = torch.tensor([ids], device=device)  # (1, t)
        # a representation adapter acts at the generated tokens (+ loreft's prompt tokens); a no-op without one
        with interventions.generating(model, x.shape[1]), context(x.shape[1]) if context is not None else nullcontext():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gcfg)
        gen = y[0, x.shape[1] :].tolist()
        if eos is not None and eos in gen:
            gen = gen[: gen.index(eos)]
        out.append(gen)
    return out


def generation_check(model, tokenizer, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                     chat_template: bool, max_prompt_length: int | None = None,
                     texts: list[str] | None = None, desc: str = "generate", progress: bool = True, context=None) -> dict[str, float]:
    """Greedy-generate from `prompts` with `model` as it is (adapter on or off is the caller's
    choice) and return `ngram_metrics` of the continuations; `texts`, when given, receives the
    decoded continuations."""
    was_training = model.training
    model.eval()
    try:
        gens = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               chat_template=chat_template, max_prompt_length=max_prompt_length, desc=desc, progress=progress,
                               context=context)
    finally:
        model.train(was_training)
    if texts is not None:
        texts += tokenizer.batch_decode(gens, skip_special_tokens=True)
    return ngram_metrics(gens)


def run_coherence(cfg, *, adapter_dir, n_prompts: int = N_PROMPTS, max_new_tokens: int = MAX_NEW_TOKENS,
                  save: Path | None = None) -> dict[str, dict[str, float]]:
    """{'base': metrics, 'adapter': metrics} on the first `n_prompts` prompts of the config's
    `test` split (else its first eval split); base = the same model with the adapter off.
    `save`: a JSON-lines file of every generation ({"model", "prompt", "text"}), base first.
    A method that acts during the forward (its scorer reads it and it has `generating`, e.g.
    steer-mean) generates inside that context."""
    from reprpo.data.readers import load_pairs
    from reprpo.data.shifts import sources_of
    from reprpo.eval.scoring import run_method
    from reprpo.model.loading import device_type, load_model

    model, tok = load_model(cfg.model, adapter=adapter_dir, device=device_type(cfg.train.device))
    method = run_method(cfg, model, adapter_dir)
    context = (lambda n: method.generating(model, n)) if hasattr(method, "generating") else None
    _, splits = sources_of(cfg.data)
    source = splits.get("test") or next(iter(splits.values()))
    pairs, _ = load_pairs(source, pairing=cfg.data.pairing, tokenizer=tok, limit=n_prompts, columns=cfg.data.columns)
    prompts = [p.prompt for p in pairs]
    kw = dict(max_new_tokens=max_new_tokens, chat_template=cfg.data.chat_template, max_prompt_length=cfg.data.max_prompt_length,
              progress=cfg.train.progress)
    texts: dict[str, list[str]] = {"base": [], "adapter": []}
    with adapter_disabled(model):
        base = generation_check(model, tok, prompts, texts=texts["base"], desc="generate (base)", **kw)
    metrics = {"base": base, "adapter": generation_check(model, tok, prompts, texts=texts["adapter"], desc="generate (adapter)",
                                                         context=context, **kw)}
    if save is not None:
        with Path(save).open("w") as fh:
            for name, gens in texts.items():
                for prompt, text in zip(prompts, gens, strict=True):
                    fh.write(json.dumps({"model": name, "prompt": prompt, "text": text}) + "\n")
    return metrics
