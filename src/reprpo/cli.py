"""`reprpo` command line: train, eval, export, compare, report, tune, study, data inspect, shifts list.

Every config field is an option `--section.field VALUE`; `--config FILE.yaml` is read first,
then the options on top. The resolved config is saved with every run (config.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

from reprpo import registered_names
from reprpo.config import (
    RunConfig,
    add_config_arguments,
    apply_overrides,
    load_yaml,
    overrides_from_args,
)
from reprpo.errors import ReprpoError


def build_config(args, *, base: RunConfig | None = None) -> RunConfig:
    """Defaults < the method preset's values < YAML file < command-line options (resolve_config);
    with `base` (a saved run's config) only the YAML and options go on top."""
    from reprpo.methods import resolve_config

    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    over = overrides_from_args(args)
    if getattr(args, "out", None):
        over["out"] = args.out
    return resolve_config((str(args.config), yaml_values), ("command line", over), method=getattr(args, "method", None), base=base)


def resume_run_dir(args) -> Path:
    """The run directory `--resume` continues: --out, else DIR (a run, or its checkpoints/step-N)."""
    if args.out or args.resume == "auto":
        if not args.out:
            raise ReprpoError("--resume auto: pass the run directory with --out, or give it: --resume RUN_DIR.")
        return Path(args.out)
    p = Path(args.resume)
    return p.parent.parent if p.parent.name == "checkpoints" else p


def cmd_train(args) -> int:
    import shlex

    from reprpo.card import write_card
    from reprpo.eval.scoring import evaluate_run, markdown_table
    from reprpo.rundir import check_out_dir, run_lock
    from reprpo.train import default_out, train

    base = None
    if args.resume:  # the run's own config.yaml is the base: `reprpo train --resume RUN` needs nothing else
        run = resume_run_dir(args)
        if (run / "config.yaml").is_file():
            from reprpo.config import from_dict

            base = from_dict(load_yaml(run / "config.yaml"), where=str(run / "config.yaml"))
            base.out = str(run)
        elif args.resume != "auto":
            raise ReprpoError(f"--resume {args.resume}: {run} has no config.yaml, so it is not a reprpo run directory "
                              "(pass the --out directory of `reprpo train`).")
    cfg = build_config(args, base=base)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    check_out_dir(out)
    with run_lock(out):  # held through the evaluation, which writes OUT/eval
        train(cfg, resume=args.resume)
        if int(os.environ.get("RANK", "0")) > 0:  # a multi-process launch: process 0 evaluates and writes the card
            return 0
        print(f"adapter, config and metrics saved to {out}")
        if cfg.eval.after_train:
            table, _ = evaluate_run(cfg, adapter_dir=out, out=out / "eval")
            print(markdown_table(table))
            print(f"per-pair scores: {out / 'eval'}")
        # the card again, with the eval table and the command (sys.argv is what main() parsed unless it was given a list)
        write_card(out, cfg, command="reprpo " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else None)
    return 0


def cmd_eval(args) -> int:
    from reprpo.config import from_dict
    from reprpo.eval.scoring import evaluate_run, markdown_table

    base = None
    if args.run:
        run = Path(args.run)
        if not (run / "config.yaml").is_file():
            raise ReprpoError(f"{run}: not a reprpo run directory (no config.yaml). Pass the --out directory of `reprpo train`.")
        base = from_dict(load_yaml(run / "config.yaml"), where=str(run / "config.yaml"))
        base.out = ""
    cfg = build_config(args, base=base)
    from reprpo.data.shifts import check_sources
    from reprpo.rundir import run_lock

    adapter = None if args.base_only or not args.run else args.run
    out = Path(args.out) if args.out else (Path(args.run) / "eval" if args.run else Path("runs") / "eval-base")
    check_sources(cfg.data.shift, cfg.data.train, cfg.data.eval, eval_fraction=cfg.data.eval_fraction)  # before the model loads
    from reprpo.rundir import check_out_dir

    check_out_dir(out)
    with run_lock(Path(args.run)) if args.run else nullcontext():  # no `train` may rewrite the run meanwhile
        table, _ = evaluate_run(cfg, adapter_dir=adapter, out=out)
        if adapter is not None and out.resolve() == (Path(args.run) / "eval").resolve():
            from reprpo.card import write_card

            write_card(args.run)  # the card's table is RUN/eval's; its config the run's own (config.yaml)
    print(markdown_table(table))
    print(f"summary and per-pair scores: {out}")
    return 0


def cmd_inspect(args) -> int:
    from reprpo.data.inspect import inspect_source
    from reprpo.data.shifts import check_sources
    from reprpo.model.loading import load_tokenizer

    cfg = build_config(args)
    check_sources("", args.source, {"inspect": args.source})  # a missing file: said before a model is converted
    tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    print(inspect_source(args.source, cfg.data, tok, tokenizer_name=cfg.model.name))
    return 0


def cmd_shifts(args) -> int:
    from reprpo.data.shifts import list_shifts

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


def cmd_report(args) -> int:
    from reprpo.experiments.report import render_report

    out = Path(args.out) if args.out else Path(args.store).parent / "report"
    print(render_report(args.store, out))
    print(f"report written to {out / 'report.md'} and {out / 'report.html'}")
    return 0


def cmd_export(args) -> int:
    if not (args.merged or args.adapter):
        raise ReprpoError(f"reprpo export {args.run}: nothing to write; give --merged OUT (a full model), "
                          "--adapter OUT (a PEFT adapter folder) or both.")
    from reprpo.export import export_run

    export_run(args.run, merged=args.merged, adapter=args.adapter)
    if args.merged:
        print(f"merged model written to {args.merged} (loads with AutoModelForCausalLM.from_pretrained)")
    if args.adapter:
        print(f"PEFT adapter written to {args.adapter}")
    return 0


def cmd_tune(args) -> int:
    from reprpo.experiments.tune import run_tune

    base: dict = {}
    if args.config:  # nested YAML sections -> dotted keys
        for k, v in load_yaml(args.config).items():
            base |= {f"{k}.{k2}": v2 for k2, v2 in v.items()} if isinstance(v, dict) else {k: v}
    base |= {k: v for k, v in (("data.n_train", args.n_train), ("data.n_eval", args.n_eval), ("train.max_steps", args.steps)) if v is not None}
    base |= overrides_from_args(args)
    if args.trials < 1:
        raise ReprpoError(f"--trials {args.trials}: give the number of finished trials the study should hold (>= 1).")
    run_tune(args.method, shift=args.shift, trials=args.trials, base=base, storage_path=args.store or Path(args.out) / "optuna.sqlite",
             study_name=args.study or "", out=args.out, keep_adapters=args.keep_adapters)
    return 0


def cmd_compare(args) -> int:
    from reprpo.experiments import store
    from reprpo.experiments.compare import (
        build_grid,
        load_params,
        merge_grid,
        parse_shard,
        run_grid,
        run_id_of,
        split_list,
        take_shard,
    )

    base = build_config(args, base=RunConfig())  # YAML, then --section.field options
    shortcuts = {"data.n_train": args.n_train, "data.n_eval": args.n_eval, "train.max_steps": args.steps}
    apply_overrides(base, {k: v for k, v in shortcuts.items() if v is not None}, where="command line")
    out = Path(args.out)
    store_path = Path(args.store) if args.store else out / "results.sqlite"
    try:
        seeds = [int(s) for s in split_list(args.seeds)]
    except ValueError as e:
        raise ReprpoError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 1,2,3.") from e
    from reprpo.experiments.tune import check_not_reported

    for item in args.params or []:  # tuned params must come from a shift that is not reported
        check_not_reported(item.split("=", 1)[-1].strip(), split_list(args.shifts))
    grid_args = dict(methods=split_list(args.methods), shifts=split_list(args.shifts), seeds=seeds, base=base,
                     out_root=out, overrides=load_params(args.params or []), target_tuned=args.target_tuned)
    shard = parse_shard(args.shard) if args.shard else None
    missing = []
    if args.merge:  # trains nothing: the grid's done runs of other stores (one per node) into --store
        if args.workers != 1:
            raise ReprpoError("--merge trains nothing, so --workers has no use there: drop it.")
        grid = take_shard(build_grid(**grid_args), shard)
        missing = merge_grid(grid, sources=split_list(args.merge), store_path=store_path)
        ids = [run_id_of(cfg) for _, cfg in grid]
    else:
        ids = run_grid(**grid_args, store_path=store_path, fail_fast=args.fail_fast, workers=args.workers, shard=shard)
    try:
        from reprpo.experiments.report import render_report
    except ImportError:
        render_report = None
    if args.no_report:
        render_report = None
    if render_report is not None:
        try:
            print(render_report(store_path, store_path.parent / "report"))
        except Exception as e:  # the runs are safe in the store; the report can be redone
            print(f"reprpo: report failed ({type(e).__name__}: {e}); rerun `reprpo report --store {store_path}`", file=sys.stderr)
    con = store.connect(store_path)
    try:
        failed = store.failed_runs(con, ids)
    finally:
        con.close()
    recurring = {r: e for r, e in failed.items() if store.error_kind(e) == store.RECURRING}
    if recurring:  # a ReprpoError (bad config or data, diverged, missing model): retrying will not help
        print(f"{len(recurring)} run(s) failed with errors that will recur with these settings; fix each "
              f"cause first (full text in {store_path}, runs.error):", file=sys.stderr)
        for r, e in recurring.items():
            print(f"  {r}: {store.error_headline(e)}", file=sys.stderr)
    if len(failed) > len(recurring):
        what = "failed otherwise" if recurring else "failed"
        print(f"{len(failed) - len(recurring)} run(s) {what}; errors in the store (runs.error). "
              "Rerun the same command to retry them.", file=sys.stderr)
    if missing:
        print(f"{len(missing)} run(s) of the grid are done in none of the merged stores: {', '.join(missing)}. "
              "Run their shard (the same command with --shard K/N, without --merge) and merge again.", file=sys.stderr)
    return 1 if failed or missing else 0


def cmd_study(args) -> int:
    from reprpo.experiments.study import load_study, run_study

    words = list(args.study)
    report = args.report
    if len(words) == 2 and words[0] == "report":
        report, words = True, words[1:]
    if len(words) != 1:
        raise ReprpoError(f"reprpo study {' '.join(args.study)}: expected FILE or `report FILE`.")
    if args.workers < 1:
        raise ReprpoError(f"--workers {args.workers}: give how many runs to train at once (>= 1).")
    study = load_study(words[0], out=args.out, profile=args.profile)
    failed = run_study(study, yes=args.yes, plan_only=args.plan, report_only=report, workers=args.workers)
    return 1 if failed else 0


def cmd_sae_train(args) -> int:
    import dataclasses

    from reprpo.config import SAETrainConfig, parse_value
    from reprpo.sae_train import train_sae

    cfg = build_config(args)
    sc = SAETrainConfig()
    for f in dataclasses.fields(SAETrainConfig):
        v = getattr(args, f"sae_{f.name}", None)
        if v is not None:
            setattr(sc, f.name, parse_value(v, type(getattr(sc, f.name)), where=f"sae train --{f.name.replace('_', '-')}"))
    rec = train_sae(cfg.model, cfg.data, sc, out=args.out, sources=args.data or "")
    q = rec["quality"]
    print(f"SAE saved to {args.out} (block {rec['layer']}, d={rec['d']}, width={rec['width']}, k={rec['k']}, "
          f"{rec['tokens']} tokens, {rec['train_seconds']} s)")
    print(f"held-out: FVU {q['fvu']:.4f} · mean L0 {q['l0']:.1f} · dead {q['dead_fraction']:.1%} "
          f"(no firing in {q['dead_window_tokens']} tokens) · delta CE {q['delta_ce']:+.4f} nats "
          f"(CE {q['ce_clean']:.4f} -> {q['ce_sae']:.4f}, {q['eval_tokens']} tokens)")
    return 0


def cmd_sae_info(args) -> int:
    import json

    from reprpo.model.sae import load_sae

    sae = load_sae(args.path)
    print(sae.describe())
    rec = sae.meta
    if q := rec.get("quality"):
        print(json.dumps({k: rec.get(k) for k in ("model", "tokens", "data") if k in rec} | {"quality": q}, indent=2))
    return 0


def presets_epilog() -> str:
    """The presets of every registered method kind, grouped by kind (from the manifest
    `registered_names.py`, which a test keeps equal to the registries: no torch import)."""
    lines = ["presets (method kinds and their names):"]
    for kind, (help_, names) in registered_names.KINDS.items():
        lines.append(f"  {kind}: {help_}")
        lines.append(textwrap.fill(", ".join(names), 100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)


def registry_choices() -> dict[str, list[str]]:
    """Registry-backed config fields -> their registered names (shown in each option's help;
    train.method's are left out: the epilog lists the presets by kind)."""
    return {k: [n for n in v if k != "train.method"] for k, v in registered_names.REGISTRY_FIELDS.items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    quiet_help = "no progress bars or progress lines (errors and results still print)"
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    sub = p.add_subparsers(dest="command", required=True)

    epilog = presets_epilog()
    t = sub.add_parser("train", help="train an adapter (then evaluate it on the eval splits)", description="Train a LoRA adapter from preference pairs; by default then evaluates base vs adapter on train/test/oos/rnd.", epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("method", nargs="?", default=None, help="method preset (default: dpo); listed below")
    t.add_argument("--config", help="YAML config file (sections model, data, lora, train, eval)")
    t.add_argument("--out", help="output directory (adapter, config.yaml, metrics.csv, tb/, eval/, checkpoints/); an earlier run there is cleared unless --resume")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="DIR|auto",
                   help="continue from a checkpoint (--train.save_every N writes them): `auto` (also bare --resume) = the newest in --out, if any; DIR = a run directory or one of its checkpoints/step-N. The settings must be the run's own")
    add_config_arguments(t, choices=registry_choices())
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="score base vs adapter on named splits", description="Score preference pairs with the base model (adapter off) and a trained adapter.")
    e.add_argument("run", nargs="?", default=None, help="a `reprpo train` output directory (its config gives model and data)")
    e.add_argument("--config", help="YAML config file")
    e.add_argument("--out", help="where to write summary.md/csv and per-pair scores (default RUN/eval)")
    e.add_argument("--base-only", action="store_true", help="score the base model only")
    add_config_arguments(e, sections=("model", "data", "eval"), choices=registry_choices())
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
    c = sub.add_parser("compare", help="train and score a grid of methods x shifts x seeds into a results store",
                       description="Train and score every (method, shift, seed) into a SQLite results store. Resumable: runs already done are skipped; runs left running by a killed process, or failed, are redone. Several processes on one host may share one store (--workers N starts N); for a cluster, --shard and --merge (docs/scaling-grids.md). Config: defaults < method preset < --config YAML < --section.field options and shortcuts < --params METHOD=FILE.yaml < the grid's shift, seed, method.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--methods", required=True, help="comma-separated method presets, e.g. dpo,hs-pca-prefvec")
    c.add_argument("--shifts", default="builtin:difficulty", help="comma-separated shifts: builtin:NAME (or just NAME) or PATH/shifts.json:NAME (default: %(default)s)")
    c.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: %(default)s)")
    c.add_argument("--out", default="runs/compare", help="run directories go to OUT/RUN_ID (default: %(default)s)")
    c.add_argument("--store", help="results store (default: OUT/results.sqlite)")
    c.add_argument("--config", help="YAML base config (sections model, data, lora, train, method, eval)")
    c.add_argument("--params", action="append", metavar="METHOD=FILE.yaml", help="per-method config overrides (dotted keys -> values, e.g. from `reprpo tune`); repeatable")
    c.add_argument("--n-train", type=int, help="shortcut for --data.n_train")
    c.add_argument("--n-eval", type=int, help="shortcut for --data.n_eval")
    c.add_argument("--steps", type=int, help="shortcut for --train.max_steps")
    c.add_argument("--fail-fast", action="store_true", help="stop at the first failing run (default: mark it failed and go on)")
    c.add_argument("--no-report", action="store_true", help="do not render the report (STORE_DIR/report) at the end")
    c.add_argument("--target-tuned", nargs="?", const="dpo", metavar="METHOD",
                   help="also train METHOD (default dpo; or sft) per shift and seed on the oos distribution's own train split, "
                        "scored on the oos split: the report's differential elicitation DE = (acc_oos - acc_oos(base)) / acc_oos(target-tuned)")
    c.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train up to N runs at once, each in a worker process of its own claiming runs from the store: one GPU "
                        "per worker (worker i on visible GPU i mod the GPU count), or on CPU the threads split between them "
                        "(default: %(default)s, one run after another; see docs/scaling-grids.md)")
    c.add_argument("--shard", metavar="K/N",
                   help="run only every N-th run of the grid, from the K-th (1 <= K <= N): one shard per node of a cluster, "
                        "each with a store on its own local disk, then --merge them (docs/scaling-grids.md)")
    c.add_argument("--merge", metavar="STORE[,STORE...]",
                   help="train nothing: copy this grid's done runs from these results stores (e.g. one per --shard node) "
                        "into --store, then write the report; exit 1 if a run of the grid is done in none of them")
    add_config_arguments(c, choices=registry_choices())
    c.set_defaults(func=cmd_compare)
    r = sub.add_parser("report", help="tables and plots from a results store",
                       description="Re-render report.md, report.html and PNGs from a results store (runs with status done) and print the markdown: Δ in pp with 95% CIs over seeds, paired differences vs DPO, transfer, coherence, training curves.")
    r.add_argument("--store", default="runs/compare/results.sqlite", help="results store (SQLite) written by `reprpo compare` (default: %(default)s)")
    r.add_argument("--out", help="output directory (default: STORE_DIR/report)")
    r.set_defaults(func=cmd_report)

    tu = sub.add_parser("tune", help="hyper-parameter search on a validation shift (optuna)",
                        description="Tune a method's hyper-parameters with optuna (resumable SQLite study). Objective: oos accuracy gain (adapter - base, pp) on the VALIDATION shift, which must never be a reported shift. Trials whose in-sample (train split) gain is below the median are pruned before the oos scoring. Writes OUT/best_params_METHOD.yaml (dotted keys, for `reprpo compare --params METHOD=FILE`).",
                        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    tu.add_argument("method", help="method preset; its search space comes from its method kind (CONTRIBUTING.md)")
    tu.add_argument("--shift", required=True, help="validation shift (builtin:NAME or PATH/shifts.json:NAME); recorded as validated_on")
    tu.add_argument("--trials", type=int, required=True, help="finished trials the study should hold; a rerun resumes and adds the missing ones")
    tu.add_argument("--store", help="optuna SQLite storage (default: OUT/optuna.sqlite)")
    tu.add_argument("--study", help="study name (default: METHOD@SHIFT)")
    tu.add_argument("--out", default="runs/tune", help="trial runs and best_params_METHOD.yaml go here (default: %(default)s)")
    tu.add_argument("--config", help="YAML base config (sections model, data, lora, train, method, eval)")
    tu.add_argument("--n-train", type=int, help="shortcut for --data.n_train")
    tu.add_argument("--n-eval", type=int, help="shortcut for --data.n_eval")
    tu.add_argument("--steps", type=int, help="shortcut for --train.max_steps")
    tu.add_argument("--keep-adapters", action="store_true", help="keep each trial's adapter weights (deleted after scoring by default)")
    add_config_arguments(tu, choices=registry_choices())
    tu.set_defaults(func=cmd_tune)

    sy = sub.add_parser("study", help="run a study file: plan (measured ETA, budget) -> tune -> compare -> report",
                        description="Run a study file (configs/studies/*.yaml; docs/study.md): check it, print the plan and an ETA measured "
                                    "on this machine (a few real train steps, scoring and generation with the study's model and sizes), refuse a "
                                    "plan over the file's budget_hours unless --yes; then tune each method on its family's validation shift "
                                    "(optuna; a candidates group keeps its top k), compare every (model, method, reported shift, seed) with the "
                                    "tuned parameters (and the target-tuned runs), and write the report. Resumable after a kill at any point: "
                                    "run the same command again (finished trials and done runs are kept). With the file's `archive:` folder, the "
                                    "finished work is also written there as CSV tables and an optuna journal to commit, and read back first, so "
                                    "a fresh checkout resumes too. `reprpo study report FILE` re-renders the verdict (and updates the archive). "
                                    "The verdict: paired differences vs DPO per shift (bootstrap over seeds and pairs), the mean over shifts, "
                                    "Holm across methods, a coherence gate, yes / no / can't tell per method.")
    sy.add_argument("study", nargs="+", metavar="FILE", help="the study file, or `report FILE`")
    sy.add_argument("--plan", action="store_true", help="print the plan and the measured ETA, run nothing")
    sy.add_argument("--yes", action="store_true", help="run even when the measured ETA is over the file's budget_hours")
    sy.add_argument("--report", action="store_true", help="only re-render the reports from the results stores (= `reprpo study report FILE`)")
    sy.add_argument("--workers", type=int, default=1, metavar="N", help="compare: train up to N runs at once (worker processes, `reprpo compare --workers`; default: %(default)s)")
    sy.add_argument("--out", help="study directory (default: the file's `out`, else runs/studies/NAME)")
    sy.add_argument("--profile", default="auto", choices=("auto", "cpu", "gpu"),
                    help="which settings of the file: gpu applies its `gpu:` keys (bigger models, more seeds); auto = gpu when CUDA is visible (default: %(default)s)")
    sy.set_defaults(func=cmd_study)

    x = sub.add_parser("export", help="write a trained run as a merged full model (loads with AutoModelForCausalLM) and/or a clean PEFT adapter folder",
                       description="Write a trained run as a merged full model (loads with AutoModelForCausalLM) and/or a clean PEFT adapter folder. Give --merged, --adapter or both.")
    x.add_argument("run", metavar="RUN", help="a `reprpo train` output directory")
    x.add_argument("--merged", metavar="OUT", help="write the base model with the adapter merged into its weights to OUT")
    x.add_argument("--adapter", metavar="OUT", help="write the adapter alone to OUT, as a PEFT adapter folder")
    x.set_defaults(func=cmd_export)

    sa = sub.add_parser("sae", help="sparse autoencoders: train one on a model's residual stream, show one")
    sasub = sa.add_subparsers(dest="sae_command", required=True)
    st = sasub.add_parser("train", help="train a TopK SAE on the block output at one layer",
                          description="Train a TopK sparse autoencoder (Gao et al. 2024) with AuxK on the residual stream (block output) at one layer, "
                                      "from the prompt and response tokens of preference data; print and save its held-out FVU, mean L0, dead fraction and "
                                      "delta CE. Saved as OUT/cfg.json + OUT/sae.safetensors (EleutherAI sparsify's layout), for --method.sae OUT.")
    st.add_argument("--out", required=True, help="directory for cfg.json + sae.safetensors (an earlier SAE there is replaced)")
    st.add_argument("--data", help="comma-separated sources (files, builtin:DIST/SPLIT, globs like 'DIR/*/train.json'); "
                                   "default: the training split of --data.shift, plus the built-in suite's training splits when that holds fewer tokens than --tokens")
    st.add_argument("--config", help="YAML config file (sections model, data)")
    from reprpo.config import SAETrainConfig

    for f in dataclasses.fields(SAETrainConfig):
        st.add_argument(f"--{f.name.replace('_', '-')}", dest=f"sae_{f.name}", default=None, metavar=type(f.default).__name__.upper(),
                        help=f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%"))
    add_config_arguments(st, sections=("model", "data"))
    st.set_defaults(func=cmd_sae_train)
    si = sasub.add_parser("info", help="what an SAE file holds (kind, width, layer, recorded quality)")
    si.add_argument("path", help="our / sparsify directory, sae-lens directory or Gemma Scope params.npz")
    si.set_defaults(func=cmd_sae_info)

    # `reprpo --quiet train` and `reprpo train --quiet` both work. SUPPRESS: a subcommand that is
    # not given --quiet sets nothing, so it cannot overwrite the root's True with its own False.
    for sp in (t, e, i, c, tu, st, sy):
        sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from reprpo import progress  # light (tqdm, no torch)

    progress.quiet_third_party_warnings()
    progress.set_quiet(bool(args.quiet))  # also undoes an earlier `main(["--quiet", ...])` in this process
    try:
        return args.func(args)
    except ReprpoError as e:
        print(f"reprpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reprpo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `reprpo ... | head`: the reader left; stop quietly, as shell tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
