"""Sparse autoencoders (model/sae.py, sae_train.py): recovery of a known dictionary, AuxK,
the three file formats, and the checks against a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprpo.errors import ConfigError
from reprpo.model.sae import JumpReLUSAE, TopKSAE, load_sae, sae_layer
from reprpo.sae_train import fit_sae, sae_step, shuffled_batches

D, M, S = 32, 64, 3  # width of the data, true atoms, atoms per sample


def _atoms(seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(M, D, generator=torch.Generator().manual_seed(seed)), dim=-1)  # (M, D)


def _sparse_data(atoms: torch.Tensor, n_batches: int, *, n: int = 512, seed: int = 1, offset: float = 0.0):
    """x = Σ_{j∈J} c_j a_j + offset, |J| = 3 atoms drawn uniformly, c ~ U[0.5, 2.5]."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        idx = torch.rand(n, M, generator=g).argsort(1)[:, :S]
        coef = torch.rand(n, S, generator=g) * 2 + 0.5
        yield (coef[..., None] * atoms[idx]).sum(1) + offset


def test_topk_sae_recovers_a_known_sparse_dictionary():
    """Data made from 64 unit atoms in R^32, 3 per sample, plus a constant offset 0.3 (which
    b_dec must absorb). A TopK SAE (width 128, k 3) trained on 600 x 1024 samples finds every
    atom: mean over true atoms of the max cosine with a learned decoder row > 0.9, FVU < 0.1."""
    atoms = _atoms()
    sae = TopKSAE(d=D, width=128, k=S, seed=0)
    st = fit_sae(sae, _sparse_data(atoms, 600, n=1024, offset=0.3), lr=2e-3, aux_k=16, aux_alpha=1 / 32,
                 dead_tokens=8192, progress=False)
    mmcs = (F.normalize(sae.W_dec, dim=-1) @ atoms.T).max(0).values.mean()
    assert mmcs > 0.9, mmcs
    x = torch.cat(list(_sparse_data(atoms, 4, seed=7, offset=0.3)))
    fvu = (x - sae.reconstruct(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.1 and st.fvu < 0.1, (fvu, st.fvu)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(128), atol=1e-5)  # unit decoder rows


@pytest.mark.parametrize("aux_alpha, revived", [(1 / 32, True), (0.0, False)])
def test_auxk_revives_planted_dead_latents(aux_alpha, revived):
    """16 of 64 latents are planted dead: their encoder rows scaled by 1e-3, so their
    pre-activations never reach the top 3. With AuxK (α 1/32) they model the residual, their
    encoder rows grow and every one fires again on fresh data; without it none ever fires (a
    latent outside the top k gets no gradient). This is what sparsify's AuxK cannot do: its
    encoder gets no gradient from the AuxK term."""
    atoms = _atoms()
    sae = TopKSAE(d=D, width=M, k=S, seed=0)
    with torch.no_grad():
        sae.encoder.weight[:16] *= 1e-3
    fit_sae(sae, _sparse_data(atoms, 400), lr=2e-3, aux_k=16, aux_alpha=aux_alpha, dead_tokens=2048, progress=False)
    vals, idx = sae.topk(torch.cat(list(_sparse_data(atoms, 4, seed=9))))
    fired = torch.zeros(M, dtype=torch.bool)
    fired[idx[vals > 0]] = True
    assert bool(fired[:16].all()) is revived and (revived or not fired[:16].any())
    assert fired[16:].all()


def test_auxk_term_reaches_the_encoder():
    """The AuxK loss alone (every latent dead) has a non-zero gradient on the encoder weight."""
    sae = TopKSAE(d=8, width=16, k=2, seed=0)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    _, m = sae_step(sae, x, dead=torch.ones(16, dtype=torch.bool), aux_k=4, aux_alpha=1.0)
    loss, _ = sae_step(sae, x, dead=torch.ones(16, dtype=torch.bool), aux_k=4, aux_alpha=1.0)
    (loss - m["fvu"]).backward()  # the aux part only
    assert sae.encoder.weight.grad.abs().sum() > 0


def test_topk_encode_pool_and_sparse_decode_agree_with_the_dense_formula():
    """f = ReLU(TopK_k(W_enc(h − b_dec) + b_enc)) computed densely by hand equals encode();
    pool (scatter of the k values) equals Σ_t w_t f_t; decode_sparse equals W_dec f + b_dec."""
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(d=6, width=20, k=4, seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(6, generator=g))
        sae.encoder.bias.copy_(torch.randn(20, generator=g) * 0.1)
    h = torch.randn(3, 5, 6, generator=g)
    pre = (h - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    kth = pre.topk(4, dim=-1).values[..., -1:]
    f = torch.where(pre >= kth, pre, torch.zeros(())).clamp_min(0)
    torch.testing.assert_close(sae.encode(h), f)
    w = torch.rand(3, 5, generator=g)
    torch.testing.assert_close(sae.pool(h, w), torch.einsum("rt,rtw->rw", w, f))
    torch.testing.assert_close(sae.reconstruct(h), f @ sae.W_dec + sae.b_dec)


def _jumprelu_params(d=5, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, w, generator=g), "W_dec": torch.randn(w, d, generator=g),
            "b_enc": torch.randn(w, generator=g) * 0.1, "b_dec": torch.randn(d, generator=g),
            "threshold": torch.rand(w, generator=g)}


def _jumprelu_by_hand(p, h, *, subtract_b_dec=False):
    x = h.numpy() - (p["b_dec"].numpy() if subtract_b_dec else 0)
    pre = x @ p["W_enc"].numpy() + p["b_enc"].numpy()
    return torch.from_numpy(np.where(pre > p["threshold"].numpy(), np.maximum(pre, 0), 0.0).astype(np.float32))


def test_gemma_scope_params_npz_loads_as_jumprelu(tmp_path):
    """A hand-made Gemma Scope layout (layer_3/width_16k/average_l0_7/params.npz): features equal
    1[p > θ]·relu(p), p = h W_enc + b_enc (no b_dec subtracted), computed in numpy; the block is
    read from the path; the directory and the file both load."""
    p = _jumprelu_params()
    path = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_7"
    path.mkdir(parents=True)
    np.savez(path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    h = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for src in (path, path / "params.npz"):
        sae = load_sae(src)
        assert isinstance(sae, JumpReLUSAE) and sae.layer == 3 and (sae.d, sae.width) == (5, 12)
        torch.testing.assert_close(sae.encode(h), _jumprelu_by_hand(p, h))
        assert (sae.encode(h) == 0).any() and (sae.encode(h) > 0).any()  # the threshold matters here


def test_saelens_directory_loads_jumprelu_and_topk(tmp_path):
    """sae-lens cfg.json + sae_weights.safetensors: jumprelu with apply_b_dec_to_input true
    (p = (h − b_dec) W_enc + b_enc) and hook blocks.4.hook_resid_post (block 4); topk with k 3
    and hook blocks.2.hook_resid_pre (block 1's output)."""
    from safetensors.torch import save_file

    p = _jumprelu_params()
    jd = tmp_path / "jr"
    jd.mkdir()
    save_file(p, str(jd / "sae_weights.safetensors"))
    (jd / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 5, "d_sae": 12, "apply_b_dec_to_input": True,
                                             "hook_name": "blocks.4.hook_resid_post", "normalize_activations": "none"}))
    h = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    sae = load_sae(jd)
    assert sae.layer == 4
    torch.testing.assert_close(sae.encode(h), _jumprelu_by_hand(p, h, subtract_b_dec=True))

    td = tmp_path / "tk"
    td.mkdir()
    save_file({k: v for k, v in p.items() if k != "threshold"}, str(td / "sae_weights.safetensors"))
    (td / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 5, "d_sae": 12, "k": 3, "apply_b_dec_to_input": True,
                                             "metadata": {"hook_name": "blocks.2.hook_resid_pre"}}))
    sae = load_sae(td)
    assert isinstance(sae, TopKSAE) and sae.layer == 1 and sae.k == 3
    pre = (h - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    kth = pre.topk(3, dim=-1).values[..., -1:]
    torch.testing.assert_close(sae.encode(h), torch.where(pre >= kth, pre, torch.zeros(())).clamp_min(0))

    (td / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 5, "d_sae": 12, "k": 3, "hook_name": "blocks.2.hook_mlp_out"}))
    with pytest.raises(ConfigError, match="hook_mlp_out.*residual stream"):
        load_sae(td)
    (td / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": 3, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(ConfigError, match="normalize_activations"):
        load_sae(td)


def test_our_format_round_trips_and_is_sparsify_layout(tmp_path):
    """save() writes cfg.json (d_in, num_latents, k, activation topk, our `reprpo` entry) and
    sae.safetensors with sparsify's tensor names; load_sae gives back identical features."""
    from safetensors.torch import load_file

    sae = TopKSAE(d=8, width=32, k=4, layer=2, seed=5)
    with torch.no_grad():
        sae.b_dec.normal_()
    sae.save(tmp_path / "s", reprpo={"model": "tiny-random"})
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (8, 32, 4, "topk")
    assert cfg["reprpo"]["layer"] == 2 and cfg["reprpo"]["model"] == "tiny-random"
    assert set(load_file(str(tmp_path / "s" / "sae.safetensors"))) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    back = load_sae(tmp_path / "s")
    h = torch.randn(5, 8)
    torch.testing.assert_close(back.encode(h), sae.encode(h))
    assert back.layer == 2 and back.fingerprint() == sae.fingerprint()
    with torch.no_grad():
        back.b_dec.add_(1e-3)
    assert back.fingerprint() != sae.fingerprint()


def test_load_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="no such file.*reprpo sae train"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no SAE here.*sae.safetensors.*sae_weights.safetensors.*params.npz"):
        load_sae(tmp_path / "empty")


def test_sae_layer_checks_width_and_block():
    sae = TopKSAE(d=8, width=32, k=4, layer=2, source="S")
    assert sae_layer(sae, d=8, n_layers=4, layers="sae") == 2
    assert sae_layer(sae, d=8, n_layers=4, layers="2") == 2
    with pytest.raises(ConfigError, match="width 8.*hidden size is 16.*another model"):
        sae_layer(sae, d=16, n_layers=4, layers="sae")
    with pytest.raises(ConfigError, match="block 1, but the SAE S was trained on block 2"):
        sae_layer(sae, d=8, n_layers=4, layers="1")
    with pytest.raises(ConfigError, match="an SAE reads one block"):
        sae_layer(sae, d=8, n_layers=4, layers="1,2")
    unknown = TopKSAE(d=8, width=32, k=4, layer=None, source="U")
    with pytest.raises(ConfigError, match="does not say which block.*--method.layers"):
        sae_layer(unknown, d=8, n_layers=4, layers="sae")
    assert sae_layer(unknown, d=8, n_layers=4, layers="-1") == 3


def test_shuffled_batches_keep_every_token_once():
    """Re-cutting a stream into shuffled batches loses and repeats nothing (but a tiny tail)."""
    stream = [torch.arange(n, dtype=torch.float32)[:, None] + 1000 * i for i, n in enumerate([7, 30, 5, 41, 9])]
    out = torch.cat(list(shuffled_batches(iter(stream), batch_tokens=8, buffer_tokens=20, seed=0)))
    want = torch.cat(stream)
    assert out.shape[0] == want.shape[0]  # tail 92 % 8 = 4 >= 8 // 4: kept
    assert sorted(out.flatten().tolist()) == sorted(want.flatten().tolist())
    assert not torch.equal(out, want)


def test_sae_train_cli_on_the_tiny_model(tmp_path, capsys):
    """`reprpo sae train` end to end on the tiny model: prints and records FVU, L0, dead fraction
    and ΔCE; the file loads for --method.sae with its block."""
    from reprpo.cli import main

    out = tmp_path / "sae"
    assert main(["sae", "train", "--model.name", "tiny-random", "--tokens", "6000", "--batch-tokens", "512",
                 "--expansion", "4", "--k", "8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and "delta CE" in printed and "L0" in printed
    sae = load_sae(out)
    q = sae.meta["quality"]
    assert sae.layer == 1 and sae.k == 8 and sae.width == 256
    assert 0 < q["fvu"] < 1 and 0 < q["l0"] <= 8 and 0 <= q["dead_fraction"] <= 1 and np.isfinite(q["delta_ce"])
    assert sae.meta["tokens"] >= 6000 and sae.meta["data"][0]["source"] == "builtin:arith/train"
    assert main(["sae", "train", "--model.name", "tiny-random", "--tokens", "0", "--out", str(out)]) == 2  # bad budget: clear error


def test_sae_train_refuses_bad_out_and_data_before_loading_a_model(tmp_path, capsys):
    """A non-empty --out that holds no SAE is left untouched; a glob matching nothing and a
    missing file are named; all before any model loads (no model name is even valid here)."""
    from reprpo.cli import main

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["sae", "train", "--model.name", "no/such-model", "--out", str(busy)]) == 2
    assert "holds no SAE; nothing in it is touched" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "mine"
    assert main(["sae", "train", "--model.name", "no/such-model", "--data", str(tmp_path / "*.json"), "--out", str(tmp_path / "o")]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert main(["sae", "train", "--model.name", "no/such-model", "--data", str(tmp_path / "gone.json"), "--out", str(tmp_path / "o")]) == 2
    assert "gone.json" in capsys.readouterr().err


def test_streamed_tokens_count_the_prompt_once(tiny):
    """Kept tokens of a batch: the chosen row's positions 1.. and the rejected response, so a
    pair gives len(prompt) + len(chosen) + len(rejected) − 1 (the count train_sae budgets with)."""
    from reprpo.data.builtin import builtin_pairs
    from reprpo.data.tokenize import tokenize_pairs
    from reprpo.sae_train import _rows

    _, tok = tiny
    tp, _ = tokenize_pairs(builtin_pairs("arith", "train")[:3], tok, max_length=64, max_prompt_length=48)
    _, attn, keep = _rows(tp, tok.pad_token_id)
    assert int(keep.sum()) == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) - 1 for p in tp)
    assert not keep[:, 0].any() and not (keep & ~attn.bool()).any()
