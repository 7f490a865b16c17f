"""Speed levers are exact: reference cache, shared prompt, response-only logits, length batches."""

import json
import math

import pandas as pd
import pytest
import torch

from reprpo.config import RunConfig, apply_overrides
from reprpo.data.layout import Layout
from reprpo.methods.presets import preset_overrides

OFF = {"speed.share_prompt": False, "speed.ref_cache": False, "speed.response_logits": False, "speed.length_batches": False,
       "speed.share_prefix": False, "speed.keep_memory": False, "speed.share_response": False}


def _cfg(tmp_path, method, name, **over):
    base = {
        "model.name": "tiny-random", "data.shift": "builtin:context", "data.n_train": 12,
        "data.max_length": 96, "data.max_prompt_length": 80, "train.batch_size": 3, "train.max_steps": 2,
        "train.lr": 3e-3, "train.method": method, "train.progress": False, "eval.after_train": False,
        "method.k": 4, "method.layers": "0,1", "out": str(tmp_path / name),
    }
    cfg = apply_overrides(RunConfig(), preset_overrides(method), where="preset")
    return apply_overrides(cfg, base | over, where="test")


def _losses(tmp_path, method, name, **over):
    from reprpo.train import train

    out = train(_cfg(tmp_path, method, name, **over))
    return pd.read_csv(out / "metrics.csv")


@pytest.mark.parametrize("method", ["dpo", "ipo", "hs-pca-prefvec", "hs-ortho-mse", "side-none-innerdpo", "hs-suppressed-prefvec"])
def test_each_speedup_leaves_losses_unchanged(method, tmp_path):
    """Same seed, same batches: all levers on vs all off vs each alone on -> same losses at
    steps 1 and 2 (step 2's loss depends on step 1's gradients, so this checks the gradients
    too). Later steps are not compared: with lr 3e-3 on a random tiny model some losses (mse)
    jump 30x in a step, and such chaotic growth amplifies 1e-6 float differences.
    projgrad/projbp are checked on their gradients instead (test_gradproj): AdamW's first step
    is about lr·sign(g), and the components their projection removes are float noise whose
    sign flips with the layout, so their step-2 loss moves by ~1e-4 with any layout change."""
    first2 = lambda df: df.loss[:2].reset_index(drop=True)
    ref = first2(_losses(tmp_path, method, "off", **OFF))
    on = first2(_losses(tmp_path, method, "on"))
    # length batching changes the batch composition: compare it against its own "off" twin
    ref_grouped = first2(_losses(tmp_path, method, "off-grouped", **(OFF | {"speed.length_batches": True})))
    tol = lambda a: 1e-4 * a.abs().clip(lower=1)  # relative where the loss is large
    assert ((on - ref_grouped).abs() < tol(ref_grouped)).all(), (on.tolist(), ref_grouped.tolist())
    for lever in ("speed.share_prompt", "speed.ref_cache", "speed.response_logits"):
        one = first2(_losses(tmp_path, method, lever, **(OFF | {lever: True})))
        assert ((one - ref).abs() < tol(ref)).all(), (lever, one.tolist(), ref.tolist())


def test_cached_reference_runs_no_reference_forward(tmp_path, monkeypatch):
    import reprpo.methods.representation as methods
    from reprpo.train import train

    calls = {"n": 0}
    real = methods.adapter_disabled

    def counting(model):
        calls["n"] += 1
        return real(model)

    monkeypatch.setattr(methods, "adapter_disabled", counting)
    train(_cfg(tmp_path, "hs-pca-prefvec", "cached"))
    assert calls["n"] == 0  # pca fit and every step read the cache
    train(_cfg(tmp_path, "hs-pca-prefvec", "online", **{"speed.ref_cache": False}))
    assert calls["n"] >= 4  # one reference pass per step (plus the pca fit)
    # non-linear but fixed transforms (suppressed; rank's token function): before training, one
    # pass sizes the transform and ceil(12 pairs / 8) = 2 compute the pooled reference; then no
    # step runs a reference pass, so 2 and 4 steps make the same 3 calls
    for method in ("hs-suppressed-prefvec", "hs-none-rank"):
        for steps in (2, 4):
            calls["n"] = 0
            train(_cfg(tmp_path, method, f"{method}-{steps}", **{"train.max_steps": steps, "train.batch_size": 3}))
            assert calls["n"] == 3, (method, steps, calls["n"])


