"""The undo-entry format: names carry the point, entries round-trip, damage is detected."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import LogBlobError, TagKind
from protocol.journal import CHUNK, EntryName, EntryTag, UndoEntry, merge_ranges

names = st.builds(EntryName, st.integers(0, 2**63), st.integers(0, 2**63), st.booleans(), st.integers(0, 2**63),
                  st.integers(0, 2**63), st.text(max_size=20).filter(lambda t: len(t.encode()) <= 48))


@given(names)
def test_entry_names_round_trip(name: EntryName) -> None:
    assert EntryName.parse(str(name)) == name


@pytest.mark.parametrize("bad", ["x.undo", "1-2-c-3-4-.undo", "00000000000000000001-00000000000000000002-x-3-4-.undo",
                                 "00000000000000000001-00000000000000000002-c-3-4-zz.undo",
                                 "00000000000000000001-00000000000000000002-c-3-4-.undo.tmp"])
def test_foreign_names_are_not_entries(bad: str) -> None:
    assert EntryName.parse(bad) is None


extents = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 14)), max_size=30)


@given(extents)
def test_merge_ranges_covers_exactly_the_union(ext: list[tuple[int, int]]) -> None:
    merged = merge_ranges(ext)
    covered = {b for o, n in ext for b in range(o, o + n)} if sum(n for _, n in ext) < 200_000 else None
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(merged)), "sorted, disjoint, not touching"
    if covered is not None:
        assert covered == {b for o, n in merged for b in range(o, o + n)}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=8), st.lists(st.tuples(
    st.integers(1, 100), st.sampled_from(list(TagKind)), st.text(max_size=10)), max_size=3))
def test_entries_round_trip(images: list[bytes], tags: list[tuple]) -> None:
    name = EntryName(4, 9, False, 1, 2)
    ranges = [(i * 10_000, len(img)) for i, img in enumerate(images)]
    entry = UndoEntry(name, ranges, b"".join(images), [EntryTag(*t) for t in tags])
    decoded = UndoEntry.decode(entry.encode(), name)
    assert decoded.ranges == ranges and [bytes(b) for b in decoded.before] == images
    assert decoded.tags == entry.tags


def test_large_entries_are_chunked_and_a_pool_gives_identical_bytes() -> None:
    image = bytes(range(256)) * (3 * CHUNK // 256 + 7)
    entry = UndoEntry(EntryName(0, 1, True, 5, 6, "t"), [(0, len(image))], image)
    with ThreadPoolExecutor(2) as pool:
        assert entry.encode(pool.map) == entry.encode()
    assert bytes(UndoEntry.decode(entry.encode(), entry.name).before[0]) == image


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_detected(data: st.DataObject) -> None:
    name = EntryName(1, 2, False, 3, 4)
    encoded = bytearray(UndoEntry(name, [(0, 1024)], bytes(range(256)) * 4, []).encode())
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] ^= 0x01
    with pytest.raises(LogBlobError):
        UndoEntry.decode(bytes(encoded), name)


def test_an_entry_under_another_name_is_refused() -> None:
    name = EntryName(1, 2, False, 3, 4)
    data = UndoEntry(name, [], b"", []).encode()
    with pytest.raises(LogBlobError, match="does not match its name"):
        UndoEntry.decode(data, EntryName(1, 3, False, 3, 4))
