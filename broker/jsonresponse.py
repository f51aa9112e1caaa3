"""Fast JSON encoding for response bodies."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response


def json_bytes(content: Any) -> bytes:
    return orjson.dumps(content)


class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
