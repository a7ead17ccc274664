"""The tables of top-level and tier keys in docs/configuration.md, written from the fields.

``python -m lmtier.config.docs`` prints them; a test checks that the docs hold them as written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmtier.config.fields import setting_of, yaml_keys
from lmtier.config.store_config import StoreConfig
from lmtier.config.tier_specs import TierSpec, spec_class, tier_kinds

__all__ = ["store_keys_table", "tier_keys_table"]


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is dataclasses.MISSING:
        return "required"
    value = field.default
    meta = setting_of(field)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    shown = meta.show(value) if meta.show is not None else str(value)
    return f"`{shown}`" if shown else '`""`'


def _row(field: dataclasses.Field[Any], tiers: str) -> str:
    keys = " / ".join(f"`{key}`" for key in yaml_keys(field))
    help_text = setting_of(field).help
    if field.name == "kind":
        help_text = "one of " + ", ".join(f"`{kind}`" for kind in tier_kinds())
    return f"| {keys} | {tiers} | {_default(field)} | {help_text} |"


def tier_keys_table() -> str:
    """A markdown table: each tier key, the kinds of tier that take it, its default, meaning."""
    base = {field.name for field in dataclasses.fields(TierSpec)}
    rows = [_row(field, "any") for field in dataclasses.fields(TierSpec)]
    owners: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field[Any]] = {}
    for kind in tier_kinds():
        for field in dataclasses.fields(spec_class(kind)):
            if field.name not in base:
                owners.setdefault(field.name, []).append(kind)
                fields.setdefault(field.name, field)
    rows += [_row(fields[name], ", ".join(kinds)) for name, kinds in owners.items()]
    head = ["| tier key | tiers | default | meaning |", "| --- | --- | --- | --- |"]
    return "\n".join(head + rows) + "\n"


def store_keys_table() -> str:
    """A markdown table: each top-level key but ``tiers``, its default and meaning."""
    rows = [
        f"| {' / '.join(f'`{key}`' for key in yaml_keys(field))} | {_default(field)} "
        f"| {setting_of(field).help} |"
        for field in dataclasses.fields(StoreConfig)
        if field.name != "tiers"
    ]
    head = ["| top-level key | default | meaning |", "| --- | --- | --- |"]
    return "\n".join(head + rows) + "\n"


if __name__ == "__main__":
    print(store_keys_table())
    print(tier_keys_table(), end="")
