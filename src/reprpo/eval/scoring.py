"""Preference evaluation: score every pair for the base model (adapter off) and the adapter.

A pair's score margin comes from a registered scorer (methods/scorers.py; default `logp_mean`,
ℓ̄⁺ − ℓ̄⁻ with ℓ̄ the mean response-token log-prob, the GENIES convention); a pair is correct
iff the margin is > 0 (a tie counts 0.5). Batches are length-sorted; padding is masked, so
batched scores equal one-pair-at-a-time scores (tested).
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from reprpo.data.layout import PADDED, Layout
from reprpo.data.tokenize import TokenizedPair
from reprpo.errors import TrainingError
from reprpo.eval.stats import delta_pp, ppl_ratio
from reprpo.methods.base import SCORERS, Scorer
from reprpo.model import forward
from reprpo.model.forward import adapter_disabled
from reprpo.progress import bar


@torch.no_grad()
def score_pairs(model, pairs: list[TokenizedPair], *, pad_id: int, batch_size: int = 8, device=None,
                layout: Layout = PADDED, chunk: int = 2048, workers: int = 1, scorer: Scorer | None = None,
                method=None, desc: str = "score", progress: bool = True, autocast: torch.dtype | None = None) -> pd.DataFrame:
    """Per-pair scores in the order of `pairs`: the scorer's columns (default `logp_mean`: log-prob
    sums and token counts of chosen and rejected, margin ℓ̄⁺ − ℓ̄⁻), then correctness.

    `workers` > 1 scores the batches in that many threads that share the model, torch's
    intra-op threads divided among them (`cpu_workers`): one thread per core has no
    per-operation synchronisation. On 2 CPU cores, W2 in fresh processes: two workers with one
    thread each 1.31 pairs/s, one worker with two threads 1.07-1.10 (bench/results/w2-workers.txt);
    interleaved in one process the gain was 1-5% (bench/scoring_ab.py). Scores are the same.
    A progress bar `desc` counts the pairs (the workers update it; its update is locked).
    `method`: the run's method object, for a scorer that reads it (`Scorer.needs_method`).
    `autocast`: score under torch.autocast of that dtype (`eval.mixed_precision`), entered in
    each worker thread (autocast is per thread)."""
    device = device or next(model.parameters()).device
    scorer = scorer or SCORERS["logp_mean"]
    if scorer.needs_method and method is None:
        raise ValueError(f"scorer {scorer.name} reads the run's method (its head or direction): pass method=")
    kw = {"method": method} if scorer.needs_method else {}
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].length)  # longest first: OOM shows early
    layout = layout.for_pairs(pairs)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for s in range(0, len(order), batch_size):
        todo.put(order[s : s + batch_size])
    rows: dict[int, dict] = {}
    pbar = bar(total=len(pairs), desc=desc, unit="pair", enabled=progress)

    @torch.no_grad()  # grad mode is per thread
    def work() -> None:
        prefix_store: dict = {}  # a template header shared by the batches is encoded once (per worker)
        while True:
            try:
                idx = todo.get_nowait()
            except queue.Empty:
                return
            batch = layout.collate([pairs[i] for i in idx], pad_id=pad_id).to(device)
            with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
                out = scorer.fn(model, batch, chunk=chunk, prefix_store=prefix_store, **kw)
            cols = {k: (v.float() if v.is_floating_point() else v).tolist() for k, v in out.items()}  # fp32 out of autocast
            for j, i in enumerate(idx):
                rows[i] = {"pair": pairs[i].index} | {k: v[j] for k, v in cols.items()}
            pbar.update(len(idx))

    workers = max(1, min(workers, todo.qsize()))
    with pbar:
        if workers == 1:
            work()
        else:
            # run_decoder switches the attention kernel per call; set it once here, so the workers'
            # switches are no-ops and none of them restores the kernel under another's feet.
            with forward.attention_impl(model, layout.attention if layout.packed else "keep"), intra_op_threads(max(1, torch.get_num_threads() // workers)):
                with ThreadPoolExecutor(workers) as pool:
                    for f in [pool.submit(work) for _ in range(workers)]:
                        f.result()  # re-raises a worker's error here
    return finish_scores(pd.DataFrame([rows[i] for i in range(len(pairs))]))


def cpu_workers(device_type: str) -> int:
    """Scoring workers for `eval.workers` 0 (auto): one per torch thread, at most 4, on CPU
    (measured on 2 cores only); 1 on GPUs."""
    return min(4, torch.get_num_threads()) if device_type == "cpu" else 1


@contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to `n` inside the block (threads started inside take
    it), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def finish_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Add per-token means (where there are log-prob columns), the margin (ℓ̄⁺ − ℓ̄⁻ unless the
    scorer gave one) and correctness (margin > 0; ties 0.5)."""
    if df.empty:
        return df
    if "chosen_logp_sum" in df:
        df["chosen_logp_mean"] = df.chosen_logp_sum / df.chosen_tokens
        df["rejected_logp_mean"] = df.rejected_logp_sum / df.rejected_tokens
        if "margin" not in df:
            df["margin"] = df.chosen_logp_mean - df.rejected_logp_mean
        df["margin_sum"] = df.chosen_logp_sum - df.rejected_logp_sum
    if "margin" not in df:
        raise ValueError("scores need a `margin` column (the scorer's score⁺ − score⁻)")
    df["correct"] = np.where(df.margin > 0, 1.0, np.where(df.margin == 0, 0.5, 0.0))
    return df


