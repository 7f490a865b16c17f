import importlib
import pkgutil

import reprpo


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(reprpo.__path__, "reprpo.")]
    assert "reprpo.cli" in names and "reprpo.data.readers" in names
    for n in names:
        importlib.import_module(n)
