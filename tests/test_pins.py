"""constraints.txt pins every package a clone's install brings in, and the README, CI and the image install from it."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
INSTALL = 'pip install -c constraints.txt -e ".[train,test]"'


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    found = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert all(len(parts) == 2 for parts in found), "constraints.txt holds only `name==version` lines and comments"
    return {normalise(name): version for name, version in found}


def applies(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in extras | {""})


def top_level() -> list[Requirement]:
    """What `pip install -e ".[train,test]"` asks for, on this interpreter and platform."""
    extras = PROJECT["optional-dependencies"]
    texts = PROJECT["dependencies"] + extras["train"] + extras["test"]
    return [req for req in map(Requirement, texts) if applies(req, set())]


def closure() -> set[str]:
    """Every distribution the install brings in, following the installed packages' own requirements."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = top_level()
    while todo:
        req = todo.pop()
        key = (normalise(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:  # not installed here: its own requirements cannot be followed
            continue
        todo += [r for r in map(Requirement, requires) if applies(r, set(req.extras))]
    return {name for name, _ in seen}


def test_every_installed_dependency_is_pinned():
    missing = sorted(closure() - set(pins()))
    assert missing == [], f"not in constraints.txt (docs/deploy.md, 'Pinned versions', regenerates it): {missing}"


def test_the_pins_fit_the_ranges_in_pyproject():
    pinned = pins()
    conflicts = [
        f"{req} vs =={pinned[normalise(req.name)]}"
        for req in top_level()
        if normalise(req.name) in pinned and not req.specifier.contains(pinned[normalise(req.name)], prereleases=True)
    ]
    assert conflicts == []


def test_readme_ci_and_image_install_from_the_same_pins():
    readme = (ROOT / "README.md").read_text()
    assert f"{INSTALL} && python -m service" in readme
    assert f"{INSTALL} && python -m pytest" in readme
    assert 'python3 -m pip install -q -c constraints.txt -e ".[train,test]"' in (ROOT / ".ci/run").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml constraints.txt ./" in dockerfile
    assert dockerfile.count("pip install -c constraints.txt -r requirements") == 2  # serving deps, then [train]
