"""A JSON parser that enforces ``DATA_UPLOAD_MAX_MEMORY_SIZE`` and a nesting depth.

DRF reads the request stream directly, bypassing Django's body-size check, so an oversize
JSON body would otherwise be read whole. This parser refuses it with 413. A body nested
deeper than ``MAX_JSON_DEPTH`` (``[[[[…]]]]`` 200,000 deep made ``json.loads`` raise
``RecursionError``, a 500) is a 400 ``malformed_request``: nothing in the API needs more
than a few levels, and a deep value parsed here would only fail later, in validation,
storage or rendering.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError

from tenants.api.errors import PayloadTooLarge

#: Arrays and objects inside one another at most (the API's own documents need < 10).
MAX_JSON_DEPTH = 32


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest deeper than ``limit`` (walked without
    recursion, so the check itself cannot exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in item)
    return False


class LimitedJSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        request = (parser_context or {}).get("request")
        if request is not None:
            try:
                declared = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                declared = 0
            if limit is not None and declared > limit:
                raise PayloadTooLarge(f"Request body larger than {limit} bytes.")
        raw = stream.read(limit + 1) if limit is not None else stream.read()
        if limit is not None and len(raw) > limit:
            raise PayloadTooLarge(f"Request body larger than {limit} bytes.")
        if not raw.strip():
            return {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON parse error: {exc}") from None
        try:
            # Deep nesting (past the interpreter's recursion limit) is a RecursionError.
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ParseError(f"JSON parse error: {exc}") from None
        if depth_exceeds(data, MAX_JSON_DEPTH):
            raise ParseError(f"JSON parse error: nested deeper than {MAX_JSON_DEPTH} levels")
        return data
