"""Errors meant for people: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations


class DolphinError(Exception):
    """Base class: a problem the user can fix, described in plain words."""

    exit_code = 1


class ConfigError(DolphinError):
    """The config file (or a command-line override) is invalid; lists every problem found."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(DolphinError):
    """A dataset cannot be read or prepared (missing file, malformed row, nothing left to train on)."""


class EnvironmentProblem(DolphinError):
    """The machine lacks something the config asks for (a GPU feature, an optional package)."""
