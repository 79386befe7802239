"""A --follow of weeks: its memory is a function of what is in flight, not of what arrived
since it started."""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from pathlib import Path

import replicate
from dicomgen import write_corpus
from orthanc import OrthancServer
from test_replicate import args, run


def arrive(source: OrthancServer, folder: Path, count: int, prefix: str) -> set[str]:
    """`count` new instances on the source, in studies of 20, uploaded one by one."""
    return set(source.upload(write_corpus(folder / prefix, count // 20, 1, 20, prefix=prefix)))


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_a_follow_keeps_its_heap_whatever_arrives(source, target, tmp_path, capsys) -> None:
    save = tmp_path / "save"
    assert run(capsys, args(source, target, save))[0] == 0
    config = replicate.Config.from_argv(args(source, target, save, "--follow", "--poll", "0.2",
                                             "--no-metadata", "-q"))
    stop = threading.Event()
    follower = threading.Thread(target=replicate.replicate, args=(config, stop))
    tracemalloc.start()
    try:
        follower.start()
        landed = arrive(source, tmp_path, 100, "A")
        wait_for(lambda: landed <= target.instances())
        first = heap()
        for batch in range(4):
            landed = arrive(source, tmp_path, 100, f"B{batch}")
            wait_for(lambda: landed <= target.instances())
        last = heap()
    finally:
        stop.set()
        follower.join(60)
        tracemalloc.stop()
    assert not follower.is_alive()
    # 400 arrivals after the first 100: what stays does not grow with them (before, 1.4 MB
    # more: a kept-alive pool for each thread of each look, never let go)
    assert last - first < 256 * 1024, (first, last)
    assert target.md5s() == source.md5s()
