"""tests/clients/NAME.lock is what `make client-venvs` installs for the client NAME.in names: each lock must pin
what its .in asks for, with hashes, and no GPU wheels (a client edited in .in without `make lock-clients` fails
here, in `make test`, not minutes into `make test-clients`)."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
CLIENTS = sorted(p.stem for p in HERE.glob("*.in"))


def entries(lock: Path) -> dict[str, tuple[Version, int]]:
    """name -> (version, number of hashes) of every entry of a pip-compile lock."""
    found = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock.read_text()):
        match = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\]+)", block)
        if match:
            found[canonicalize_name(match[1])] = (Version(match[2]), block.count("--hash=sha256:"))
    return found


def test_the_makefile_names_every_client():
    line = next(x for x in (HERE.parents[1] / "Makefile").read_text().splitlines() if x.startswith("CLIENTS :="))
    assert sorted(line.split(":=")[1].split()) == CLIENTS


@pytest.mark.parametrize("client", CLIENTS)
def test_the_lock_pins_what_the_in_file_asks_with_hashes_and_no_gpu_wheels(client):
    lock = entries(HERE / f"{client}.lock")
    wanted = [Requirement(x.split("#")[0]) for x in (HERE / f"{client}.in").read_text().splitlines()
              if x.split("#")[0].strip()]
    problems = [f"{r.name} is not in {client}.lock: run make lock-clients" for r in wanted
                if canonicalize_name(r.name) not in lock]
    problems += [f"{r.name} {lock[canonicalize_name(r.name)][0]} in {client}.lock is outside {client}.in's "
                 f"{r.specifier}: run make lock-clients" for r in wanted if canonicalize_name(r.name) in lock
                 and not r.specifier.contains(lock[canonicalize_name(r.name)][0], prereleases=True)]
    assert not problems, "\n".join(problems)
    assert all(hashes > 0 for _, hashes in lock.values())
    # CUDA's libraries and triton's kernels are gigabytes no client uses on a CPU machine (nvidia-ml-py, aiperf's
    # NVML binding, is a small pure-Python wheel)
    assert not [n for n in lock if n == "triton" or n.startswith("nvidia-") and n != "nvidia-ml-py"]
    if "torch" in lock:
        assert lock["torch"][0].local == "cpu"
