"""YAML read strictly: a key given twice in one mapping is an error, not "the later wins",
and an error quotes no line of the file (the line might hold a password)."""

from __future__ import annotations

from typing import IO, Any

import yaml
from yaml.nodes import MappingNode

from lmtier.errors import ConfigError

__all__ = ["load_yaml"]

_MERGE = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a duplicate key, naming it and both lines."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # `<<: *base` then a key of base's: an override
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first is not None:
                raise ConfigError(
                    f"{self.name}: line {line}: duplicate key {key!r} (first at line {first})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _at(mark: Any) -> str:
    return "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"


def load_yaml(stream: str | IO[str], source: str = "<value>") -> Any:
    """The one document in ``stream``; any YAML error, or a duplicate key, is a ConfigError
    that starts with ``source``."""
    loader = _StrictLoader(stream)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        parts = [f"{exc.context}{_at(exc.context_mark)}"] if exc.context else []
        parts.append(f"{exc.problem}{_at(exc.problem_mark)}")
        raise ConfigError(f"{source}: malformed YAML: {'; '.join(parts)}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: malformed YAML: {exc}") from exc
    finally:
        loader.dispose()
