import pytest
import torch

from reprpo.data.pairs import PreferencePair
from reprpo.data.tokenize import TokenizedPair, collate_pairs, format_prompt, tokenize_pairs
from reprpo.errors import DataError


def test_response_mask_hand_built():
    """prompt [5,6,7], chosen [8,9], rejected [10] (pair 0); prompt [5], chosen [8,9,11], rejected [12,13] (pair 1).

    Rows: chosen0 = 5 6 7 8 9 | chosen1 = 5 8 9 11 _ | rejected0 = 5 6 7 10 _ | rejected1 = 5 12 13 _ _
    Response mask marks only the response tokens: prompt and padding are 0.
    """
    pairs = [TokenizedPair((5, 6, 7), (8, 9), (10,), 0), TokenizedPair((5,), (8, 9, 11), (12, 13), 1)]
    b = collate_pairs(pairs, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 11, 0], [5, 6, 7, 10, 0], [5, 12, 13, 0, 0]]
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert b.index.tolist() == [0, 1]


def test_truncation_prompt_left_response_right(tiny):
    _, tok = tiny
    pairs = [PreferencePair("abcdefghij", "KLMNOP", "QR")]  # char tokenizer: 1 token per char
    out, rep = tokenize_pairs(pairs, tok, max_length=10, max_prompt_length=6, append_eos=True)
    (p,) = out
    ids = lambda s: tuple(tok(s, add_special_tokens=False)["input_ids"])
    # the tiny tokenizer adds no BOS; prompt keeps its last 6 chars, responses get 4 tokens of room
    assert p.prompt_ids == ids("efghij")
    assert p.chosen_ids == ids("KLMN")  # EOS cut off with the tail
    assert p.rejected_ids == ids("QR") + (tok.eos_token_id,)
    assert (p.prompt_truncated, p.chosen_truncated, p.rejected_truncated) == (True, True, False)
    assert (rep.prompt_truncated, rep.chosen_truncated, rep.rejected_truncated, rep.n_kept) == (1, 1, 0, 1)


def test_pair_with_no_room_for_response_is_dropped_with_count(tiny):
    """Prompt fills max_length (budget 0): the pair cannot be scored, so it is dropped and counted."""
    _, tok = tiny
    pairs = [PreferencePair("abcd", "x", "y"), PreferencePair("ab", "x", "y")]
    out, rep = tokenize_pairs(pairs, tok, max_length=4, max_prompt_length=4, append_eos=False)
    assert [p.index for p in out] == [1]
    assert rep.n_kept == 1 and sum(rep.dropped.values()) == 1
    assert "dropped 1" in rep.summary()


def test_chat_template_prompt(tiny):
    _, tok = tiny
    assert format_prompt(tok, "hi", chat_template=True) == "<|user|>hi<|end|>\n<|assistant|>"
    assert format_prompt(tok, "hi", chat_template=False) == "hi"
    out, _ = tokenize_pairs([PreferencePair("hi", "a", "b")], tok, max_length=64, max_prompt_length=32, chat_template=True)
    assert tok.decode(list(out[0].prompt_ids)) == "<|user|>hi<|end|>\n<|assistant|>"


def test_chat_template_missing_is_clear_error(tiny):
    _, tok = tiny
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(DataError, match="chat_template"):
            format_prompt(tok, "hi", chat_template=True)
    finally:
        tok.chat_template = saved


def test_collate_dtype_and_shapes():
    b = collate_pairs([TokenizedPair((1,), (2,), (3, 4), 7)], pad_id=0)
    assert b.input_ids.dtype == torch.long and b.input_ids.shape == (2, 3)
    assert b.n_pairs == 1


def test_prepare_limit_counts_pairs_that_survive_tokenisation(tiny, tmp_path):
    """10 rows, prompt "p" (1 token of the character tokenizer). At max_length 5 a response keeps
    4 characters, so in rows 1, 2, 4, 5, 6 ("aaaax" vs "aaaay") chosen and rejected are cut to the
    same tokens and dropped. limit 4 gives the first 4 surviving rows 0, 3, 7, 8 (9 rows read, 5
    of them dropped), not the 2 survivors among the first 4 rows (the old rule); a limit above what
    survives gives all of it (rows 0, 3, 7, 8, 9)."""
    import json

    from reprpo.config import DataConfig
    from reprpo.data.prepare import prepare

    _, tok = tiny
    same = {1, 2, 4, 5, 6}
    rows = [{"prompt": "p", "chosen": "aaaa" + ("x" if i in same else f"{i}"), "rejected": ("aaaa" + "y") if i in same else f"{i}bbbb"}
            for i in range(10)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    data = DataConfig(max_length=5, max_prompt_length=1, append_eos=False)
    got = prepare(str(tmp_path / "d.json"), tok, data, limit=4)
    assert [p.index for p in got.tokenized] == [0, 3, 7, 8] and len(got.pairs) == 9
    assert got.token_report.n_pairs == 9 and got.token_report.n_kept == 4 and sum(got.token_report.dropped.values()) == 5
    every = prepare(str(tmp_path / "d.json"), tok, data, limit=50)
    assert [p.index for p in every.tokenized] == [0, 3, 7, 8, 9]
