"""Methods: the `Method` interface and registries (base.py), one file per kind of method,
presets and config resolution (presets.py). See CONTRIBUTING.md for adding one."""

from reprpo.methods.presets import (
    build_method,
    check_config,
    init_loss,
    preset_names,
    preset_overrides,
    resolve_config,
    search_space,
)

__all__ = ["build_method", "check_config", "init_loss", "preset_names", "preset_overrides", "resolve_config", "search_space"]
