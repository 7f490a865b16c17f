"""Tokenise preference pairs and collate them into one [chosen; rejected] batch.

Prompt and responses are tokenised separately (so the response mask is exact): the prompt is
cut from the left to `max_prompt_length`, then each response from the right so that
prompt + response <= `max_length`. Counts of truncated and dropped pairs (an empty response;
chosen and rejected the same tokens) are reported.
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
    """Tokenise pairs with truncation. Dropped, with a count by reason in `rep.dropped`: a pair whose
    response would be empty, and one whose responses differ as text but not as tokens (zero DPO
    gradient, a tied eval score): they tokenise alike, or truncation cut them to the same tokens.

    Pairs with equal texts are not dropped here: the readers drop them (`pairs.check_pair`), so
    counting them again would double-count, and tests build such pairs on purpose."""
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
        same_text = p.chosen == p.rejected
        if c and c == r and not same_text:  # (both empty: counted as empty below)
            rep.dropped["chosen and rejected differ as text but tokenise identically"] += 1
            continue
        pt = len(pids) > max_prompt_length
        if pt:
            pids = pids[-max_prompt_length:]  # keep the end of the prompt, next to the response
        budget = max_length - len(pids)
        ct, rt = len(c) > budget, len(r) > budget
        c, r = c[:budget], r[:budget]
        if not c or not r:
            rep.dropped["response empty after tokenisation/truncation"] += 1
            continue
        if c == r and not same_text:
            rep.dropped["chosen and rejected identical after truncation (raise data.max_length)"] += 1
            continue
        rep.prompt_truncated += pt
        rep.chosen_truncated += ct
        rep.rejected_truncated += rt
        out.append(TokenizedPair(tuple(pids), tuple(c), tuple(r), i, pt, ct, rt))
    rep.n_kept = len(out)
    return out, rep


@dataclass
class PairBatch:
    """b pairs. The model reads R input rows; 2b output rows (chosen [0, b), rejected [b, 2b))
    say which input row and which positions hold each response.

    padded layout (`collate_pairs`): R = 2b rows [chosen; rejected], each prompt + response,
    right-padded. packed layout (`collate_packed`, shared prompt prefix): R = b rows
    prompt + chosen + rejected; the rejected tokens cannot see the chosen ones (4D mask) and
    their positions restart after the prompt, so both responses attend to one encoding of the
    prompt.
    """

    input_ids: torch.Tensor  # (R, t)
    attention_mask: torch.Tensor  # (R, t) 1 on real tokens, 0 on padding
    response_mask: torch.Tensor  # (2b, t) 1 on the output row's response tokens (in its input row)
    pool_mask: torch.Tensor  # (2b, t) 1 on the tokens the output row sees: prompt + own response
    pred_pos: torch.Tensor  # (R, t) position whose hidden state predicts this token (-1: none)
    rows: torch.Tensor  # (2b,) input row of each output row
    index: torch.Tensor  # (b,) positions of the pairs in their source list
    position_ids: torch.Tensor | None = None  # (R, t) packed only
    allow: torch.Tensor | None = None  # (R, t, t) bool, packed only: query i may attend key j
    prefix_ids: torch.Tensor | None = None  # (h,) packed only: tokens that begin every prompt, encoded once for the batch
    attention: str = "keep"  # attention kernel of a packed batch (data.layout.Layout.attention); the forward reads it

    def to(self, device) -> PairBatch:
        return PairBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})

    @property
    def n_pairs(self) -> int:
        return self.index.shape[0]

    @property
    def packed(self) -> bool:
        return self.allow is not None

    @property
    def row_pair(self) -> torch.Tensor:
        """(R,) the pair each input row belongs to: padded i mod b, packed i."""
        r = self.input_ids.shape[0]
        return torch.arange(r, device=self.input_ids.device) % self.n_pairs

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_ids is None else int(self.prefix_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens the model reads, the batch prefix once."""
        return int(self.attention_mask.sum()) + self.prefix_len

    @property
    def n_shared_response(self) -> int:
        """Response tokens the rejected output rows read at the chosen positions (not recomputed)."""
        if not self.packed:
            return 0
        b = self.n_pairs
        return int((self.response_mask[:b].bool() & self.response_mask[b:].bool()).sum())

    @property
    def n_slots(self) -> int:
        """Token slots the model computes (real + padding), the batch prefix once."""
        return self.input_ids.numel() + self.prefix_len


