"""The layout the README promises: tools are thin programs over the library (no tool imports another or reaches into
a private name), encoders declare their capabilities in one registry, tasks share one contract, one list of losses."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mmscale.models import ENCODERS, encoder_class
from mmscale.models.encoder import FusionEncoder, ItemEncoder
from mmscale.objectives import FUSION_LOSSES, LOSSES

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted((REPO / "tools").glob("*.py"))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_a_tool_imports_the_library_never_another_tool_or_a_private_name(tool):
    tool_names = {p.stem for p in TOOLS}
    for module, names in imports(tool):
        assert module.split(".")[0] not in tool_names, f"{tool.name} imports the tool {module}"
        if module.startswith("mmscale"):
            assert not any(part.startswith("_") for part in module.split(".")), f"{tool.name}: {module}"
            assert not [n for n in names if n.startswith("_")], f"{tool.name} imports private {names} from {module}"
    assert "sys.path.insert" not in tool.read_text() and "sys.path.append" not in tool.read_text(), tool.name


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_each_encoder_declares_what_it_can_do(kind):
    cls = encoder_class(kind)
    assert issubclass(cls, ItemEncoder)
    assert ("fusion" in ENCODERS[kind].capabilities) == issubclass(cls, FusionEncoder)


def test_one_list_of_losses_and_what_they_need():
    from mmscale.config import ConfigError, load_config

    assert set(FUSION_LOSSES) == {"itm", "mlm"} and set(LOSSES) == {"rec", "itc", "seq_item", "seq_seq", "itm", "mlm"}
    with pytest.raises(ConfigError, match="objectives.weights.itm: needs an encoder with the 'fusion' capability"):
        load_config(overrides=["objectives.weights.itm=1.0"])  # CLIP has no fusion mode
    with pytest.raises(ConfigError, match="objectives.weights.nce: unknown loss"):
        load_config(overrides=["objectives.weights.nce=1.0"])


HEAVY = ("torch", "deepspeed", "open_clip", "transformers", "webdataset", "faiss", "matplotlib")
PROGRAMS = [p for p in TOOLS if not p.name.startswith("_")] + [REPO / "launch" / "train.py"]


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name)
def test_help_comes_before_the_heavy_imports(program):
    """`--help` answers at once: the program parses its arguments before importing torch, DeepSpeed and the like."""
    import subprocess
    import sys

    probe = (f"import runpy, sys\nsys.argv = [{str(program)!r}, '--help']\n"
             f"try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
             f"print('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    loaded = proc.stdout.strip().splitlines()[-1]
    assert loaded == "loaded:", f"{program.name} --help imported {loaded.removeprefix('loaded:')}"