SCORE_COLUMNS = ("margin", "chosen_logp_sum", "rejected_logp_sum", "chosen_logp_mean", "rejected_logp_mean")


def check_finite(df: pd.DataFrame, *, split: str | None = None, model: str | None = None) -> None:
    """Raise TrainingError when any pair's score (margin, log-probs) is NaN or ±inf.

    A NaN margin is not > 0, so it would count as "wrong" and give an accuracy that looks real.
    `split` / `model` default to the frame's `split` / `model` columns (evaluate_splits adds them)."""
    cols = [c for c in SCORE_COLUMNS if c in df]
    if df.empty or not cols:
        return
    bad = ~np.isfinite(df[cols].to_numpy(dtype=float)).all(axis=1)
    if not bad.any():
        return
    split = split or (str(df.split.iloc[0]) if "split" in df else None)
    model = model or (str(df.model.iloc[0]) if "model" in df else None)
    where = ", ".join(f"{k} {v!r}" for k, v in (("split", split), ("model", model)) if v is not None)
    raise TrainingError(
        f"Scores of {where or 'a split'}: {int(bad.sum())} of {len(df)} pairs are non-finite "
        f"(NaN/inf in {', '.join(cols)}), so no accuracy is reported. Likely cause: "
        + ("a non-finite adapter (check the training run's losses; retrain with a lower lr)"
           if model == "adapter" else "a corrupt model checkpoint or non-finite weights (re-convert or re-download it)")
        + ", or a dtype that overflows (try --model.dtype float32)."
    )


def summarize(df: pd.DataFrame, *, split: str | None = None, model: str | None = None) -> dict[str, float]:
    """accuracy (ties 0.5), mean margin of ℓ̄, chosen perplexity = exp(−mean ℓ̄⁺) (geometric mean).

    Non-finite scores raise TrainingError (`check_finite`) instead of becoming a result."""
    check_finite(df, split=split, model=model)
    return {
        "n": int(len(df)),
        "accuracy": float(df.correct.mean()),
        "margin": float(df.margin.mean()),
        "chosen_ppl": float(np.exp(-df.chosen_logp_mean.mean())) if "chosen_logp_mean" in df else float("nan"),
    }


def base_scores_cached(model, pairs: list[TokenizedPair], *, pad_id: int, batch_size: int, layout: Layout = PADDED,
                       chunk: int = 2048, scorer: Scorer | None = None, desc: str = "score (base)", progress: bool = True) -> pd.DataFrame:
    """Base-model scores of a log-prob scorer from the offline reference cache (computed once per model x data)."""
    from reprpo.model.refcache import build_ref_cache

    scorer = scorer or SCORERS["logp_mean"]
    c = build_ref_cache(model, pairs, pad_id=pad_id, layout=layout, batch_size=batch_size, chunk=chunk, desc=desc, progress=progress)
    row = {int(i): r for r, i in enumerate(c.pair_index.tolist())}
    r = [row[p.index] for p in pairs]
    cols = {"chosen_logp_sum": c.logp_sum[r, 0], "rejected_logp_sum": c.logp_sum[r, 1],
            "chosen_tokens": c.n_tokens[r, 0], "rejected_tokens": c.n_tokens[r, 1]}
    margin = scorer.from_logps(cols)
    return finish_scores(pd.DataFrame({"pair": [p.index for p in pairs]} | {k: v.tolist() for k, v in cols.items()}
                                      | {"margin": margin.tolist()}))


