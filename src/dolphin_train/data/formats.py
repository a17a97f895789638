"""Row formats → canonical conversations: a list of (role, content) with roles system/user/assistant."""

from __future__ import annotations

from typing import Any

from dolphin_train.config.schema import DatasetConfig

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"

SHAREGPT_ROLES = {"system": SYSTEM, "human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
OPENAI_ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class RowProblem(ValueError):
    """A row that cannot become a conversation; the message is the reason shown to the user."""


def _format_spec(ds: DatasetConfig) -> tuple[str, str, str, dict[str, str]]:
    """(turns field, role key, content key, role mapping) for a dataset's `type`."""
    if ds.type == "sharegpt":
        return ds.field_messages or "conversations", "from", "value", SHAREGPT_ROLES
    return ds.field_messages or "messages", "role", "content", OPENAI_ROLES


def to_conversation(row: Any, ds: DatasetConfig) -> tuple[list[str], list[str]]:
    """Validate one row and return (roles, contents). Raises RowProblem with the reason."""
    field, role_key, content_key, role_map = _format_spec(ds)
    if not isinstance(row, dict):
        raise RowProblem(f"expected an object, got {type(row).__name__}")
    turns = row.get(field)
    if turns is None:
        raise RowProblem(f"missing field {field!r}")
    if not isinstance(turns, list) or not turns:
        raise RowProblem(f"field {field!r} must be a non-empty list of turns")
    roles: list[str] = []
    contents: list[str] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowProblem(f"turn {i} is not an object")
        role = turn.get(role_key)
        if role not in role_map:
            allowed = ", ".join(sorted(role_map))
            raise RowProblem(f"turn {i}: unknown role {role!r} in {role_key!r} (allowed: {allowed})")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise RowProblem(f"turn {i}: {content_key!r} must be a string, got {type(content).__name__}")
        if not content.strip():
            raise RowProblem(f"turn {i}: empty {content_key!r}")
        roles.append(role_map[role])
        contents.append(content)
    if ASSISTANT not in roles:
        raise RowProblem("no assistant turn (nothing to learn from)")
    return roles, contents
