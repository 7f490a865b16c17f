"""Tokenise preference pairs and collate them into one [chosen; rejected] batch.

Prompt and responses are tokenised separately (so the response mask is exact): the prompt is
cut from the left to `max_prompt_length`, then each response from the right so that
prompt + response <= `max_length`. Counts of truncated and dropped pairs are reported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from reprpo.data.pairs import PreferencePair
from reprpo.errors import DataError


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    index: int  # position in the pair list it came from
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False

    @property
    def length(self) -> int:
        """Padded length of this pair's rows in a [chosen; rejected] batch."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizeReport:
    n_pairs: int = 0
    n_kept: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        s = (
            f"{self.n_kept}/{self.n_pairs} pairs kept; truncated: prompt {self.prompt_truncated}, "
            f"chosen {self.chosen_truncated}, rejected {self.rejected_truncated}"
        )
        if self.dropped:
            s += "; dropped " + ", ".join(f"{n} ({r})" for r, n in self.dropped.items())
        return s


def format_prompt(tokenizer, prompt: str, *, chat_template: bool) -> str:
    """The prompt text as fed to the model: as is, or as a user turn in the chat template."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.chat_template is on but the tokenizer has no chat template: turn it off "
            "(--data.chat_template false) or use an instruction-tuned model."
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    chat_template: bool = False,
    append_eos: bool = True,
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenise pairs with truncation; a pair whose response would be empty is dropped (counted)."""
    rep = TokenizeReport(n_pairs=len(pairs))
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    out: list[TokenizedPair] = []
    # The chat template writes its own special tokens; a plain prompt gets the tokenizer's (BOS).
    add_special = not chat_template
    for i, p in enumerate(pairs):
        ptext = format_prompt(tokenizer, p.prompt, chat_template=chat_template)
        pids = tokenizer(ptext, add_special_tokens=add_special)["input_ids"] if ptext else []
        c = tokenizer(p.chosen, add_special_tokens=False)["input_ids"] + eos
        r = tokenizer(p.rejected, add_special_tokens=False)["input_ids"] + eos
        pt = len(pids) > max_prompt_length
        if pt:
            pids = pids[-max_prompt_length:]  # keep the end of the prompt, next to the response
        budget = max_length - len(pids)
        ct, rt = len(c) > budget, len(r) > budget
        c, r = c[:budget], r[:budget]
        if not c or not r:
            rep.dropped["response empty after tokenisation/truncation"] += 1
            continue
        rep.prompt_truncated += pt
        rep.chosen_truncated += ct
        rep.rejected_truncated += rt
        out.append(TokenizedPair(tuple(pids), tuple(c), tuple(r), i, pt, ct, rt))
    rep.n_kept = len(out)
    return out, rep


@dataclass
class PairBatch:
    """b pairs as 2b rows: rows [0, b) chosen, rows [b, 2b) rejected; right-padded."""

    input_ids: torch.Tensor  # (2b, t)
    attention_mask: torch.Tensor  # (2b, t)
    response_mask: torch.Tensor  # (2b, t) 1 on response tokens (not prompt, not padding)
    index: torch.Tensor  # (b,) positions of the pairs in their source list

    def to(self, device) -> PairBatch:
        return PairBatch(*(x.to(device) for x in (self.input_ids, self.attention_mask, self.response_mask, self.index)))

    @property
    def n_pairs(self) -> int:
        return self.index.shape[0]


def collate_pairs(pairs: list[TokenizedPair], *, pad_id: int) -> PairBatch:
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    t = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), t), dtype=torch.long)
    resp = torch.zeros((len(rows), t), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        n = len(a) + len(b)
        ids[i, :n] = torch.tensor(a + b, dtype=torch.long)
        att[i, :n] = 1
        resp[i, len(a) : n] = 1
    return PairBatch(ids, att, resp, torch.tensor([p.index for p in pairs], dtype=torch.long))
