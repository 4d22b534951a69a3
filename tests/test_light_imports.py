"""Importing qvlquant's entry points loads neither transformers nor vLLM (seconds of start-up each, and vLLM is an
optional extra): the functions that need them import them when they run. Checked in a fresh interpreter, since this
test process has long imported both."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "vllm")


def modules_after(statement: str) -> set[str]:
    """The top-level packages in sys.modules after ``statement`` runs in a new interpreter on this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = f"{statement}; import sys; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_entry_points_import_without_transformers_or_vllm():
    loaded = modules_after("import qvlquant.api, qvlquant.evaluation, qvlquant.checkpoint.inspection")
    assert "qvlquant" in loaded and "torch" in loaded  # the imports ran
    assert [m for m in HEAVY if m in loaded] == []


def test_the_package_imports_without_torch():
    """``import qvlquant`` (what the CLI's --help and --version need) stays light: its entry points import lazily."""
    loaded = modules_after("import qvlquant")
    assert "qvlquant" in loaded and [m for m in ("torch", *HEAVY) if m in loaded] == []
