"""Per-phase time of one W1 training step (SmolLM2, LoRA r16 all-linear, 4 pairs).

    python bench/phases.py    # medians over 5 repeats after 1 warm-up, speed.keep_memory on

Layouts: shared prompt + batch prefix + shared response tokens (the default), shared prompt +
batch prefix, shared prompt only, padded [chosen; rejected].
"""

import statistics
import time
from pathlib import Path

import torch

from reprpo.config import RunConfig, apply_overrides
from reprpo.data.prepare import prepare
from reprpo.model.forward import attention_impl, decoder_and_head, token_logps
from reprpo.model.loading import load_model_and_tokenizer
from reprpo.model.memory import keep_freed_memory
from reprpo.train import make_lora

W1 = Path(__file__).resolve().parents[2] / "shared/data/genies/us_history_textbook/train.json"


def main() -> None:
    keep_freed_memory()
    cfg = apply_overrides(RunConfig(), {"data.max_length": 256, "data.max_prompt_length": 192, "data.chat_template": False}, where="phases")
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    model = make_lora(model, cfg)
    model.train()
    pairs = prepare(str(W1), tok, cfg.data, limit=4).tokenized
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    from reprpo.data.layout import Layout
    from reprpo.model import forward

    layouts = [("eager", True, True, True), ("eager", True, True, False), ("eager", True, False, False), ("sdpa", False, False, False)]
    for impl, packed, prefix, response in layouts:
        batch = Layout(packed=packed, share_prefix=prefix, share_response=response, attention=impl).collate(pairs, pad_id=tok.pad_token_id)
        _, head = decoder_and_head(model)
        times: dict[str, list[float]] = {"decoder fwd": [], "head+logsoftmax": [], "backward": [], "optimizer": []}
        for rep in range(6):
            t0 = time.perf_counter()
            with attention_impl(model, impl):
                hidden = forward.run_decoder(model, batch)
            t1 = time.perf_counter()
            out_row, pos = batch.response_mask.bool().nonzero(as_tuple=True)
            in_row = batch.rows[out_row]
            lp = token_logps(head, hidden[in_row, batch.pred_pos[in_row, pos]], batch.input_ids[in_row, pos])
            loss = -lp.mean()
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t4 = time.perf_counter()
            if rep:
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    times[k].append(v)
        med = {k: statistics.median(v) for k, v in times.items()}
        name = ("shared prompt" + (" + batch prefix" if prefix else "") + (" + response" if response else "")) if packed else "padded"
        print(f"{name:39s} {impl:5s} tokens {batch.n_slots:5d} | "
              + " | ".join(f"{k} {v:.2f}s" for k, v in med.items()) + f" | total {sum(med.values()):.2f}s", flush=True)


if __name__ == "__main__":
    main()
