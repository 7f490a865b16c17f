import torch

from reprpo.data.layout import Layout
from reprpo.data.pairs import PreferencePair
from reprpo.data.tokenize import collate_pairs, tokenize_pairs
from reprpo.model import blocked_attention
from reprpo.model.forward import sequence_logps, token_logps


def _pairs(tok):
    ps = [PreferencePair("Q: 2+2?", " 4", " 5"), PreferencePair("Say hi to the nice reader", " hi there", " no"),
          PreferencePair("x", " a long answer here", " b")]
    return tokenize_pairs(ps, tok, max_length=64, max_prompt_length=32)[0]


def test_response_logps_equal_full_logits(tiny):
    """ℓ from response-only logits equals the sum over response positions of full log-softmax."""
    model, tok = tiny
    tp = _pairs(tok)
    b = collate_pairs(tp, pad_id=tok.pad_token_id)
    with torch.no_grad():
        got = sequence_logps(model, b)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, b.input_ids[:, 1:, None]).squeeze(2)
    want = (lp * b.response_mask[:, 1:]).sum(1)
    assert torch.allclose(got.logp_sum, want, atol=1e-5)
    assert got.n_tokens.tolist() == b.response_mask.sum(1).tolist()


def test_batched_equals_one_pair_at_a_time(tiny):
    model, tok = tiny
    tp = _pairs(tok)
    with torch.no_grad():
        full = sequence_logps(model, collate_pairs(tp, pad_id=tok.pad_token_id))
        fc, fr = full.chosen_rejected()
        for i, p in enumerate(tp):
            one = sequence_logps(model, collate_pairs([p], pad_id=tok.pad_token_id))
            oc, orj = one.chosen_rejected()
            assert torch.allclose(oc[0], fc[i], atol=1e-4) and torch.allclose(orj[0], fr[i], atol=1e-4)


def test_chunked_logsoftmax_matches_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    h, t = torch.randn(37, 8), torch.randint(0, 50, (37,))
    want = torch.log_softmax(head(h), -1).gather(1, t[:, None]).squeeze(1)
    for chunk in (1, 5, 37, 100):
        assert torch.allclose(token_logps(head, h, t, chunk=chunk), want, atol=1e-6)


