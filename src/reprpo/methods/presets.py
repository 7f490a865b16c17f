"""Method names -> config values -> method objects, and the one config-precedence rule.

    cfg = resolve_config(("config.yaml", yaml_values), ("command line", cli_values), method="hs-pca-prefvec")
    method = build_method(cfg, model)

Precedence: RunConfig defaults < the preset's values < each layer in order (YAML, then the
command line): the user's explicit value wins and the saved config says it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reprpo.config import RunConfig, apply_overrides
from reprpo.data.readers import PAIRINGS
from reprpo.methods import fpo, grad, mms, output, representation, reward, scorers, sft, tdpo  # noqa: F401 - registers kinds, presets, scorers
from reprpo.methods.base import KINDS, PRESETS, SCORERS, Method, Preset
from reprpo.methods.repr_losses import REPR_LOSSES
from reprpo.methods.transforms import TRANSFORMS
from reprpo.model.capture import COLLECTIONS

# config fields whose values name registry entries (checked, and listed in the CLI help)
REGISTRY_FIELDS = {"train.method": PRESETS, "method.collection": COLLECTIONS, "method.transform": TRANSFORMS,
                   "method.loss": REPR_LOSSES, "data.pairing": PAIRINGS, "eval.scorer": SCORERS}


def preset_names(kind: str | None = None) -> list[str]:
    return [n for n, p in PRESETS.items() if kind is None or p.kind == kind]


def preset(name: str) -> Preset:
    return PRESETS[name]


def preset_overrides(name: str) -> dict[str, object]:
    """Config values a preset name implies (e.g. hs-pca-prefvec -> collection/transform/loss)."""
    return dict(PRESETS[name].values)


def check_config(cfg: RunConfig) -> None:
    """Every registry-backed field names a registered entry (a ConfigError lists them)."""
    for key, reg in REGISTRY_FIELDS.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if key == "eval.scorer" and value == "":
            continue  # "" = the method's own scorer
        reg.check(value, where=key)


def _method_of(values: Mapping[str, Any]) -> str | None:
    """train.method of a dotted ({'train.method': x}) or nested ({'train': {'method': x}}) layer."""
    if values.get("train.method"):
        return str(values["train.method"])
    nested = values.get("train")
    return str(nested["method"]) if isinstance(nested, dict) and nested.get("method") else None


def resolve_config(*layers: tuple[str, Mapping[str, Any]], method: str | None = None, base: RunConfig | None = None) -> RunConfig:
    """`base` (default: RunConfig()) < preset(method) < each (where, values) layer in order.

    `method` defaults to the last layer's train.method (dotted or nested), else base's. The
    preset is applied only when `base` is None (a saved run's config already holds its values)."""
    if method is None:
        for _, values in layers:
            method = _method_of(values) or method
    cfg = base if base is not None else RunConfig()
    if base is None:
        name = str(method or cfg.train.method)
        apply_overrides(cfg, preset_overrides(name) | {"train.method": name}, where=f"preset {name}")
    for where, values in layers:
        if values:
            apply_overrides(cfg, dict(values), where=where)
    if method is not None:
        apply_overrides(cfg, {"train.method": str(method)}, where="method")
    check_config(cfg)
    return cfg


def build_method(cfg: RunConfig, model) -> Method:
    """The method object for `cfg.train.method`. Reads the config, never writes it: a preset's
    values are applied by `resolve_config`, before YAML and the command line."""
    check_config(cfg)
    p = PRESETS[cfg.train.method]
    return KINDS[p.kind].build(cfg, model, p)


def init_loss(cfg: RunConfig) -> float | None:
    """The method's step-1 loss when policy = reference (None where it depends on the data)."""
    return KINDS[PRESETS[cfg.train.method].kind].init_loss(cfg)


def search_space(cfg: RunConfig) -> dict[str, tuple]:
    """tune's search space for the configured method (from its kind and registry entries)."""
    return KINDS[PRESETS[cfg.train.method].kind].search_space(cfg)


def scorer_of(cfg: RunConfig):
    """The evaluation `Scorer` of a run: `eval.scorer`, else its method kind's."""
    name = cfg.eval.scorer or KINDS[PRESETS[cfg.train.method].kind].scorer
    return SCORERS[SCORERS.check(name, where="eval.scorer")]


def preset_note(cfg: RunConfig) -> str:
    """A line when explicit values replaced what the preset name says (they win; said once)."""
    changed = [f"{k}={getattr(getattr(cfg, k.split('.')[0]), k.split('.')[1])!r}" for k, v in preset_overrides(cfg.train.method).items()
               if getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) != v]
    if not changed:
        return ""
    return f"note: method {cfg.train.method} with {', '.join(changed)} set explicitly (the preset's values were replaced)."


__all__ = ["KINDS", "PRESETS", "REGISTRY_FIELDS", "build_method", "check_config", "init_loss",
           "preset", "preset_names", "preset_note", "preset_overrides", "resolve_config", "scorer_of", "search_space"]
