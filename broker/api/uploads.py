"""Streaming multipart/form-data uploads: the file part goes to disk chunk by chunk.

The request body is fed to python-multipart's push parser as it arrives, so an upload
never sits whole in memory: the file part is written through a ``FileWriter`` and the
small text fields are kept up to ``MAX_FIELD_BYTES`` each.
"""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from broker.errors import InvalidRequest, PayloadTooLarge
from broker.filestore import FileTooLarge, FileWriter

# Largest text field (such as ``purpose``), in bytes.
MAX_FIELD_BYTES = 4096
# Longest file name kept, because the column stores at most 255 characters.
MAX_FILENAME_CHARS = 255
FILE_FIELD = "file"


@dataclass
class Upload:
    """The fields and file name of a multipart body, and the size of its file part."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    file_bytes: int = 0


class _PartCollector:
    """Callbacks for the push parser: route each part to the file or to a text field."""

    def __init__(self, writer: FileWriter) -> None:
        self.writer = writer
        self.upload = Upload()
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._buffer = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._name = None
        self._is_file = False
        self._buffer = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = b""
        self._header_value = b""

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        _, params = parse_options_header(disposition)
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if self._name != FILE_FIELD:
            return
        if self.upload.filename is not None:
            raise InvalidRequest("The upload has more than one 'file' part.", param="file")
        self._is_file = True
        name = (
            posixpath.basename(filename.decode("utf-8", "replace").replace("\\", "/"))
            if (filename)
            else ""
        )
        self.upload.filename = (name or "upload.jsonl")[:MAX_FILENAME_CHARS]

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.writer.write(data[start:end])
            return
        self._buffer += data[start:end]
        if len(self._buffer) > MAX_FIELD_BYTES:
            raise InvalidRequest(
                f"The form field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes.",
                param=self._name,
            )

    def _part_end(self) -> None:
        if self._is_file:
            self.upload.file_bytes = self.writer.bytes
        elif self._name:
            self.upload.fields[self._name] = self._buffer.decode("utf-8", "replace")


def multipart_boundary(content_type: str | None) -> bytes:
    """Return the boundary of a multipart/form-data content type, or raise a 400."""
    kind, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "Upload files as multipart/form-data with a 'file' part and a 'purpose' field."
        )
    return boundary


async def receive_upload(
    chunks: AsyncIterator[bytes], boundary: bytes, writer: FileWriter
) -> Upload:
    """Parse a multipart body as it streams in, writing the file part to ``writer``."""
    collector = _PartCollector(writer)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FileTooLarge as exc:
        raise PayloadTooLarge(f"The uploaded file is too large: {exc}.", param="file") from exc
    except MultipartParseError as exc:
        raise InvalidRequest(f"The multipart body is malformed: {exc}.") from exc
    if collector.upload.filename is None:
        raise InvalidRequest(
            "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
        )
    return collector.upload
