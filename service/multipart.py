"""multipart/form-data bodies -> parts. Pure bytes in, Part objects out; no web framework.

Uploads are on the hot path, so canonical bodies (what curl, browsers, httpx and requests send: no preamble, no
transport padding, no folded headers) are split with a few bytes.find calls; anything else goes through
python-multipart's streaming parser, which accepts what it can and rejects what is malformed with a reason. Both
give the same parts for canonical bodies (tests/service/test_multipart.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import InvalidInput, InvalidPayload

Raw = tuple[list[tuple[bytes, bytes]], bytes]  # (headers as (lower-case name, value), data)
# What clients write for a part: parsed by one match; anything else (quotes or backslashes inside a value, other
# parameters, RFC 2231 names) goes through python-multipart's header parser.
SIMPLE_DISPOSITION = re.compile(rb'form-data; name="([^"\\]*)"(?:; filename="([^"\\]*)")?')


@dataclass
class Part:
    name: str
    filename: str | None  # None for plain fields; "" counts as a file
    content_type: str | None
    data: bytes


@lru_cache(maxsize=256)  # a client sends the same Content-Type with every request
def boundary_of(content_type: str) -> bytes:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise InvalidPayload("multipart body without a valid boundary in its Content-Type")
    return boundary


def parse(content_type: str, body: bytes, max_parts: int) -> list[Part]:
    """Raises InvalidPayload (malformed body, a part without a name) or InvalidInput (more than max_parts parts)."""
    boundary = boundary_of(content_type)
    raw = split_canonical(body, boundary)
    if raw is None:
        raw = split_full(body, boundary, max_parts)
    if len(raw) > max_parts:
        raise InvalidInput(f"too many parts in the multipart body (at most {max_parts})")
    return [_part(headers, data) for headers, data in raw]


def split_canonical(body: bytes, boundary: bytes) -> list[Raw] | None:
    """The fast path; None when the body is not in canonical form (then the full parser decides)."""
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    if not body.startswith(delimiter):
        return None
    pos = len(delimiter)
    parts: list[Raw] = []
    while True:
        if body.startswith(b"--", pos):
            return parts  # the close delimiter; an epilogue is ignored, as RFC 2046 says
        if not body.startswith(b"\r\n", pos):
            return None
        head_end = body.find(b"\r\n\r\n", pos)
        end = body.find(separator, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            return None
        headers = []
        if head_end > pos:
            for line in body[pos + 2 : head_end].split(b"\r\n"):
                name, colon, value = line.partition(b":")
                if not colon or line[:1] in (b" ", b"\t"):
                    return None  # folded or malformed header: leave it to the full parser
                headers.append((name.strip().lower(), value.strip()))
        parts.append((headers, body[head_end + 4 : end]))
        pos = end + len(separator)


def split_full(body: bytes, boundary: bytes, max_parts: int) -> list[Raw]:
    """python-multipart's streaming parser (any valid body; raises InvalidPayload for a malformed one)."""
    parts: list[Raw] = []
    headers: list[tuple[bytes, bytes]] = []
    field: list[bytes] = []
    value: list[bytes] = []
    chunks: list[bytes] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def on_header_end() -> None:
        headers.append((b"".join(field).strip().lower(), b"".join(value).strip()))
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        if len(parts) > max_parts:
            raise InvalidInput(f"too many parts in the multipart body (at most {max_parts})")
        parts.append((list(headers), b"".join(chunks)))
        headers.clear()
        chunks.clear()

    callbacks = {
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise InvalidPayload(f"malformed multipart body: {e}") from None
    return parts


def _part(headers: list[tuple[bytes, bytes]], data: bytes) -> Part:
    disposition = content_type = None
    for name, value in headers:
        if name == b"content-disposition":
            disposition = value
        elif name == b"content-type":
            content_type = value.decode("latin-1")
    simple = SIMPLE_DISPOSITION.fullmatch(disposition) if disposition else None
    if simple is not None:
        name, filename = simple.group(1, 2)
    else:
        params = parse_options_header(disposition)[1] if disposition else {}
        if b"name" not in params:
            raise InvalidPayload("a multipart part has no name in its Content-Disposition")
        name, filename = params[b"name"], params.get(b"filename")
    return Part(
        name.decode("utf-8", errors="replace"),
        None if filename is None else filename.decode("utf-8", errors="replace"),
        content_type,
        data,
    )
