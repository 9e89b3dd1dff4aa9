"""Reading YAML files safely: ``yaml.SafeLoader`` only (no Python object tags), a key
given twice in one mapping refused with its line, and alias expansion bounded (a
"billion laughs" document is refused). Every error is one line naming the file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cl_proxyfda.errors import ConfigError

MAX_YAML_VALUES = 100_000  # values of a document once its aliases are expanded


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (the second would silently win)."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line = key, line


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Keys brought in by a merge (``<<: *defaults``) may be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def yaml_size(data: Any, limit: int = MAX_YAML_VALUES) -> int:
    """Number of values in ``data`` with aliases expanded; ``ValueError`` when an alias
    refers to itself or the expansion passes ``limit`` (a "billion laughs" document)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ValueError("an alias refers to the mapping or list that contains it")
        active.add(key)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise ValueError(f"aliases expand it to more than {limit:,} values")
        active.discard(key)
        sizes[key] = total
        return total

    return size(data)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` that also refuses duplicate keys and exploding aliases."""
    try:
        loader = StrictSafeLoader(text)  # a SafeLoader: no Python object tags
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise yaml.YAMLError(f"a value cannot be read ({str(exc).split(':')[0]})") from None
    try:
        yaml_size(data)
    except RecursionError:
        raise yaml.YAMLError("the document nests too deeply") from None
    except ValueError as exc:
        raise yaml.YAMLError(str(exc)) from None
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a safe loader; errors name the file (and the line)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("", f"config file {p} does not exist")
    if p.is_dir():
        raise ConfigError("", f"config file {p} is a folder")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"config file {p} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError("", f"config file {p} cannot be read: {exc.strerror or exc}") from None
    try:
        data = load_yaml_text(text)
    except DuplicateKeyError as exc:
        raise ConfigError("", f"config file {p}: duplicate key {exc.key!r} at line {exc.line}") from None
    except RecursionError:
        raise ConfigError("", f"config file {p} is not valid YAML: it nests too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"config file {p} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError("", f"config file {p} is empty")
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {p} must hold a mapping of sections, not {type(data).__name__}")
    return data
