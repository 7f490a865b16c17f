"""projgrad `--method.project update`: the optimiser's LoRA-B update projected on span{u_b} of
the step's pairs (ΔB ← PΔB + β(I − P)ΔB), by hand and on the tiny Llama with real AdamW steps."""

import copy
import math

import pandas as pd
import pytest
import torch

from reprpo.config import RunConfig, apply_overrides
from reprpo.data.pairs import PreferencePair
from reprpo.data.tokenize import collate_pairs, tokenize_pairs
from reprpo.errors import ConfigError
from reprpo.methods.gradproj import lora_B_weights, projected_update, reference_directions
from reprpo.methods.losses import dpo_loss
from reprpo.methods.presets import build_method, preset_overrides
from reprpo.model.forward import sequence_logps

TEXTS = [
    ("Q: 2+2?", " 4", " 5 or so"),
    ("Say hi to the reader", " hi there", " no"),
    ("x", " a long answer here", " b"),
    ("Name a colour", " blue", " seven!!"),
]
LN2 = math.log(2)


@pytest.fixture(scope="module")
def lora0(lora):
    """The shared LoRA model of conftest (random small B, so policy != reference); tests deep-copy it."""
    return lora[0]


def _batch(tok, idx):
    pairs = [PreferencePair(*TEXTS[i]) for i in idx]
    return collate_pairs(tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=32)[0], pad_id=tok.pad_token_id)


def test_projected_update_by_hand():
    """o = 3, k = 2, ΔB = [[1, 2], [3, 4], [5, 6]].
    u = [(1, 0, 0), (1, 1, 0)/√2, (0, 0, 0)]: span = first two axes (the zero direction adds
    nothing), P = diag(1, 1, 0): β = 0 -> [[1, 2], [3, 4], [0, 0]]; β = 0.5 -> row 3 halved,
    [[1, 2], [3, 4], [2.5, 3]].
    u = [(1, 1, 0)/√2, same again] (rank 1 by the tolerance): P = ½[[1, 1, 0], [1, 1, 0], [0, 0, 0]],
    column 1 (1, 3, 5) -> (2, 2, 0), column 2 (2, 4, 6) -> (3, 3, 0): [[2, 3], [2, 3], [0, 0]].
    No direction at all: P = 0, ΔB ← βΔB."""
    d = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (o=3, k=2)
    r = 1 / math.sqrt(2)
    two = torch.tensor([[1.0, 0.0, 0.0], [r, r, 0.0], [0.0, 0.0, 0.0]])  # (n=3, o=3)
    one = torch.tensor([[r, r, 0.0], [r, r, 0.0], [r, r, 0.0]])
    assert torch.allclose(projected_update(d, two, beta=0.0), torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(projected_update(d, two, beta=0.5), torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.5, 3.0]]), atol=1e-6)
    assert torch.allclose(projected_update(d, one, beta=0.0), torch.tensor([[2.0, 3.0], [2.0, 3.0], [0.0, 0.0]]), atol=1e-6)
    assert torch.equal(projected_update(d, torch.zeros(2, 3), beta=0.25), 0.25 * d)
    # batched over modules of one shape: each slice gets its own span
    both = projected_update(torch.stack([d, d]), torch.stack([two, one]), beta=0.0)  # (2, o, k)
    assert torch.allclose(both[0], projected_update(d, two, beta=0.0)) and torch.allclose(both[1], projected_update(d, one, beta=0.0))
    # β = 1 is the optimiser's own update
    assert torch.allclose(projected_update(d, two, beta=1.0), d)


def _method(model, project, beta=0.0):
    cfg = apply_overrides(RunConfig(), {"train.method": "projgrad", "method.project": project,
                                        "method.proj_beta": beta}, where="t")
    return build_method(cfg, model)


def _steps(lora0, tok, windows, project, *, lr=1e-2):
    """Real AdamW steps of projgrad (β 0) as train() runs them: each window's micro-batches
    (index lists) in method.step, mean loss, one optimizer.step, then after_step.
    -> (per step {module: (ΔB (o, k), directions of that step's pairs (n, o))}, the method)."""
    model = copy.deepcopy(lora0)
    meth = _method(model, project)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    out = []
    for window in windows:
        before = {n: w.detach().clone() for n, w in lora_B_weights(model).items()}
        dirs = {}
        for idx in window:
            b = _batch(tok, idx)
            with meth.step(model, b) as ref:
                loss, _ = meth.loss(model, b, ref=ref)
                (loss.mean() / len(window)).backward()
            for n, u in ref.dirs.items():
                dirs[n] = torch.cat([dirs[n], u]) if n in dirs else u
        opt.step()
        meth.after_step(model, opt)
        opt.zero_grad()
        out.append({n: (w.detach() - before[n], dirs[n]) for n, w in lora_B_weights(model).items()})
    return out, meth


