import pandas as pd
import pytest
import torch

from reprpo.data.pairs import PreferencePair
from reprpo.data.tokenize import tokenize_pairs
from reprpo.eval.scoring import markdown_table, score_pairs, summarize


def test_accuracy_margin_ppl_on_hand_built_logps():
    """Four pairs, mean log-probs (ℓ̄⁺, ℓ̄⁻): (-1,-2) correct, (-3,-1) wrong, (-2,-2) tie, (-0.5,-4) correct.

    accuracy = (1 + 0 + 0.5 + 1)/4 = 0.625; margins 1, -2, 0, 3.5 -> mean 0.625;
    chosen ppl = exp(-mean(-1,-3,-2,-0.5)) = exp(1.625) = 5.0784190.
    Sums: token counts 2 each, so ℓ = 2ℓ̄.
    """
    import numpy as np

    c, r = [-1.0, -3.0, -2.0, -0.5], [-2.0, -1.0, -2.0, -4.0]
    df = pd.DataFrame({"chosen_logp_mean": c, "rejected_logp_mean": r})
    df["margin"] = df.chosen_logp_mean - df.rejected_logp_mean
    df["correct"] = np.where(df.margin > 0, 1.0, np.where(df.margin == 0, 0.5, 0.0))
    s = summarize(df)
    assert s["accuracy"] == pytest.approx(0.625)
    assert s["margin"] == pytest.approx(0.625)
    assert s["chosen_ppl"] == pytest.approx(5.0784190, rel=1e-6)


def test_batched_length_sorted_scores_equal_single(tiny):
    model, tok = tiny
    pairs = [PreferencePair(f"Question {i}: " + "z" * (3 * i), " yes" * (i % 3 + 1), " no") for i in range(7)]
    tp, _ = tokenize_pairs(pairs, tok, max_length=128, max_prompt_length=64)
    batched = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=3)
    single = pd.concat([score_pairs(model, [p], pad_id=tok.pad_token_id, batch_size=1) for p in tp], ignore_index=True)
    assert batched.pair.tolist() == list(range(7))
    for col in ("chosen_logp_sum", "rejected_logp_sum", "margin"):
        assert (batched[col] - single[col]).abs().max() < 1e-5
    assert (batched.chosen_tokens == single.chosen_tokens).all()


def test_markdown_table_shows_delta_in_pp():
    t = pd.DataFrame([{"split": "test", "n": 10, "base_accuracy": 0.5, "adapter_accuracy": 0.7, "delta_pp": 20.0,
                       "base_margin": 0.1, "adapter_margin": 0.3, "ppl_ratio": 1.01}])
    md = markdown_table(t)
    assert "| test | 10 | 50.0 | 70.0 | +20.0 | +0.100 | +0.300 | 1.010 |" in md


def test_score_pairs_no_grad(tiny):
    model, tok = tiny
    tp, _ = tokenize_pairs([PreferencePair("a", "b", "c")], tok, max_length=16, max_prompt_length=8)
    assert torch.is_grad_enabled()
    score_pairs(model, tp, pad_id=tok.pad_token_id)
    assert torch.is_grad_enabled()


def test_worker_threads_score_like_one(tiny, monkeypatch):
    """workers=3 (threads sharing the model) gives the same per-pair rows, in the same order,
    as one worker, for the padded and the shared-prompt layouts; the attention kernel and
    torch's thread count are restored after; a worker's error reaches the caller."""
    from reprpo.data.layout import Layout
    from reprpo.model import blocked_attention

    model, tok = tiny
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 4)
    head = "### Instruction: answer\n"
    pairs = [PreferencePair(head + f"Question {i}: " + "z" * (3 * i), " yes" * (i % 3 + 1), " yes no") for i in range(9)]
    tp, _ = tokenize_pairs(pairs, tok, max_length=128, max_prompt_length=64)
    kernel, threads = model.config._attn_implementation, torch.get_num_threads()
    for lay in (Layout(), Layout(packed=True, share_prefix=True, share_response=True, attention="blocks")):
        one = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=2, layout=lay)
        many = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=2, workers=3, layout=lay)
        assert many.pair.tolist() == list(range(9))
        pd.testing.assert_frame_equal(one, many, atol=1e-6, rtol=0)
        assert model.config._attn_implementation == kernel and torch.get_num_threads() == threads

    def broken(*a, **k):
        raise RuntimeError("worker failed")

    from reprpo.methods import scorers

    monkeypatch.setattr(scorers, "sequence_logps", broken)
    with pytest.raises(RuntimeError, match="worker failed"):
        score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=2, workers=3)
    assert torch.get_num_threads() == threads


def test_auto_workers_per_device(monkeypatch):
    from reprpo.eval.scoring import cpu_workers

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cpu_workers("cpu") == 2 and cpu_workers("cuda") == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    assert cpu_workers("cpu") == 4


def test_autocast_scoring_in_every_worker_and_its_own_base_cache(tiny, tmp_path, monkeypatch):
    """eval.mixed_precision bf16: every worker thread scores under autocast (autocast is per
    thread: entered only in the caller, 2 workers would score in fp32 and match fp32 exactly);
    the scores are close to fp32's but not equal, integer columns stay integers, and base scores
    from the reference cache are computed again under bf16 rather than read from the fp32 entry."""
    import numpy as np

    from reprpo.eval.scoring import evaluate_splits

    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path))
    model, tok = tiny
    pairs = [PreferencePair(f"Question {i}: " + "z" * (3 * i), " yes" * (i % 3 + 1), " no") for i in range(6)]
    tp, _ = tokenize_pairs(pairs, tok, max_length=128, max_prompt_length=64)
    fp32 = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=2, workers=2)
    bf16 = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=2, workers=2, autocast=torch.bfloat16)
    gap = (fp32.chosen_logp_sum - bf16.chosen_logp_sum).abs()
    assert gap.min() > 0 and gap.max() < 0.5 and bf16.chosen_tokens.dtype == np.int64
    kw = {"batch_size": 1, "with_adapter": False, "ref_cache": True, "progress": False}
    _, a = evaluate_splits(model, tok, {"test": tp}, **kw)
    _, b = evaluate_splits(model, tok, {"test": tp}, autocast=torch.bfloat16, **kw)
    _, c = evaluate_splits(model, tok, {"test": tp}, autocast=torch.bfloat16, **kw)
    assert (a.chosen_logp_sum - b.chosen_logp_sum).abs().min() > 0  # not the fp32 entry
    pd.testing.assert_frame_equal(b, c)  # the bf16 entry, read back
    assert (b.chosen_logp_sum - bf16.chosen_logp_sum).abs().max() < 0.1
