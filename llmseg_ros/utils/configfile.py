"""Reading YAML / JSON configuration files with errors that point into the file.

Every configuration file of the project (``llmseg --config``, the training config, the
bag-replay instructions file) goes through :func:`load_config_file`. A file whose name ends
in ``.json`` is read as JSON, anything else as YAML (which also reads most JSON). Every
problem raises :class:`ConfigFileError` (a ``ValueError``) whose message names the file,
the line (when one is known) and what was expected::

    cannot parse config file run.yaml, line 3, column 12: expected ',' or ']', but got '<stream end>'
    config file run.yaml, line 5: method must be one of ['llmseg', ...], got 'magic'
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
KeyPath = tuple[str | int, ...]

# the field a validation message starts with: "lora.r must be ...", "at[0].instruction must ..."
_LEADING_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*)\s")
_QUOTED_NAME = re.compile(r"'([A-Za-z_]\w*)'")
_PATH_PART = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")


class ConfigFileError(ValueError):
    """A configuration file that cannot be used.

    Attributes:
        path: the file.
        line: 1-based line of the problem, or ``None`` when no single line is at fault.
        reason: what was wrong and what was expected (the message without the location).
    """

    def __init__(
        self,
        path: Path,
        reason: str,
        *,
        line: int | None = None,
        column: int | None = None,
        action: str = "",
        what: str = "config file",
    ) -> None:
        where = f"{what} {path}"
        if line is not None:
            where += f", line {line}" + (f", column {column}" if column is not None else "")
        super().__init__(f"{action}{where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


@dataclass(frozen=True)
class ConfigFile:
    """A parsed configuration file that holds a mapping.

    Attributes:
        path: where it was read from.
        data: the top-level mapping.
        what: how messages call the file (``"config file"``, ``"instructions file"``).
        key_lines: 1-based line of every key and list item, by its path (``("lora", "r")``,
            ``("at", 0)``, ``("at", 0, "stamp")``).
    """

    path: Path
    data: dict[str, Any]
    what: str = "config file"
    key_lines: dict[KeyPath, int] = field(default_factory=dict)

    def error(self, reason: str, line: int | None = None) -> ConfigFileError:
        return ConfigFileError(self.path, reason, line=line, what=self.what)

    def line_of_message(self, message: str) -> int | None:
        """The line of the key a validation message is about, or ``None`` when it names none.

        Messages name their field first (``"iop_threshold must be in [0, 1], got 2"``, dotted
        and indexed for nested ones) or quote it (``"unknown config field(s) ['colour']"``).
        """
        leading = _LEADING_FIELD.match(message)
        if leading:
            wanted: KeyPath = tuple(
                int(index) if index else name for name, index in _PATH_PART.findall(leading.group(1))
            )
            for size in range(len(wanted), 0, -1):  # the field, else its nearest enclosing entry
                for path, line in self.key_lines.items():
                    if path[-size:] == wanted[:size]:
                        return line
        for name in _QUOTED_NAME.findall(message):
            for path, line in self.key_lines.items():
                if path[-1] == name:
                    return line
        return None

    def build(self, factory: Callable[[dict[str, Any]], T]) -> T:
        """``factory(data)``; its ``ValueError`` / ``TypeError`` comes back naming the file and line."""
        try:
            return factory(self.data)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ConfigFileError):
                raise
            message = str(exc)
            raise self.error(message, self.line_of_message(message)) from exc


def _key_lines(node: Any, prefix: KeyPath = ()) -> dict[KeyPath, int]:
    """Line of every mapping key and sequence item under a composed YAML ``node``."""
    import yaml

    lines: dict[KeyPath, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*prefix, index)] = item.start_mark.line + 1
            lines.update(_key_lines(item, (*prefix, index)))
    return lines


def _compose(text: str) -> tuple[Any, Any]:
    """YAML ``text`` → (its node tree, its data); raises ``yaml.YAMLError``."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return node, (None if node is None else loader.construct_document(node))
    finally:
        loader.dispose()


def _parse(path: Path, text: str, what: str) -> tuple[Any, dict[KeyPath, int]]:
    """Parse ``text`` (JSON by extension, else YAML) into its data and the line of every key."""
    import yaml

    action = "cannot parse "
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            reason = exc.msg.replace("Expecting", "expected", 1) + " (read as JSON: the name ends in .json)"
            raise ConfigFileError(
                path, reason, line=exc.lineno, column=exc.colno, action=action, what=what
            ) from exc
        try:  # key lines only: JSON allows tabs as whitespace, YAML nowhere
            node, _ = _compose(text.replace("\t", " "))
        except yaml.YAMLError:  # valid JSON that YAML 1.1 cannot read: no key lines, nothing wrong
            return data, {}
        return data, _key_lines(node)
    try:
        node, data = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        reason = str(exc.problem or exc.context or "not valid YAML")
        if exc.context and exc.problem and exc.context_mark is not None:
            reason += f" ({exc.context} that started on line {exc.context_mark.line + 1})"
        raise ConfigFileError(
            path,
            reason,
            line=None if mark is None else mark.line + 1,
            column=None if mark is None else mark.column + 1,
            action=action,
            what=what,
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(path, str(exc), action=action, what=what) from exc
    return data, _key_lines(node)


def load_config_file(path: str | Path, what: str = "config file") -> ConfigFile:
    """Read a YAML or JSON file that must hold a mapping.

    Args:
        path: the file (``.json``: JSON; anything else: YAML).
        what: how messages call the file.

    Raises:
        ConfigFileError: the file cannot be read, does not parse, or holds no mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigFileError(path, reason, action="cannot read ", what=what) from exc
    try:
        data, lines = _parse(path, text, what)
    except RecursionError as exc:  # a parser's recursion on pathological nesting
        raise ConfigFileError(path, "nested too deeply to read", action="cannot parse ", what=what) from exc
    if not isinstance(data, dict):
        got = "nothing (the file is empty)" if data is None else f"a {type(data).__name__}"
        raise ConfigFileError(
            path, f"must hold a mapping of field names to values, got {got}", line=1, what=what
        )
    return ConfigFile(path, data, what, lines)
