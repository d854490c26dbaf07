"""Template filters of the dashboard."""

from __future__ import annotations

import json
import shlex
from typing import Any

from django import template

register = template.Library()


@register.filter
def money(cents: Any, currency: str = "usd") -> str:
    """Integer cents as an amount: 4500 → "$45.00" (other currencies: "45.00 EUR")."""
    if cents is None or cents == "":
        return "—"
    value = int(cents)
    sign = "-" if value < 0 else ""
    amount = f"{abs(value) // 100:,}.{abs(value) % 100:02d}"
    if str(currency).lower() == "usd":
        return f"{sign}${amount}"
    return f"{sign}{amount} {str(currency).upper()}"


@register.filter
def shell(argv: Any) -> str:
    """An argv list as one shell-quoted line (what the command field takes back)."""
    return shlex.join(str(a) for a in argv) if argv else ""


@register.filter
def get_item(mapping: Any, key: Any) -> Any:
    """``mapping[key]`` in a template, sorted when it is a set (empty when missing)."""
    value = mapping.get(key, ()) if hasattr(mapping, "get") else ()
    return sorted(value) if isinstance(value, (set, frozenset)) else value


@register.filter
def pairs(details: Any) -> str:
    """Audit details as ``key: value`` pairs; nested values compact JSON."""
    if not isinstance(details, dict):
        return str(details)
    return "; ".join(
        f"{key}: {value if isinstance(value, (str, int, float)) else json.dumps(value)}"
        for key, value in details.items()
    )
