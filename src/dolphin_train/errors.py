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


def where_not_utf8(raw: bytes, exc: UnicodeDecodeError) -> tuple[int, str]:
    """The line of the first byte of `raw` that is not UTF-8 text, and that byte said with its column (config
    files and data files name it alike)."""
    line_start = raw.rfind(b"\n", 0, exc.start) + 1
    line = raw.count(b"\n", 0, exc.start) + 1
    return line, f"byte 0x{raw[exc.start]:02x} at column {exc.start - line_start + 1} is not UTF-8 text"
