"""The README is the truth: every flag it shows exists, and its two set-up commands are the Makefile's."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Flags of other tools the README shows (ray job submit, aws s3 cp, pytest, python -m ... --help).
OTHER_TOOLS = {"--working-dir", "--runtime-env-json", "--recursive", "--help", "--logdir"}


def help_text(module: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_flag_in_the_readme_exists():
    readme = (REPO / "README.md").read_text()
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", readme)) - OTHER_TOOLS
    known = set()
    for module in ("job.train", "job.prepare", "job.generate", "job.evaluate", "infra.create_bucket",
                   "infra.localstack", "bench.run"):
        known |= set(re.findall(r"--[a-z][a-z0-9-]*", help_text(module)))
    assert shown <= known, f"README shows flags no CLI has: {sorted(shown - known)}"


def test_readme_setup_commands_are_make_targets():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
