"""`reprpo` command line: train, eval, data inspect, shifts list.

Every config field is an option `--section.field VALUE`; `--config FILE.yaml` is read first,
then the options on top. The resolved config is saved with every run (config.yaml).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from reprpo.config import (
    RunConfig,
    add_config_arguments,
    apply_overrides,
    load_yaml,
    overrides_from_args,
)
from reprpo.errors import ReprpoError


def build_config(args, *, base: RunConfig | None = None) -> RunConfig:
    """Defaults < the method preset's defaults < YAML file < command-line options."""
    from reprpo.methods import preset_overrides

    cfg = base or RunConfig()
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    over = overrides_from_args(args)
    if base is None:
        method = getattr(args, "method", None) or over.get("train.method") or yaml_values.get("train", {}).get("method") or cfg.train.method
        apply_overrides(cfg, preset_overrides(str(method)), where=f"preset {method}")
    if yaml_values:
        apply_overrides(cfg, yaml_values, where=str(args.config))
    if getattr(args, "out", None):
        over["out"] = args.out
    if getattr(args, "method", None):
        over["train.method"] = args.method
    return apply_overrides(cfg, over, where="command line")


def cmd_train(args) -> int:
    from reprpo.evaluate import evaluate_run, markdown_table
    from reprpo.train import train

    cfg = build_config(args)
    out = train(cfg)
    print(f"adapter, config and metrics saved to {out}")
    if cfg.eval.after_train:
        table, _ = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
        print(markdown_table(table))
        print(f"per-pair scores: {out / 'eval'}")
    return 0


def cmd_eval(args) -> int:
    from reprpo.config import from_dict
    from reprpo.evaluate import evaluate_run, markdown_table

    base = None
    if args.run:
        run = Path(args.run)
        if not (run / "config.yaml").is_file():
            raise ReprpoError(f"{run}: not a reprpo run directory (no config.yaml). Pass the --out directory of `reprpo train`.")
        base = from_dict(load_yaml(run / "config.yaml"), where=str(run / "config.yaml"))
        base.out = ""
    cfg = build_config(args, base=base)
    adapter = None if args.base_only or not args.run else args.run
    out = Path(args.out) if args.out else (Path(args.run) / "eval" if args.run else Path("runs") / "eval-base")
    table, _ = evaluate_run(cfg, adapter_dir=adapter, out=out)
    print(markdown_table(table))
    print(f"summary and per-pair scores: {out}")
    return 0


def cmd_inspect(args) -> int:
    from reprpo.data.inspect import inspect_source

    cfg = build_config(args)
    print(inspect_source(args.source, cfg))
    return 0


def cmd_shifts(args) -> int:
    from reprpo.shifts import list_shifts

    src = args.source
    rows = list_shifts(src)
    w = max(len(r["name"]) for r in rows)
    print(f"shifts in {src} (use as --data.shift {src}:NAME):")
    for r in rows:
        print(f"  {r['name']:<{w}}  train={r['train']}  oos={r['oos']}  rnd={r['rnd']}")
    if src == "builtin":
        from reprpo.data.builtin import describe

        print()
        print(describe())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    from reprpo.methods import GRAD_METHODS, OUTPUT_METHODS, preset_names

    presets = preset_names()
    repr_presets = [n for n in presets if n not in OUTPUT_METHODS + GRAD_METHODS]
    epilog = ("presets:\n  output-level: " + ", ".join(OUTPUT_METHODS) + "\n  gradient:     " + ", ".join(GRAD_METHODS)
              + "\n  representation ({hs|side}-{transform}-{loss}):\n" + textwrap.fill(", ".join(repr_presets), 100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False))
    t = sub.add_parser("train", help="train an adapter (then evaluate it on the eval splits)", description="Train a LoRA adapter from preference pairs; by default then evaluates base vs adapter on train/test/oos/rnd.", epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("method", nargs="?", default=None, help="method preset (default: dpo); listed below")
    t.add_argument("--config", help="YAML config file (sections model, data, lora, train, eval)")
    t.add_argument("--out", help="output directory (adapter, config.yaml, metrics.csv, tb/, eval/)")
    add_config_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="score base vs adapter on named splits", description="Score preference pairs with the base model (adapter off) and a trained adapter.")
    e.add_argument("run", nargs="?", default=None, help="a `reprpo train` output directory (its config gives model and data)")
    e.add_argument("--config", help="YAML config file")
    e.add_argument("--out", help="where to write summary.md/csv and per-pair scores (default RUN/eval)")
    e.add_argument("--base-only", action="store_true", help="score the base model only")
    add_config_arguments(e, sections=("model", "data", "eval"))
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    i = dsub.add_parser("inspect", help="counts, token-length percentiles and truncation of a data source")
    i.add_argument("source", help="file, builtin:DIST/SPLIT or hf:ID[:SPLIT]")
    i.add_argument("--config", help="YAML config file")
    add_config_arguments(i, sections=("model", "data"))
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("shifts", help="named distribution shifts")
    ssub = s.add_subparsers(dest="shifts_command", required=True)
    sl = ssub.add_parser("list", help="list shifts of the built-in suite or of a shifts.json")
    sl.add_argument("source", nargs="?", default="builtin", help="`builtin` or PATH/shifts.json")
    sl.set_defaults(func=cmd_shifts)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ReprpoError as e:
        print(f"reprpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reprpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
