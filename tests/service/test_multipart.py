"""service.multipart: the fast canonical splitter agrees with python-multipart's full parser on every body real
clients send, and non-canonical bodies fall back to the full parser."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import multipart
from service.errors import InvalidInput, InvalidPayload

# Clients percent-encode '"', CR and LF in names (HTML's rule); our field names are plain ASCII anyway. httpx writes a
# backslash unescaped, so a name ending in one would run into the next parameter: no parser can agree on that body.
names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters='"%\\'), min_size=1, max_size=12
)
payloads = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\r\n", b"--", b"\r\n--", b"\r\n\r\n", b"-"]))
files = st.lists(st.tuples(names, st.one_of(st.none(), names), payloads), max_size=5)
fields = st.dictionaries(names, st.text(max_size=10), max_size=3)


def encode(parts: list[tuple[str, str | None, bytes]], data: dict[str, str]) -> tuple[str, bytes]:
    uploads = [(name, (filename or "", content, "application/octet-stream")) for name, filename, content in parts]
    request = httpx.Request("POST", "http://x", files=uploads or None, data=data or None)
    if not uploads:  # httpx sends url-encoded forms without files; force multipart with one dummy file
        request = httpx.Request("POST", "http://x", files=[("f", ("f", b"x", "text/plain"))], data=data or None)
    return request.headers["content-type"], request.read()


@settings(max_examples=150, deadline=None)
@given(files, fields)
def test_fast_and_full_parsers_agree(parts, data) -> None:
    content_type, body = encode(parts, data)
    boundary = multipart.boundary_of(content_type)
    fast = multipart.split_canonical(body, boundary)
    assert fast is not None  # httpx writes canonical bodies
    assert fast == multipart.split_full(body, boundary, 1000)
    parsed = multipart.parse(content_type, body, 1000)
    uploaded = [(p.name, p.filename, p.data) for p in parsed if p.content_type == "application/octet-stream"]
    assert uploaded == [(name, filename or None, content) for name, filename, content in parts]  # "" is omitted


CANONICAL = (
    b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    b'PNGDATA\r\n--b\r\nContent-Disposition: form-data; name="seed"\r\n\r\n7\r\n--b--\r\nan epilogue is ignored'
)


def test_a_canonical_body() -> None:
    parts = multipart.parse("multipart/form-data; boundary=b", CANONICAL, 10)
    assert [(p.name, p.filename, p.content_type, p.data) for p in parts] == [
        ("image", "a.png", "image/png", b"PNGDATA"),
        ("seed", None, None, b"7"),
    ]
    assert multipart.split_canonical(CANONICAL, b"b") == multipart.split_full(CANONICAL, b"b", 10)


@pytest.mark.parametrize(
    "body",
    [
        b"a preamble\r\n" + CANONICAL,
        CANONICAL.replace(b"--b\r\n", b"--b  \r\n", 1),  # transport padding
        CANONICAL.replace(b"Content-Type: image/png", b"Content-Type:\r\n image/png"),  # a folded header
        CANONICAL.replace(b"Content-Type: image/png", b"no colon here"),
    ],
    ids=["preamble", "padding", "folded-header", "no-colon"],
)
def test_non_canonical_bodies_go_to_the_full_parser(body: bytes) -> None:
    assert multipart.split_canonical(body, b"b") is None
    with pytest.raises(InvalidPayload, match="malformed multipart body"):  # which refuses these with a reason
        multipart.parse("multipart/form-data; boundary=b", body, 10)


def test_malformed_bodies() -> None:
    with pytest.raises(InvalidPayload, match="boundary"):
        multipart.parse("multipart/form-data", b"--b--", 10)
    with pytest.raises(InvalidPayload, match="no name"):
        multipart.parse("multipart/form-data; boundary=b", b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--", 10)
    too_many = b"".join(b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n' for _ in range(5)) + b"--b--"
    with pytest.raises(InvalidInput, match="too many parts"):
        multipart.parse("multipart/form-data; boundary=b", too_many, 4)
