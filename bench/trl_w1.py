"""W1 peer: TRL DPOTrainer on the W1 workload (see ../shared/BENCH.md).

Prints ONE JSON line on stdout; everything else goes to stderr.

    python bench/trl_w1.py                  # normal (TRL's random sampler, seed 42)
    python bench/trl_w1.py --precompute-ref # precompute_ref_log_probs=True
    python bench/trl_w1.py --sequential     # consume records 0..31 in file order (loss-matching check)

Notes
- W1 says "no gradient checkpointing", but TRL's configs default to gradient_checkpointing=True;
  this script sets it to False unless --gradient-checkpointing is given (TRL's default).
- --sequential uses transformers' own TrainingArguments option
  `train_sampling_strategy="sequential"` (transformers >= 5.x: Trainer._get_train_sampler returns a
  SequentialSampler), so no Trainer method is overridden for it.
- The consumption order is recovered observationally: a subclass wraps `training_step` only to
  read the batch's input_ids and match each chosen row to the tokenised records; it does not change
  what TRL computes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

DATA = "/work/shared/data/genies/us_history_textbook/train.json"
N_RECORDS = 32
REAL_STDOUT = sys.stdout


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load_records(n=N_RECORDS):
    with open(DATA) as f:
        records = json.load(f)[:n]
    rows = []
    for i, r in enumerate(records):
        chosen = [t for t, s in r["responses"].items() if s == 1.0]
        rejected = [t for t, s in r["responses"].items() if s == 0.0]  # dict (file) order
        if len(chosen) != 1 or not rejected:
            raise SystemExit(f"record {i}: expected one response scored 1.0 and one scored 0.0")
        rows.append({"prompt": r["prompt"], "chosen": chosen[0], "rejected": rejected[0]})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precompute-ref", action="store_true", help="precompute_ref_log_probs=True")
    ap.add_argument("--sequential", action="store_true", help="consume records in file order")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="TRL's default (True); W1 wants it off, which is this script's default")
    ap.add_argument("--save-init", default=None, help="save the initial LoRA weights here (for a like-for-like loss check)")
    ap.add_argument("--output-dir", default=None, help="Trainer output_dir (nothing is saved); default: a temp dir")
    args = ap.parse_args()

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(2)

    import tempfile

    import datasets
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from reprpo.model.loading import resolve_model

    datasets.disable_progress_bars()
    log(f"torch {torch.__version__} threads={torch.get_num_threads()} transformers {transformers.__version__} "
        f"trl {trl.__version__} peft {peft.__version__} datasets {datasets.__version__} cpus={os.cpu_count()}")

    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    rows = load_records()
    ds = Dataset.from_list(rows)

    peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="trl_w1_")
    cfg = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        max_length=256,
        num_train_epochs=1,
        learning_rate=1e-4,
        bf16=False,
        use_cpu=True,
        gradient_accumulation_steps=1,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        beta=0.1,
        loss_type=["sigmoid"],
        optim="adamw_torch",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=42,
        dataloader_num_workers=0,
        precompute_ref_log_probs=args.precompute_ref,
        train_sampling_strategy="sequential" if args.sequential else "random",
        disable_tqdm=True,
    )

    consumed: list[list[int]] = []  # raw batches of input_ids rows (chosen half), matched after init

    class _RecordingDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, *a, **kw):
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            half = ids.shape[0] // 2  # batch is [chosen; rejected]
            consumed.append([tuple(ids[r][mask[r].bool()].tolist()) for r in range(half)])
            return super().training_step(model, inputs, *a, **kw)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.sec = []
            self.loss = []
            self.logs = []

        def on_train_begin(self, a, state, control, model=None, **kw):
            if args.save_init and model is not None:
                torch.save({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}, args.save_init)

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.sec.append(time.perf_counter() - self.t0)
            log(f"step {state.global_step}: {self.sec[-1]:.2f} s")

        def on_log(self, a, state, control, logs=None, **kw):
            logs = logs or {}
            self.logs.append(dict(logs))
            if "loss" in logs:
                self.loss.append(float(logs["loss"]))
                log(f"log step {state.global_step}: loss {logs['loss']:.6f} "
                    f"lr {logs.get('learning_rate')} grad_norm {logs.get('grad_norm')}")

    timer = Timer()
    t_init = time.perf_counter()
    trainer = _RecordingDPOTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[timer]
    )
    init_sec = time.perf_counter() - t_init
    log(f"trainer init (tokenise{' + precompute ref' if args.precompute_ref else ''}): {init_sec:.1f} s")

    # --- tokenisation facts -------------------------------------------------------------------
    tds = trainer.train_dataset
    prompt_index = {r["prompt"]: i for i, r in enumerate(rows)}
    if len(prompt_index) != len(rows):
        log("warning: duplicate prompts among the 32 records; order mapping may be ambiguous")
    key_to_idx = {}
    n_prompt_not_prefix = 0
    n_trunc = 0
    lens = {"prompt": [], "chosen": [], "rejected": []}
    bos_first = 0
    for j in range(len(tds)):
        ex = tds[j]
        idx = prompt_index[ex["prompt"]]
        full = tok(ex["prompt"])["input_ids"]
        bos_first += int(len(ex["prompt_ids"]) > 0 and ex["prompt_ids"][0] == tok.bos_token_id)
        n_prompt_not_prefix += int(len(ex["prompt_ids"]) < len(full))
        for k in lens:
            lens[k].append(len(ex[f"{k}_ids"]))
        n_trunc += int(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) > cfg.max_length)
        n_trunc += int(len(ex["prompt_ids"]) + len(ex["rejected_ids"]) > cfg.max_length)
        key_to_idx[tuple((ex["prompt_ids"] + ex["chosen_ids"])[: cfg.max_length])] = idx
    eos_id = tok.eos_token_id
    ends_eos = sum(int(ex["chosen_ids"][-1] == eos_id and ex["rejected_ids"][-1] == eos_id) for ex in tds)
    tokenisation = {
        "tokenizer_add_bos": bool(tok("x")["input_ids"][:1] == [tok.bos_token_id]),
        "bos_token": tok.bos_token,
        "prompts_starting_with_bos": bos_first,
        "eos_appended_to_completions": ends_eos == len(tds),
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "max_length": cfg.max_length,
        "truncation_mode": cfg.truncation_mode,
        "max_prompt_length": getattr(cfg, "max_prompt_length", "absent in this TRL version"),
        "max_completion_length": getattr(cfg, "max_completion_length", "absent in this TRL version"),
        "truncated_sequences": n_trunc,
        "records_kept": len(tds),
        "prompt_not_prefix_of_prompt_plus_completion": n_prompt_not_prefix,
        "mean_tokens": {k: round(statistics.mean(v), 1) for k, v in lens.items()},
        "note": "completion log-probs are summed over completion tokens (incl. the appended EOS); "
                "tokeniser called with add_special_tokens default; right padding; pad id = "
                f"{tok.pad_token_id}",
    }
    log("tokenisation:", json.dumps(tokenisation))
    log(f"sampler: train_sampling_strategy={cfg.train_sampling_strategy!r}, "
        f"lr_scheduler_type={cfg.lr_scheduler_type}, gradient_checkpointing={cfg.gradient_checkpointing}")

    trainer.train()

    order = []
    for batch in consumed:
        for key in batch:
            order.append(key_to_idx.get(tuple(key[: cfg.max_length]), None))
    sec = timer.sec
    result = {
        "program": "trl",
        "version": trl.__version__,
        "sec_per_step": sec,
        "median_sec_steps_2_8": statistics.median(sec[1:]) if len(sec) > 1 else None,
        "loss": timer.loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precompute_ref": args.precompute_ref,
        "sequential": args.sequential,
        "sampler": f"TrainingArguments.train_sampling_strategy={cfg.train_sampling_strategy!r}",
        "gradient_checkpointing": bool(cfg.gradient_checkpointing),
        "lr_scheduler_type": str(getattr(cfg.lr_scheduler_type, "value", cfg.lr_scheduler_type)),
        "order": order,
        "init_sec": init_sec,
        "tokenisation": tokenisation,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    REAL_STDOUT.write(json.dumps(result) + "\n")
    REAL_STDOUT.flush()


if __name__ == "__main__":
    # keep stdout clean: libraries printing to stdout go to stderr; only the JSON line goes to stdout
    sys.stdout = sys.stderr
    main()
