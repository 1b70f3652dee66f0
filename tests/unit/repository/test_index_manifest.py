"""Index and manifest encodings: round trips, damage and unknown versions."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kura.errors import IntegrityError, UnsupportedFormat, UsageError
from kura.repository.index import ZERO_CHUNK, DiskIndex, chunk_count, chunk_length
from kura.repository.manifest import (
    ConfigEntry,
    DiskEntry,
    Manifest,
    SourceRef,
    check_object_name,
    is_snapshot_id,
    new_snapshot_id,
)

ids = st.one_of(st.just(ZERO_CHUNK), st.binary(min_size=32, max_size=32))


@st.composite
def indexes(draw: st.DrawFn) -> DiskIndex:
    chunk_size = draw(st.sampled_from([1, 7, 4096, 4 << 20]))
    size = draw(st.integers(min_value=0, max_value=chunk_size * 40))
    n = chunk_count(size, chunk_size)
    return DiskIndex(size, chunk_size, draw(st.lists(ids, min_size=n, max_size=n)))


@settings(max_examples=100, deadline=None)
@given(indexes())
def test_index_roundtrip(index: DiskIndex) -> None:
    assert DiskIndex.decode(index.encode(), "t") == index


@settings(max_examples=100, deadline=None)
@given(indexes(), st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_index_header_damage_detected(index: DiskIndex, pos: int, flip: int) -> None:
    data = bytearray(index.encode())
    # magic, version, padding; the rest is covered by the blob MAC and the manifest's hash
    data[pos % 8] ^= flip
    with pytest.raises((IntegrityError, UnsupportedFormat)):
        DiskIndex.decode(bytes(data), "t")


@settings(max_examples=50, deadline=None)
@given(indexes(), st.integers(min_value=1))
def test_index_truncation_detected(index: DiskIndex, cut: int) -> None:
    data = index.encode()
    with pytest.raises(IntegrityError):
        DiskIndex.decode(data[: len(data) - 1 - cut % len(data)], "t")


def test_chunk_arithmetic() -> None:
    assert chunk_count(0, 4) == 0 and chunk_count(1, 4) == 1 and chunk_count(8, 4) == 2
    assert chunk_length(2, 10, 4) == 2 and chunk_length(0, 10, 4) == 4


def manifest(**kw: object) -> Manifest:
    created = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    base: dict[str, object] = dict(
        id=new_snapshot_id(created), repository="r", created=created,
        source=SourceRef("vm", "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "web01"), node="a",
        kind="full", reason="first", parent=None, sequence=0, chain="x",
        consistency="application", meta={"frozen_seconds": 0.4, "nested": {"a": [1, 2]}},
        disks=[DiskEntry("vda", 10, 4, "indexes/x/vda.idx", "ab" * 32, 3, {"f": "qcow2"},
                         {"bytes_in": 10})],
        configs={"domain.xml": ConfigEntry("domain.xml", 5, [b"\1" * 32])})
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


def test_manifest_roundtrip() -> None:
    m = manifest()
    assert Manifest.from_json(m.to_json(), "t") == m
    assert is_snapshot_id(m.id) and m.id.startswith("20260102T030405Z-")
    d = m.to_dict()
    assert d["source"]["name"] == "web01" and d["protected"] is False and d["size"] == 10
    assert m.disk("vda").size == 10
    with pytest.raises(UsageError, match="no disk"):
        m.disk("vdb")


def test_manifest_unknown_version_and_damage() -> None:
    doc = json.loads(manifest().to_json())
    doc["version"] = 2
    with pytest.raises(UnsupportedFormat, match="version 2"):
        Manifest.from_json(json.dumps(doc).encode(), "t")
    doc["version"] = 1
    del doc["disks"][0]["size"]
    with pytest.raises(IntegrityError, match="damaged"):
        Manifest.from_json(json.dumps(doc).encode(), "t")
    with pytest.raises(IntegrityError):
        Manifest.from_json(b"{not json", "t")
    with pytest.raises(IntegrityError):
        Manifest.from_json(b'{"format": "other"}', "t")


def test_names_are_validated() -> None:
    assert check_object_name("disk", "vda") == "vda"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(UsageError):
            check_object_name("disk", bad)
    with pytest.raises(UsageError):
        SourceRef("container", "k", "n")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        SourceRef("vm", "", "n")
