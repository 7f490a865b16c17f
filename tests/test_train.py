import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from reprpo.config import RunConfig, apply_overrides
from reprpo.train import make_scheduler, train


def _cfg(tmp_path, **over) -> RunConfig:
    base = {
        "model.name": "tiny-random", "data.shift": "builtin:difficulty", "data.n_train": 16,
        "data.n_eval": 8, "train.batch_size": 4, "train.max_steps": 3, "train.lr": 1e-2,
        "train.progress": False, "eval.after_train": False, "out": str(tmp_path / "run"),
    }
    return apply_overrides(RunConfig(), base | over, where="test")


def test_loss_is_ln2_at_step_0_and_adapter_loads(tmp_path):
    out = train(_cfg(tmp_path))
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 3
    assert m.loss[0] == pytest.approx(math.log(2), abs=1e-6)  # adapter B = 0: policy == reference
    assert m["rewards/margin"][0] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(x) for x in m.loss) and (m.grad_norm > 0).all()
    lora = load_file(str(out / "adapter_model.safetensors"))
    assert lora and all("lora_" in k for k in lora)
    # the adapter records the base as the user named it (`tiny-random`, which reprpo resolves;
    # tests/test_export.py loads a run on a local checkpoint with AutoPeftModelForCausalLM alone)
    from reprpo.model.loading import load_model

    peft = load_model(_cfg(tmp_path).model, adapter=out)[0]
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        on = peft(input_ids=x).logits
        with peft.disable_adapter():
            off = peft(input_ids=x).logits
    assert not torch.allclose(on, off), "the saved adapter changes nothing"


def test_steps_change_every_lora_tensor_and_no_base_tensor(tiny):
    """Same pieces as train(): make_lora + compute_loss + AdamW, three steps."""
    import copy

    from reprpo.data.pairs import PreferencePair
    from reprpo.data.tokenize import collate_pairs, tokenize_pairs
    from reprpo.methods.presets import build_method
    from reprpo.train import make_lora

    model0, tok = tiny
    cfg = apply_overrides(RunConfig(), {"lora.r": 4}, where="test")
    torch.manual_seed(0)
    model = make_lora(copy.deepcopy(model0), cfg)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = [PreferencePair(f"q{i}", f" good {i}", f" bad {i}!") for i in range(4)]
    batch = collate_pairs(tokenize_pairs(pairs, tok, max_length=32, max_prompt_length=16)[0], pad_id=tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    method = build_method(cfg, model)
    for _ in range(3):
        loss, _ = method.loss(model, batch)
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 7 * 2  # A and B, 7 linear layers per block, 2 blocks
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == ("lora_" in n), f"{n}: moved={moved}"


def test_seeded_cpu_run_repeats_exactly(tmp_path):
    a = pd.read_csv(train(_cfg(tmp_path, out=str(tmp_path / "a"))) / "metrics.csv")
    b = pd.read_csv(train(_cfg(tmp_path, out=str(tmp_path / "b"))) / "metrics.csv")
    cols = ["loss", "rewards/margin", "grad_norm"]
    assert a[cols].equals(b[cols])
    c = pd.read_csv(train(_cfg(tmp_path, out=str(tmp_path / "c"), **{"train.seed": 2})) / "metrics.csv")
    assert not a[cols].equals(c[cols])


def test_grad_accum_and_outputs(tmp_path):
    out = train(_cfg(tmp_path, **{"train.batch_size": 2, "train.grad_accum": 2, "train.max_steps": 2}))
    m = pd.read_csv(out / "metrics.csv")
    assert m.step.tolist() == [1, 2]
    for f in ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "train_report.json"):
        assert (out / f).is_file(), f
    assert any((out / "tb").iterdir())


def test_schedule_warmup_then_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = make_scheduler(opt, schedule="cosine", warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(s.get_last_lr()[0])
        opt.step()
        s.step()
    # warmup 1/2, 2/2, then cos over 4 steps: 1, .8536, .5, .1464
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.8535534, 0.5, 0.1464466], abs=1e-6)
