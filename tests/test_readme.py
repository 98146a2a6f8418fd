"""The README and docs/ are the truth: every flag they show exists, every link leads somewhere, the README's two
set-up commands are the Makefile's, and the README stays short and undated."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
# Flags of other tools the docs show (ray job submit, aws s3 cp, pytest, python -m ... --help, tensorboard).
# Flags of other programs the pages show (ray job submit, aws s3 cp, tensorboard, ray drain-node).
OTHER_TOOLS = {"--working-dir", "--runtime-env-json", "--recursive", "--help", "--logdir", "--reason",
               "--reason-message", "--deadline-remaining-seconds", "--node-id"}
CLIS = ("job.train", "job.prepare", "job.generate", "job.evaluate", "job.drain_node", "infra.create_bucket",
        "infra.localstack", "bench.run")
# A citation of a document outside the repository; built in two parts so this file does not hold it.
OUTSIDE_DOC = "GUI" + "DE"
README_MAX_LINES = 200
README_MAX_LINE_CHARS = 160


def help_text(module: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def pages() -> list[Path]:
    return [README, *DOCS]


def test_there_are_docs_pages():
    assert DOCS, "docs/ holds no page"


def test_every_flag_in_the_readme_and_docs_exists():
    known = set()
    for module in CLIS:
        known |= set(re.findall(r"--[a-z][a-z0-9-]*", help_text(module)))
    for page in pages():
        shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", page.read_text())) - OTHER_TOOLS
        assert shown <= known, f"{page.relative_to(REPO)} shows flags no CLI has: {sorted(shown - known)}"


def test_readme_setup_commands_are_make_targets():
    readme = README.read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    long = [n for n, line in enumerate(lines, 1) if len(line) > README_MAX_LINE_CHARS]
    assert not long, f"README.md lines over {README_MAX_LINE_CHARS} characters: {long}"


def test_readme_has_no_date():
    dates = re.findall(r"\b20\d\d-\d\d-\d\d\b", README.read_text())
    assert not dates, f"README.md holds dates {dates}: dated measurements belong in bench/README.md"


def test_every_docs_page_is_linked_from_the_readme():
    readme = README.read_text()
    missing = [p.name for p in DOCS if f"(docs/{p.name})" not in readme and f"(docs/{p.name}#" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_every_relative_link_points_to_a_file():
    broken = []
    for page in pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s)://, mailto:, an anchor on the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_no_reference_to_a_document_outside_the_repository():
    files = [REPO / "pyproject.toml", REPO / "Dockerfile", REPO / "Makefile", README]
    for folder in ("job", "infra", "k8s", "tests", "docs"):
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    found = []
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                  if OUTSIDE_DOC in line]
    assert not found, f"{OUTSIDE_DOC} cited (a document outside the repository): {found}"