def _residual(delta, u):
    """‖(I − P)ΔB‖/‖ΔB‖, P on span(u) from an independent float64 QR (o ≫ n: full rank)."""
    d, Q = delta.double(), torch.linalg.qr(u.double().T).Q  # (o, k), (o, n)
    return float((d - Q @ (Q.T @ d)).norm() / d.norm())


def test_update_lies_in_span_after_real_adamw_steps_and_grad_mode_does_not(lora0, tiny):
    """β = 0, two steps of 2 pairs each: every LoRA-B update is in span{u_b} of its step's pairs
    (residual < 1e-5) with project=update; with project=grad the projected *gradient* is in the
    span, but AdamW's per-coordinate rescaling (its first step ≈ lr·sign(g)) moves the update
    out: measured residual (min / median / max over the 14 modules) 0.56 / 0.60 / 0.66 at step 1,
    0.63 / 0.70 / 0.90 at step 2; with update ≤ 7e-7."""
    _, tok = tiny
    windows = [[[0, 1]], [[2, 3]]]
    steps, meth = _steps(lora0, tok, windows, "update")
    for step in steps:
        assert len(step) == 14
        for n, (delta, u) in step.items():
            assert u.shape[0] == 2 and delta.norm() > 0, n
            assert _residual(delta, u) < 1e-5, n
    assert meth._b_before is None and not meth._window_dirs  # after_step cleared the window
    res = torch.tensor([_residual(d, u) for step in _steps(lora0, tok, windows, "grad")[0] for d, u in step.values()])
    assert res.min() > 0.3 and res.median() > 0.5, res


def test_accumulated_window_projects_on_all_its_pairs(lora0, tiny):
    """grad_accum 2 (micro-batches [0, 1] and [2, 3], one optimiser step): B is snapshotted on
    the first micro-batch and the update lies in the span of all 4 pairs, not of either
    micro-batch's 2; the gradients are DPO's, so it equals one step on the batch [0, 1, 2, 3]."""
    _, tok = tiny
    (acc,), _ = _steps(lora0, tok, [[[0, 1], [2, 3]]], "update")
    (big,), _ = _steps(lora0, tok, [[[0, 1, 2, 3]]], "update")
    for n, (delta, u) in acc.items():
        assert u.shape[0] == 4
        assert _residual(delta, u) < 1e-5, n
        assert _residual(delta, u[:2]) > 0.1 and _residual(delta, u[2:]) > 0.1, n  # measured ≥ 0.32
        assert (delta - big[n][0]).norm() < 1e-4 * delta.norm(), n  # measured ≤ 5e-7


def test_update_mode_leaves_dpo_gradients_and_state_dict_empty(lora0, tiny):
    """No gradient hooks in update mode: the gradients inside method.step are DPO's."""
    _, tok = tiny
    model = copy.deepcopy(lora0)
    b = _batch(tok, [0, 1, 2])
    dirs, ref = reference_directions(model, b)
    pol = sequence_logps(model, b)
    dpo_loss(*pol.chosen_rejected(), *ref.chosen_rejected(), beta=0.1)[0].mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    meth = _method(model, "update")
    with meth.step(model, b) as r:
        meth.loss(model, b, ref=r)[0].mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, want[n], atol=1e-7, rtol=1e-5), n
    assert len(meth.state_dict()) == 0  # the window state is not saved as method_state.pt


def test_projbp_with_update_is_refused(lora0):
    cfg = apply_overrides(RunConfig(), {"train.method": "projbp", "method.project": "update"}, where="t")
    with pytest.raises(ConfigError, match="method.project"):
        build_method(cfg, lora0)


def test_train_with_project_update(tmp_path, monkeypatch):
    """reprpo.train.train, tiny model, grad_accum 2: 3 steps, finite losses, step 1 = ln 2 (B = 0
    at init, policy = reference); after_step projects once per real optimiser step (3 times,
    not once per micro-batch)."""
    import reprpo.methods.grad as grad
    from reprpo.train import train

    calls = {"n": 0}
    real = grad.project_updates

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(grad, "project_updates", counting)
    base = {
        "model.name": "tiny-random", "data.shift": "builtin:difficulty", "data.n_train": 8,
        "data.max_length": 64, "data.max_prompt_length": 48, "train.batch_size": 2, "train.grad_accum": 2,
        "train.max_steps": 3, "train.lr": 1e-2, "train.method": "projgrad", "train.progress": False,
        "eval.after_train": False, "method.project": "update", "out": str(tmp_path / "pu"),
    }
    cfg = apply_overrides(apply_overrides(RunConfig(), preset_overrides("projgrad"), where="preset"), base, where="test")
    out = train(cfg)
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 3 and all(math.isfinite(x) for x in m.loss)
    assert m.loss[0] == pytest.approx(LN2, abs=1e-4)
    assert calls["n"] == 3
    assert not (out / "method_state.pt").exists()
