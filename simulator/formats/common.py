"""Request field checks shared by the wire formats."""

from typing import Any

import orjson

from simulator.pipeline import ERROR_INVALID_REQUEST, RequestRejected


def invalid(message: str, param: str | None = None) -> RequestRejected:
    return RequestRejected(ERROR_INVALID_REQUEST, message, param)


def optional_int(
    body: dict, name: str, minimum: int, maximum: int | None = None, label: str | None = None
) -> int | None:
    """Return the integer field ``name`` of ``body``, or None when it is absent or null.

    Gemini sends int64 fields as JSON strings, so digit strings are accepted too.
    ``label`` is the field's path in error messages, by default ``name``.
    """
    value = body.get(name)
    label = label or name
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"Invalid type for '{label}': expected an integer, got {value!r}.", label)
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise invalid(
            f"Invalid value for '{label}': {value}. It must be at least {minimum}{upper}.",
            label,
        )
    return value


def string_list(value: Any, label: str, max_items: int | None = None) -> list[str]:
    """Return a list of non-empty strings from a string, a list of strings or null."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid(f"Invalid type for '{label}': expected a string or a list of strings.", label)
    if max_items is not None and len(value) > max_items:
        raise invalid(
            f"Invalid value for '{label}': {len(value)} items given, at most {max_items} allowed.",
            label,
        )
    return [item for item in value if item]


def json_text(value: Any) -> str:
    """Serialize a parsed JSON value, such as tool arguments, to count its tokens."""
    return orjson.dumps(value).decode()
