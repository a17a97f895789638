"""The lock (locks/cpu-py311.txt) is what a fresh install gets, and the tests read nothing from outside the
repository: two machines a week apart run the same code on the same versions."""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from importlib import metadata

import pytest

from conftest import IN_CI, REPO

LOCK = REPO / "locks" / "cpu-py311.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(text: str) -> dict[str, str]:
    return {canonical(name): version for name, version in PIN.findall(text)}


def test_every_lock_pin_has_a_hash() -> None:
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().strip())
    pinned = [entry for entry in entries if PIN.match(entry)]
    assert len(pinned) == len(locked_pins(LOCK.read_text())) > 50
    assert all("--hash=sha256:" in entry for entry in pinned)


def test_the_bootstrap_installs_the_locked_uv() -> None:
    assert locked_pins((REPO / "locks" / "uv.txt").read_text()) == {"uv": locked_pins(LOCK.read_text())["uv"]}


@pytest.mark.skipif(not IN_CI and not (REPO / ".venv").exists(), reason="checks the environment scripts/setup.sh made")
def test_the_installed_environment_is_the_lock() -> None:
    """What `bash scripts/setup.sh` installed, as `pip freeze` would list it, is exactly the lock."""
    if sys.prefix != str(REPO / ".venv") and not IN_CI:
        pytest.skip("not running in the repository's .venv")
    # The venv's own folders only: other tests put stand-in packages (flash-attn, Liger) on sys.path.
    folders = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions(path=folders)}
    installed.pop("dolphin-train", None)  # the editable install of this checkout
    installed.pop("pip", None)  # the venv's own, which the lock does not manage
    assert installed == locked_pins(LOCK.read_text())


ABSOLUTE = re.compile(r"""["'](/tmp|/home|/root|/work|/opt|/mnt|/data|/Users)/""")


def test_no_test_names_a_path_outside_the_repository() -> None:
    """A file a test reads must ship with the repository (or come from tmp_path): absent on a fresh machine,
    it would turn into a skip, which CI counts as a failure."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ABSOLUTE.search(line) and "ABSOLUTE" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_ci_runs_from_the_lock() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "uv pip sync" in setup and "locks/cpu-py311.txt" in setup and "--require-hashes" in setup
    assert "bash scripts/setup.sh" in (REPO / ".ci" / "run").read_text()
    assert os.access(REPO / "scripts" / "check_latest.sh", os.X_OK)
