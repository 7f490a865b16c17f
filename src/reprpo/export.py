"""`reprpo export RUN`: a trained run as folders other tools load without reprpo's run layout.

    export_run("runs/dpo-1", merged="out/merged")    # full HF model + tokenizer (LoRA merged in)
    export_run("runs/dpo-1", adapter="out/adapter")  # clean PEFT folder: adapter, config, tokenizer, card

`--merged OUT` loads with `AutoModelForCausalLM.from_pretrained(OUT)` and gives base + adapter's
logits. `--adapter OUT` holds adapter_model.safetensors, adapter_config.json (its base named as
the user named it, see `loading.portable_name`), the tokenizer, reprpo.json (the base's
fingerprint) and the card. Neither holds method_state.pt: a method's learned or fitted frames
are part of its training objective, not of the model, and generation never reads them.

A representation adapter (`train.adapter` loreft / vector) edits hidden states at token
positions, not weights: `--merged` refuses it; `--adapter` copies intervention.safetensors and
intervention_config.json, which reprpo's `load_model(..., adapter=OUT)` hooks onto the base.

Each OUT must be new or empty; it is written to a temporary sibling and renamed into place, so a
failed export leaves nothing half-written and nothing is ever overwritten.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from reprpo.errors import ReprpoError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
INTERVENTION_FILES = ("intervention.safetensors", "intervention_config.json")  # = model.interventions.FILES (no torch import here)


def _adapter_files(run: Path) -> tuple[str, ...]:
    """The files of the run's adapter: a representation adapter's where its config is there, else PEFT's."""
    return INTERVENTION_FILES if (run / INTERVENTION_FILES[1]).is_file() and not (run / ADAPTER_FILES[1]).is_file() else ADAPTER_FILES


def _check_target(out: Path, *, flag: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "exists and is not empty"
        raise ReprpoError(f"{flag} {out}: {what}; nothing was written. Pass a new or empty directory.")


def _check_run(run: Path) -> None:
    if not (run / "config.yaml").is_file():
        raise ReprpoError(f"{run}: not a reprpo run directory (no config.yaml). Pass the --out directory of `reprpo train`.")
    missing = [f for f in _adapter_files(run) if not (run / f).is_file()]
    if missing:
        raise ReprpoError(f"{run}: no trained adapter ({', '.join(missing)} missing); the run did not finish. "
                          "Finish it (`reprpo train --resume auto --out RUN`) or train again.")


def _write_atomically(out: Path, fill) -> Path:
    """fill(tmp) into a temporary sibling of `out`, then rename it to `out` (new or empty)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            out.rmdir()  # empty (checked); rmdir refuses anything else
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_run(run: str | Path, *, merged: str | Path | None = None, adapter: str | Path | None = None) -> list[Path]:
    """Write the run's merged model to `merged` and/or its clean adapter folder to `adapter`;
    returns the folders written. Every target is checked before anything loads or is written."""
    from transformers import AutoTokenizer

    from reprpo.card import CARD, render_card
    from reprpo.config import from_dict, load_yaml
    from reprpo.model.loading import RUN_RECORD, load_model, portable_name, set_adapter_base
    from reprpo.rundir import run_lock

    run = Path(run)
    if merged is None and adapter is None:
        raise ReprpoError("reprpo export: nothing to write; pass --merged OUT and/or --adapter OUT.")
    targets = [(Path(p), flag) for p, flag in ((merged, "--merged"), (adapter, "--adapter")) if p is not None]
    if len(targets) == 2 and targets[0][0].resolve() == targets[1][0].resolve():
        raise ReprpoError(f"--merged and --adapter are the same directory ({targets[0][0]}); pass two.")
    _check_run(run)
    for out, flag in targets:
        _check_target(out, flag=flag)
    files = _adapter_files(run)
    if merged is not None and files == INTERVENTION_FILES:
        raise ReprpoError(f"--merged {merged}: {run} trained a representation adapter (intervention_config.json: loreft or vector), "
                          "which edits hidden states at token positions and has no weights to merge; nothing was written. "
                          "Export it with --adapter OUT and load it with reprpo's load_model(ModelConfig(name=BASE), adapter=OUT).")
    cfg = from_dict(load_yaml(run / "config.yaml"), where=str(run / "config.yaml"))
    written = []
    with run_lock(run):  # no `train` may rewrite the run meanwhile
        tok = AutoTokenizer.from_pretrained(run)  # the run's own tokenizer (pad token set as in training)
        if adapter is not None:
            def fill_adapter(tmp: Path) -> None:
                for f in files:
                    shutil.copy2(run / f, tmp / f)
                if files == ADAPTER_FILES:  # also fixes runs saved before it was portable
                    set_adapter_base(tmp, portable_name(cfg.model.name))
                tok.save_pretrained(tmp)
                if (run / RUN_RECORD).is_file():
                    shutil.copy2(run / RUN_RECORD, tmp / RUN_RECORD)
                (tmp / CARD).write_text(render_card(run, cfg, kind="adapter"))

            written.append(_write_atomically(Path(adapter), fill_adapter))
        if merged is not None:
            model, _ = load_model(cfg.model, adapter=run)  # warns if the base is not the one trained on

            def fill_merged(tmp: Path) -> None:
                full = model.merge_and_unload()
                full.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                (tmp / CARD).write_text(render_card(run, cfg, kind="merged"))

            written.append(_write_atomically(Path(merged), fill_merged))
    return written
