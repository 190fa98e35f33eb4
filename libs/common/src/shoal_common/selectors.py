"""Kubernetes-style label selectors: parse ``env=prod,tier in (a,b),!gpu`` into LabelSelectors."""

from __future__ import annotations

import re

from shoal_common.spec import LabelSelector, SelectionOperator

_SET = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_CMP = re.compile(r"^\s*([\w./-]+)\s*(==|!=|=|>|<)\s*([\w./-]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def parse_selector(text: str) -> list[LabelSelector]:
    """Parse a selector expression; raises ValueError naming the part it cannot read."""
    out: list[LabelSelector] = []
    for part in _split_top_level(text):
        if m := _SET.match(part):
            values = [v.strip() for v in m.group(3).split(",") if v.strip()]
            op = SelectionOperator.IN if m.group(2) == "in" else SelectionOperator.NOT_IN
            out.append(LabelSelector(key=m.group(1), operator=op, values=values))
        elif m := _CMP.match(part):
            op = {
                "=": SelectionOperator.EQUALS,
                "==": SelectionOperator.EQUALS,
                "!=": SelectionOperator.NOT_EQUALS,
                ">": SelectionOperator.GT,
                "<": SelectionOperator.LT,
            }[m.group(2)]
            out.append(LabelSelector(key=m.group(1), operator=op, values=[m.group(3)]))
        elif m := _EXISTS.match(part):
            op = SelectionOperator.DOES_NOT_EXIST if m.group(1) else SelectionOperator.EXISTS
            out.append(LabelSelector(key=m.group(2), operator=op, values=[]))
        else:
            raise ValueError(f"cannot read selector {part.strip()!r}: use k=v, k!=v, k in (a,b)")
    return out


def matches(selector: LabelSelector, labels: dict[str, str]) -> bool:
    """Whether a node's labels satisfy one requirement (k8s semantics)."""
    key, op, values = selector.key, selector.operator, selector.values or []
    present = key in labels
    value = labels.get(key)
    if op in (SelectionOperator.EQUALS, SelectionOperator.DOUBLE_EQUALS, SelectionOperator.IN):
        return present and value in values
    if op in (SelectionOperator.NOT_EQUALS, SelectionOperator.NOT_IN):
        return not present or value not in values
    if op == SelectionOperator.EXISTS:
        return present
    if op == SelectionOperator.DOES_NOT_EXIST:
        return not present
    if op in (SelectionOperator.GT, SelectionOperator.LT) and present and values:
        try:
            left, right = float(value or ""), float(values[0])
        except ValueError:
            return False
        return left > right if op == SelectionOperator.GT else left < right
    return False
