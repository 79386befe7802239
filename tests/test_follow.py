"""A --follow of weeks: its memory is a function of what is in flight, not of what arrived
since it started, and its save file stays proportional to the archive (compacted whole, or
not at all, whatever moment a crash comes)."""

from __future__ import annotations

import gc
import random
import select
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import replicate
from dicomgen import write_corpus
from orthanc import OrthancServer
from test_replicate import SCRIPT, args, run, summary_value


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


def test_a_save_file_compacted_while_killed_stays_whole(source, target, tmp_path,
                                                        capsys) -> None:
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    journal = replicate.Journal(save, source.url, target.url).open(read_only=True)
    expected = (dict(journal.studies), set(journal.known), journal.mark, journal.position)
    # A run that records the same studies again and again (as looks of a follow do), and
    # compacts the file each time its dead lines outweigh its live ones, killed at random
    # moments: what a crash leaves must read as the same save file every time.
    writer = tmp_path / "writer.py"
    writer.write_text(f"""
import sys
sys.path.insert(0, {str(Path(SCRIPT).parent)!r})
import replicate
replicate.COMPACT_MIN = 50
journal = replicate.Journal(replicate.Path({str(save)!r}), {source.url!r}, {target.url!r}).open()
records = [(study, count, 0, "20200101") for study, count in journal.studies.items()]
compactions = 0
while True:
    for _ in range(20):
        journal.studies_done(records)
    if journal.compact_due():
        journal.compact()
        compactions += 1
        print(compactions, flush=True)
""")
    generator = random.Random(7)
    compactions = 0
    for _ in range(12):
        process = subprocess.Popen([sys.executable, str(writer)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:  # once it has compacted a first time, at a random moment of what follows
            assert select.select([process.stdout], [], [], 60)[0], "no compaction in 60 s"
            first = process.stdout.readline()  # type: ignore[union-attr]
            time.sleep(generator.random() * 0.3)
        finally:
            process.send_signal(signal.SIGKILL)
        out, err = process.communicate()
        assert "Traceback" not in err, err
        compactions += len((first + out).split())
        after = replicate.Journal(save, source.url, target.url).open(read_only=True)
        assert (after.studies, after.known, after.mark, after.position) == expected
        assert after.lines < 2000  # compacted, not grown for ever
    assert compactions >= 12  # the kills came in all moments of many compactions
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "Skipped:") == len(expected[0])  # the next run is exact
    assert summary_value(out, "Copied:") == 0 and "To transfer:   0" in out
