"""One rule for the batch layout of a stage: config + model + stage -> `Layout`.

Training, the reference cache, evaluation and tune all call `build_layout`, so a training
reference cache is hit by evaluation of the same data, and the kernel is chosen per stage."""

from __future__ import annotations

from reprpo.config import SpeedConfig
from reprpo.data.layout import Layout
from reprpo.model.forward import prefix_supported
from reprpo.model.interventions import prefix_ok


def resolve_packed_attention(setting: str, *, training: bool, device_type: str) -> str:
    """auto -> eager for CPU training (sdpa's backward with a 4D mask measured 17% slower),
    blocks for CPU scoring (SDPA on the visible keys only: 5% faster than plain sdpa on 64 W2
    pairs, interleaved A/B; sdpa was 1.45x faster than eager), the model's own kernel on GPUs
    (not measured)."""
    if setting != "auto":
        return setting
    if device_type != "cpu":
        return "keep"
    return "eager" if training else "blocks"


def build_layout(speed: SpeedConfig, model, *, stage: str, device_type: str, packing: bool = True,
                 prefix: bool = True) -> Layout:
    """The layout `speed` asks for, as far as the model (a plain KV cache for a batch prefix; no
    loreft adapter that edits prompt tokens, which a prefix takes out of the rows) and the method
    (`packing`, `prefix`: what its loss supports) allow. `stage`: train | score.
    Call `.for_pairs(pairs)` on the result to fix the set's template header."""
    if stage not in ("train", "score"):
        raise ValueError(f"stage must be train or score, got {stage!r}")
    packed = speed.share_prompt and packing
    return Layout(
        packed=packed,
        share_prefix=packed and speed.share_prefix and prefix and prefix_supported(model) and prefix_ok(model),
        share_response=packed and speed.share_response,
        attention=resolve_packed_attention(speed.packed_attention, training=stage == "train", device_type=device_type),
    )