@pytest.mark.parametrize("method", ["projgrad", "projbp"])
def test_gradient_methods_read_directions_from_the_cache(method, tmp_path, monkeypatch):
    """With the reference cache, projgrad/projbp take u_b and ℓ_ref from it: no reference pass
    in the loop (one per step without it), and the shared-prompt layout."""
    import reprpo.methods.gradproj as gp
    from reprpo.train import train

    calls = {"n": 0}
    real = gp.reference_directions

    def counting(model, batch):
        calls["n"] += 1
        return real(model, batch)

    monkeypatch.setattr(gp, "reference_directions", counting)
    out = train(_cfg(tmp_path, method, "cached"))
    assert calls["n"] == 0
    assert json.loads((out / "train_report.json").read_text())["layout"] == "shared-prompt"
    train(_cfg(tmp_path, method, "online", **{"speed.ref_cache": False}))
    assert calls["n"] == 2  # one per step


def test_cache_is_reused_and_validated(tiny, tmp_path, monkeypatch):
    import reprpo.model.refcache as rc
    from reprpo.data.pairs import PreferencePair
    from reprpo.data.tokenize import tokenize_pairs

    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "c"))
    model, tok = tiny
    pairs = [PreferencePair(f"q{i}?", f" yes {i}", f" no {i}") for i in range(5)]
    tp, _ = tokenize_pairs(pairs, tok, max_length=32, max_prompt_length=16)
    a = rc.build_ref_cache(model, tp, pad_id=tok.pad_token_id, layout=Layout(packed=True))
    files = list((tmp_path / "c" / "ref").glob("*.pt"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed although a valid cache exists")

    monkeypatch.setattr(rc, "sequence_logps", boom)
    b = rc.build_ref_cache(model, tp, pad_id=tok.pad_token_id, layout=Layout(packed=True))
    assert torch.equal(a.logp_sum, b.logp_sum)
    # different data -> different fingerprint -> recomputed (boom proves it is not reused)
    with pytest.raises(AssertionError, match="recomputed"):
        rc.build_ref_cache(model, tp[:3], pad_id=tok.pad_token_id, layout=Layout(packed=True))
    # a file whose content does not match its name is not trusted
    d = torch.load(files[0], weights_only=True)
    d["fingerprint"] = "something-else"
    torch.save(d, files[0])
    with pytest.raises(AssertionError, match="recomputed"):
        rc.build_ref_cache(model, tp, pad_id=tok.pad_token_id, layout=Layout(packed=True))
    files[0].write_bytes(b"garbage")
    with pytest.raises(AssertionError, match="recomputed"):
        rc.build_ref_cache(model, tp, pad_id=tok.pad_token_id, layout=Layout(packed=True))
    # changed weights -> different fingerprint
    monkeypatch.undo()
    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "c"))
    import copy

    m2 = copy.deepcopy(model)
    m2.__dict__.pop("_reprpo_fingerprint", None)
    with torch.no_grad():
        next(m2.parameters()).add_(0.01)
    assert rc.model_fingerprint(m2) != rc.model_fingerprint(model)


def test_cached_base_scores_equal_direct_scores(tiny, tmp_path, monkeypatch):
    from reprpo.data.pairs import PreferencePair
    from reprpo.data.tokenize import tokenize_pairs
    from reprpo.eval.scoring import base_scores_cached, score_pairs

    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "c"))
    model, tok = tiny
    pairs = [PreferencePair("p" * (i + 1), " a" * (i + 1), " b") for i in range(6)]
    tp, _ = tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=32)
    x = base_scores_cached(model, tp, pad_id=tok.pad_token_id, batch_size=4, layout=Layout(packed=True))
    y = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=1)
    assert (x.margin - y.margin).abs().max() < 1e-4 and (x.correct == y.correct).all()