def test_packed_shared_prompt_equals_padded(tiny, monkeypatch):
    """Shared prompt prefix (one row per pair, 4D mask, restarted positions) gives the same
    log-probs as the padded [chosen; rejected] layout, for prompts of different lengths."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 4)  # several query blocks per row
    from reprpo.data.tokenize import collate_packed

    model, tok = tiny
    tp = _pairs(tok)
    assert len({len(p.prompt_ids) for p in tp}) == 3
    for impl in ("sdpa", "eager", blocked_attention.NAME):
        model.config._attn_implementation = impl
        with torch.no_grad():
            a = sequence_logps(model, collate_pairs(tp, pad_id=tok.pad_token_id))
            b = sequence_logps(model, collate_packed(tp, pad_id=tok.pad_token_id))
        assert torch.allclose(a.logp_sum, b.logp_sum, atol=1e-4), impl
        assert torch.equal(a.n_tokens, b.n_tokens)
    model.config._attn_implementation = "sdpa"


def test_packed_gradients_equal_padded(tiny):
    """Gradients flow into the shared prefix: d(Σ ℓ)/dθ is the same in both layouts."""
    import copy

    from reprpo.data.tokenize import collate_packed

    model, tok = tiny
    tp = _pairs(tok)
    grads = []
    for coll in (collate_pairs, collate_packed):
        m = copy.deepcopy(model)
        sequence_logps(m, coll(tp, pad_id=tok.pad_token_id)).logp_sum.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4 * grads[0].abs().max())


def test_full_logits_path_equals_response_only(tiny):
    model, tok = tiny
    b = collate_pairs(_pairs(tok), pad_id=tok.pad_token_id)
    with torch.no_grad():
        a = sequence_logps(model, b)
        c = sequence_logps(model, b, full_logits=True)
    assert torch.allclose(a.logp_sum, c.logp_sum, atol=1e-5)


def _header_pairs(tok):
    """Three prompts that begin with the same 24-character header (a template), of different
    lengths; the second is the header plus one character."""
    head = "### Instruction: answer\n"
    ps = [PreferencePair(head + "Q: 2+2?", " 4", " 5"), PreferencePair(head + "x", " hi there", " no"),
          PreferencePair(head + "Say hi to the nice reader", " a long answer here", " b")]
    return tokenize_pairs(ps, tok, max_length=96, max_prompt_length=64)[0]


def test_batch_prefix_split_keeps_each_prompts_last_token(tiny):
    """The shared header goes to prefix_ids once; each row keeps at least its last prompt token
    (the predictor of the first response token); positions continue after the prefix."""
    from reprpo.data.tokenize import collate_packed, common_prefix_len

    _, tok = tiny
    tp = _header_pairs(tok)
    h = common_prefix_len(tp)
    shortest = min(len(p.prompt_ids) for p in tp)
    assert h == shortest - 1 >= 24  # the header plus nothing more: the x prompt keeps its last token
    b = collate_packed(tp, pad_id=tok.pad_token_id, share_prefix=True)
    assert b.prefix_len == h and b.prefix_ids.tolist() == list(tp[0].prompt_ids[:h])
    assert b.position_ids[:, 0].tolist() == [h] * 3
    plain = collate_packed(tp, pad_id=tok.pad_token_id)
    assert b.n_tokens == plain.n_tokens - 2 * h  # the header is read once, not three times
    assert b.input_ids.shape[1] == plain.input_ids.shape[1] - h
    assert collate_packed(tp[:1], pad_id=tok.pad_token_id, share_prefix=True).prefix_ids is None  # one pair: nothing shared
    assert collate_packed(tp, pad_id=tok.pad_token_id, share_prefix=True, min_prefix=h + 1).prefix_ids is None


def test_batch_prefix_logps_and_gradients_equal_unshared(tiny, monkeypatch):
    """Prefix encoded once + KV cache to every row == the padded layout: log-probs to 1e-4 for
    both attention kernels, and d(Σ ℓ)/dθ to 1e-4 relative (gradients reach the prefix)."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 4)  # several query blocks per row
    import copy

    from reprpo.data.tokenize import collate_packed

    model, tok = tiny
    tp = _header_pairs(tok)
    shared = collate_packed(tp, pad_id=tok.pad_token_id, share_prefix=True)
    assert shared.prefix_len > 0
    for impl in ("sdpa", "eager", blocked_attention.NAME):
        model.config._attn_implementation = impl
        with torch.no_grad():
            a = sequence_logps(model, collate_pairs(tp, pad_id=tok.pad_token_id))
            b = sequence_logps(model, shared)
            store = {}
            c = sequence_logps(model, shared, prefix_store=store)  # computes and keeps the prefix KV
            d = sequence_logps(model, shared, prefix_store=store)  # reuses it
        assert len(store) == 1
        for x in (b, c, d):
            assert torch.allclose(a.logp_sum, x.logp_sum, atol=1e-4), impl
            assert torch.equal(a.n_tokens, x.n_tokens)
    model.config._attn_implementation = "sdpa"
    grads = []
    for batch in (collate_pairs(tp, pad_id=tok.pad_token_id), shared):
        m = copy.deepcopy(model)
        sequence_logps(m, batch).logp_sum.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4 * grads[0].abs().max())


def test_scoring_encodes_a_set_wide_header_once(tiny):
    """score_pairs with share_prefix: the header common to the whole set is encoded once and
    reused by every batch, batches of one pair included; scores equal the padded layout's."""
    from reprpo.eval.scoring import score_pairs

    model, tok = tiny
    tp = _header_pairs(tok)
    want = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=3)
    calls = []
    emb = model.get_input_embeddings().register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        for bs in (1, 2):
            calls.clear()
            got = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=bs, layout=Layout(packed=True, share_prefix=True))
            n_batches = -(-len(tp) // bs)
            assert len(calls) == n_batches + 1 and calls[0][1] >= 24  # the header, then one call per batch
            for col in ("chosen_logp_sum", "rejected_logp_sum"):
                assert (got[col] - want[col]).abs().max() < 1e-4, (bs, col)
    finally:
        emb.remove()


def test_a_header_lost_by_left_cut_prompts_still_serves_the_others(tiny):
    """A prompt cut from the left loses the template header. The set-wide header is then the one
    the uncut prompts share; batches holding a cut prompt find their own prefix (or none), the
    others reuse the one stored encoding of the header; scores equal the padded layout's."""
    from reprpo.data.tokenize import collate_packed, set_header
    from reprpo.eval.scoring import score_pairs

    model, tok = tiny
    head = "### Instruction: answer\n"
    ps = [PreferencePair(head + "Q: 2+2?", " 4", " 5"), PreferencePair(head + "x", " hi there", " no"),
          PreferencePair(head + "Say hi to the nice reader", " a long answer here", " b"),
          PreferencePair(head + "What colour is the sky on a clear day, please? " * 2, " blue", " green")]
    tp = tokenize_pairs(ps, tok, max_length=96, max_prompt_length=56)[0]
    assert [p.prompt_truncated for p in tp] == [False, False, False, True]
    header = set_header(tp)
    h = len(header or ())
    assert h >= len(head)
    assert collate_packed(tp[:3], pad_id=tok.pad_token_id, share_prefix=True, header=header).prefix_len == h
    assert collate_packed(tp[2:], pad_id=tok.pad_token_id, share_prefix=True, header=header).prefix_len == 0  # falls back
    assert collate_packed(tp[3:], pad_id=tok.pad_token_id, header=header).prefix_len == 0  # the cut prompt alone
    want = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=2)
    calls = []
    emb = model.get_input_embeddings().register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))
    try:
        got = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=1, layout=Layout(packed=True, share_prefix=True))
    finally:
        emb.remove()
    assert calls.count(h) == 1 and len(calls) == 5  # the header once, then one call per pair
    for col in ("chosen_logp_sum", "rejected_logp_sum"):
        assert (got[col] - want[col]).abs().max() < 1e-4, col


