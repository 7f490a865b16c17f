"""The training loop: LoRA adapter, one forward over [chosen; rejected], accelerate, logging.

Read top to bottom: setup -> data -> adapter -> optimiser/schedule -> loop -> save.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from reprpo.config import RunConfig, save_yaml, to_dict, to_flat
from reprpo.data.prepare import prepare
from reprpo.data.shifts import sources_of
from reprpo.errors import ConfigError, TrainingError
from reprpo.methods import build_method
from reprpo.methods.gradproj import lora_modules
from reprpo.methods.presets import preset, preset_note
from reprpo.model.forward import Policy, through
from reprpo.model.layout import build_layout
from reprpo.model.loading import device_type, is_quantized, load_model
from reprpo.model.memory import compile_blocks, enable_gradient_checkpointing, keep_freed_memory
from reprpo.model.refcache import build_ref_cache
from reprpo.progress import bar as progress_bar


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.train.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def make_lora(model, cfg: RunConfig):
    """The trained adapter on `model`, as `train.adapter` says: PEFT LoRA, or a representation
    adapter (loreft / vector at the blocks of method.layers, `model/interventions.py`)."""
    if cfg.method.bipo_flip and (cfg.train.adapter != "vector" or preset(cfg.train.method).kind != "output"):
        raise ConfigError(f"method.bipo_flip flips a learned vector in an output loss: it needs --train.adapter vector "
                          f"(got {cfg.train.adapter}) and an output-loss method such as bipo or dpo (got {cfg.train.method}).")
    if cfg.train.adapter != "lora":
        from reprpo.model import interventions

        return interventions.from_config(model, cfg)
    from peft import LoraConfig, get_peft_model

    tm = cfg.lora.target_modules
    targets = tm if tm == "all-linear" else [s.strip() for s in tm.split(",") if s.strip()]
    lcfg = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=targets, task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules={tm!r}: {e}") from e


class LengthGroupedBatches:
    """Batches of pair indices, reshuffled every epoch (seeded).

    With `group`, pairs are shuffled, cut into windows of 16 batches, sorted by length inside
    each window, batched, and the batches shuffled: similar lengths share a batch (less
    padding) while the order stays random."""

    def __init__(self, lengths: list[int], *, batch_size: int, seed: int, group: bool = True, window: int = 16, shuffle: bool = True):
        self.lengths, self.bs, self.group, self.window, self.shuffle = lengths, batch_size, group, window, shuffle
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch_start = self.gen.get_state()  # generator state when the current epoch began
        self._skip = 0

    def resume(self, epoch_start: torch.Tensor, *, skip: int) -> None:
        """Continue an epoch: the generator as it began, its first `skip` batches left out."""
        self.gen.set_state(epoch_start)
        self._skip = skip

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.bs)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.epoch_start = self.gen.get_state()
        for i, batch in enumerate(self._batches()):
            if i >= skip:
                yield batch

    def _batches(self):
        if not self.shuffle:  # file order, fixed batches
            yield from ([*range(i, min(i + self.bs, len(self.lengths)))] for i in range(0, len(self.lengths), self.bs))
            return
        perm = torch.randperm(len(self.lengths), generator=self.gen).tolist()
        if not self.group:
            yield from (perm[i : i + self.bs] for i in range(0, len(perm), self.bs))
            return
        span = self.bs * self.window
        batches = []
        for w in range(0, len(perm), span):
            win = sorted(perm[w : w + span], key=lambda i: -self.lengths[i])
            batches += [win[i : i + self.bs] for i in range(0, len(win), self.bs)]
        order = torch.randperm(len(batches), generator=self.gen).tolist()
        yield from (batches[i] for i in order)


def make_scheduler(optimizer, *, schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MetricsLog:
    """One row per logged step: metrics.csv (always: resume, compare and the report read it),
    plus the trackers of `train.report_to` (TensorBoard, Weights & Biases). A row with keys the
    earlier rows lack (in-training evaluation) widens the CSV: the file is rewritten with the
    union header, earlier rows blank there."""

    def __init__(self, out: Path, *, trackers: tuple[str, ...] = ("tensorboard",), rows: list[dict[str, float]] = (),
                 purge_step: int | None = None, config: dict | None = None):
        """`rows`: the rows of a resumed run so far (metrics.csv is rewritten with them, and
        TensorBoard drops what an interrupted attempt logged from `purge_step` on)."""
        self.path = out / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        self._fields: list[str] = []
        self._fh = self._writer = self.tb = self.wandb = None
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=purge_step if rows else None)
        if "wandb" in trackers:
            self.wandb = start_wandb(out, config or {})
        for row in rows:
            self._row(row)

    def _row(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if self._writer is None or any(k not in self._fields for k in row):
            if self._fh:
                self._fh.close()
            self._fields = list(dict.fromkeys(k for r in self.rows for k in r))
            self._fh = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._fh, fieldnames=self._fields)
            self._writer.writeheader()
            self._writer.writerows(self.rows[:-1])
        self._writer.writerow(row)
        self._fh.flush()

    def write(self, row: dict[str, float]) -> None:
        self._row(row)
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, int(row["step"]))
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def close(self) -> None:
        if self._fh:
            self._fh.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def start_wandb(out: Path, config: dict):
    """A wandb run for this run directory: offline unless WANDB_MODE says otherwise (no network
    needed; `wandb sync OUT/wandb/...` uploads later); WANDB_PROJECT names the project
    (default reprpo). A resumed run continues the same wandb run (its id is kept in OUT)."""
    import os
    import uuid

    try:
        import wandb
    except ImportError as e:
        raise ConfigError("train.report_to wandb: the wandb package is not installed. pip install 'reprpo[wandb]' "
                          "(or pip install wandb), or drop wandb from --train.report_to.") from e
    id_file = out / ".wandb-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "reprpo"), name=out.name, id=run_id, resume="allow",
                     dir=str(out), config=config, mode=mode, settings=wandb.Settings(silent=True))
    print(f"wandb ({mode}): {out / 'wandb'}" + (" (upload later: wandb sync DIR)" if mode == "offline" else ""), file=sys.stderr)
    return run


class TrainingEval:
    """`train.eval_every`: the first `train.eval_pairs` pairs of every eval split, scored with the
    current adapter (the method's scorer, no grad, dropout off) every N steps; the rows get
    `eval/SPLIT/accuracy` and `eval/SPLIT/margin`. Every process scores the same slice (no
    collective calls); only process 0 logs."""

    def __init__(self, cfg: RunConfig, tok, model, *, device_type: str):
        from reprpo.eval.scoring import scoring_setup

        _, sources = sources_of(cfg.data)
        n = min(cfg.train.eval_pairs, cfg.data.n_eval) if cfg.data.n_eval else cfg.train.eval_pairs  # a slice of the final eval's pairs
        self.splits = {name: prepare(src, tok, cfg.data, limit=n).tokenized for name, src in sources.items()}
        self.pad_id = tok.pad_token_id
        self.setup = scoring_setup(cfg, model, device_type=device_type) | {"workers": 1}

    def __call__(self, model, method=None) -> dict[str, float]:
        from reprpo.eval.scoring import score_pairs

        was_training = model.training
        model.eval()
        try:
            out = {}
            for name, pairs in self.splits.items():
                df = score_pairs(model, pairs, pad_id=self.pad_id, progress=False, method=method, **self.setup)  # a few pairs: no bar
                out |= {f"eval/{name}/accuracy": float(df.correct.mean()), f"eval/{name}/margin": float(df.margin.mean())}
            return out
        finally:
            model.train(was_training)


def _finite(row: dict[str, float]) -> bool:
    return all(math.isfinite(v) for k, v in row.items() if k not in ("step", "epoch", "bad_steps"))


def check_fsdp(cfg: RunConfig, method) -> None:
    """What FSDP (accelerate's fsdp config) runs today: LoRA with a loss whose every forward is
    inside `Policy`. Parts that read or write sharded weights outside a forward are refused."""
    why = []
    if method.reference.directions:
        why.append(f"{cfg.train.method} projects LoRA gradients and updates outside the forward")
    if cfg.train.adapter != "lora":
        why.append(f"train.adapter {cfg.train.adapter} is saved from its module directly")
    if cfg.train.eval_every:
        why.append("train.eval_every scores with the weights outside the wrapped forward")
    if cfg.train.save_every:
        why.append("train.save_every checkpoints the adapter tensors of process 0 only")
    if why:
        raise ConfigError("under FSDP " + "; ".join(why) + ". Use DDP (configs/accelerate/ddp.yaml; "
                          "LoRA on a model that fits one GPU in bf16) or turn those options off.")


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """`--resume auto`: the newest checkpoint of `out` (None if there is none); `--resume DIR`:
    that checkpoint directory, or the newest one of that run directory."""
    from reprpo import checkpoint as ckpt

    if resume == "auto":
        found = ckpt.checkpoints(out)
        return found[-1] if found else None
    p = Path(resume)
    if (p / ckpt.META).is_file():
        return p
    found = ckpt.checkpoints(p)
    if not found:
        raise TrainingError(f"--resume {resume}: no checkpoint there (expected a run directory with checkpoints/step-N, "
                            "or a step-N directory). Train with --train.save_every N to write them.")
    return found[-1]


def train(cfg: RunConfig, *, resume: str | None = None) -> Path:
    """Train an adapter as `cfg` says; returns the output directory.

    `resume`: None starts clean (an earlier run in `cfg.out` is cleared); "auto" continues from
    the newest checkpoint in `cfg.out` when there is one (else starts clean); a path continues
    from that checkpoint. The run directory is locked while training writes it."""
    from reprpo.rundir import check_out_dir, run_lock

    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    check_out_dir(out)  # before anything loads: a bad --out costs nothing
    with run_lock(out):
        return _train(cfg, out, resume)


def _train(cfg: RunConfig, out: Path, resume: str | None) -> Path:
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import set_seed

    from reprpo import checkpoint as ckpt
    from reprpo.data.shifts import check_sources
    from reprpo.rundir import mark_run, start_clean

    t0 = time.time()
    tc = cfg.train
    # fail fast: the checkpoint to resume and every data source are checked before the model loads
    start = find_checkpoint(out, resume) if resume else None
    state, meta = None, None
    if start is not None:
        state, meta = ckpt.read_checkpoint(start)
        ckpt.check_matches(meta, to_flat(cfg), path=start)
    check_sources(cfg.data.shift, cfg.data.train, cfg.data.eval, eval_fraction=cfg.data.eval_fraction)
    trackers = [t.strip() for t in tc.report_to.split(",") if t.strip() not in ("", "csv", "none")]
    if "wandb" in trackers and importlib.util.find_spec("wandb") is None:
        start_wandb(out, {})  # the clear error, before the model loads
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    AcceleratorState._reset_state()  # one process may train runs of other mixed precisions (tests, tune, compare); the process group stays
    # find_unused_parameters: a representation loss read at block l leaves the LoRA of the blocks
    # above it without a gradient, which DDP must be told about (it then finds them each step)
    acc = Accelerator(cpu=device_type(tc.device) == "cpu", mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if start is None:
        if acc.is_main_process and start_clean(out):
            acc.print(f"{out}: held an earlier run; cleared (pass --resume auto to continue a run instead)")
    else:
        if acc.is_main_process:  # what the checkpoint does not cover is redone
            shutil.rmtree(out / "eval", ignore_errors=True)
        if acc.process_index:
            state, meta = ckpt.read_checkpoint(start, rank=acc.process_index)
    if acc.is_main_process:
        mark_run(out)
    acc.wait_for_everyone()
    set_seed(tc.seed)
    if cfg.speed.keep_memory:
        keep_freed_memory()

    # data
    model, tok = load_model(cfg.model)
    train_src, eval_sources = sources_of(cfg.data)
    data = prepare(train_src, tok, cfg.data, limit=cfg.data.n_train)
    for src in eval_sources.values():  # a held-out slice of the training file: not empty, before training
        if "#holdout=" in src and src != train_src:
            prepare(src, tok, cfg.data, limit=1)
    acc.print(f"train data: {data.summary()}")
    if note := preset_note(cfg):
        acc.print(note)

    # adapter (seeded: the LoRA init repeats) and method
    set_seed(tc.seed)
    if cfg.model.load_in_4bit:  # QLoRA: norms and head in float32, inputs that carry grad (PEFT's recipe)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = make_lora(model, cfg)
    model.train()
    method = build_method(cfg, model)
    if cfg.train.adapter != "lora" and method.reference.directions:
        raise ConfigError(f"{cfg.train.method} projects the gradients of LoRA modules; train.adapter {cfg.train.adapter} has none. "
                          "Use --train.adapter lora.")
    # one layout for every pass (reference cache and training batches alike, so their numerics
    # match): the header common to the whole training set, else each batch's own
    layout = build_layout(cfg.speed, model, stage="train", device_type=acc.device.type, packing=method.packing,
                          prefix=method.prefix and not tc.gradient_checkpointing).for_pairs(data.tokenized)
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model, attention=layout.attention if layout.packed else None)
    if cfg.speed.compile:
        if method.reference.directions or cfg.method.collection == "side":
            raise ConfigError(f"speed.compile: {cfg.train.method} hooks modules inside the decoder blocks, which the compiled "
                              "blocks would trace and recompile at every step. Set --speed.compile false.")
        compile_blocks(model)
    if not is_quantized(model):  # a 4-bit model was placed on its GPU when it loaded
        model.to(acc.device)
    cache, t_cache = None, time.time()
    need = method.reference
    if cfg.speed.ref_cache and need.cached:  # one reference pass now, none in the loop (for what the cache holds)
        # process 0 computes and saves it, the others then read it from disk; under the loop's
        # autocast (train.mixed_precision), so that the policy at init equals its reference
        with acc.main_process_first(), acc.autocast():
            cache = build_ref_cache(model, data.tokenized, pad_id=tok.pad_token_id, layout=layout, batch_size=tc.batch_size,
                                    points=list(need.points), pooling=cfg.method.pooling, outlier_quantile=cfg.method.outlier_quantile,
                                    chunk=cfg.speed.logit_chunk, directions=lora_modules(model) if need.directions else None,
                                    features=need.features,
                                    progress=tc.progress and acc.is_main_process)
    t_cache = time.time() - t_cache
    with acc.autocast():
        method.prepare(model, data.tokenized, pad_id=tok.pad_token_id, cache=cache, layout=layout)  # e.g. fit pca, size frames
    method.to(acc.device)
    extra = method.extra_parameters()  # learned frames (hra/ether/ortho), a reward head
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) + sum(p.numel() for p in extra)
    if not method.trains:  # training-free (probe-mms, steer-mean): `prepare` fitted it; the LoRA stays the identity
        n_trainable = 0

    sampler = LengthGroupedBatches([p.length for p in data.tokenized], batch_size=tc.batch_size,
                                   seed=tc.seed, group=cfg.speed.length_batches, shuffle=tc.shuffle)
    loader = torch.utils.data.DataLoader(
        data.tokenized, batch_sampler=sampler,
        collate_fn=lambda b: layout.collate(b, pad_id=tok.pad_token_id),
    )
    steps_per_epoch = max(1, len(loader) // tc.grad_accum)
    total = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    if not method.trains:
        total = 0
    params = [p for p in model.parameters() if p.requires_grad] + extra
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = make_scheduler(optimizer, schedule=tc.schedule, warmup=int(tc.warmup_ratio * total), total=total)

    # counters of the loop; a checkpoint restores them with everything else it holds
    c = {"step": 0, "micro": 0, "epoch": 0, "micro_in_epoch": 0, "bad_in_row": 0, "bad_steps": 0,
         "real_tokens": 0, "padded_tokens": 0, "prefix_saved": 0, "response_shared": 0}
    rows: list[dict[str, float]] = []  # every logged metrics row, for checkpoints
    if state is not None:
        with torch.no_grad():
            for n, p in _adapter_tensors(model).items():
                p.copy_(state[f"adapter/{n}"])
        method.load_state_dict({k[len("method/"):]: v for k, v in state.items() if k.startswith("method/")})
        ckpt.load_optimizer_state(optimizer, state, meta["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        c |= meta["counters"]
        rows = meta["metrics"]
    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp:
        check_fsdp(cfg, method)
    # every training forward goes through `policy`, the prepared (DDP / FSDP) module: see Policy
    policy, optimizer, loader = acc.prepare(Policy(model), optimizer, loader)
    if state is not None:  # the data position: mid-epoch, the epoch's order with its first batches left out
        if c["micro_in_epoch"] >= len(loader):  # the checkpoint's step ended an epoch
            c["epoch"], c["micro_in_epoch"] = c["epoch"] + 1, 0
            sampler.resume(state["sampler/now"], skip=0)
            ckpt.set_rng_state(state, meta["rng"])
            state = None
        else:
            sampler.resume(state["sampler/epoch_start"], skip=c["micro_in_epoch"] * acc.num_processes)

    save_yaml(cfg, out / "config.yaml")
    log = MetricsLog(out, trackers=tuple(trackers), rows=rows, purge_step=c["step"] + 1, config=to_dict(cfg)) if acc.is_main_process else None
    in_training_eval = TrainingEval(cfg, tok, model, device_type=acc.device.type) if tc.eval_every else None
    where = f"resumed at step {c['step']} from {start} ->" if start else "->"
    if not method.trains:
        acc.print(f"{cfg.train.method}: training-free, fitted from the reference pass (no gradient steps) -> {out}")
    else:
        acc.print(f"training {cfg.train.method}: {total} steps x {tc.batch_size * tc.grad_accum} pairs, {n_trainable:,} trainable params {where} {out}")

    def save_checkpoint() -> Path:
        """Every process's RNG, the main process's the rest; atomic (see reprpo.checkpoint)."""
        tmp = ckpt.begin_checkpoint(out, c["step"]) if acc.is_main_process else out / "checkpoints" / f".tmp-step-{c['step']}"
        acc.wait_for_everyone()
        if acc.process_index:
            ckpt.write_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        path = out / "checkpoints" / f"step-{c['step']}"
        if acc.is_main_process:
            rng_t, rng_m = ckpt.rng_state()
            opt_t, opt_m = ckpt.optimizer_state(optimizer)
            tensors = {f"adapter/{n}": p for n, p in _adapter_tensors(model).items()}
            tensors |= {f"method/{k}": v for k, v in method.state_dict().items()} | opt_t | rng_t
            tensors["sampler/epoch_start"], tensors["sampler/now"] = sampler.epoch_start, sampler.gen.get_state()
            meta = {"step": c["step"], "counters": c, "metrics": rows, "optimizer": opt_m, "scheduler": scheduler.state_dict(),
                    "rng": rng_m, "config": to_flat(cfg), "code_version": ckpt.code_version()}
            path = ckpt.finish_checkpoint(tmp, tensors, meta, keep=tc.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    last_ckpt = start
    last_good = next((r for r in reversed(rows) if _finite(r)), None)
    window, t_step = [], time.time()
    bar = progress_bar(total=total, initial=c["step"], desc=cfg.train.method, unit="step", enabled=tc.progress and acc.is_main_process)
    while c["step"] < total:
        for batch in loader:
            if state is not None:  # mid-epoch: the RNG as it was after the checkpoint's step, set after
                # the loader's own draw at the epoch start (which the continued run made before it)
                ckpt.set_rng_state(state, meta["rng"])
                state = None
            with acc.accumulate(policy):
                ref = cache.lookup(batch) if cache is not None else None
                with method.step(policy, batch, ref=ref) as ref:  # gradient methods hook forward + backward here
                    per_pair, metrics = through(policy, method.loss, batch, ref=ref)
                    loss = per_pair.mean()
                    acc.backward(loss)
                c["real_tokens"] += batch.n_tokens
                c["padded_tokens"] += batch.n_slots
                c["prefix_saved"] += batch.prefix_len * (batch.n_pairs - 1)
                c["response_shared"] += batch.n_shared_response
                if extra and acc.num_processes > 1:  # frames live outside the DDP-wrapped model
                    for p in extra:
                        if p.grad is not None:
                            p.grad = acc.reduce(p.grad, reduction="mean")
                window.append({"loss": loss.detach(), **metrics})
                c["micro"] += 1
                c["micro_in_epoch"] += 1
                if acc.sync_gradients:
                    if tc.max_grad_norm > 0:
                        gnorm = acc.clip_grad_norm_(params, tc.max_grad_norm)
                    else:
                        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                    # a non-finite loss or gradient norm on any process: no update this step
                    bad = torch.tensor(float(not (torch.isfinite(gnorm) and all(torch.isfinite(w["loss"]) for w in window))), device=acc.device)
                    if acc.num_processes > 1:
                        bad = acc.reduce(bad, reduction="sum")
                    lr = scheduler.get_last_lr()[0]
                    if not bad:
                        try:
                            optimizer.step()
                        except RuntimeError as e:  # e.g. an lr that overflows float32 inside AdamW
                            if "overflow" not in str(e):
                                raise
                            raise TrainingError(f"step {c['step'] + 1}: the optimiser step overflowed ({e}); --train.lr {tc.lr:g} "
                                                "is too large. Lower it.") from e
                        method.after_step(policy, optimizer)  # e.g. projgrad's update projection
                    scheduler.step()  # a skipped step still uses its slot of the schedule
                    optimizer.zero_grad()
            if not acc.sync_gradients:
                continue
            c["step"] += 1
            step = c["step"]
            if bad:
                c["bad_in_row"] += 1
                c["bad_steps"] += 1
            else:
                c["bad_in_row"] = 0
            row = {"step": step, "epoch": c["micro"] / max(1, len(loader))}
            means = torch.stack([torch.stack([w[k].float() for w in window]).mean() for k in window[0]])
            if acc.num_processes > 1:  # the step's metrics over every process's pairs
                means = acc.reduce(means.to(acc.device), reduction="mean")
            row |= dict(zip(window[0], means.tolist(), strict=True))
            row |= {"grad_norm": float(gnorm), "lr": lr, "sec_per_step": time.time() - t_step,
                    "pad_waste": 1.0 - c["real_tokens"] / max(1, c["padded_tokens"]), "bad_steps": c["bad_steps"]}
            window, t_step = [], time.time()
            if in_training_eval and (step % tc.eval_every == 0 or step == total):
                row |= in_training_eval(model, method)
            if bad and acc.is_main_process:
                print(f"reprpo: step {step}: loss {row['loss']:.4g}, grad norm {row['grad_norm']:.4g}: not finite, no update "
                      f"({c['bad_in_row']} in a row, {c['bad_steps']} in all; stops at train.max_bad_steps={tc.max_bad_steps} in a row)",
                      file=sys.stderr)
            else:
                last_good = row
            if log and (step % tc.log_every == 0 or step == total or bad):
                rows.append(row)
                log.write(row)
            # stop at max_bad_steps in a row, and never end on a step whose loss was not finite
            if c["bad_in_row"] >= tc.max_bad_steps or (c["bad_in_row"] and step >= total):
                bar.close()
                if log:
                    log.close()
                shown = ", ".join(f"{k} {v:.4g}" for k, v in last_good.items() if k in ("loss", "grad_norm", "lr")) if last_good else "none"
                raise TrainingError(
                    f"step {step}: loss or gradient norm not finite for {c['bad_in_row']} steps in a row "
                    f"({'train.max_bad_steps=' + str(tc.max_bad_steps) if step < total else 'up to the last step'}); no adapter saved. "
                    f"Last finite metrics: {'step ' + str(int(last_good['step'])) + ': ' if last_good else ''}{shown}. Last good checkpoint: "
                    f"{last_ckpt or 'none (write them with --train.save_every N)'}. Lower --train.lr (now {tc.lr:g}), "
                    "or check the data and method settings.")
            bar.update(1)
            bar.set_postfix({"loss": f"{row['loss']:.4f}"} | ({"margin": f"{row['rewards/margin']:.3f}"} if "rewards/margin" in row else {}))
            if tc.save_every and step % tc.save_every == 0 and not c["bad_in_row"]:
                last_ckpt = save_checkpoint()
            if step >= total:
                break
        else:  # the epoch ran out
            c["epoch"] += 1
            c["micro_in_epoch"] = 0
    bar.close()

    # save: the adapter (AutoPeftModelForCausalLM loads it), tokenizer, config, report
    acc.wait_for_everyone()
    full = acc.get_state_dict(policy) if fsdp else None  # FSDP: every process takes part in gathering the shards
    if acc.is_main_process:
        log.close()
        final = model
        # FSDP: process 0's own tensors are shards; its adapter is taken from the gathered state
        full = {k.removeprefix("module."): v for k, v in full.items()} if full is not None else None
        trained = _adapter_tensors(final) if full is None else {n: full[n] for n in _adapter_tensors(final)}
        if bad_names := _nonfinite(trained | dict(method.state_dict())):
            raise TrainingError(f"the trained adapter holds non-finite values ({', '.join(bad_names[:3])}); not saved as a result. "
                                f"Lower --train.lr (now {tc.lr:g}).")
        from reprpo.model import interventions

        if interventions.find(final) is not None:  # a representation adapter: OUT/intervention.{safetensors,_config.json}
            interventions.save(final, out)
        else:
            final.save_pretrained(out, **({"state_dict": full} if full is not None else {}))
        tok.save_pretrained(out)
        from reprpo.model.loading import record_base

        record_base(out, cfg.model, final)  # adapter_config.json names the user's base, not our cache; reprpo.json its fingerprint
        if len(method.state_dict()):
            torch.save(method.state_dict(), out / "method_state.pt")  # frames / pca bases
        report = {
            "steps": c["step"], "pairs_seen": c["micro"] * tc.batch_size, "trainable_params": n_trainable,
            "training_free": not method.trains, "adapter": cfg.train.adapter, "bad_steps": c["bad_steps"], "resumed_from": str(start) if start else None,
            "layout": "shared-prompt" if layout.packed else "padded", "layout_detail": layout.describe(), "attention": layout.attention,
            "batch_prefix_tokens_saved": c["prefix_saved"], "response_tokens_shared": c["response_shared"],
            "reference_cache": cache is not None, "reference_cache_seconds": t_cache,
            "pad_waste": 1.0 - c["real_tokens"] / max(1, c["padded_tokens"]),
            "seconds": time.time() - t0, "data": {"source": train_src, "summary": data.summary(),
            "dropped": dict(data.read_report.dropped), "tokenize": vars(data.token_report) | {"dropped": dict(data.token_report.dropped)}},
        }
        if need.features is not None:  # the SAE a run's features came from: path as given, block and weights' fingerprint
            point, sae = need.features
            report["sae"] = {"path": cfg.method.sae, "block": point.layer_idx, "kind": sae.kind, "width": sae.width,
                             "fingerprint": sae.fingerprint()}
        (out / "train_report.json").write_text(json.dumps(report, indent=2, default=str))
        from reprpo.card import write_card

        write_card(out, cfg)  # README.md in place of PEFT's empty template; `reprpo train` adds the eval table
    return out
