"""The package's layers (docs/development.md): job.core < job.data < job.model < job.training < job.cluster <
job.generation < the command modules (job/train.py, prepare.py, evaluate.py, generate.py, cli.py). A module imports
only from its own sub-package or a lower one, whether at its top or inside a function, so dependencies flow one way
and no two sub-packages import each other; and the driver's commands start without TensorFlow or Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("job.core", "job.data", "job.model", "job.training", "job.cluster", "job.generation")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in (REPO / "job").rglob("*.py")}


def layer(module: str) -> int:
    """0 for job/__init__.py (constants every layer may read), then the sub-packages in order; the command modules
    at job's top are last."""
    if module == "job":
        return 0
    for rank, package in enumerate(LAYERS, start=1):
        if module == package or module.startswith(package + "."):
            return rank
    return len(LAYERS) + 1


def imports_of(module: str) -> list[tuple[str, int]]:
    """(module of ours it imports, line) for every import statement, wherever it stands."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: absolute imports only (job.x.y)"
            base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in names if name == "job" or name.startswith("job.")]
    return found


def test_every_module_is_in_a_layer():
    assert {"job.core.errors", "job.data.prepare", "job.model.model", "job.training.worker",
            "job.cluster.launch", "job.train"} <= set(MODULES)
    assert not [m for m in MODULES if m.count(".") > 2], "one level of sub-packages"


def test_imports_flow_one_way():
    upward = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target}"
              for m in sorted(MODULES) for target, line in imports_of(m) if layer(target) > layer(m)]
    assert upward == []


@pytest.mark.parametrize("command", ["job.train", "job.prepare", "job.generate", "job.evaluate", "job.cli"])
def test_the_commands_start_without_tensorflow_or_ray(command):
    """`--help` (and every refusal of bad input before the cluster) must not pay for `import tensorflow` or Ray."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", command, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"tensorflow", "keras", "ray", "matplotlib"}