def base_scorer(scorer: Scorer) -> Scorer:
    """The scorer of the base model's row: `scorer.base` when set (a reward head or probe scores
    the adapter; the base is the zero-shot ℓ̄ margin), else the scorer itself."""
    return SCORERS[scorer.base] if scorer.base else scorer


def evaluate_splits(model, tokenizer, splits: dict[str, list[TokenizedPair]], *, batch_size: int, with_adapter: bool = True,
                    layout: Layout = PADDED, ref_cache: bool = False, chunk: int = 2048, workers: int = 1,
                    scorer: Scorer | None = None, method=None, progress: bool = True,
                    autocast: torch.dtype | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score each split for `base` (adapter off) and, if present, `adapter` (`workers`: see score_pairs;
    base scores from the reference cache are computed in one thread, as its activation capture needs).

    With `ref_cache`, base scores come from (and go to) the offline reference cache (log-prob
    scorers only). One progress bar per split and model, `score SPLIT (MODEL)` (`progress=False`: none).
    Returns (summary table: one row per split, per-pair rows with split and model columns)."""
    per_pair, table = [], []
    pad = tokenizer.pad_token_id
    scorer = scorer or SCORERS["logp_mean"]
    for split, pairs in splits.items():
        row: dict[str, object] = {"split": split}
        variants = [("base", True)] + ([("adapter", False)] if with_adapter else [])
        for name, disable in variants:
            sc = base_scorer(scorer) if disable else scorer
            lay = {"layout": layout, "scorer": sc, "progress": progress, "desc": f"score {split} ({name})"}
            if disable and ref_cache and sc.from_logps is not None:
                # the cache is keyed by the autocast in force (model/refcache.py), so fp32 and bf16 scores never mix
                with torch.autocast(next(model.parameters()).device.type, dtype=autocast, enabled=autocast is not None):
                    df = base_scores_cached(model, pairs, pad_id=pad, batch_size=batch_size, chunk=chunk, **lay)
            elif disable:
                with adapter_disabled(model):
                    df = score_pairs(model, pairs, pad_id=pad, batch_size=batch_size, chunk=chunk, workers=workers,
                                     autocast=autocast, **lay)
            else:
                df = score_pairs(model, pairs, pad_id=pad, batch_size=batch_size, chunk=chunk, workers=workers,
                                 method=method if sc.needs_method else None, autocast=autocast, **lay)
            df.insert(0, "model", name)
            df.insert(0, "split", split)
            per_pair.append(df)
            s = summarize(df, split=split, model=name)
            row["n"] = s["n"]
            row |= {f"{name}_{k}": v for k, v in s.items() if k != "n"}
        if with_adapter:
            row["delta_pp"] = delta_pp(row["adapter_accuracy"], row["base_accuracy"])
            # a reward head / probe is not the LM's score: its perplexity ratio says nothing about it (n/a)
            row["ppl_ratio"] = ppl_ratio(row["adapter_chosen_ppl"], row["base_chosen_ppl"]) if scorer.lm else float("nan")
        table.append(row)
    return pd.DataFrame(table), pd.concat(per_pair, ignore_index=True)


def markdown_table(table: pd.DataFrame) -> str:
    """The summary as a markdown table (accuracies in %, Δ in percentage points).

    With a `source` column (evaluate_run adds it), one line per split names its source first,
    e.g. `- test: my.json (held-out 10% by prompt, 23 pairs)`, after a line saying so when the
    splits are slices of the training source (`data.train` alone: no separate eval data)."""
    from reprpo.data.readers import split_holdout

    lines = []
    if "source" in table:
        holdouts = [h for _, h in map(split_holdout, table["source"].astype(str)) if h is not None]
        if holdouts:
            lines.append(f"No eval data was given (data.eval, data.shift): the splits are slices of the training "
                         f"data split by prompt; `test` is the held-out {100 * holdouts[0].fraction:g}% of its prompts "
                         "(never trained on), `train` is in-sample. Pass --data.eval NAME=SOURCE for a separate eval set.")
            lines.append("")
        for _, r in table.iterrows():
            name, h = split_holdout(str(r.source))
            lines.append(f"- {r.split}: {name} ({h.describe() + ', ' if h else ''}{int(r.n)} pairs)")
        lines.append("")
    has_adapter = "adapter_accuracy" in table
    head = ["split", "n", "base acc %"] + (["adapter acc %", "Δ pp"] if has_adapter else []) + ["base margin"] + (["adapter margin", "ppl ratio"] if has_adapter else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r.split), str(int(r.n)), f"{100 * r.base_accuracy:.1f}"]
        if has_adapter:
            cells += [f"{100 * r.adapter_accuracy:.1f}", f"{r.delta_pp:+.1f}"]
        cells += [f"{r.base_margin:+.3f}"]
        if has_adapter:
            cells += [f"{r.adapter_margin:+.3f}", f"{r.ppl_ratio:.3f}" if np.isfinite(r.ppl_ratio) else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_eval(out: Path, table: pd.DataFrame, per_pair: pd.DataFrame, *, fmt: str = "parquet") -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(table) + "\n")
    if fmt == "parquet":
        per_pair.to_parquet(out / "per_pair.parquet", index=False)
    else:
        per_pair.to_csv(out / "per_pair.csv", index=False)


def scoring_setup(cfg, model, *, device_type: str) -> dict:
    """Keyword arguments of `score_pairs` / `evaluate_splits` that `cfg.speed` and `cfg.eval`
    ask for (layout with the scoring kernel, batch size, chunk, workers, scorer). One rule for
    `evaluate_run` and `tune`; the layout is train()'s (`build_layout`), so a training reference
    cache of the same data is reused."""
    from reprpo.errors import ConfigError
    from reprpo.methods.presets import scorer_of
    from reprpo.model.layout import build_layout

    dtypes = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.eval.mixed_precision not in dtypes:
        raise ConfigError(f"eval.mixed_precision {cfg.eval.mixed_precision!r}: expected no, bf16 or fp16.")
    return {"layout": build_layout(cfg.speed, model, stage="score", device_type=device_type), "chunk": cfg.speed.logit_chunk,
            "batch_size": cfg.eval.batch_size or (1 if device_type == "cpu" else 8),
            "workers": cfg.eval.workers or cpu_workers(device_type), "scorer": scorer_of(cfg),
            "autocast": dtypes[cfg.eval.mixed_precision]}


def run_method(cfg, model, run_dir: str | Path | None):
    """The method object a scorer reads (`Scorer.needs_method`: a reward head, a probe
    direction), rebuilt from the run's config with its method_state.pt loaded; None when the
    run's scorer does not read one."""
    from reprpo.errors import ConfigError
    from reprpo.methods.presets import build_method, scorer_of

    if not scorer_of(cfg).needs_method or run_dir is None:
        return None
    path = Path(run_dir) / "method_state.pt"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no method_state.pt, which the {cfg.train.method} scorer reads (its head or direction). "
                          "Retrain the run; a directory made by `reprpo export --adapter` holds only the LoRA part.")
    method = build_method(cfg, model)
    method.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return method.to(next(model.parameters()).device).eval()


