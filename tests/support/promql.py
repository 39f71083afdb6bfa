"""Find the metric names a PromQL expression (or a Grafana query) selects."""

from __future__ import annotations

import re

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan", "label_values", "query_result"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARS = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([^,()]*(?:\{[^}]*\})?)\s*,\s*\w+\s*\)")
_NAME = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Return the metric names `expr` refers to (function and label names excluded)."""
    text = _LABEL_VALUES.sub(r"\1", expr)  # Grafana's label_values(metric{...}, label)
    text = _STRINGS.sub('""', text)
    text = _GRAFANA_VARS.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for m in _NAME.finditer(text):
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or m.group() in KEYWORDS:
            continue
        names.add(m.group())
    return names


def grafana_queries(node: object) -> list[str]:
    """Return every PromQL query in a Grafana dashboard (targets, variables, annotations)."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                out.append(value)
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                out.append(value["query"])
            else:
                out += grafana_queries(value)
    elif isinstance(node, list):
        for item in node:
            out += grafana_queries(item)
    return out


def for_promtool(expr: str) -> str:
    """Replace Grafana's variables so promtool can parse the expression."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
    return _GRAFANA_VARS.sub(".*", expr)
