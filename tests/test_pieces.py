"""Pieces, shards and buckets (common.partition) and shared-memory segments (common.shm)."""

from __future__ import annotations

import os

import pytest
import torch

from common.partition import assign_shards, base_of, buckets, merge_pieces, pieces_of, split
from common.shm import Segment, layout


def test_split_and_merge_are_inverse():
    t = {"w": torch.arange(70.0).reshape(10, 7), "b": torch.arange(7.0), "s": torch.tensor(3.0)}
    pieces = pieces_of(t, chunk_bytes=3 * 7 * 4)  # three rows of w per piece
    keys = [p.key for p in pieces]
    assert keys == ["w#0/4", "w#1/4", "w#2/4", "w#3/4", "b", "s"]
    assert [(p.lo, p.hi) for p in pieces[:4]] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    parts = {p.key: p.of(t[p.base]).clone() for p in pieces}
    merged = merge_pieces(parts)
    assert set(merged) == set(t)
    for k in t:
        assert torch.equal(merged[k], t[k])


def test_incomplete_pieces_stay_pieces():
    parts = {"w#0/3": torch.zeros(2), "w#1/3": torch.ones(2)}  # piece 2 lives on another shard
    assert set(merge_pieces(parts)) == {"w#0/3", "w#1/3"}
    assert base_of("w#1/3") == ("w", 1, 3)
    assert base_of("layer.0.weight") == ("layer.0.weight", None, 1)


def test_small_tensors_and_no_chunking_are_whole():
    assert split("w", (4, 4), 4, 0)[0].whole
    assert split("w", (4, 4), 4, 1 << 20)[0].whole
    assert split("w", (), 4, 1)[0].whole
    with pytest.raises(ValueError, match="must not contain"):
        split("bad#name", (4,), 4, 1)


def test_shard_assignment_is_deterministic_and_balanced():
    sizes = {f"k{i}": s for i, s in enumerate([100, 90, 80, 30, 20, 10, 10])}
    a = assign_shards(sizes, 2)
    assert a == assign_shards(dict(reversed(list(sizes.items()))), 2)  # independent of order
    load = [sum(sizes[k] for k in a if a[k] == s) for s in range(2)]
    assert abs(load[0] - load[1]) <= 10
    assert set(assign_shards(sizes, 1).values()) == {0}


def test_buckets_reverse_order_cover_everything():
    names = ["a", "b", "c", "d"]
    sizes = {"a": 10, "b": 10, "c": 25, "d": 5}
    got = buckets(names, sizes, 20)
    assert got == [["d", "c"], ["b", "a"]]
    assert buckets(names, sizes, 0) == [["d", "c", "b", "a"]]
    assert sorted(n for b in buckets(names, sizes, 1) for n in b) == names


def test_segment_token_and_layout():
    specs = [("w#0/2", "float32", (2, 3)), ("w#1/2", "float32", (1, 3)), ("b", "float64", (5,))]
    offsets, nbytes = layout(specs)
    assert offsets["w#1/2"] == offsets["w#0/2"] + 24  # pieces of one tensor are back to back
    assert offsets["b"] % 64 == 0
    seg = Segment.create("test", nbytes)
    try:
        seg.views(specs, offsets)["b"].fill_(2.5)
        other = Segment.open(seg.path, seg.token, nbytes, writable=False)
        assert other is not None
        assert torch.equal(other.views(specs, offsets)["b"], torch.full((5,), 2.5, dtype=torch.float64))
        assert Segment.open(seg.path, "00" * 16, nbytes, writable=False) is None  # another server's
        assert Segment.open(seg.path, seg.token, nbytes + 8, writable=False) is None  # wrong size
        assert Segment.open(seg.path + "-missing", seg.token, nbytes, writable=False) is None  # other host
    finally:
        seg.close()


def test_segments_of_dead_servers_of_this_host_are_removed(tmp_path):
    import subprocess
    import sys

    from common.shm import _host, remove_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)  # exited: no process has this pid (a reuse within the test is unlikely)
    stale = tmp_path / f"zmqps-{_host()}-{dead_pid}-0123abcd-theta"
    live = tmp_path / f"zmqps-{_host()}-{os.getpid()}-0123abcd-g0"  # this process: alive
    other_host = tmp_path / f"zmqps-elsewhere-{dead_pid}-0123abcd-g1"  # another container's
    unrelated = tmp_path / "zmqps-notes.txt"
    for p in (stale, live, other_host, unrelated):
        p.write_bytes(b"x")
    assert remove_stale(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other_host.exists() and unrelated.exists()
