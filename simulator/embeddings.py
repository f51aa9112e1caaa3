"""Deterministic embedding vectors shared by the OpenAI and Gemini formats."""

import base64
import functools
import hashlib
import math
import struct
import sys
from array import array

DEFAULT_DIMENSIONS = 256
MAX_DIMENSIONS = 8192


@functools.lru_cache(maxsize=4096)
def embedding_vector(model: str, text: str, dimensions: int, seed: int) -> tuple[float, ...]:
    """Return a unit-length vector derived from a hash of model, text and seed."""
    digest = hashlib.shake_256(f"{model}\x00{seed}\x00{text}".encode()).digest(2 * dimensions)
    raw = struct.unpack(f"<{dimensions}H", digest)
    values = [(value - 32767.5) / 32767.5 for value in raw]
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return tuple(value / norm for value in values)


@functools.lru_cache(maxsize=4096)
def embedding_base64(model: str, text: str, dimensions: int, seed: int) -> str:
    """Return the vector as base64 of little-endian float32, as OpenAI's base64 encoding."""
    packed = array("f", embedding_vector(model, text, dimensions, seed))
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
