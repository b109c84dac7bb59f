"""requirements.lock is the environment `make setup` installs: it must hold every dependency pyproject.toml
names, at a version pyproject allows, with hashes (a dependency added without `make lock` fails here, not
on a fresh clone)."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, tuple[Version, int]]:
    """name -> (version, number of hashes) of every entry of the lock."""
    text = (ROOT / "requirements.lock").read_text()
    entries = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\]+)", block)
        if match:
            entries[canonicalize_name(match[1])] = (Version(match[2]), block.count("--hash=sha256:"))
    return entries


def test_every_dependency_is_locked_at_an_allowed_version_with_hashes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    lock = locked()
    problems = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name not in lock:
            problems.append(f"{req.name} is not in requirements.lock: run make lock")
        elif not req.specifier.contains(lock[name][0], prereleases=True):
            problems.append(f"{req.name} {lock[name][0]} in the lock is outside pyproject's {req.specifier}: run make lock")
    assert not problems, "\n".join(problems)
    assert all(hashes > 0 for _, hashes in lock.values())


def test_lock_pins_the_cpu_torch_and_the_stub_numpy():
    lock = locked()
    assert str(lock["torch"][0]) == "2.13.0+cpu"  # the wheel on this machine's disk, not a CUDA build
    assert lock["numpy"][0] < Version("2")  # the python backend stub returns empty outputs under numpy 2
