"""The batch layout: one frozen value, built once per stage (model/layout.py), passed explicitly to
collate, the forward, the reference cache and scoring, so the two passes that must agree (a
cached reference and the policy) cannot drift apart.

packed         shared-prompt layout: one row per pair, prompt + chosen + rejected, 4D mask
share_prefix   with packed: tokens that begin every prompt of a batch are encoded once per batch
share_response with packed: the leading tokens chosen and rejected share are encoded once
header         the template header common to the whole pair set (`set_header`), or None
attention      attention kernel for packed batches: eager | sdpa | blocks | keep (the model's)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from reprpo.data.tokenize import PairBatch, TokenizedPair, collate, set_header

KERNELS = ("eager", "sdpa", "blocks", "keep")


@dataclass(frozen=True)
class Layout:
    packed: bool = False
    share_prefix: bool = False
    share_response: bool = False
    header: tuple[int, ...] | None = None
    attention: str = "keep"

    def __post_init__(self) -> None:
        if self.attention not in KERNELS:
            raise ValueError(f"Layout.attention must be one of {KERNELS}, got {self.attention!r}.")
        if not self.packed and (self.share_prefix or self.share_response):
            object.__setattr__(self, "share_prefix", False)  # both levers live inside the packed layout
            object.__setattr__(self, "share_response", False)

    def collate(self, pairs: list[TokenizedPair], *, pad_id: int) -> PairBatch:
        """A batch in this layout; it carries the attention kernel to the forward."""
        batch = collate(pairs, pad_id=pad_id, packed=self.packed, share_prefix=self.share_prefix,
                        header=self.header if self.share_prefix else None, share_response=self.share_response)
        batch.attention = self.attention if self.packed else "keep"
        return batch

    def for_pairs(self, pairs: list[TokenizedPair]) -> Layout:
        """This layout with the header of `pairs` (a set's template header is encoded once)."""
        header = set_header(pairs) if self.packed and self.share_prefix else None
        return replace(self, header=header)

    def fingerprint(self) -> dict[str, bool]:
        """What changes the reference numerics' layout (the kernel is chosen per stage, not cached)."""
        return {"packed": self.packed, "share_prefix": self.share_prefix, "share_response": self.share_response}

    def describe(self) -> str:
        if not self.packed:
            return "padded"
        extra = [n for n, on in (("batch prefix", self.share_prefix), ("shared response tokens", self.share_response)) if on]
        return "shared-prompt" + (f" ({', '.join(extra)})" if extra else "")


PADDED = Layout()
