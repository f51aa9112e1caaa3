"""Deterministic sample values for JSON schemas.

Tool-call arguments and structured replies are generated from the schema the client
sent. The generator covers the JSON Schema subset that the OpenAI, Anthropic and Gemini
APIs accept. That is types (with Gemini's upper-case names and type lists), ``enum``,
``const``, local ``$ref``, ``anyOf``, ``oneOf`` and ``allOf``, nested objects and
arrays, ``required``, numeric bounds, string lengths and common string formats.
"""

import math
import random
import uuid
from typing import Any

WORDS = tuple(
    "amber basil cedar delta ember fable garnet harbor indigo juniper kestrel lumen".split()
)

# Below this depth objects get every property and arrays their default length. Deeper
# levels get only required properties and minimum-length arrays, so that recursive
# schemas end.
FULL_DEPTH = 6
MAX_DEPTH = 12


def sample_value(schema: Any, rng: random.Random) -> Any:
    """Return a value that conforms to ``schema``, drawn from ``rng``."""
    root = schema if isinstance(schema, dict) else {}
    return _sample(schema, rng, root, 0)


def _sample(schema: Any, rng: random.Random, root: dict, depth: int) -> Any:
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return None
    if "$ref" in schema:
        return _sample(_resolve_ref(schema["$ref"], root), rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _sample(_first_non_null(options), rng, root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        return _sample(_merge_all_of(schema), rng, root, depth + 1)

    kind = _schema_type(schema)
    if kind == "object":
        return _sample_object(schema, rng, root, depth)
    if kind == "array":
        return _sample_array(schema, rng, root, depth)
    if kind == "integer":
        return _sample_integer(schema, rng)
    if kind == "number":
        return _sample_number(schema, rng)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _sample_string(schema, rng)


def _resolve_ref(reference: Any, root: dict) -> Any:
    """Follow a local ``#/...`` JSON pointer, returning None when it does not resolve."""
    if not isinstance(reference, str) or not reference.startswith("#"):
        return None
    node: Any = root
    for part in reference[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _first_non_null(options: list) -> Any:
    for option in options:
        if isinstance(option, dict) and option.get("type") not in ("null", "NULL"):
            return option
    return options[0]


def _merge_all_of(schema: dict) -> dict:
    """Combine the ``allOf`` parts into one schema, uniting properties and required."""
    merged: dict = {key: value for key, value in schema.items() if key != "allOf"}
    properties = dict(merged.get("properties") or {})
    required = list(merged.get("required") or [])
    for part in schema["allOf"]:
        if not isinstance(part, dict):
            continue
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                properties.update(value)
            elif key == "required" and isinstance(value, list):
                required.extend(name for name in value if name not in required)
            else:
                merged.setdefault(key, value)
    if properties:
        merged["properties"] = properties
    if required:
        merged["required"] = required
    return merged


def _schema_type(schema: dict) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null = [item for item in kind if str(item).lower() != "null"]
        kind = non_null[0] if non_null else "null"
    if isinstance(kind, str):
        return kind.lower()
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _sample_object(schema: dict, rng: random.Random, root: dict, depth: int) -> dict:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    required = schema.get("required")
    required_names = set(required) if isinstance(required, list) else set()
    value = {}
    for name, property_schema in properties.items():
        if depth >= FULL_DEPTH and name not in required_names:
            continue
        value[name] = _sample(property_schema, rng, root, depth + 1)
    return value


def _sample_array(schema: dict, rng: random.Random, root: dict, depth: int) -> list:
    max_items = _non_negative_int(schema.get("maxItems"))
    min_items = _non_negative_int(schema.get("minItems"))
    if min_items is None:
        min_items = 0 if max_items == 0 else 1
    if max_items is None or max_items < min_items:
        max_items = max(min_items, 3)
    if depth >= FULL_DEPTH:
        length = min_items
    else:
        length = rng.randint(min_items, min(max_items, min_items + 2))
    prefix = schema.get("prefixItems")
    prefix_items = prefix if isinstance(prefix, list) else []
    items = schema.get("items")
    values = []
    for position in range(max(length, len(prefix_items))):
        item_schema = prefix_items[position] if position < len(prefix_items) else items
        values.append(_sample(item_schema, rng, root, depth + 1))
    return values


def _non_negative_int(value: Any) -> int | None:
    """Read a count that may arrive as a string (Gemini sends int64 fields as strings)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 0 else None


def _bounds(schema: dict) -> tuple[float | None, float | None, bool, bool]:
    """Return the lower and upper bound and whether each one is exclusive."""
    low = _number(schema.get("minimum"))
    high = _number(schema.get("maximum"))
    low_exclusive = high_exclusive = False
    # Draft 4 schemas mark minimum or maximum as exclusive with a boolean, later drafts
    # give the exclusive bound as a number.
    if schema.get("exclusiveMinimum") is True:
        low_exclusive = low is not None
    elif _number(schema.get("exclusiveMinimum")) is not None:
        low, low_exclusive = _number(schema.get("exclusiveMinimum")), True
    if schema.get("exclusiveMaximum") is True:
        high_exclusive = high is not None
    elif _number(schema.get("exclusiveMaximum")) is not None:
        high, high_exclusive = _number(schema.get("exclusiveMaximum")), True
    return low, high, low_exclusive, high_exclusive


def _sample_integer(schema: dict, rng: random.Random) -> int:
    low, high, low_exclusive, high_exclusive = _bounds(schema)
    if low is None and high is None:
        return rng.randint(0, 100)
    if low is not None:
        first = math.floor(low) + 1 if low_exclusive else math.ceil(low)
    if high is not None:
        last = math.ceil(high) - 1 if high_exclusive else math.floor(high)
    if low is None:
        first = last - 100
    if high is None:
        last = first + 100
    return rng.randint(first, max(first, last))


def _sample_number(schema: dict, rng: random.Random) -> float:
    low, high, _, _ = _bounds(schema)
    if low is None and high is None:
        low, high = 0.0, 100.0
    elif low is None:
        low = high - 100.0
    elif high is None:
        high = low + 100.0
    if high <= low:
        return low
    # Stay strictly inside the range so that exclusive bounds hold too.
    value = low + (high - low) * (0.1 + 0.8 * rng.random())
    rounded = round(value, 2)
    return rounded if low < rounded < high else value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _sample_string(schema: dict, rng: random.Random) -> str:
    text_format = schema.get("format")
    if text_format in ("date", "date-time"):
        date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if text_format == "date":
            return date
        return f"{date}T{rng.randint(0, 23):02d}:00:00Z"
    if text_format == "time":
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
    if text_format == "email":
        return f"{rng.choice(WORDS)}@example.com"
    if text_format in ("uri", "url"):
        return f"https://example.com/{rng.choice(WORDS)}"
    if text_format == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    # NOTE: "pattern" is not honoured, so a string with a pattern may not match it.
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    min_length = _non_negative_int(schema.get("minLength"))
    max_length = _non_negative_int(schema.get("maxLength"))
    if min_length is not None and len(text) < min_length:
        text = text + "x" * (min_length - len(text))
    if max_length is not None and len(text) > max_length:
        text = text[:max_length]
    return text