def collate_pairs(pairs: list[TokenizedPair], *, pad_id: int) -> PairBatch:
    """Padded layout: 2b rows [chosen; rejected], right-padded."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    t = max(len(a) + len(b) for a, b in rows)
    r = len(rows)
    ids = torch.full((r, t), pad_id, dtype=torch.long)
    att = torch.zeros((r, t), dtype=torch.long)
    resp = torch.zeros((r, t), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        n = len(a) + len(b)
        ids[i, :n] = torch.tensor(a + b, dtype=torch.long)
        att[i, :n] = 1
        resp[i, max(1, len(a)) : n] = 1  # a token at position 0 has no predictor
    pred = torch.arange(t).expand(r, t) - 1
    return PairBatch(ids, att, resp, att.clone(), pred.contiguous(), torch.arange(r),
                     torch.tensor([p.index for p in pairs], dtype=torch.long))


def common_prefix_len(pairs: list[TokenizedPair]) -> int:
    """Leading prompt tokens shared by every pair, leaving each prompt at least its last token
    (whose hidden state predicts the first response token)."""
    prompts = [p.prompt_ids for p in pairs]
    limit = min(len(q) for q in prompts) - 1
    h = 0
    while h < limit and all(q[h] == prompts[0][h] for q in prompts):
        h += 1
    return max(h, 0)


def set_header(pairs: list[TokenizedPair], *, min_prefix: int = 16) -> tuple[int, ...] | None:
    """For passes over a whole set: the header (tokens) common to its prompts, if at least
    `min_prefix` tokens, else None. Prompts cut from the left (which lost the header) are left
    out of the rule; batches holding one find their own prefix (`collate_packed`), the others use
    this one, and no-grad passes encode it once for all of them."""
    full = [p for p in pairs if not p.prompt_truncated]
    if len(full) < 2:
        return None
    h = common_prefix_len(full)
    return tuple(full[0].prompt_ids[:h]) if h >= min_prefix else None


def response_common_len(p: TokenizedPair) -> int:
    """Leading tokens the chosen and rejected responses share (the same tokens after the same
    prompt: their hidden states and log-probs are identical)."""
    k = 0
    for a, b in zip(p.chosen_ids, p.rejected_ids):
        if a != b:
            break
        k += 1
    return k


def collate_packed(pairs: list[TokenizedPair], *, pad_id: int, share_prefix: bool = False, min_prefix: int = 16,
                   header: tuple[int, ...] | None = None, share_response: bool = False) -> PairBatch:
    """Packed layout (shared prompt prefix): one row per pair, prompt + chosen + rejected.

    With `share_prefix`, the tokens that begin every prompt of the batch (e.g. a template
    header), when there are at least `min_prefix` of them and two or more pairs, are taken out
    of the rows into `prefix_ids`: the decoder encodes them once and every row attends to them
    (`forward.run_decoder`); row positions then start at h. A `header` (`set_header`: the one
    common to a whole set) is taken out instead when every prompt of the batch begins with it
    and keeps a token after it, so one encoding serves every batch, even of one pair; a batch
    that does not share it falls back to the `share_prefix` rule.

    With `share_response`, the k leading tokens the rejected response shares with the chosen one
    are not repeated: the rejected output row reads them at the chosen positions, and its own
    tail (positions from lp + k) attends to the prompt and those k tokens only."""
    if header and all(len(p.prompt_ids) > len(header) and p.prompt_ids[: len(header)] == header for p in pairs):
        h = len(header)
    else:
        h = common_prefix_len(pairs) if share_prefix and len(pairs) > 1 else 0
        if h < max(1, min_prefix):
            h = 0
    prefix = torch.tensor(pairs[0].prompt_ids[:h], dtype=torch.long) if h else None
    if h:
        pairs = [TokenizedPair(p.prompt_ids[h:], p.chosen_ids, p.rejected_ids, p.index) for p in pairs]
    ks = [response_common_len(p) if share_response else 0 for p in pairs]
    b = len(pairs)
    t = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) - k for p, k in zip(pairs, ks))
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    att = torch.zeros((b, t), dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    pred = torch.full((b, t), -1, dtype=torch.long)
    resp = torch.zeros((2 * b, t), dtype=torch.long)
    seen = torch.zeros((2 * b, t), dtype=torch.long)
    allow = torch.zeros((b, t, t), dtype=torch.bool)
    for i, (p, k) in enumerate(zip(pairs, ks)):
        lp, lc, lr = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        c = lp + lc  # the rejected tail starts here
        n = c + lr - k
        ids[i, :n] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids[k:], dtype=torch.long)
        att[i, :n] = 1
        pos[i, :c] = torch.arange(c)
        pos[i, c:n] = torch.arange(lp + k, lp + lr)
        pred[i, 1:n] = torch.arange(n - 1)
        if n > c:
            pred[i, c] = lp + k - 1  # the tail's first token is predicted by the last shared one (or the prompt's)
        resp[i, max(1, lp) : c] = 1  # a token at position 0 has no predictor
        resp[b + i, max(1, lp) : lp + k] = 1
        resp[b + i, c + (1 if lp + k == 0 else 0) : n] = 1
        seen[i, :c] = 1
        seen[b + i, : lp + k] = 1
        seen[b + i, c:n] = 1
        allow[i, :n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allow[i, c:n, lp + k : c] = False  # the rejected tail does not see the chosen tokens after the shared ones
    # padding rows attend to themselves only, so softmax never sees an empty row
    allow |= torch.eye(t, dtype=torch.bool)[None]
    return PairBatch(ids, att, resp, seen, pred, torch.arange(b).repeat(2),
                     torch.tensor([p.index for p in pairs], dtype=torch.long), pos + h, allow, prefix)


def collate(pairs: list[TokenizedPair], *, pad_id: int, packed: bool, share_prefix: bool = False,
            header: tuple[int, ...] | None = None, share_response: bool = False) -> PairBatch:
    """`packed`: shared-prompt layout (`collate_packed`, optionally with a batch prefix and shared
    response tokens); else padded."""
    if packed:
        return collate_packed(pairs, pad_id=pad_id, share_prefix=share_prefix, header=header,
                              share_response=share_response)
    return collate_pairs(pairs, pad_id=pad_id)
