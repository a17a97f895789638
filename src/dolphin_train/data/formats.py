"""Row formats → canonical conversations.

A canonical row is `{kind, roles, contents, train, train_end}`: roles are system/user/assistant/tool,
and the per-turn flags say whether a turn's content and its end-of-turn token are trained. Every
format-specific decision (field names, role names, which roles train) is made here, once, so the
tokenizer stage only renders and masks.
"""

from __future__ import annotations

from typing import Any

from dolphin_train.config.schema import DatasetConfig

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"
CHAT, COMPLETION = "chat", "completion"

# Source role name → canonical role. ShareGPT variants seen in the wild are mapped here once.
DEFAULT_ROLES = {
    "system": SYSTEM,
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "model": ASSISTANT,
    "tool": TOOL,
    "function": TOOL,
    "observation": TOOL,
    "ipython": TOOL,
}


class RowProblem(ValueError):
    """A row that cannot become a conversation. `reason` groups problems in counts; str() is the detail."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        self.reason = reason
        super().__init__(detail or reason)


class RowConverter:
    """Turns raw rows of one dataset into canonical rows (built once per dataset, applied per row)."""

    def __init__(self, ds: DatasetConfig, default_system_message: str | None, train_on_inputs: bool) -> None:
        self.ds = ds
        self.default_system_message = default_system_message
        self.train_on_inputs = train_on_inputs
        sharegpt = ds.type == "sharegpt"
        self.field = ds.field_messages or ("conversations" if sharegpt else "messages")
        mapping = ds.property_mappings
        self.role_key = mapping.get("role", "from" if sharegpt else "role")
        self.content_key = mapping.get("content", "value" if sharegpt else "content")
        if ds.roles:
            self.role_map = {name: target for target, names in ds.roles.items() for name in names}
        else:
            self.role_map = DEFAULT_ROLES

    def __call__(self, row: Any) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise RowProblem("not an object", f"expected an object, got {type(row).__name__}")
        if self.ds.type == "completion":
            return self._completion(row)
        roles, contents = self._alpaca(row) if self.ds.type.startswith("alpaca") else self._turns(row)
        if self.ds.drop_system_message:
            kept = [(r, c) for r, c in zip(roles, contents, strict=True) if r != SYSTEM]
            roles, contents = [r for r, _ in kept], [c for _, c in kept]
        if self.default_system_message and SYSTEM not in roles:
            roles, contents = [SYSTEM, *roles], [self.default_system_message, *contents]
        if ASSISTANT not in roles:
            raise RowProblem("no assistant turn", "no assistant turn (nothing to learn from)")
        return self._with_flags(roles, contents)

    def _turns(self, row: dict[str, Any]) -> tuple[list[str], list[str]]:
        turns = row.get(self.field)
        if turns is None:
            raise RowProblem("missing field", f"missing field {self.field!r}")
        if not isinstance(turns, list) or not turns:
            raise RowProblem("empty conversation", f"field {self.field!r} must be a non-empty list of turns")
        roles: list[str] = []
        contents: list[str] = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RowProblem("malformed turn", f"turn {i} is not an object")
            role = turn.get(self.role_key)
            if role not in self.role_map:
                allowed = ", ".join(sorted(self.role_map))
                raise RowProblem(
                    "unknown role", f"turn {i}: unknown role {role!r} in {self.role_key!r} (allowed: {allowed})"
                )
            roles.append(self.role_map[role])
            contents.append(_text(turn.get(self.content_key), f"turn {i}: {self.content_key!r}"))
        return roles, contents

    def _alpaca(self, row: dict[str, Any]) -> tuple[list[str], list[str]]:
        instruction = _text(row.get("instruction"), "'instruction'")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowProblem("non-string content", f"'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        roles, contents = [USER, ASSISTANT], [prompt, _text(row.get("output"), "'output'")]
        system = row.get("system")
        if isinstance(system, str) and system.strip():
            roles, contents = [SYSTEM, *roles], [system, *contents]
        return roles, contents

    def _completion(self, row: dict[str, Any]) -> dict[str, Any]:
        text = _text(row.get(self.ds.field or "text"), repr(self.ds.field or "text"))
        return {"kind": COMPLETION, "roles": [], "contents": [text], "train": [True], "train_end": [True]}

    def _with_flags(self, roles: list[str], contents: list[str]) -> dict[str, Any]:
        train = [True] * len(roles) if self.train_on_inputs else [r in self.ds.roles_to_train for r in roles]
        policy = self.ds.train_on_eos
        if policy == "all":
            train_end = [True] * len(roles)
        elif policy == "none":
            train_end = [False] * len(roles)
        elif policy == "last":
            last = max((i for i, t in enumerate(train) if t), default=-1)
            train_end = [i == last for i in range(len(roles))]
        else:
            train_end = list(train)
        return {"kind": CHAT, "roles": roles, "contents": contents, "train": train, "train_end": train_end}


def _text(value: Any, what: str) -> str:
    if value is None:
        raise RowProblem("missing field", f"missing {what}")
    if not isinstance(value, str):
        raise RowProblem("non-string content", f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem("empty content", f"empty {what}")
    return value
