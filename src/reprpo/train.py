"""The training loop: LoRA adapter, one forward over [chosen; rejected], accelerate, logging.

Read top to bottom: setup -> data -> adapter -> optimiser/schedule -> loop -> save.
"""

from __future__ import annotations

import csv
import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch

from reprpo.config import RunConfig, save_yaml
from reprpo.data.prepare import prepare
from reprpo.data.shifts import data_sources
from reprpo.errors import ConfigError
from reprpo.methods import build_method
from reprpo.methods.gradproj import lora_modules
from reprpo.methods.presets import preset_note
from reprpo.model.layout import build_layout
from reprpo.model.loading import device_type, load_model
from reprpo.model.memory import keep_freed_memory
from reprpo.model.refcache import build_ref_cache


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.train.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def make_lora(model, cfg: RunConfig):
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

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.bs)

    def __iter__(self):
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
    """One row per logged step to metrics.csv and TensorBoard."""

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.csv"
        self.tb = SummaryWriter(str(out / "tb"))
        self._fh = None
        self._writer = None

    def write(self, row: dict[str, float]) -> None:
        if self._writer is None:
            self._fh = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._fh, fieldnames=list(row))
            self._writer.writeheader()
        self._writer.writerow(row)
        self._fh.flush()
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self._fh:
            self._fh.close()
        self.tb.close()


def train(cfg: RunConfig) -> Path:
    """Train an adapter as `cfg` says; returns the output directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t0 = time.time()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    tc = cfg.train
    acc = Accelerator(cpu=device_type(tc.device) == "cpu", mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum)
    set_seed(tc.seed)
    if cfg.speed.keep_memory:
        keep_freed_memory()

    # data
    model, tok = load_model(cfg.model)
    train_src, _ = data_sources(shift=cfg.data.shift, train=cfg.data.train, eval_splits=cfg.data.eval)
    data = prepare(train_src, tok, cfg.data, limit=cfg.data.n_train)
    acc.print(f"train data: {data.summary()}")
    if note := preset_note(cfg):
        acc.print(note)

    # adapter (seeded: the LoRA init repeats) and method
    set_seed(tc.seed)
    model = make_lora(model, cfg)
    model.train()
    method = build_method(cfg, model)
    # one layout for every pass (reference cache and training batches alike, so their numerics
    # match): the header common to the whole training set, else each batch's own
    layout = build_layout(cfg.speed, model, stage="train", device_type=acc.device.type, packing=method.packing,
                          prefix=method.prefix).for_pairs(data.tokenized)
    model.to(acc.device)
    cache, t_cache = None, time.time()
    need = method.reference
    if cfg.speed.ref_cache and need.cached:  # one reference pass now, none in the loop (for what the cache holds)
        cache = build_ref_cache(model, data.tokenized, pad_id=tok.pad_token_id, layout=layout, batch_size=tc.batch_size,
                                points=list(need.points), pooling=cfg.method.pooling, outlier_quantile=cfg.method.outlier_quantile,
                                chunk=cfg.speed.logit_chunk, directions=lora_modules(model) if need.directions else None)
    t_cache = time.time() - t_cache
    method.prepare(model, data.tokenized, pad_id=tok.pad_token_id, cache=cache, layout=layout)  # e.g. fit pca, size frames
    method.to(acc.device)
    extra = method.extra_parameters()  # learned frames (hra/ether/ortho)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    sampler = LengthGroupedBatches([p.length for p in data.tokenized], batch_size=tc.batch_size,
                                   seed=tc.seed, group=cfg.speed.length_batches, shuffle=tc.shuffle)
    loader = torch.utils.data.DataLoader(
        data.tokenized, batch_sampler=sampler,
        collate_fn=lambda b: layout.collate(b, pad_id=tok.pad_token_id),
    )
    steps_per_epoch = max(1, len(loader) // tc.grad_accum)
    total = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad] + extra
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = make_scheduler(optimizer, schedule=tc.schedule, warmup=int(tc.warmup_ratio * total), total=total)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)

    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    log = MetricsLog(out) if acc.is_main_process else None
    acc.print(f"training {cfg.train.method}: {total} steps x {tc.batch_size * tc.grad_accum} pairs, {n_trainable:,} trainable params -> {out}")

    step, micro, window, t_step = 0, 0, [], time.time()
    real_tokens = padded_tokens = prefix_saved = response_shared = 0
    bar = tqdm(total=total, disable=not (tc.progress and acc.is_main_process), desc=cfg.train.method)
    while step < total:
        for batch in loader:
            with acc.accumulate(model):
                ref = cache.lookup(batch) if cache is not None else None
                with method.step(model, batch, ref=ref) as ref:  # gradient methods hook forward + backward here
                    per_pair, metrics = method.loss(model, batch, ref=ref)
                    loss = per_pair.mean()
                    acc.backward(loss)
                real_tokens += batch.n_tokens
                padded_tokens += batch.n_slots
                prefix_saved += batch.prefix_len * (batch.n_pairs - 1)
                response_shared += batch.n_shared_response
                if extra and acc.num_processes > 1:  # frames live outside the DDP-wrapped model
                    for p in extra:
                        if p.grad is not None:
                            p.grad = acc.reduce(p.grad, reduction="mean")
                window.append({"loss": loss.detach(), **metrics})
                micro += 1
                if acc.sync_gradients:
                    if tc.max_grad_norm > 0:
                        gnorm = acc.clip_grad_norm_(params, tc.max_grad_norm)
                    else:
                        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                if acc.sync_gradients:
                    method.after_step(model, optimizer)  # e.g. projgrad's update projection
                    scheduler.step()
                optimizer.zero_grad()
            if not acc.sync_gradients:
                continue
            step += 1
            row = {"step": step, "epoch": micro / max(1, len(loader))}
            row |= {k: float(torch.stack([w[k] for w in window]).mean()) for k in window[0]}
            row |= {"grad_norm": float(gnorm), "lr": lr, "sec_per_step": time.time() - t_step,
                    "pad_waste": 1.0 - real_tokens / max(1, padded_tokens)}
            window, t_step = [], time.time()
            if log and (step % tc.log_every == 0 or step == total):
                log.write(row)
            bar.update(1)
            bar.set_postfix({"loss": f"{row['loss']:.4f}"} | ({"margin": f"{row['rewards/margin']:.3f}"} if "rewards/margin" in row else {}))
            if step >= total:
                break
    bar.close()

    # save: the adapter (AutoPeftModelForCausalLM loads it), tokenizer, config, report
    acc.wait_for_everyone()
    if acc.is_main_process:
        log.close()
        acc.unwrap_model(model).save_pretrained(out)
        tok.save_pretrained(out)
        if len(method.state_dict()):
            torch.save(method.state_dict(), out / "method_state.pt")  # frames / pca bases
        report = {
            "steps": step, "pairs_seen": micro * tc.batch_size, "trainable_params": n_trainable,
            "layout": "shared-prompt" if layout.packed else "padded", "layout_detail": layout.describe(), "attention": layout.attention, "batch_prefix_tokens_saved": prefix_saved,
            "response_tokens_shared": response_shared, "reference_cache": cache is not None,
            "reference_cache_seconds": t_cache, "pad_waste": 1.0 - real_tokens / max(1, padded_tokens),
            "seconds": time.time() - t0, "data": {"source": train_src, "summary": data.summary(),
            "dropped": dict(data.read_report.dropped), "tokenize": vars(data.token_report) | {"dropped": dict(data.token_report.dropped)}},
        }
        (out / "train_report.json").write_text(json.dumps(report, indent=2, default=str))
    return out
