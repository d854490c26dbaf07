"""Cursor pagination for every list: stable under inserts, no page counts to leak.

A cursor is opaque to clients but not to an attacker, who can send any base64 they like
(``?cursor=cD1hYmM%3D`` is ``p=abc``). Every part of it is checked before it reaches a
query: a cursor that is not strict base64 or does not decode, or whose position is not a
value of the ordering field (an id that is not an integer or is out of range, a UUID that
is not one), is a 400 ``invalid_cursor`` in the API error format, never a 500.
"""

from __future__ import annotations

import binascii
from typing import Any

from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.db.models import Field, Model
from rest_framework import status
from rest_framework.exceptions import APIException, NotFound
from rest_framework.pagination import Cursor, CursorPagination


class InvalidCursor(APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = "Invalid cursor: follow the next/previous links as the API gave them."
    default_code = "invalid_cursor"


class IdCursorPagination(CursorPagination):
    """Newest first by primary key. ``?page_size=`` up to 200."""

    ordering = "-pk"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200

    def paginate_queryset(self, queryset: Any, request: Any, view: Any = None) -> Any:
        self._position_field = _ordering_field(
            queryset.model, self.get_ordering(request, queryset, view)[0]
        )
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request: Any) -> Cursor | None:
        encoded = request.query_params.get(self.cursor_query_param)
        try:
            if encoded is not None:  # DRF's decoder skips what is not base64; refuse it
                binascii.a2b_base64(encoded.encode("ascii"), strict_mode=True)
            cursor = super().decode_cursor(request)
        except (NotFound, binascii.Error, UnicodeEncodeError):  # NotFound: DRF's refusal
            raise InvalidCursor() from None
        if cursor is None or cursor.position is None:
            return cursor
        field = getattr(self, "_position_field", None)
        try:
            if field is not None:  # a value of the field, in its range (an id past a bigint)
                field.run_validators(field.to_python(cursor.position))
        except (ValidationError, ValueError, TypeError):
            raise InvalidCursor() from None
        return cursor


def _ordering_field(model: type[Model], ordering: str) -> Field[Any, Any] | None:
    """The model field a cursor's position holds a value of (``-pk`` → the primary key)."""
    name = ordering.lstrip("-")
    if name == "pk":
        return model._meta.pk
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:  # an annotation: DRF's own checks apply
        return None
    return field if isinstance(field, Field) else None