def _sharing_pairs(tok, *, append_eos=True):
    """Responses that share leading characters: 15, 4 (chosen is a prefix of the rejected),
    everything (identical: 5 characters + EOS), 1 (the space), and 4 (rejected is a prefix of
    the chosen) -- 5 pairs."""
    ps = [PreferencePair("Q: 2+2?", " the answer is 4", " the answer is 5"),
          PreferencePair("Say hi", " yes", " yes indeed"),
          PreferencePair("x", " same", " same"),
          PreferencePair("Name one", " a", " b"),
          PreferencePair("Longer prompt here", " abc def", " abc")]
    return tokenize_pairs(ps, tok, max_length=96, max_prompt_length=64, append_eos=append_eos)[0]


def test_shared_response_tokens_equal_padded(tiny, monkeypatch):
    """speed.share_response: the rejected row reads its first k tokens (shared with the chosen)
    at the chosen positions and its tail branches off after them. Log-probs (both kernels),
    token counts, gradients and response-pooled activations equal the padded layout; with a
    batch header too."""
    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 4)  # several query blocks per row
    import copy

    from reprpo.data.tokenize import collate_packed, response_common_len
    from reprpo.model.capture import capture, capture_points, pool

    model, tok = tiny
    for eos in (True, False):
        tp = _sharing_pairs(tok, append_eos=eos)
        ks = [response_common_len(p) for p in tp]
        assert ks == ([15, 4, 6, 1, 4] if eos else [15, 4, 5, 1, 4]), ks
        plain = collate_packed(tp, pad_id=tok.pad_token_id)
        shared = collate_packed(tp, pad_id=tok.pad_token_id, share_response=True)
        assert shared.n_shared_response == sum(ks) and plain.n_shared_response == 0
        assert shared.n_tokens == plain.n_tokens - sum(ks)
        padded = collate_pairs(tp, pad_id=tok.pad_token_id)
        for impl in ("sdpa", "eager", blocked_attention.NAME):
            model.config._attn_implementation = impl
            with torch.no_grad():
                a, b = sequence_logps(model, padded), sequence_logps(model, shared)
            assert torch.allclose(a.logp_sum, b.logp_sum, atol=1e-4), (eos, impl)
            assert torch.equal(a.n_tokens, b.n_tokens)
        model.config._attn_implementation = "sdpa"
    pts = capture_points(model, collection="hs", layers=[0, 1])
    pooled, grads = [], []
    for batch in (padded, shared):
        m = copy.deepcopy(model)
        with capture(capture_points(m, collection="hs", layers=[0, 1])) as store:
            sequence_logps(m, batch).logp_sum.sum().backward()
        pooled.append([pool(store[p.key][batch.rows].detach(), response_mask=batch.response_mask,
                            attention_mask=batch.pool_mask, mode=mode) for p in pts for mode in ("mean", "last", "all")])
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4 * grads[0].abs().max())
    for x, y in zip(*pooled):
        assert torch.allclose(x, y, atol=1e-4)
    # with a template header taken out as a batch prefix as well
    hp = _header_pairs(tok)
    hp = [type(p)(p.prompt_ids, p.chosen_ids, p.chosen_ids[:3] + p.rejected_ids, p.index) for p in hp]  # share 3+ tokens
    both = collate_packed(hp, pad_id=tok.pad_token_id, share_prefix=True, share_response=True)
    assert both.prefix_len > 0 and both.n_shared_response >= 9
    with torch.no_grad():
        a, b = sequence_logps(model, collate_pairs(hp, pad_id=tok.pad_token_id)), sequence_logps(model, both)
    assert torch.allclose(a.logp_sum, b.logp_sum, atol=1e-4)
