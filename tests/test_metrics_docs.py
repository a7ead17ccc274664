"""docs/metrics.md lists exactly the metrics the exporter emits, with their type, labels and
unit; the README links it; the configuration page's example is a valid config."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lmtier.config import MetricsConfig, config_from_mapping
from lmtier.monitoring import CATALOGUE

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")


def documented() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Each metric row of the doc's table: name -> (type, labels, unit)."""
    rows = {}
    for line in DOC.splitlines():
        match = re.match(r"\| `(lmtier_\w+)` \| (\w+) \| ([^|]+) \| ([^|]+) \|", line)
        if match:
            name, kind, labels, unit = (part.strip() for part in match.groups())
            assert name not in rows, f"{name} is listed twice"
            rows[name] = (kind, tuple(re.findall(r"`(\w+)`", labels)), unit.replace("—", ""))
    return rows


def test_the_doc_lists_exactly_the_exported_metrics() -> None:
    # The exporter emits only catalogue metrics, all of them with a redis tier
    # (tests/test_metrics_export.py and tests/test_metrics_redis.py check the scrapes).
    expected = {spec.name: (spec.kind, spec.labels, spec.unit) for spec in CATALOGUE}
    assert documented() == expected


def test_the_readme_links_the_doc_from_its_monitoring_section() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    monitoring = readme.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    assert "(docs/metrics.md)" in monitoring


def test_the_configuration_example_serves_metrics() -> None:
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    examples = [b for b in re.findall(r"```yaml\n(.*?)```", page, re.S) if "metrics:" in b]
    assert examples, "docs/configuration.md shows a metrics section"
    for example in examples:
        config = config_from_mapping(yaml.safe_load(example), "configuration.md", environ={})
        assert config.metrics == MetricsConfig(port=9400)
