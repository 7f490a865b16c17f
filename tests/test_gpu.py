"""CUDA checks (marker `gpu`; skipped where torch.cuda.is_available() is False): the training loop
in bf16 on the GPU against fp32 on the CPU, the shared-prompt layouts and every attention kernel
against the padded layout on the GPU, and scoring on the GPU against one pair at a time.

    PYTHONPATH=src python -m pytest -m gpu tests/test_gpu.py     # bench/gpu_check.sh runs this
"""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

KERNELS = ("eager", "sdpa", "blocks", "keep")


def _train(tmp_path, name: str, **over) -> pd.DataFrame:
    """3 DPO steps of the tiny model on the built-in suite, lr 1e-2 (the losses move off ln 2)."""
    from reprpo.config import RunConfig, apply_overrides
    from reprpo.train import train

    base = {"model.name": "tiny-random", "data.shift": "builtin:difficulty", "data.n_train": 16, "data.n_eval": 8,
            "train.batch_size": 4, "train.max_steps": 3, "train.lr": 1e-2, "train.progress": False,
            "eval.after_train": False, "train.report_to": "none", "out": str(tmp_path / name)}
    out = train(apply_overrides(RunConfig(), base | over, where="test_gpu"))
    return pd.read_csv(out / "metrics.csv")


def _pairs(tok):
    """Prompts with a common header, of different lengths; responses that share leading tokens."""
    from reprpo.data.pairs import PreferencePair
    from reprpo.data.tokenize import tokenize_pairs

    head = "### Instruction: answer\n"
    ps = [PreferencePair(head + "Q: 2+2?", " The answer is 4", " The answer is 5"),
          PreferencePair(head + "x", " hi there", " no"),
          PreferencePair(head + "Say hi to the nice reader", " a long answer here", " a short one"),
          PreferencePair(head + "Name a colour", " red", " reddish brown")]
    return tokenize_pairs(ps, tok, max_length=96, max_prompt_length=64)[0]


def test_bf16_training_on_cuda_matches_fp32_on_cpu(tmp_path):
    """model.dtype bfloat16 + bf16 autocast on cuda: per-step losses within 4e-3 and the step-1
    gradient norm within 3% of the fp32 CPU run (same seed, data order and LoRA init). Calibration:
    the same bf16 settings on the CPU differed from fp32 by 1.5e-4 in loss and 0.2% in gradient norm."""
    cpu = _train(tmp_path, "cpu", **{"train.device": "cpu"})
    gpu = _train(tmp_path, "cuda", **{"train.device": "cuda", "model.dtype": "bfloat16", "train.mixed_precision": "bf16"})
    assert gpu.loss[0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference, in bf16 too
    assert abs(cpu.loss.iloc[-1] - math.log(2)) > 0.01  # the comparison is not of three ln 2s
    assert (gpu.loss - cpu.loss).abs().max() < 4e-3, (cpu.loss.tolist(), gpu.loss.tolist())
    assert gpu.grad_norm[0] == pytest.approx(cpu.grad_norm[0], rel=3e-2)


def test_shared_prompt_layouts_equal_padded_on_cuda(tiny):
    """fp32 on cuda, every kernel: shared prompt (+ batch prefix, + shared response tokens) gives
    the padded layout's log-probs to 1e-4, and the same weight gradients to 1e-4 relative."""
    from reprpo.data.layout import PADDED, Layout

    model0, tok = tiny
    model = copy.deepcopy(model0).to("cuda")  # the session fixture stays on the CPU
    tp = _pairs(tok)
    padded = PADDED.collate(tp, pad_id=tok.pad_token_id).to("cuda")
    from reprpo.model.forward import sequence_logps

    with torch.no_grad():
        want = sequence_logps(model, padded)
    layouts = [Layout(packed=True, share_prefix=p, share_response=r, attention=k).for_pairs(tp)
               for k in KERNELS for p, r in ((False, False), (True, False), (True, True))]
    assert any(lay.collate(tp, pad_id=tok.pad_token_id).n_shared_response for lay in layouts)
    for lay in layouts:
        batch = lay.collate(tp, pad_id=tok.pad_token_id).to("cuda")
        with torch.no_grad():
            got = sequence_logps(model, batch)
        assert torch.allclose(got.logp_sum, want.logp_sum, atol=1e-4), lay
        assert torch.equal(got.n_tokens, want.n_tokens), lay
    grads = []
    for batch in (padded, layouts[-1].collate(tp, pad_id=tok.pad_token_id).to("cuda")):
        m = copy.deepcopy(model)
        sequence_logps(m, batch).logp_sum.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4 * grads[0].abs().max())


def test_every_attention_kernel_trains_the_same_on_cuda(tmp_path):
    """speed.packed_attention eager / sdpa / blocks / auto (= the model's kernel on GPUs) and the
    padded layout: the same per-step losses (1e-4) and gradient norms (1e-3 relative), fp32 on cuda."""
    runs = {k: _train(tmp_path, k, **{"train.device": "cuda", "speed.packed_attention": k})
            for k in ("auto", "eager", "sdpa", "blocks")}
    runs["padded"] = _train(tmp_path, "padded", **{"train.device": "cuda", "speed.share_prompt": False})
    base = runs["auto"]
    for k, m in runs.items():
        assert (m.loss - base.loss).abs().max() < 1e-4, (k, m.loss.tolist(), base.loss.tolist())
        assert ((m.grad_norm - base.grad_norm).abs() / base.grad_norm).max() < 1e-3, k


def test_scoring_on_cuda_equals_one_pair_at_a_time(tiny):
    """score_pairs on cuda (shared-prompt layout, batches of 8 with padding, each kernel) gives the
    per-pair mean log-probs of a padded one-pair-at-a-time loop to 1e-4 (W2's check), fp32."""
    from reprpo.data.layout import PADDED, Layout
    from reprpo.data.pairs import PreferencePair
    from reprpo.data.tokenize import tokenize_pairs
    from reprpo.eval.scoring import score_pairs
    from reprpo.model.forward import sequence_logps

    model0, tok = tiny
    model = copy.deepcopy(model0).to("cuda").eval()
    head = "Question: "
    ps = [PreferencePair(head + "q" * (i % 5 + 1) + str(i), f" yes {i}" * (1 + i % 3), f" no {i}") for i in range(12)]
    tp = _pairs(tok) + tokenize_pairs(ps, tok, max_length=96, max_prompt_length=64)[0]
    with torch.no_grad():
        want = []
        for p in tp:
            lp = sequence_logps(model, PADDED.collate([p], pad_id=tok.pad_token_id).to("cuda"))
            want.append((lp.logp_mean[0].item(), lp.logp_mean[1].item()))
    want = torch.tensor(want)
    for k in KERNELS:
        lay = Layout(packed=True, share_prefix=True, share_response=True, attention=k)
        df = score_pairs(model, tp, pad_id=tok.pad_token_id, batch_size=8, layout=lay, workers=1, progress=False)
        got = torch.tensor(list(zip(df.chosen_logp_mean, df.rejected_logp_mean)))
        assert torch.allclose(got, want, atol=1e-4), (k, (got - want).abs().max().item())
