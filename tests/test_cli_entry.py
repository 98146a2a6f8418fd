"""`charlstm COMMAND ...` is `python -m job.COMMAND ...`: the console script pip installs, its dispatch and its
errors. No Ray, no TensorFlow (prepare only)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import textgen

from job import cli

REPO = Path(__file__).resolve().parents[1]


def test_the_console_script_is_declared_for_every_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"charlstm": "job.cli:main"}
    assert set(cli.COMMANDS) == {"train", "prepare", "evaluate", "generate"}
    for module, _ in cli.COMMANDS.values():
        assert (REPO / (module.replace(".", "/") + ".py")).exists()


def charlstm(*args: str) -> subprocess.CompletedProcess:
    """`charlstm ARGS` as the console script runs it (job.cli.main), in a child process."""
    return subprocess.run([sys.executable, "-m", "job.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_a_command_runs_the_modules_main(tmp_path):
    (tmp_path / "c.txt").write_text(textgen.story(20_000, 1))
    proc = charlstm("prepare", "--corpus", str(tmp_path / "c.txt"), "--output", str(tmp_path / "ds"))
    assert proc.returncode == 0 and (tmp_path / "ds" / "meta.json").exists() and "dataset " in proc.stdout


@pytest.mark.parametrize("argv,code,fragment", [([], 2, "usage: charlstm COMMAND"), (["--help"], 0, "prepare "),
                                                (["fit"], 2, "error: unknown command 'fit'")])
def test_usage_and_unknown_commands(argv, code, fragment, capsys):
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    assert fragment in (captured.out + captured.err)
    if code:
        assert not captured.out
    if argv == ["fit"]:
        assert len(captured.err.strip().splitlines()) == 1


def test_a_user_error_is_one_line(tmp_path):
    proc = charlstm("prepare", "--corpus", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o"))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: ")


def test_the_installed_script_runs():
    script = Path(sys.executable).parent / "charlstm"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . installs it; make venv does)")
    proc = subprocess.run([str(script), "prepare", "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0 and "--corpus" in proc.stdout
