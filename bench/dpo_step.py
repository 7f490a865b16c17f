"""Benchmarks of ../shared/BENCH.md: W1 (DPO step vs TRL), W2 (scoring), W3 (method overhead).

    python bench/dpo_step.py w1 [--repeats 2]   # ours (all levers on), ours (all off), TRL if installed
    python bench/dpo_step.py w2 [--repeats 2]   # pairs/s of our scorer vs a naive loop, same scores
    python bench/dpo_step.py w3 [--presets a,b] # s/step of representation presets / our DPO
                                                # (an entry may add options: "dpo --speed.share_prefix false")
    python bench/dpo_step.py w1-match           # all levers off, file order: per-step losses vs TRL
    python bench/dpo_step.py w1-scale [--repeats 2]  # ours in fp32 / bf16 / autocast / checkpointing / compile

Each program runs in its own subprocess (alternating, so drift hits all alike) and reports
its own peak RSS. Figures: medians of steps 2..8 and same-run ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENIES = ROOT.parent / "shared" / "data" / "genies"
W1_DATA = GENIES / "us_history_textbook" / "train.json"
W2_DATA = GENIES / "code_hard" / "test.json"
OFF = ["--speed.share_prompt", "false", "--speed.ref_cache", "false", "--speed.response_logits", "false",
       "--speed.length_batches", "false", "--speed.share_prefix", "false", "--speed.keep_memory", "false",
       "--speed.share_response", "false"]
W3_PRESETS = ["hs-none-prefvec", "hs-pca-prefvec", "hs-hra-prefvec", "hs-ether-prefvec", "hs-ortho-prefvec",
              "hs-unembed_null-prefvec", "hs-suppressed-prefvec", "hs-none-mse", "hs-none-rank",
              "hs-none-innerdpo", "hs-none-innerpo", "side-none-prefvec", "projgrad", "projbp", "fpo", "hs-sae-prefvec"]
# fpo / hs-sae-*: a random TopK SAE of width 16·d, k 32 at the middle block (the speed does not
# depend on the weights); pass --method.sae PATH after the preset to time another
W3_SAE = {"d": 576, "width": 16 * 576, "k": 32, "layer": 15}
# W1 with the scaling options (README "Scaling up"); "reprpo" = fp32, every speed lever on
W1_SCALE = {"bf16": ["--model.dtype", "bfloat16", "--train.mixed_precision", "bf16"],
            "autocast-bf16": ["--train.mixed_precision", "bf16"],
            "grad-checkpointing": ["--train.gradient_checkpointing", "true"],
            "compile": ["--speed.compile", "true"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_steps(xs: list[float]) -> float:
    return statistics.median(xs[1:]) if len(xs) > 1 else xs[0]


# --- child programs (each prints one JSON line) ----------------------------------------------
def child_ours(argv: list[str]) -> None:
    """W1 with our loop; argv are extra `--section.field value` options."""
    import pandas as pd

    from reprpo.cli import build_config, parser
    from reprpo.train import train

    out = tempfile.mkdtemp(prefix="w1-")
    init = os.environ.get("REPRPO_BENCH_LORA_INIT")
    if init:  # start from another program's LoRA weights (like-for-like loss check only)
        import reprpo.train as rt

        make = rt.make_lora

        def make_from_init(model, cfg):
            import torch

            peft = make(model, cfg)
            state = torch.load(init, weights_only=True)
            params = dict(peft.named_parameters())
            missing = [n for n in state if n not in params]
            if missing:
                raise SystemExit(f"LoRA init names do not match: {missing[:3]}")
            with torch.no_grad():
                for n, v in state.items():
                    params[n].copy_(v)
            return peft

        rt.make_lora = make_from_init
    args = parser().parse_args([
        "train", "--model.name", "smollm2-135m-instruct", "--data.shift", "", "--data.train", str(W1_DATA),
        "--data.n_train", "32", "--data.max_length", "256", "--data.max_prompt_length", "192",
        "--data.chat_template", "false", "--lora.r", "16", "--lora.alpha", "16", "--lora.dropout", "0",
        "--train.batch_size", "4", "--train.max_steps", "8", "--train.lr", "1e-4", "--train.warmup_ratio", "0",
        "--train.schedule", "linear", "--train.progress", "false", "--eval.after_train", "false",
        "--method.k", "16", "--out", out, *argv,
    ])
    cfg = build_config(args)
    t0 = time.perf_counter()
    run = train(cfg)
    total = time.perf_counter() - t0
    m = pd.read_csv(run / "metrics.csv")
    rep = json.loads((run / "train_report.json").read_text())
    print(json.dumps({"program": "reprpo", "method": cfg.train.method, "argv": argv,
                      "sec_per_step": m.sec_per_step.tolist(), "loss": m.loss.tolist(),
                      "peak_rss_mb": peak_rss_mb(), "total_sec": total, "layout": rep["layout"],
                      "reference_cache_sec": rep["reference_cache_seconds"], "pad_waste": rep["pad_waste"]}))


def _w2_pairs(n_pairs: int):
    from reprpo.config import RunConfig, apply_overrides
    from reprpo.data.prepare import prepare
    from reprpo.model.loading import load_model_and_tokenizer

    cfg = apply_overrides(RunConfig(), {"data.max_length": 512, "data.max_prompt_length": 384}, where="w2")
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    model.eval()
    pairs = prepare(str(W2_DATA), tok, cfg.data, limit=n_pairs).tokenized
    return model, tok, pairs


def child_w2(program: str, n_pairs: int, batch_size: int, workers: int) -> None:
    """W2 scoring, one program per process, per-pair mean log-probs printed with the time.

    naive: one pair per forward ([chosen; rejected] padded into 2 rows), full logits and a
    log-softmax over the vocabulary, default allocator -- what a plain loop does.
    reprpo: `score_pairs` with every speed lever (length-sorted batches, prompt encoded once,
    the template header encoded once and reused, the response tokens chosen and rejected share
    encoded once, logits at response tokens only, blocked attention, worker threads with one
    torch thread each (eval.workers auto), speed.keep_memory)."""
    import torch

    from reprpo.data.tokenize import collate_pairs
    from reprpo.model.forward import sequence_logps

    if program == "reprpo":
        from reprpo.model.memory import keep_freed_memory

        keep_freed_memory()
    model, tok, pairs = _w2_pairs(n_pairs)
    print(f"w2 {program}: {len(pairs)} pairs, mean tokens/pair {sum(p.length for p in pairs) / len(pairs):.0f}", file=sys.stderr)
    t0 = time.perf_counter()
    if program == "reprpo":
        from reprpo.data.layout import Layout
        from reprpo.eval.scoring import cpu_workers, score_pairs
        from reprpo.model.layout import resolve_packed_attention

        layout = Layout(packed=True, share_prefix=True, share_response=True,
                        attention=resolve_packed_attention("auto", training=False, device_type="cpu"))
        df = score_pairs(model, pairs, pad_id=tok.pad_token_id, batch_size=batch_size, layout=layout,
                         workers=workers or cpu_workers("cpu"))
        scores = list(zip(df.chosen_logp_mean.tolist(), df.rejected_logp_mean.tolist()))
    else:
        scores = []
        with torch.no_grad():
            for p in pairs:
                lp = sequence_logps(model, collate_pairs([p], pad_id=tok.pad_token_id), full_logits=True)
                scores.append((lp.logp_mean[0].item(), lp.logp_mean[1].item()))
    sec = time.perf_counter() - t0
    print(json.dumps({"program": program, "pairs": len(pairs), "sec": sec, "pairs_per_s": len(pairs) / sec,
                      "scores": scores, "peak_rss_mb": peak_rss_mb()}))


# --- orchestration ---------------------------------------------------------------------------
def run_child(cmd: list[str], env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"benchmark child failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch
    import transformers

    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["w1", "w2", "w3", "w1-match", "w1-scale", "_ours", "_w2"])
    ap.add_argument("--program", default="reprpo", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help="w2: pairs per scoring batch (ours; 1 is fastest on CPU: no padding)")
    ap.add_argument("--workers", type=int, default=0, help="w2: our scoring threads (0 = auto, as eval.workers)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds of every program")
    ap.add_argument("--presets", default=",".join(W3_PRESETS), help="w3: comma list of presets")
    ap.add_argument("--pairs", type=int, default=128, help="w2: pairs of code_hard test.json to score")
    ap.add_argument("--no-trl", action="store_true", help="w1: skip TRL even if installed")
    args, rest = ap.parse_known_args()
    if args.workload == "_ours":
        return child_ours(rest)
    if args.workload == "_w2":
        return child_w2(args.program, args.pairs, args.batch, args.workers)
    if not GENIES.is_dir():
        raise SystemExit(f"GENIES data not found at {GENIES}: the benchmarks need ../shared/data/genies.")
    env = dict(os.environ)
    me = str(Path(__file__).resolve())
    print(f"# {args.workload} on {machine()}; command: python bench/dpo_step.py {' '.join(sys.argv[1:])}")

    if args.workload == "w2":
        runs: dict[str, list[dict]] = {"naive": [], "reprpo": []}
        for rnd in range(args.repeats):
            for prog in runs:
                r = run_child([me, "_w2", "--program", prog, "--pairs", str(args.pairs), "--batch", str(args.batch),
                               "--workers", str(args.workers)], env)
                runs[prog].append(r)
                print(f"round {rnd + 1} {prog}: {r['pairs_per_s']:.3f} pairs/s ({r['sec']:.0f} s), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        gap = max(abs(a - b) for rn, rf in zip(runs["naive"], runs["reprpo"])
                  for x, y in zip(rn["scores"], rf["scores"]) for a, b in zip(x, y))
        rates = {k: statistics.median(r["pairs_per_s"] for r in v) for k, v in runs.items()}
        print(f"\nW2: reprpo {rates['reprpo']:.3f} pairs/s vs naive {rates['naive']:.3f} pairs/s = "
              f"{rates['reprpo'] / rates['naive']:.2f}x (medians of {args.repeats} rounds); "
              f"max |score gap| {gap:.2e} ({'within' if gap <= 1e-4 else 'NOT within'} 1e-4)")
        return

    if args.workload == "w1-match":
        init = str(Path(tempfile.mkdtemp()) / "lora_init.pt")
        trl = run_child([str(ROOT / "bench" / "trl_w1.py"), "--sequential", "--save-init", init], env)
        ours = run_child([me, "_ours", *OFF, "--train.shuffle", "false"], env | {"REPRPO_BENCH_LORA_INIT": init})
        gap = max(abs(a - b) for a, b in zip(trl["loss"], ours["loss"]))
        print("| step | TRL loss | reprpo loss (levers off) | |diff| |\n|---|---|---|---|")
        for i, (a, b) in enumerate(zip(trl["loss"], ours["loss"]), 1):
            print(f"| {i} | {a:.6f} | {b:.6f} | {abs(a - b):.2e} |")
        print(f"max |diff| over {len(ours['loss'])} steps: {gap:.2e} ({'within' if gap <= 1e-3 else 'NOT within'} 1e-3)")
        return

    if args.workload == "w1":
        programs = {"reprpo": [me, "_ours"], "reprpo-all-off": [me, "_ours", *OFF]}
        have_trl = (ROOT / "bench" / "trl_w1.py").is_file() and not args.no_trl and subprocess.run(
            [sys.executable, "-c", "import trl"], capture_output=True).returncode == 0
        if have_trl:
            programs["trl"] = [str(ROOT / "bench" / "trl_w1.py")]
            programs["trl-precompute-ref"] = [str(ROOT / "bench" / "trl_w1.py"), "--precompute-ref"]
    elif args.workload == "w1-scale":
        programs = {"reprpo": [me, "_ours"]} | {k: [me, "_ours", *v] for k, v in W1_SCALE.items()}
    else:
        # an entry may carry options after the preset: "dpo --speed.share_prefix false"
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
        programs = {"dpo": [me, "_ours"]} | {p: [me, "_ours", "--train.method", *shlex.split(p)] for p in presets}
        sae_users = [p for p in presets if (p.split()[0] == "fpo" or "-sae-" in p.split()[0]) and "--method.sae" not in p]
        if sae_users:
            from reprpo.model.sae import TopKSAE

            sae_dir = Path(tempfile.mkdtemp(prefix="w3-sae-"))
            TopKSAE(**W3_SAE).save(sae_dir)
            for p in sae_users:
                programs[p] += ["--method.sae", str(sae_dir)]

    results: dict[str, list[dict]] = {k: [] for k in programs}
    for rnd in range(args.repeats):
        for name, cmd in programs.items():
            r = run_child(cmd, env)
            results[name].append(r)
            print(f"round {rnd + 1} {name}: median {median_steps(r['sec_per_step']):.2f} s/step, "
                  f"step-1 loss {r['loss'][0]:.4f}, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)

    def med(name: str) -> float:
        return statistics.median([median_steps(r["sec_per_step"]) for r in results[name]])

    base = "dpo" if args.workload == "w3" else "reprpo"
    print("\n| program | s/step (median, steps 2-8) | ratio | step-1 loss | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name in programs:
        ratio = med(name) / med(base)
        print(f"| {name} | {med(name):.2f} | {ratio:.2f} | {results[name][0]['loss'][0]:.4f} | "
              f"{max(r['peak_rss_mb'] for r in results[name]):.0f} |")
    if args.workload == "w1" and "trl" in results:
        print(f"\nW1: TRL / reprpo = {med('trl') / med('reprpo'):.2f}x "
              f"(TRL with precomputed reference / reprpo = {med('trl-precompute-ref') / med('reprpo'):.2f}x)")
    Path(ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"{args.workload}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
