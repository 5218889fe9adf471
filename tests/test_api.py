"""The curated top level: every advertised name resolves to the object its module defines, and importing peftjax
loads none of the heavy subpackages until a name is used."""
import importlib
import subprocess
import sys

import peftjax


def test_every_public_name_resolves_to_its_definition():
    for name in peftjax.__all__:
        value = getattr(peftjax, name)
        if name in peftjax._SUBPACKAGES:
            assert value is importlib.import_module(f"peftjax.{name}")
        else:
            assert value is getattr(importlib.import_module(peftjax._EXPORTS[name]), name), name


def test_import_is_lazy_and_unknown_names_fail_clearly():
    code = ("import sys, peftjax; assert 'peftjax.train' not in sys.modules and 'jax' not in sys.modules; "
            "peftjax.make_train_step; assert 'peftjax.train' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        peftjax.no_such_name
    except AttributeError as e:
        assert "no attribute 'no_such_name'" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
