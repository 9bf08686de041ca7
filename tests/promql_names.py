"""Which metric names a PromQL expression reads, and which names exist (shared by the rule and
dashboard lints: tests/test_alert_rules.py, tests/test_dashboards.py).

Expressions are parsed with promql-parser, not matched with regexes. The known names are the
generated metric catalogue (exporters.metricsdoc), every recording rule in alerts/rules/, and
the series Prometheus itself writes.
"""

from __future__ import annotations

from pathlib import Path

import promql_parser
import yaml

from exporters import metricsdoc

RULES_DIR = Path(__file__).resolve().parent.parent / "alerts" / "rules"
# Series Prometheus itself provides for every scrape target, and for alerting rules.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
ALERT_SERIES = {"ALERTS", "ALERTS_FOR_STATE"}


def vector_selectors(node) -> list[promql_parser.VectorSelector]:
    """Every vector selector of a parsed PromQL expression (inside matrices, calls, binary ops)."""
    if isinstance(node, promql_parser.VectorSelector):
        return [node]
    found: list[promql_parser.VectorSelector] = []
    for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            found += vector_selectors(child)
    for arg in getattr(node, "args", None) or []:
        found += vector_selectors(arg)
    return found


def selector_name(sel: promql_parser.VectorSelector) -> str:
    if sel.name:
        return sel.name
    return next((m.value for m in sel.matchers.matchers if m.name == "__name__"), "")


def selectors(node) -> set[str]:
    """Metric names read by a parsed PromQL expression."""
    return {name for sel in vector_selectors(node) if (name := selector_name(sel))}


def recording_rule_names(rules_dir: Path = RULES_DIR) -> set[str]:
    names = set()
    for path in sorted(rules_dir.glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            names |= {r["record"] for r in group.get("rules", []) if "record" in r}
    return names


def known_names(*, alerts: bool = False) -> set[str]:
    """Catalogue + recording rules + Prometheus's own series (+ ALERTS series if asked)."""
    known = metricsdoc.all_metric_names() | recording_rule_names() | BUILTIN
    if alerts:
        known |= ALERT_SERIES
    # A counter family is also addressable by its sample name.
    return known | {n + "_total" for n in known if not n.endswith("_total")}
