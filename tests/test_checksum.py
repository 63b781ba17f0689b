"""The formats' CRC-32 is zlib's: whatever computes it must give zlib's values, chained and over views."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from protocol.checksum import crc32


@given(data=st.binary(max_size=70_000), start=st.integers(0, 2**32 - 1), cut=st.integers(0, 70_000))
def test_crc32_is_zlibs(data: bytes, start: int, cut: int) -> None:
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)
    view = memoryview(bytearray(data))
    assert crc32(view[cut:], crc32(view[:cut])) == zlib.crc32(data)  # chained over pieces, as the log does


def test_known_answer() -> None:
    assert crc32(b"123456789") == 0xCBF43926
