"""The command-line programs of tools/ and launch/, loaded from their files to run their `main` in this process.

They are programs, not a package (and `evaluate` would clash with an installed package of that name), so the
library is what tests import; these loaders exist only to drive a program's command line."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_program(relative_path: str) -> ModuleType:
    """The module of REPO/RELATIVE_PATH (e.g. "tools/evaluate.py"), freshly executed."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(f"mmscale_program_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