def test_length_grouped_batches():
    from reprpo.data.tokenize import TokenizedPair, collate_pairs
    from reprpo.train import LengthGroupedBatches

    lengths = [1 + (i * 37) % 50 for i in range(64)]
    for group in (True, False):
        s = LengthGroupedBatches(lengths, batch_size=4, seed=0, group=group)
        for _ in range(2):  # every epoch is a permutation, cut into batches of 4
            batches = list(s)
            assert sorted(i for b in batches for i in b) == list(range(64)) and len(batches) == len(s) == 16

    def waste(group):
        tp = [TokenizedPair((1,), (2,) * n, (3,) * n, i) for i, n in enumerate(lengths)]
        real = pad = 0
        for b in LengthGroupedBatches(lengths, batch_size=4, seed=0, group=group):
            bt = collate_pairs([tp[i] for i in b], pad_id=0)
            real, pad = real + bt.n_tokens, pad + bt.input_ids.numel()
        return 1 - real / pad

    assert waste(True) < 0.5 * waste(False)


def test_train_report_records_layout_and_waste(tmp_path):
    import json

    from reprpo.train import train

    out = train(_cfg(tmp_path, "dpo", "r"))
    rep = json.loads((out / "train_report.json").read_text())
    assert rep["layout"] == "shared-prompt" and rep["reference_cache"] is True
    assert 0 <= rep["pad_waste"] < 1
    m = pd.read_csv(out / "metrics.csv")
    assert "pad_waste" in m and math.isfinite(m.pad_waste.iloc[-1])
    # projbp's leaky rectifier acts per response row: it falls back to the padded layout
    out = train(_cfg(tmp_path, "projbp", "g", **{"method.projbp_rectify": "leaky"}))
    assert json.loads((out / "train_report.json").read_text())["layout"] == "padded"


def _header_data(path):
    """12 pairs whose prompts all begin with a 40-character template header."""
    import json

    head = "### Instruction: answer the question.\n\n"
    rows = [{"prompt": f"{head}Q{i}: what is {i} + {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1} maybe"}
            for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize("method", ["dpo", "hs-pca-prefvec", "side-none-innerdpo"])
def test_batch_prefix_leaves_losses_unchanged(method, tmp_path):
    """A template header shared by every prompt is encoded once per batch (speed.share_prefix):
    the first two losses equal those of the plain shared-prompt layout, and the report counts
    the header tokens not re-read (so the lever really ran)."""
    src = _header_data(tmp_path / "h.jsonl")  # all 12 pairs train (the eval split named: no held-out slice)
    data = {"data.shift": "", "data.train": src, "data.eval": f"train={src}", "data.chat_template": False}
    on = _cfg(tmp_path, method, "on", **data)
    off = _cfg(tmp_path, method, "off", **data, **{"speed.share_prefix": False})
    from reprpo.train import train

    runs = [train(c) for c in (on, off)]
    saved = [json.loads((r / "train_report.json").read_text())["batch_prefix_tokens_saved"] for r in runs]
    assert saved[0] >= 2 * 2 * 40 and saved[1] == 0  # 2 steps x 3 pairs: >= 2 x 40 header tokens not re-read per step
    a, b = (pd.read_csv(r / "metrics.csv").loss[:2] for r in runs)
    assert ((a - b).abs() < 1e-4 * b.abs().clip(lower=1)).all(), (a.tolist(), b.tolist())


def _sharing_data(path):
    """12 pairs whose chosen and rejected responses begin with the same words."""
    rows = [{"prompt": f"Q{i}: what is {i} + {i}?", "chosen": f" The sum of them is {2 * i}.",
             "rejected": f" The sum of them is {2 * i + 1}, I think"} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize("method", ["dpo", "hs-pca-prefvec", "hs-none-rank", "side-none-innerdpo"])
def test_shared_response_tokens_leave_losses_unchanged(method, tmp_path):
    """speed.share_response: the tokens chosen and rejected share are encoded once; the first
    two losses equal those with the lever off, and the report counts the shared tokens."""
    src = _sharing_data(tmp_path / "s.jsonl")
    data = {"data.shift": "", "data.train": src, "data.eval": f"train={src}", "data.chat_template": False}
    from reprpo.train import train

    runs = [train(_cfg(tmp_path, method, name, **data, **over))
            for name, over in (("on", {}), ("off", {"speed.share_response": False}))]
    shared = [json.loads((r / "train_report.json").read_text())["response_tokens_shared"] for r in runs]
    assert shared[0] >= 2 * 3 * len(" The sum of them is ") and shared[1] == 0  # 2 steps x 3 pairs
    a, b = (pd.read_csv(r / "metrics.csv").loss[:2] for r in runs)
    assert ((a - b).abs() < 1e-4 * b.abs().clip(lower=1)).all(), (a.tolist(), b.tolist())