def evaluate_run(cfg, *, adapter_dir: str | Path | None, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load the base model (+ the adapter in `adapter_dir`), prepare the config's eval splits,
    score them and write summary.{md,csv} and per-pair scores to `out`."""
    from reprpo.data.prepare import prepare
    from reprpo.data.shifts import sources_of
    from reprpo.model.loading import device_type, load_model
    from reprpo.model.memory import keep_freed_memory

    if cfg.speed.keep_memory:
        keep_freed_memory()
    device = device_type(cfg.train.device)
    model, tok = load_model(cfg.model, adapter=adapter_dir, device=device)
    _, sources = sources_of(cfg.data)  # the rule train() uses, so a held-out slice is the one it left out
    splits, notes = {}, []
    for name, src in sources.items():
        prep = prepare(src, tok, cfg.data, limit=cfg.data.n_eval)
        splits[name] = prep.tokenized
        notes.append(f"{name}: {prep.summary()}")
    table, per_pair = evaluate_splits(model, tok, splits, with_adapter=adapter_dir is not None, ref_cache=cfg.speed.ref_cache,
                                      method=run_method(cfg, model, adapter_dir), progress=cfg.train.progress,
                                      **scoring_setup(cfg, model, device_type=device))
    table.insert(1, "source", [sources[s] for s in table["split"]])  # each split's source, in summary.{csv,md}
    write_eval(out, table, per_pair, fmt=cfg.eval.per_pair_format)
    (out / "data.txt").write_text("\n".join(notes) + "\n")
    return table, per_pair
