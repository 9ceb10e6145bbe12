"""Validation of text that arrives from users: instructions, conversation ids, frame ids.

Text must be a ``str`` that encodes to UTF-8 (no lone surrogates, which tokenizers and ROS
string fields reject) and holds no control characters (C0/C1; tab, newline and carriage
return are allowed where ``allow_newlines``).
"""

from __future__ import annotations

import re

_CONTROL = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
_BAD_TEXT = re.compile(f"[{_CONTROL}\ud800-\udfff]")
_BAD_LINE = re.compile(f"[{_CONTROL}\t\n\r\ud800-\udfff]")


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters (for error messages about huge inputs)."""
    text = (
        repr(value) if not isinstance(value, (str, bytes)) or len(value) <= 4 * limit else repr(value[:limit])
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_text(value: object, name: str, *, max_chars: int | None = None, allow_newlines: bool = True) -> str:
    """``value`` unchanged when it is valid text, else a ``TypeError`` / ``ValueError`` saying why.

    Args:
        value: the text to check.
        name: what it is, for the message (e.g. ``"instruction"``).
        max_chars: longest accepted length in characters (checked first, before scanning).
        allow_newlines: accept tab, newline and carriage return.
    Raises:
        TypeError: not a ``str``.
        ValueError: longer than ``max_chars``, or holds a lone surrogate (not valid UTF-8)
            or a control character; the message names the character and its position.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {short_repr(value)}")
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"{name} has {len(value)} characters; the limit is {max_chars}")
    bad = (_BAD_TEXT if allow_newlines else _BAD_LINE).search(value)
    if bad is not None:
        char = bad.group()
        code = f"U+{ord(char):04X}"
        what = (
            f"a lone surrogate {code} (not valid UTF-8)"
            if "\ud800" <= char <= "\udfff"
            else f"the control character {code}"
        )
        raise ValueError(
            f"{name} holds {what} at character {bad.start()}; expected text that is valid UTF-8 without control characters"
        )
    return value
