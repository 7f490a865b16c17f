"""The CLI starts without torch: the parser comes from the config dataclasses and the
manifest `reprpo/registered_names.py`, which must equal the live registries. Behavioural,
not timed (the timing is bench/cli_startup.py)."""

import json
import subprocess
import sys
import types

import pytest

from reprpo import registered_names
from reprpo.cli import main, parser

HEAVY = ("torch", "transformers")


def test_manifest_equals_the_live_registries():
    live = registered_names.live()
    stale = f"src/reprpo/registered_names.py is stale; regenerate it: {registered_names.REGENERATE}"
    assert registered_names.KINDS == live["KINDS"], stale
    assert registered_names.REGISTRY_FIELDS == live["REGISTRY_FIELDS"], stale


def test_manifest_regenerates_to_itself():
    """`--write` on up-to-date registries leaves the file as it is (render and rewrite agree)."""
    from pathlib import Path

    text = Path(registered_names.__file__).read_text()
    block = registered_names.render({"KINDS": registered_names.KINDS, "REGISTRY_FIELDS": registered_names.REGISTRY_FIELDS})
    assert registered_names.rewrite(text, block) == text


def test_help_and_shifts_list_import_neither_torch_nor_transformers(tmp_path):
    shifts = tmp_path / "shifts.json"
    shifts.write_text(json.dumps([{"name": "s1", "train": "a", "oos": "b", "rnd": "c"}]))
    code = f"""
import contextlib, io, sys
from reprpo.cli import main, parser
parser()
for argv in (["--help"], ["train", "--help"], ["compare", "--help"], ["tune", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["shifts", "list"]) == 0
    assert main(["shifts", "list", {str(shifts)!r}]) == 0
assert "difficulty" in out.getvalue() and "s1" in out.getvalue(), out.getvalue()
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", f"imported at start-up: {r.stdout}"


@pytest.mark.parametrize("command", ["train", "compare", "tune"])
def test_help_shows_no_doubled_percent(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "%%" not in text
    assert "17% slower" in " ".join(text.split())  # speed.packed_attention's help, escaped once


SUBCOMMANDS = {
    "train": ["train", "dpo"],
    "eval": ["eval", "RUN"],
    "compare": ["compare", "--methods", "dpo"],
    "tune": ["tune", "dpo", "--shift", "builtin:difficulty", "--trials", "1"],
    "data inspect": ["data", "inspect", "builtin:arith/test"],
}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_quiet_before_or_after_the_subcommand(name):
    argv = SUBCOMMANDS[name]
    assert parser().parse_args(argv).quiet is False
    assert parser().parse_args(["--quiet", *argv]).quiet is True
    assert parser().parse_args([*argv, "--quiet"]).quiet is True


def test_main_sets_and_resets_quiet(monkeypatch, capsys):
    import reprpo.progress

    calls = []
    monkeypatch.setattr(reprpo.progress, "set_quiet", calls.append)
    assert main(["--quiet", "shifts", "list"]) == 0
    assert main(["shifts", "list"]) == 0  # a later command in the same process is not quiet
    assert calls == [True, False]


def test_export_needs_merged_or_adapter(capsys):
    assert main(["export", "runs/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("reprpo: error:") and "--merged" in err and "--adapter" in err


def test_export_calls_export_run(monkeypatch, capsys, tmp_path):
    calls = []
    fake = types.SimpleNamespace(export_run=lambda run, *, merged, adapter: calls.append((run, merged, adapter)))
    monkeypatch.setitem(sys.modules, "reprpo.export", fake)
    assert main(["export", "runs/x", "--adapter", str(tmp_path / "ad")]) == 0
    assert calls == [("runs/x", None, str(tmp_path / "ad"))]
    assert str(tmp_path / "ad") in capsys.readouterr().out
