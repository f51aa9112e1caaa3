"""File bytes on local disk, under one root folder, for the Files and Batch APIs.

Each file lives at ``<root>/<account id>/<file id>``; the database row stores that path
relative to the root. Writes go to a temporary name in the same folder and are renamed
into place when complete, so a reader never sees a half-written file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Bytes per read when copying or streaming a file.
CHUNK_BYTES = 64 * 1024


class FileTooLarge(Exception):
    """A write went past the store's size limit, so nothing was kept."""


class FileStore:
    """Reads and writes file bytes below ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def relative_path(self, account_id: str, file_id: str) -> str:
        return f"{account_id}/{file_id}"

    def path(self, relative: str) -> Path:
        """Return the absolute path of a stored file, rejecting paths outside the root."""
        full = (self.root / relative).resolve()
        if self.root.resolve() not in full.parents:
            raise ValueError(f"stored path {relative!r} is outside the file store")
        return full

    @contextmanager
    def writer(
        self, account_id: str, file_id: str, max_bytes: int | None = None
    ) -> Iterator[FileWriter]:
        """Open a new file for writing, kept only if the block ends without an error."""
        relative = self.relative_path(account_id, file_id)
        final = self.path(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f".{final.name}.partial")
        handle = open(temporary, "wb")  # noqa: SIM115  (closed below on every path)
        writer = FileWriter(handle, relative, max_bytes)
        try:
            yield writer
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(temporary, final)
        except BaseException:
            handle.close()
            temporary.unlink(missing_ok=True)
            raise

    def open(self, relative: str) -> BinaryIO:
        """Open a stored file for reading in binary mode."""
        return open(self.path(relative), "rb")  # noqa: SIM115  (the caller closes it)

    def size(self, relative: str) -> int:
        return self.path(relative).stat().st_size

    def delete(self, relative: str) -> None:
        """Remove a stored file's bytes, if they are still there."""
        self.path(relative).unlink(missing_ok=True)


class FileWriter:
    """Appends bytes to a file being written, counting them against an optional limit."""

    def __init__(self, handle: BinaryIO, relative: str, max_bytes: int | None) -> None:
        self._handle = handle
        self.relative_path = relative
        self.max_bytes = max_bytes
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            raise FileTooLarge(f"the file is larger than {self.max_bytes} bytes")
        self._handle.write(data)
