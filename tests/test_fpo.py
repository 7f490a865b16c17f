"""FPO and the SAE transform: the hand-worked loss, the offline reference features (equal to the
online ones), training on the tiny model, and the errors a user meets."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from reprpo.config import apply_overrides
from reprpo.errors import ConfigError
from reprpo.methods import build_method, resolve_config
from reprpo.methods.fpo import feature_mse, fpo_loss, select_features
from reprpo.model.refcache import build_ref_cache, dense_rows, sparse_rows
from reprpo.model.tiny import build_tiny_sae

LN2 = math.log(2)
TINY = {"model.name": "tiny-random", "data.shift": "builtin:difficulty", "data.n_train": 8, "data.max_length": 64,
        "data.max_prompt_length": 48, "train.batch_size": 2, "train.max_steps": 3, "train.lr": 1e-2,
        "train.progress": False, "eval.after_train": False}

# two pairs, four features; rows [chosen of pair 1, chosen of pair 2, rejected of 1, rejected of 2]
F_POL = torch.tensor([[0.5, 0.35, 0.2, 0.1], [0.3, 0.0, 0.0, 0.7], [0.0, 0.6, 0.0, 0.3], [0.2, 0.2, 0.0, 0.0]])
F_REF = torch.tensor([[0.4, 0.1, 0.3, 0.0], [0.3, 0.0, 0.0, 0.7], [0.1, 0.2, 0.0, 0.5], [0.2, 0.2, 0.0, 0.0]])


def test_fpo_loss_hand_worked_two_pairs_four_features():
    """K = 2, β 0.1, α 0.5. Pair 1: ℓ̄_θ⁺ −1.0, ℓ̄_ref⁺ −1.2 (m⁺ 0.2); ℓ̄_θ⁻ −2.0, ℓ̄_ref⁻ −1.9 (m⁻ −0.1).
    S by the reference: chosen {0, 2}: diffs 0.1, −0.1 -> MSE⁺ 0.01; rejected {3, 1}: −0.2, 0.4
    -> MSE⁻ 0.1. Logit 0.3 − 0.5(0.1 − 0.01) = 0.255; L = log(1 + e^{−0.0255}) = 0.680478.
    S by the policy: chosen {0, 1}: 0.1, 0.25 -> MSE⁺ 0.03625; rejected unchanged. Logit
    0.3 − 0.5(0.1 − 0.03625) = 0.268125; L = log(1 + e^{−0.0268125}) = 0.679831.
    Pair 2 is policy = reference: L = ln 2 = 0.693147 either way."""
    pi = torch.tensor([-1.0, -0.7]), torch.tensor([-2.0, -1.1])
    ref = torch.tensor([-1.2, -0.7]), torch.tensor([-1.9, -1.1])
    for select, want in (("reference", 0.6804785), ("policy", 0.6798308)):
        idx = select_features(F_POL, F_REF, k=2, select=select)
        mse_c, mse_r = feature_mse(F_POL, F_REF, idx).chunk(2)
        loss, m = fpo_loss(*pi, *ref, mse_c, mse_r, beta=0.1, alpha=0.5)
        assert loss.tolist() == pytest.approx([want, LN2], abs=1e-6)
        assert float(m["fpo/mse_rejected"]) == pytest.approx(0.05)  # (0.1 + 0) / 2
    glob = select_features(F_POL, F_REF, k=2, select="global", global_idx=torch.tensor([3, 1]))
    assert glob.tolist() == [[3, 1]] * 4


def test_fpo_gradient_stops_at_the_chosen_mse():
    """sg(MSE⁺): no gradient reaches the chosen features through the constraint; the rejected MSE
    pushes the loss up (∂L/∂MSE⁻ = β α σ(−βz) > 0)."""
    mse_c, mse_r = torch.tensor([0.3], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    loss, _ = fpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), mse_c, mse_r, beta=0.1, alpha=0.5)
    loss.sum().backward()
    assert mse_c.grad is None or float(mse_c.grad) == 0.0
    z = -0.5 * (0.2 - 0.3)
    assert float(mse_r.grad) == pytest.approx(0.1 * 0.5 * torch.sigmoid(torch.tensor(-0.1 * z)).item(), rel=1e-6)


def test_sparse_rows_round_trip_exactly():
    f = torch.tensor([[0.0, 1.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.25, 0.0]])
    idx, val = sparse_rows(f)
    assert idx.shape == (3, 2) and idx.dtype == torch.int32
    assert torch.equal(dense_rows(idx, val, 4), f)


def _method(tiny, tmp_path, method="fpo", **over):
    from reprpo.train import make_lora

    cfg = resolve_config(("test", TINY | {"method.sae": str(build_tiny_sae(tmp_path / "sae")), **over}), method=method)
    model = make_lora(copy.deepcopy(tiny[0]), cfg)
    return cfg, model, build_method(cfg, model)


def test_offline_reference_features_equal_online(tiny, tmp_path):
    """The cache's pooled reference SAE features, densified, are bit-for-bit the ones an online
    reference pass computes in the same layout; FPO's loss from the cache equals the loss with
    an online reference, and with LoRA B = 0 it is ln 2 exactly where policy = reference."""
    from reprpo.data.builtin import builtin_pairs
    from reprpo.data.tokenize import tokenize_pairs
    from reprpo.model.layout import build_layout

    _, tok = tiny
    cfg, model, meth = _method(tiny, tmp_path)
    tp, _ = tokenize_pairs(builtin_pairs("arith", "train")[:6], tok, max_length=64, max_prompt_length=48)
    layout = build_layout(cfg.speed, model, stage="train", device_type="cpu", packing=meth.packing, prefix=meth.prefix).for_pairs(tp)
    cache = build_ref_cache(model, tp, pad_id=tok.pad_token_id, layout=layout, batch_size=2, features=meth.reference.features,
                            use_disk=False, progress=False)
    meth.prepare(model, tp, pad_id=tok.pad_token_id, cache=cache, layout=layout)
    for s in range(0, 6, 2):
        batch = layout.collate(tp[s : s + 2], pad_id=tok.pad_token_id)
        ref = cache.lookup(batch)
        from reprpo.model.capture import capture
        from reprpo.model.forward import adapter_disabled, sequence_logps

        with torch.no_grad(), adapter_disabled(model), capture([meth.point]) as st:
            sequence_logps(model, batch)
        online = meth._pooled(st[meth.point.key], batch)
        assert torch.equal(ref.feats, online)
        assert (online > 0).any()
        with torch.no_grad():
            off, _ = meth.loss(model, batch, ref=ref)
            on, _ = meth.loss(model, batch, ref=None)
        assert torch.allclose(off, on, atol=1e-6) and off.tolist() == pytest.approx([LN2] * 2, abs=1e-6)


def test_cache_is_keyed_by_the_sae_and_digests_its_features(tiny, tmp_path, monkeypatch):
    """Another SAE gives another cache file; a flipped feature value is caught by the digest."""
    from reprpo.data.builtin import builtin_pairs
    from reprpo.data.tokenize import tokenize_pairs
    from reprpo.model.refcache import cache_root, content_digest

    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "cache"))
    _, tok = tiny
    cfg, model, meth = _method(tiny, tmp_path)
    from reprpo.model.sae import load_sae

    other = load_sae(tmp_path / "sae")
    other.b_dec.data += 0.5  # another SAE at the same block
    tp, _ = tokenize_pairs(builtin_pairs("arith", "train")[:4], tok, max_length=64, max_prompt_length=48)
    a = build_ref_cache(model, tp, pad_id=tok.pad_token_id, features=meth.reference.features, progress=False)
    b = build_ref_cache(model, tp, pad_id=tok.pad_token_id, features=(meth.point, other), progress=False)
    assert a.fingerprint != b.fingerprint and len(list(cache_root().glob("*.pt"))) == 2
    d = torch.load(cache_root() / f"{a.fingerprint}.pt", weights_only=True)
    before = content_digest(d)
    d["feats"]["val"][0, 0, 0] += 1.0
    assert content_digest(d) != before


def test_global_selection_from_the_cache_equals_reference_passes(tiny, tmp_path):
    from reprpo.data.builtin import builtin_pairs
    from reprpo.data.tokenize import tokenize_pairs

    _, tok = tiny
    _, model, meth = _method(tiny, tmp_path, **{"method.sae_select": "global", "method.sae_features": 5})
    tp, _ = tokenize_pairs(builtin_pairs("arith", "train")[:6], tok, max_length=64, max_prompt_length=48)
    cache = build_ref_cache(model, tp, pad_id=tok.pad_token_id, features=meth.reference.features, use_disk=False, progress=False)
    meth.prepare(model, tp, pad_id=tok.pad_token_id, cache=cache)
    from_cache = meth.global_idx.clone()
    meth.prepare(model, tp, pad_id=tok.pad_token_id, cache=None)
    assert from_cache.shape == (5,) and set(from_cache.tolist()) == set(meth.global_idx.tolist())


@pytest.mark.parametrize("method", ["fpo", "hs-sae-prefvec"])
def test_sae_methods_train_3_steps_through_train(method, tmp_path, monkeypatch):
    """train() on the tiny model with a random SAE at block 1: step-1 loss is the value at init
    (fpo ln 2; hs-sae-prefvec 2 ln 2: prefvec's ln 2 + DPO's), losses finite, the reference
    features come from the cache (no reference forward in the loop), and the SAE is not saved
    with the adapter."""
    from reprpo.methods.fpo import FPOMethod
    from reprpo.methods.representation import ReprMethod
    from reprpo.train import train

    seen = []
    for cls in (FPOMethod, ReprMethod):
        def spy(self, model, batch, *, ref=None, _orig=cls.loss):
            seen.append(ref is not None and ref.feats is not None)
            return _orig(self, model, batch, ref=ref)
        monkeypatch.setattr(cls, "loss", spy)
    cfg = resolve_config(("test", TINY | {"method.sae": str(build_tiny_sae(tmp_path / "sae")), "out": str(tmp_path / "run")}),
                         method=method)
    out = train(cfg)
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 3 and m.loss.map(math.isfinite).all()
    assert m.loss[0] == pytest.approx(LN2 if method == "fpo" else 2 * LN2, abs=1e-5)
    assert seen and all(seen)
    assert not (out / "method_state.pt").exists()
    import json

    rep = json.loads((out / "train_report.json").read_text())["sae"]
    assert rep["block"] == 1 and rep["width"] == 256 and len(rep["fingerprint"]) == 32
    if method == "fpo":
        assert m["fpo/mse_chosen"][0] == pytest.approx(0.0, abs=1e-10) and m["fpo/mse_rejected"][2] > 0


def test_sae_method_errors_name_the_field_and_the_fix(tiny, tmp_path):
    from reprpo.train import make_lora

    cfg = resolve_config(("test", TINY), method="fpo")
    model = make_lora(copy.deepcopy(tiny[0]), cfg)
    with pytest.raises(ConfigError, match="method.sae is empty.*reprpo sae train"):
        build_method(cfg, model)
    sae = str(build_tiny_sae(tmp_path / "sae", layer=1))
    with pytest.raises(ConfigError, match="block 0, but the SAE .* was trained on block 1"):
        build_method(apply_overrides(copy.deepcopy(cfg), {"method.sae": sae, "method.layers": "0"}, where="t"), model)
    with pytest.raises(ConfigError, match="method.sae_features 999: must be in \\[1, 256\\]"):
        build_method(apply_overrides(copy.deepcopy(cfg), {"method.sae": sae, "method.sae_features": 999}, where="t"), model)
    with pytest.raises(ConfigError, match="method.sae_select 'top'"):
        build_method(apply_overrides(copy.deepcopy(cfg), {"method.sae": sae, "method.sae_select": "top"}, where="t"), model)
    wide = str(build_tiny_sae(tmp_path / "wide", d=32))
    with pytest.raises(ConfigError, match="width 32, the model's hidden size is 64"):
        build_method(apply_overrides(copy.deepcopy(cfg), {"method.sae": wide}, where="t"), model)
    rc = resolve_config(("test", TINY | {"method.layers": "sae"}), method="hs-pca-prefvec")
    with pytest.raises(ConfigError, match="method.layers sae means the block of method.sae"):
        build_method(rc, make_lora(copy.deepcopy(tiny[0]), rc))
