from kura.nbd.source import Extent, chunks_touching

MiB = 1 << 20


def test_chunks_touching_merges_overlaps_and_skips_holes() -> None:
    extents = [
        Extent(0, MiB, True),
        Extent(MiB, 9 * MiB, False),
        Extent(10 * MiB, 5 * MiB, True),  # spans chunks 2 and 3
        Extent(15 * MiB, MiB, True),  # chunk 3 again: not repeated
        Extent(16 * MiB, 0, True),  # empty: ignored
        Extent(16 * MiB, 100 * MiB, False),
    ]
    assert chunks_touching(extents, 4 * MiB) == [0, 2, 3]


def test_chunk_boundaries_are_exclusive() -> None:
    assert chunks_touching([Extent(4 * MiB, 4 * MiB, True)], 4 * MiB) == [1]
    assert chunks_touching([Extent(4 * MiB - 1, 2, True)], 4 * MiB) == [0, 1]
