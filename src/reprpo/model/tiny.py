"""Tiny random models and tokenizers for tests and smoke runs (no download, seconds to build)."""

from __future__ import annotations

import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def build_tiny_tokenizer():
    """A character-level fast tokenizer: printable ASCII, 8 special tokens, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    from tokenizers import decoders

    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(out_dir: str | Path | None = None, *, seed: int = 0, layers: int = 2, width: int = 64):
    """A random Llama (`layers` blocks, hidden `width`) matching `build_tiny_tokenizer`.

    Returns (model, tokenizer); when `out_dir` is given, saves both there (atomically, with a
    checksum manifest that `resolve_model` verifies)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(torch.float32)
    model.eval()
    if out_dir is not None:
        import shutil
        import tempfile

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        from reprpo.model.checksums import save_on_any_process, write_checksums

        try:
            save_on_any_process(model, tmp)
            tok.save_pretrained(tmp)
            write_checksums(tmp)
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").exists():  # not "another process finished first"
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tok


def build_tiny_sae(out_dir: str | Path, *, d: int = 64, width: int = 256, k: int = 8, layer: int = 1, seed: int = 0) -> Path:
    """A random TopK SAE for the tiny model (hidden 64, block 1), saved in our format."""
    from reprpo.model.sae import TopKSAE

    return TopKSAE(d=d, width=width, k=k, layer=layer, seed=seed).save(out_dir, reprpo={"model": "tiny-random"})
