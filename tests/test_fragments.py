"""JSONL byte-range fragments: every line lands in exactly one range, whatever the sizes."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.fs as pafs

from rayembed.embed.manifest import list_fragments, read_lines


def test_byte_ranges_cover_every_line_once(tmp_path: Path) -> None:
    rng, fs = random.Random(0), pafs.LocalFileSystem()
    path = tmp_path / "f.jsonl"
    for _ in range(300):
        lines = [f'{{"id": {i}, "t": "{"x" * rng.randrange(0, 40)}"}}' for i in range(rng.randrange(1, 30))]
        path.write_text("\n".join(lines) + ("\n" if rng.random() < 0.7 else ""))  # last newline optional
        frags = list_fragments(str(path), fs, fragment_rows=10, fragment_bytes=rng.randrange(1, 80))
        parts = [read_lines(fs, f, block=rng.randrange(1, 16)) for f in frags]
        got = [line for part in parts for line in part.decode().split("\n") if line]
        assert got == lines
        assert len({f.name for f in frags}) == len(frags)  # one output name per range


def test_small_files_stay_whole(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    [frag] = list_fragments(str(tmp_path), pafs.LocalFileSystem(), fragment_rows=10, fragment_bytes=1 << 20)
    assert frag.byte_range is None and frag.key == "a.jsonl"  # the key (so the output name) is unchanged
    assert read_lines(pafs.LocalFileSystem(), frag) == b'{"id": 1}\n{"id": 2}\n'
