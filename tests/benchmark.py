"""Benchmark replicate.py against Orthanc's own push (POST /peers/{peer}/store jobs).

Generates three corpora with pydicom, loads each into a source Orthanc, and times on fresh,
empty targets, alternately, Orthanc's push and replicate.py with default options. Prints a table
of best times, their ratio and replicate.py's peak RSS, then the re-run with nothing to copy on
the tiny corpus and what planning costs. Every copy is checked (instance IDs and sizes, and MD5s
in smoke mode). Not part of the pytest run, except for its smoke scale.

The `scale` corpora (20,000 and 200,000 tiny instances in studies of 40, and one study of
50,000 in 10 series) are not timed against the push: they measure what must not grow with the
archive: peak RSS of a full copy and of a re-run with nothing to copy, the time until the
first instance lands, and the requests each server receives during that re-run. The first
two are also copied with --order source, before and after the default (newest first): the
first copy after a source is loaded is the slowest whichever order it takes, so the default
is compared with the quicker of the two.

The `wan` part copies across tests/linkproxy.py (a round trip and a 25 MB/s rate between the
tool and one server): mixed with the source 20 ms away and with the target 80 ms away, a varied
corpus of about 1 GB whose pixels deflate to half with the source 80 ms away, and tiny with the
source 80 ms away, timed without the link too. Each against the link's floor (bytes / rate),
with Orthanc's push across the same link for reference (cut after two minutes and projected).

The `check` part times --check of the scale corpus against an empty target, with the source
next to the tool and 80 ms away, and --check --recheck of a complete target (beside another
version's replicate.py with --baseline).

The `status` part copies mixed with --status read every second (page, metrics, state) and
without, in turn: the tool's CPU seconds pair by pair.

The `verify` part times --verify of the mixed corpus' shape into a target that stores it as it
came and into one that re-encodes it to JPEG-LS lossless: CPU seconds per GB of each side.

usage: python tests/benchmark.py [--corpora mixed,tiny,big,scale20k,scale,onestudy,wan,check]
                                 [--repeat 2] [--scale full|smoke] [--baseline SCRIPT]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


import replicate  # noqa: E402
from dicomgen import write_corpus  # noqa: E402
from orthanc import PASSWORD, USER, OrthancServer  # noqa: E402

SCRIPT = str(HERE.parent / "replicate.py")

# corpus -> list of (studies, series, instances, rows, columns, frames[, modality, pixels])
# "varied" is the WAN part's own: CT of 512x512, MR of 256x256, radiographs of 2048x2048 and
# tiny instances, about 1 GB, with pixels that deflate to about half as real images do.
VARIED_FULL = [(6, 2, 120, 512, 512, 1, "CT", "smooth"), (4, 4, 60, 256, 256, 1, "MR", "smooth"),
               (12, 1, 2, 2048, 2048, 1, "CR", "smooth"), (100, 1, 20, 8, 8, 1, "OT", "random")]
CORPORA = {
    "full": {
        "mixed": [(40, 3, 25, 256, 256, 1), (2, 1, 1, 2048, 1024, 15)],
        "tiny": [(600, 2, 20, 8, 8, 1)],
        "big": [(3, 1, 1, 4096, 2048, 12)],
        "scale20k": [(500, 2, 20, 8, 8, 1)],
        "scale": [(5000, 2, 20, 8, 8, 1)],
        "onestudy": [(1, 10, 5000, 8, 8, 1)],
        "varied": VARIED_FULL,
        # the mixed corpus' shape with pixels that compress (the verify part re-encodes it)
        "reencode": [(40, 3, 25, 256, 256, 1, "CT", "smooth"),
                     (2, 1, 1, 2048, 1024, 15, "CT", "smooth")],
    },
    "smoke": {
        "mixed": [(2, 2, 4, 256, 256, 1), (1, 1, 1, 512, 512, 6)],
        "tiny": [(6, 2, 5, 8, 8, 1)],
        "big": [(1, 1, 1, 1024, 1024, 3)],
        "scale20k": [(5, 2, 4, 8, 8, 1)],
        "scale": [(10, 2, 4, 8, 8, 1)],
        "onestudy": [(1, 3, 30, 8, 8, 1)],
        "varied": [(1, 1, 6, 512, 512, 1, "CT", "smooth"), (2, 1, 5, 8, 8, 1, "OT", "random")],
        "reencode": [(2, 2, 4, 256, 256, 1, "CT", "smooth"),
                     (1, 1, 1, 512, 512, 6, "CT", "smooth")],
    },
}
SCALE_CORPORA = {"scale20k", "scale", "onestudy"}  # measured for memory and start-up only
PUSH_PER_STUDY = {"tiny"}  # one huge push job is pathologically slow; one job per study is fair
FLOOR_CORPORA = {"mixed", "tiny", "big"}  # timed against the target's own ingestion too


@dataclass
class Timing:
    """One timed copy: wall seconds and the CPU seconds each process spent on it."""
    seconds: float
    source_cpu: float = 0.0
    target_cpu: float = 0.0
    client_cpu: float = 0.0
    share: float = 1.0  # of the instances copied when timing stopped (a push cut short)


@dataclass
class Measure:
    corpus: str
    instances: int = 0
    size: int = 0
    push: list[Timing] = field(default_factory=list)
    ours: list[Timing] = field(default_factory=list)
    floor: list[Timing] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    first_landing: list[float] = field(default_factory=list)  # seconds to the first instance
    rerun: dict[str, "Rerun"] = field(default_factory=dict)  # by the options it was run with
    # ORDER_CORPORA: the same full copy with --order source, before and after the newest
    # first one (the first copy after the source is loaded is the slowest, whichever it is):
    # (timing, peak RSS in KB, first landing) of each
    source_order: list[tuple[Timing, int, Optional[float]]] = field(default_factory=list)


@dataclass
class Rerun:
    """A re-run with nothing to copy."""
    seconds: float
    rss_kb: int
    source_requests: int
    target_requests: int
    posts: int


def best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda timing: timing.seconds)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerClock:
    """CPU seconds the source and the target spend between start() and stop()."""

    def __init__(self, source: OrthancServer, target: OrthancServer) -> None:
        self.pids = [server.process.pid for server in (source, target)]  # type: ignore[union-attr]
        self.before = [cpu_seconds(pid) for pid in self.pids]
        self.started = time.monotonic()

    def stop(self, client_cpu: float = 0.0) -> Timing:
        elapsed = time.monotonic() - self.started
        used = [cpu_seconds(pid) - before for pid, before in zip(self.pids, self.before)]
        return Timing(elapsed, used[0], used[1], client_cpu)


def generate(kind: str, scale: str, cache: Path) -> list[Path]:
    folder = cache / scale / kind
    marker = folder / "complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        for number, (studies, series, instances, rows, columns, frames, *style) in \
                enumerate(CORPORA[scale][kind]):
            write_corpus(folder, studies, series, instances, rows, columns, frames,
                         prefix=f"{kind[0].upper()}{number}", study_date="spread",
                         modality=(style or ["CT"])[0], pixels=style[1] if style else "random")
        marker.write_text("")
    return sorted(folder.glob("*.dcm"))


def store(session, server: OrthancServer, body: bytes, content_type: str) -> None:
    """POST /instances, tried again after a 500: a fresh server here answered 500 to a ZIP
    now and then (loading a corpus, posting the floor's ZIPs), which ended the whole run.
    That was Orthanc's FileStorageCannotWrite, which its file storage answers when two
    uploads race to create the same storage folder (replicate.py retries it too)."""
    for attempt in range(3):
        answer = session.post(server.url + "/instances", data=body, timeout=600,
                              headers={"Content-Type": content_type})
        if answer.status_code != 500:
            break
        print(f"{server.name} answered 500 to a POST: {answer.text[:200]}", file=sys.stderr)
        time.sleep(1)
    answer.raise_for_status()


def load(server: OrthancServer, files: list[Path]) -> None:
    """Fill a source quickly: small files in ZIPs of 500, large ones alone."""
    small = [path for path in files if path.stat().st_size < 1_000_000]
    large = [path for path in files if path.stat().st_size >= 1_000_000]
    groups = [small[start:start + 500] for start in range(0, len(small), 500)]

    def send(group: list[Path]) -> None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for path in group:
                archive.write(path, path.name)
        store(server.new_session(), server, buffer.getvalue(), "application/zip")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, groups))
    server.upload(large)


def push(source: OrthancServer, target: OrthancServer, per_study: bool,
         peer_url: Optional[str] = None, limit: Optional[float] = None) -> Timing:
    """Orthanc's own push of everything to `target` (through `peer_url` if given). Past
    `limit` seconds the jobs are cancelled and the timing is a projection from the share
    of instances that landed (Timing.share below 1)."""
    source.session.put(f"{source.url}/peers/bench", json={
        "Url": peer_url or target.url, "Username": USER, "Password": PASSWORD},
        timeout=60).raise_for_status()
    studies = source.get("/studies")
    groups = [[study] for study in studies] if per_study else [studies]
    clock = ServerClock(source, target)
    jobs = []
    for group in groups:
        answer = source.session.post(f"{source.url}/peers/bench/store", timeout=60, json={
            "Resources": group, "Asynchronous": True})
        answer.raise_for_status()
        jobs.append(answer.json()["ID"])
    for job in jobs:
        while True:
            if limit is not None and time.monotonic() - clock.started > limit:
                for running in jobs:
                    source.session.post(f"{source.url}/jobs/{running}/cancel", timeout=60)
                timing = clock.stop()
                share = target.get("/statistics")["CountInstances"] / max(
                    1, source.get("/statistics")["CountInstances"])
                timing.share = share
                return timing
            # The server keeps only its last JobsHistorySize (default 10) finished jobs: a job
            # no longer listed has finished, and check_copy tells whether the copy is whole.
            answer = source.session.get(f"{source.url}/jobs/{job}", timeout=60)
            if answer.status_code == 404:
                break
            answer.raise_for_status()
            state = answer.json()["State"]
            if state == "Success":
                break
            if state == "Failure":
                raise RuntimeError(f"push job {job} failed")
            time.sleep(0.02)
    return clock.stop()


def floor(source: OrthancServer, target: OrthancServer) -> Timing:
    """The target's own ingestion of what replicate.py sends it, made in advance: stored ZIPs
    of up to 200 instances or 4 MB of the files under 2 MB, larger files alone, posted with
    as many threads as replicate.py uses and nothing else running. No copier through the
    REST API can beat this."""
    records = source.get("/instances?expand")
    bodies: list[tuple[str, bytes]] = []
    group: list[tuple[str, bytes]] = []
    grouped = 0

    def close_group() -> None:
        nonlocal group, grouped
        if group:
            bodies.append(("application/zip", replicate.stored_zip(group)))
        group, grouped = [], 0
    for record in records:
        content = source.session.get(f"{source.url}/instances/{record['ID']}/file",
                                     timeout=600).content
        if len(content) >= replicate.STREAM_MIN_INSTANCE:
            bodies.append(("application/dicom", content))
            continue
        if len(group) >= replicate.BATCH_MAX_INSTANCES or \
                grouped + len(content) > replicate.BATCH_MAX_BYTES:
            close_group()
        group.append((f"{record['ID']}.dcm", content))
        grouped += len(content)
    close_group()
    local = threading.local()

    def post(body: tuple[str, bytes]) -> None:
        if not hasattr(local, "session"):
            local.session = target.new_session()
        store(local.session, target, body[1], body[0])
    settle()
    clock = ServerClock(source, target)
    with ThreadPoolExecutor(replicate.Config.threads) as pool:
        list(pool.map(post, bodies))
    return clock.stop()


def ours(source: OrthancServer, target: OrthancServer, save: Path,
         watch_first: bool = False, urls: Optional[tuple[str, str]] = None,
         options: tuple[str, ...] = (), script: str = SCRIPT,
         statuses: tuple[int, ...] = (0,)) -> tuple[Timing, int, str, Optional[float]]:
    """Run replicate.py with default options; (timing, peak RSS in KB, stdout, seconds until
    the first instance landed on the target if `watch_first`).

    The peak is the child's VmHWM, polled every 20 ms: it is a high-water mark of the child's
    own memory, whereas wait4's ru_maxrss would start from this (much larger) parent's size.
    Its CPU is read at the same polls (the last 20 ms may be missed)."""
    clock = ServerClock(source, target)
    started = time.monotonic()
    source_url, target_url = urls or (source.url, target.url)
    process = subprocess.Popen([sys.executable, script, source_url, target_url, "--save",
                                str(save), "-q", "--username", USER, "--password", PASSWORD,
                                *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: Optional[float] = None
    watcher = None
    if watch_first:
        def watch() -> None:
            nonlocal first
            session = target.new_session()
            while process.poll() is None:
                answer = session.get(target.url + "/statistics", timeout=60).json()
                if answer["CountInstances"] > 0:
                    first = time.monotonic() - started
                    return
                time.sleep(0.02)
        watcher = threading.Thread(target=watch)
        watcher.start()
    peak = 0
    client_cpu = 0.0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
            client_cpu = cpu_seconds(process.pid)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.02)
    out, err = process.communicate()
    timing = clock.stop(client_cpu)
    if watcher is not None:
        watcher.join()
    if process.returncode not in statuses:
        raise RuntimeError(f"replicate.py exited {process.returncode}: {err}")
    return timing, peak, out, first


def check_copy(source: OrthancServer, target: OrthancServer, deep: bool) -> None:
    if target.instances() != source.instances():
        raise AssertionError("target does not hold exactly the source's instances")
    source_size = source.get("/statistics")["TotalUncompressedSize"]
    if target.get("/statistics")["TotalUncompressedSize"] != source_size:
        raise AssertionError("sizes differ between source and target")
    if deep and target.md5s() != source.md5s():
        raise AssertionError("MD5s differ between source and target")


def fresh_target(work: Path, name: str, **config: object) -> OrthancServer:
    return OrthancServer(work / f"{name}-{time.monotonic_ns()}", "TARGET", **config).start()


def settle() -> None:
    """Write back what earlier steps left in the page cache (a loaded corpus, a discarded
    target) so that neither contender pays for the other's disk writes."""
    os.sync()
    time.sleep(1)


def discard(server: OrthancServer) -> None:
    server.kill()  # a graceful stop takes seconds and the folder goes anyway
    shutil.rmtree(server.folder, ignore_errors=True)


def source_order(source: OrthancServer, work: Path,
                 deep: bool) -> tuple[Timing, int, Optional[float]]:
    """A full copy with --order source into a fresh target: (timing, peak RSS, first landing)."""
    target = fresh_target(work, "source-order")
    settle()
    timing, rss, _, first = ours(source, target, target.folder / "save", watch_first=True,
                                 options=("--order", "source"))
    check_copy(source, target, deep)
    discard(target)
    return timing, rss, first


def run(corpora: list[str], repeat: int, scale: str, work: Path, cache: Path) -> list[str]:
    lines: list[str] = []
    measures = []
    deep = scale == "smoke"
    for kind in corpora:
        files = generate(kind, scale, cache)
        source = OrthancServer(work / f"source-{kind}", "SOURCE").start()
        try:
            load(source, files)
            statistics = source.get("/statistics")
            measure = Measure(kind, statistics["CountInstances"],
                              int(statistics["TotalUncompressedSize"]))
            timed = kind not in SCALE_CORPORA
            for number in range(repeat if timed else 1):
                if timed:
                    target = fresh_target(work, "push")
                    settle()
                    measure.push.append(push(source, target, kind in PUSH_PER_STUDY))
                    check_copy(source, target, deep)
                    discard(target)
                if kind in ORDER_CORPORA and number == 0:
                    measure.source_order.append(source_order(source, work, deep))
                target = fresh_target(work, "ours")
                save = target.folder / "save"
                settle()
                timing, rss, _, first = ours(source, target, save, watch_first=True)
                measure.ours.append(timing)
                measure.rss_kb.append(rss)
                if first is not None:
                    measure.first_landing.append(first)
                check_copy(source, target, deep)
                if number == 0 and kind in RERUN_CORPORA:
                    measure.rerun = rerun_nothing(source, target, save, work)
                discard(target)
                if kind in ORDER_CORPORA:
                    measure.source_order.append(source_order(source, work, deep))
                if kind in FLOOR_CORPORA:
                    target = fresh_target(work, "floor")
                    measure.floor.append(floor(source, target))
                    check_copy(source, target, deep)
                    discard(target)
            measures.append(measure)
        finally:
            discard(source)
    lines.append(f"machine: {platform.node() or '?'}, {os.cpu_count()} cores, "
                 f"{platform.python_implementation()} {platform.python_version()}, "
                 f"Orthanc {OrthancServer.version_of()}, {time.strftime('%Y-%m-%d')}")
    lines.append("")
    lines.append("| corpus | instances | size | push (best) | replicate.py (best) | ratio | "
                 "peak RSS | first landing |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for measure in measures:
        best_ours = best(measure.ours)
        push_text, ratio = "-", "-"
        if measure.push:
            best_push = best(measure.push)
            push_text = f"{best_push.seconds:.2f} s"
            ratio = f"{best_ours.seconds / best_push.seconds:.2f}"
        landing = f"{min(measure.first_landing):.2f} s" if measure.first_landing else "-"
        lines.append(f"| {measure.corpus} | {measure.instances:,} | "
                     f"{replicate.format_bytes(measure.size)} | {push_text} | "
                     f"{best_ours.seconds:.2f} s | {ratio} | "
                     f"{max(measure.rss_kb) / 1024:.0f} MB | {landing} |")
    lines.append("")
    lines.append("all times: " + "; ".join(
        f"{m.corpus} push {', '.join(f'{t.seconds:.2f}' for t in m.push) or '-'} / ours "
        f"{', '.join(f'{t.seconds:.2f}' for t in m.ours)}" for m in measures))
    lines.append("")
    lines.append("where the time goes (best run of each; CPU seconds of each process):")
    lines.append("")
    lines.append("| corpus | run | wall | source CPU | target CPU | replicate.py CPU | "
                 "wall / push | wall / floor | replicate.py CPU per instance, per GB |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for measure in measures:
        push_seconds = best(measure.push).seconds if measure.push else None
        floor_seconds = best(measure.floor).seconds if measure.floor else None
        for name, timings in (("push", measure.push), ("replicate.py", measure.ours),
                              ("target ingestion alone", measure.floor)):
            if not timings:
                continue
            timing = best(timings)
            per = "-"
            if name == "replicate.py":
                per = (f"{timing.client_cpu / measure.instances * 1e6:.0f} µs, "
                       f"{timing.client_cpu / (measure.size / 1e9):.1f} s")
            lines.append(
                f"| {measure.corpus} | {name} | {timing.seconds:.2f} s | "
                f"{timing.source_cpu:.1f} | {timing.target_cpu:.1f} | {timing.client_cpu:.1f} | "
                + (f"{timing.seconds / push_seconds:.2f}" if push_seconds else "-") + " | "
                + (f"{timing.seconds / floor_seconds:.2f}" if floor_seconds else "-")
                + f" | {per} |")
    lines.append("")
    for measure in measures:
        for label, rerun in measure.rerun.items():
            lines.append(f"{measure.corpus} re-run with nothing to copy, {label}: "
                         f"{rerun.seconds:.2f} s = "
                         f"{rerun.seconds / best(measure.ours).seconds * 100:.1f}% of a full "
                         f"copy, peak RSS {rerun.rss_kb / 1024:.0f} MB, "
                         f"{rerun.source_requests} requests to the source, "
                         f"{rerun.target_requests} to the target, {rerun.posts} POSTs to the "
                         "target")
        if measure.source_order:
            timing, rss, first = min(measure.source_order, key=lambda run: run[0].seconds)
            newest = measure.ours[0]
            lines.append(
                f"{measure.corpus} newest first (default) against --order source (the quicker "
                "of the runs before and after it, "
                + ", ".join(f"{run[0].seconds:.2f} s" for run in measure.source_order) + "): "
                f"{newest.seconds:.2f} s / {timing.seconds:.2f} s = "
                f"{newest.seconds / timing.seconds:.3f}; peak RSS "
                f"{measure.rss_kb[0] / 1024:.1f} / {rss / 1024:.1f} MB; first landing "
                + " / ".join("-" if value is None else f"{value:.2f} s"
                             for value in (measure.first_landing[0] if measure.first_landing
                                           else None, first))
                + f"; CPU of replicate.py {newest.client_cpu:.1f} / {timing.client_cpu:.1f} s, "
                f"of the source {newest.source_cpu:.1f} / {timing.source_cpu:.1f} s")
        if "--recheck" in measure.rerun and "--check --recheck" in measure.rerun:
            lines.append(f"{measure.corpus} --check --recheck / --recheck: "
                         f"{measure.rerun['--check --recheck'].seconds / measure.rerun['--recheck'].seconds:.2f}")
    return lines


def sources_for(cases: list, prefix: str, scale: str, work: Path,
                cache: Path) -> Iterator[tuple[tuple, OrthancServer]]:
    """Each case with a source loaded with its corpus (the case's first field): cases of one
    corpus follow each other, so each corpus is loaded once; each source goes when its cases
    are done, or when the caller stops."""
    source: Optional[OrthancServer] = None
    loaded = ""
    try:
        for case in cases:
            if case[0] != loaded:
                if source is not None:
                    discard(source)
                source = OrthancServer(work / f"{prefix}-source-{case[0]}", "SOURCE").start()
                loaded = case[0]
                load(source, generate(case[0], scale, cache))
            yield case, source
    finally:
        if source is not None:
            discard(source)


# ---- across a distant link ------------------------------------------------------------------
WAN_RATE = 25e6  # bytes a second each way
WAN_DEPTH = 4 * 1024 * 1024  # bytes a connection may have queued on a deep link
# (corpus, the server behind the link, round trip in seconds, bytes a second each way, the
# link's queue: "fair" or "deep" (see tests/linkproxy.py), Orthanc's push timed too)
WAN_CASES = [("mixed", "source", 0.020, WAN_RATE, "fair", True),
             ("mixed", "target", 0.080, WAN_RATE, "fair", True),
             ("mixed", "target", 0.080, WAN_RATE, "deep", False),
             ("mixed", "target", 0.002, 10e6, "deep", False),
             ("varied", "source", 0.080, WAN_RATE, "fair", True),
             ("varied", "target", 0.080, WAN_RATE, "fair", False),
             ("tiny", "source", 0.080, WAN_RATE, "fair", True)]
WAN_PUSH_LIMIT = 120.0  # seconds of Orthanc's push across the link before it is projected


def wan(scale: str, work: Path, cache: Path, push_limit: float = WAN_PUSH_LIMIT) -> list[str]:
    """Each case of WAN_CASES with default options, one server behind tests/linkproxy.py:
    replicate.py's time against the link's floor (the bytes over the rate), and Orthanc's
    push across the same link for reference. Tiny is also timed without the link, in the
    same run: there the link is not what limits, and the goal is to lose nothing to it."""
    from linkproxy import LinkProxy
    deep = scale == "smoke"
    lines = ["| corpus | behind the link | round trip | rate | queue | size | link floor | "
             "replicate.py | / floor | link bytes / size | peak RSS | replicate.py CPU | "
             "target CPU | Orthanc's push |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    notes = []
    with closing(sources_for(WAN_CASES, "wan", scale, work, cache)) as cases:
        for (corpus, side, rtt, rate, queue, timed_push), source in cases:
            size = int(source.get("/statistics")["TotalUncompressedSize"])
            link_floor = size / rate
            depth = WAN_DEPTH if queue == "deep" else None

            target = fresh_target(work, "wan-ours")
            proxy = LinkProxy((source if side == "source" else target).port, rtt, rate, depth)
            urls = ((proxy.url, target.url) if side == "source" else (source.url, proxy.url))
            settle()
            timing, rss, _, _ = ours(source, target, target.folder / "save", urls=urls)
            moved = proxy.up.moved + proxy.down.moved
            proxy.close()
            check_copy(source, target, deep)
            discard(target)
            if corpus == "tiny":
                target = fresh_target(work, "wan-local")
                settle()
                local, _, _, _ = ours(source, target, target.folder / "save")
                check_copy(source, target, deep)
                discard(target)
                notes.append(f"{corpus}, source {rtt * 1000:.0f} ms away: {timing.seconds:.2f} "
                             f"s; without the link, same run: {local.seconds:.2f} s -> "
                             f"{timing.seconds / local.seconds:.2f}")
            # The push goes from the source to the target: the link sits in front of the
            # target whichever side the case puts it on, and carries the same bytes.
            push_text = "-"
            if timed_push:
                target = fresh_target(work, "wan-push")
                proxy = LinkProxy(target.port, rtt, rate, depth)
                settle()
                pushed = push(source, target, corpus in PUSH_PER_STUDY, peer_url=proxy.url,
                              limit=push_limit)
                proxy.close()
                if pushed.share >= 1:
                    check_copy(source, target, deep)
                    push_text = f"{pushed.seconds:.1f} s ({pushed.seconds / link_floor:.2f}x)"
                else:
                    projected = pushed.seconds / max(pushed.share, 1e-6)
                    push_text = (f"cut at {pushed.seconds:.0f} s, {pushed.share:.0%} done: "
                                 f"about {projected:.0f} s ({projected / link_floor:.1f}x)")
                discard(target)
            lines.append(f"| {corpus} | {side} | {rtt * 1000:.0f} ms | {rate / 1e6:.0f} MB/s | "
                         f"{queue} | {replicate.format_bytes(size)} | {link_floor:.2f} s | "
                         f"{timing.seconds:.2f} s | {timing.seconds / link_floor:.2f} | "
                         f"{moved / size:.2f} | {rss / 1024:.0f} MB | "
                         f"{timing.client_cpu:.1f} s | {timing.target_cpu:.1f} s | {push_text} |")
    return ["across a link (tests/linkproxy.py), default options; link bytes count both "
            "directions:", ""] + lines + [""] + notes


# ---- a target larger than this machine -------------------------------------------------------
# (corpus, bytes a second a connection, bytes a second in all): the target behind
# tests/linkproxy.py's CappedProxy, a many-core server or a small cluster. Mixed holds two
# files of 63 MB, which take 21 s through one connection at 3 MB/s whatever else happens:
# its floor is that when it is more than the bytes over the total rate.
CAPPED_CASES = [("varied", 3e6, 24e6), ("varied", 3e6, 40e6), ("mixed", 3e6, 24e6),
                ("mixed", 3e6, 40e6)]


def capped(scale: str, work: Path, cache: Path, baseline: Optional[str],
           repeat: int) -> list[str]:
    """Each case of CAPPED_CASES with default options (and `baseline`'s, if given): time
    against the cap's floor (the bytes over the total rate, or the largest file over one
    connection's rate if longer), peak RSS, the tool's CPU, and the uploads in flight the
    run reports."""
    from linkproxy import CappedProxy
    lines = ["| corpus | a connection | in all | floor | script | time | / floor | peak RSS | "
             "tool CPU | uploads at once (at most) | why |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    with closing(sources_for(CAPPED_CASES, "capped", scale, work, cache)) as cases:
        for (corpus, per_connection, total), source in cases:
            size = int(source.get("/statistics")["TotalUncompressedSize"])
            largest = max(path.stat().st_size for path in generate(corpus, scale, cache))
            cap_floor = max(size / total, largest / per_connection)
            for _ in range(repeat):
                for label, script in (("this", SCRIPT), ("baseline", baseline)):
                    if script is None:
                        continue
                    target = fresh_target(work, "capped")
                    proxy = CappedProxy(target.port, per_connection, total)
                    report = target.folder / "report.json"
                    settle()
                    timing, rss, _, _ = ours(
                        source, target, target.folder / "save", urls=(source.url, proxy.url),
                        script=script, options=("--report", str(report)))
                    proxy.close()
                    check_copy(source, target, scale == "smoke")
                    link = json.loads(report.read_text()).get("link", {})
                    discard(target)
                    lines.append(
                        f"| {corpus} | {per_connection / 1e6:.0f} MB/s | {total / 1e6:.0f} MB/s "
                        f"| {cap_floor:.2f} s | {label} | {timing.seconds:.2f} s | "
                        f"{timing.seconds / cap_floor:.2f} | {rss / 1024:.0f} MB | "
                        f"{timing.client_cpu:.1f} s | {link.get('uploads_now', '-')} "
                        f"({link.get('uploads_in_flight_max', '-')}) | "
                        f"{link.get('uploads_why', '-')} |")
                    print(lines[-1], file=sys.stderr, flush=True)
    return ["a target larger than this machine (tests/linkproxy.py's CappedProxy), default "
            "options:", ""] + lines


RERUN_CORPORA = {"tiny", "scale20k", "scale", "onestudy"}
ORDER_CORPORA = {"scale20k", "scale"}  # also copied with --order source, to compare
COUNT_LUA = ('function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n'
             '  print("REQUEST-SEEN " .. method .. " " .. uri)\n'
             '  return true\nend\n')


# The re-runs with nothing to copy: a plain one, the cut-over's --delete, and the look at every
# study with and without --check (which must cost about the same: a check is a --recheck that
# writes nothing).
RERUNS = {"plain": (), "--delete": ("--delete",), "--recheck": ("--recheck",),
          "--check --recheck": ("--check", "--recheck")}


def rerun_nothing(source: OrthancServer, target: OrthancServer, save: Path,
                  work: Path) -> dict[str, Rerun]:
    """Restart both servers with a Lua script that logs every request; re-run with each of
    RERUNS, counting the requests of each."""
    script = work / "count.lua"
    script.write_text(COUNT_LUA)
    for server in (source, target):
        server.stop()
        server.config["LuaScripts"] = [str(script)]
        server.start()

    def seen(server: OrthancServer) -> int:
        return (server.folder / "orthanc.log").read_text().count("REQUEST-SEEN")
    reruns = {}
    for label, options in RERUNS.items():
        before = {server.name: seen(server) for server in (source, target)}
        posts_before = (target.folder / "orthanc.log").read_text().count(
            "REQUEST-SEEN POST /instances")
        timing, rss, _, _ = ours(source, target, save, options=options)
        posts = (target.folder / "orthanc.log").read_text().count(
            "REQUEST-SEEN POST /instances") - posts_before
        reruns[label] = Rerun(timing.seconds, rss, seen(source) - before["SOURCE"],
                              seen(target) - before["TARGET"], posts)
    for server in (source, target):
        server.stop()
        server.config.pop("LuaScripts")
        server.start()
    return reruns


# ---- --check as a sign-off -------------------------------------------------------------------
CHECK_RTT = 0.080  # the source's round trip in the check's distant case


def checks(scale: str, work: Path, cache: Path, baseline: Optional[str]) -> list[str]:
    """--check of the scale corpus against an empty target with the source next to the tool
    and 80 ms away (25 MB/s, tests/linkproxy.py), then of a complete target (copied by this
    replicate.py), with --recheck and without; each by this replicate.py and, next to the
    source, by `baseline` (another version's replicate.py) if given."""
    from linkproxy import LinkProxy
    source = OrthancServer(work / "check-source", "SOURCE").start()
    target = fresh_target(work, "check")
    lines = ["| --check of scale | replicate.py | baseline |", "| --- | ---: | ---: |"]
    try:
        load(source, generate("scale", scale, cache))
        save = target.folder / "save"

        def timed(script: str, urls: Optional[tuple[str, str]] = None,
                  options: tuple[str, ...] = ()) -> str:
            settle()
            timing, rss, _, _ = ours(source, target, save, urls=urls, script=script,
                                     options=("--check", *options), statuses=(0, 1))
            return (f"{timing.seconds:.2f} s (CPU: tool {timing.client_cpu:.1f}, source "
                    f"{timing.source_cpu:.1f} s; {rss / 1024:.0f} MB)")
        near = timed(SCRIPT)
        lines.append(f"| empty target, source next to the tool | {near} | "
                     f"{timed(baseline) if baseline else '-'} |")
        proxy = LinkProxy(source.port, CHECK_RTT, WAN_RATE, None)
        try:
            far = timed(SCRIPT, urls=(proxy.url, target.url))
        finally:
            proxy.close()
        lines.append(f"| empty target, source {CHECK_RTT * 1000:.0f} ms away | {far} | - |")
        ours(source, target, save)
        check_copy(source, target, scale == "smoke")
        for options, case in ((("--recheck",), "--recheck"), ((), "the save file trusted")):
            lines.append(f"| complete target, {case}, next to the tool | "
                         f"{timed(SCRIPT, options=options)} | "
                         f"{timed(baseline, options=options) if baseline else '-'} |")
    finally:
        discard(target)
        discard(source)
    return lines


JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def verifications(scale: str, work: Path, cache: Path) -> list[str]:
    """--verify of the mixed corpus' shape (with pixels that compress) on a target that
    stores it as it came, compared by MD5, and on one that re-encodes it to JPEG-LS
    lossless, compared by tags and decoded pixels (all of it, then --verify-sample 10):
    wall time and the CPU seconds of the tool and of each server, per GB of the source."""
    source = OrthancServer(work / "verify-source", "SOURCE").start()
    lines = ["| --verify of reencode | wall | CPU tool | CPU source | CPU target | "
             "per GB: wall, tool, source, target |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    try:
        load(source, generate("reencode", scale, cache))
        gigabytes = int(source.get("/statistics")["TotalUncompressedSize"]) / 1e9
        for case, config, options in (
                ("stored as it came, by MD5", {}, ()),
                ("re-encoded, tags and pixels", {"IngestTranscoding": JPEG_LS_LOSSLESS}, ()),
                ("re-encoded, --verify-sample 10", {"IngestTranscoding": JPEG_LS_LOSSLESS},
                 ("--verify-sample", "10"))):
            target = fresh_target(work, "verify", **config)
            try:
                save = target.folder / "save"
                ours(source, target, save)
                settle()
                timing, _, out, _ = ours(source, target, save, options=("--verify", *options))
                verified = next(line for line in out.splitlines()
                                if line.startswith("Verified:"))
                lines.append(
                    f"| {case} | {timing.seconds:.2f} s | {timing.client_cpu:.1f} s | "
                    f"{timing.source_cpu:.1f} s | {timing.target_cpu:.1f} s | "
                    f"{timing.seconds / gigabytes:.1f}, {timing.client_cpu / gigabytes:.1f}, "
                    f"{timing.source_cpu / gigabytes:.1f}, "
                    f"{timing.target_cpu / gigabytes:.1f} s |")
                lines.append(f"|   {verified.split(':', 1)[1].strip()} | | | | | |")
            finally:
                discard(target)
        lines.append(f"(source: {gigabytes:.2f} GB)")
    finally:
        discard(source)
    return lines


def watched(scale: str, work: Path, cache: Path, repeat: int) -> list[str]:
    """The mixed corpus copied with --status, its page, metrics and state read every second
    (as a Prometheus scrape and an open page would), against the same copy without, in turn:
    the tool's CPU seconds, pair by pair."""
    from orthanc import free_port
    source = OrthancServer(work / "status-source", "SOURCE").start()
    lines = ["| copy of mixed | without --status | with --status, read every second | "
             "ratio of tool CPU |", "| --- | ---: | ---: | ---: |"]
    ratios = []
    try:
        load(source, generate("mixed", scale, cache))
        for attempt in range(max(repeat, 3)):
            pair = []
            for status in (False, True):
                target = fresh_target(work, "status")
                port, stop, reads = free_port(), threading.Event(), [0]

                def scrape() -> None:
                    session = requests.Session()
                    while not stop.wait(1.0):
                        for path in ("/metrics", "/status.json", "/"):
                            try:
                                session.get(f"http://127.0.0.1:{port}{path}", timeout=5)
                                reads[0] += 1
                            except requests.RequestException:
                                pass
                scraper = threading.Thread(target=scrape)
                try:
                    settle()
                    scraper.start() if status else None
                    timing, _, _, _ = ours(source, target, target.folder / "save",
                                           options=("--status", str(port)) if status else ())
                    check_copy(source, target, scale == "smoke")
                finally:
                    stop.set()
                    scraper.join() if status else None
                    discard(target)
                pair.append((timing, reads[0]))
            (plain, _), (seen, count) = pair
            ratios.append(seen.client_cpu / max(plain.client_cpu, 1e-9))
            lines.append(f"| pair {attempt + 1} | {plain.client_cpu:.2f} s CPU, "
                         f"{plain.seconds:.2f} s | {seen.client_cpu:.2f} s CPU, "
                         f"{seen.seconds:.2f} s, {count} answers read | {ratios[-1]:.3f} |")
        ratios.sort()
        lines.append(f"| median | | | {ratios[len(ratios) // 2]:.3f} |")
    finally:
        discard(source)
    return lines


SOAK_RATE = 2.0  # instances a second arriving on the source
SOAK_STUDY = 20  # instances a study
SOAK_DELETE_EVERY = 300.0  # seconds between deletions of a study on the source
SOAK_SAMPLE = 10.0  # seconds between samples of the tool's memory
SOAK_STEADY = 180.0  # seconds after which the memory slope is taken
SOAK_LUA = ('function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n'
            f'  if username == "{USER}" then print("TOOL-REQUEST " .. method .. " " .. uri) end\n'
            '  return true\nend\n')
BENCH_USER = ("bench", "bench")  # the harness's own requests, which the Lua above leaves out


class Soak:
    """One --follow --delete --poll 2 of one script, with a steady stream of arrivals on its
    source and a study deleted there every SOAK_DELETE_EVERY seconds."""

    def __init__(self, label: str, script: str, work: Path) -> None:
        self.label, self.script = label, script
        folder = work / f"soak-{label}"
        folder.mkdir(parents=True)
        (folder / "count.lua").write_text(SOAK_LUA)
        users = {USER: PASSWORD, BENCH_USER[0]: BENCH_USER[1]}
        self.source, self.target = (
            OrthancServer(folder / role, role.upper(), users=users,
                          LuaScripts=[str(folder / "count.lua")]).start()
            for role in ("source", "target"))
        for server in (self.source, self.target):
            server.session.auth = BENCH_USER
        self.save = folder / "save"
        self.arrived: list[str] = []
        self.deletions: list[float] = []  # seconds each deletion took to reach the target
        self.memory: list[tuple[float, int]] = []  # (seconds since the start, RSS in KB)
        self.cpu = 0.0
        self.idle = (0.0, 0.0)  # requests to the source and the target an idle look
        self.process: Optional[subprocess.Popen] = None

    def start(self, base: list[Path]) -> None:
        self.source.upload(base)
        self.process = subprocess.Popen(
            [sys.executable, self.script, self.source.url, self.target.url, "--save",
             str(self.save), "--follow", "--delete", "--poll", "2", "-q", "--username", USER,
             "--password", PASSWORD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    def arrive(self, dataset_bytes: bytes) -> None:
        answer = self.source.session.post(self.source.url + "/instances", data=dataset_bytes,
                                          timeout=60)
        answer.raise_for_status()
        self.arrived.append(answer.json()["ID"])

    def delete_one(self, study: str) -> None:
        self.source.session.delete(f"{self.source.url}/studies/{study}",
                                   timeout=60).raise_for_status()
        started = time.monotonic()

        def watch() -> None:  # a session of its own: requests' are not shared by threads
            session = self.target.new_session()
            session.auth = BENCH_USER
            while time.monotonic() - started < 600:
                try:
                    if session.get(f"{self.target.url}/studies/{study}",
                                   timeout=60).status_code == 404:
                        self.deletions.append(time.monotonic() - started)
                        return
                except requests.ConnectionError:
                    pass  # a kept-alive connection the server closed: asked again
                time.sleep(1)
            self.deletions.append(float("inf"))
        threading.Thread(target=watch, daemon=True).start()

    def sample(self, elapsed: float) -> None:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                self.memory.append((elapsed, int(line.split()[1])))
        self.cpu = cpu_seconds(self.process.pid)

    def requests(self) -> tuple[int, int]:
        return tuple((server.folder / "orthanc.log").read_text(  # type: ignore[return-value]
            errors="replace").count("TOOL-REQUEST") for server in (self.source, self.target))

    def lags(self) -> list[float]:
        """Target ReceptionDate minus source ReceptionDate, seconds, of each arrival."""
        found = []
        for instance in self.arrived:
            stamps = []
            for server in (self.source, self.target):
                answer = server.session.get(
                    f"{server.url}/instances/{instance}/metadata/ReceptionDate", timeout=60)
                if answer.status_code != 200:
                    break
                stamps.append(time.mktime(time.strptime(answer.text.strip(), "%Y%m%dT%H%M%S")))
            if len(stamps) == 2:
                found.append(stamps[1] - stamps[0])
        return found

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)
            self.process.communicate(timeout=120)
        for server in (self.source, self.target):
            discard(server)


def slope(samples: list[tuple[float, int]]) -> float:
    """KB a second, least squares over `samples` of (seconds, KB)."""
    if len(samples) < 2:
        return 0.0
    mean_x = sum(x for x, _ in samples) / len(samples)
    mean_y = sum(y for _, y in samples) / len(samples)
    spread = sum((x - mean_x) ** 2 for x, _ in samples)
    return sum((x - mean_x) * (y - mean_y) for x, y in samples) / spread if spread else 0.0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def soak(minutes: float, work: Path, cache: Path, baseline: Optional[str],
         scale: str) -> list[str]:
    """--follow --delete --poll 2 for `minutes` (and `baseline`'s beside it, on servers of its
    own, at the same time) while SOAK_RATE instances a second arrive on each source in studies
    of SOAK_STUDY and a study is deleted there every SOAK_DELETE_EVERY seconds: the tool's
    memory over time and its slope once steady, the lag of each arrival, how long each
    deletion took to reach the target, the tool's CPU per arrival, the requests each server
    received in an idle minute at the end, and the save file against the studies it records."""
    from dicomgen import make_instance, write_dicom
    from pydicom.uid import generate_uid
    base = generate("scale20k" if scale == "full" else "tiny", scale, cache)[:400]
    full = scale == "full"
    sample_every, steady_from, settle_for, idle_for = (SOAK_SAMPLE, SOAK_STEADY, 15, 60) if full \
        else (2, 0, 5, 10)
    soaks = [Soak("this", SCRIPT, work)] + ([Soak("baseline", baseline, work)] if baseline
                                            else [])
    lines: list[str] = []
    try:
        for run_ in soaks:
            run_.start(base)
        started = time.monotonic()
        duration = minutes * 60
        arrivals = 0
        next_delete = started + SOAK_DELETE_EVERY / 2
        next_sample = started
        study_uid, series_uid = generate_uid(), generate_uid()
        while time.monotonic() - started < duration:
            now = time.monotonic()
            if now >= next_sample:
                for run_ in soaks:
                    run_.sample(now - started)
                next_sample += sample_every
            if now >= next_delete:
                victims = sorted(soaks[0].source.get("/studies"))
                for run_ in soaks:
                    run_.delete_one(victims[0])
                next_delete += SOAK_DELETE_EVERY
            if arrivals % SOAK_STUDY == 0:
                study_uid, series_uid = generate_uid(), generate_uid()
            buffer = io.BytesIO()
            dataset = make_instance(f"SOAK{arrivals // SOAK_STUDY}", study_uid, series_uid,
                                    arrivals % SOAK_STUDY + 1, rows=64, columns=64)
            write_dicom(dataset, buffer)
            for run_ in soaks:
                run_.arrive(buffer.getvalue())
            arrivals += 1
            time.sleep(max(0.0, started + arrivals / SOAK_RATE - time.monotonic()))
        time.sleep(settle_for)  # the last arrivals land
        idle = [run_.requests() for run_ in soaks]
        time.sleep(idle_for)
        for run_, before in zip(soaks, idle):
            after = run_.requests()
            looks = idle_for / 2  # --poll 2
            run_.idle = ((after[0] - before[0]) / looks, (after[1] - before[1]) / looks)
            run_.sample(time.monotonic() - started)
        lines += ["| script | minutes | arrivals | on the target, of those the source kept | "
                  "RSS first, last | slope after "
                  "3 min | per 1,000 arrivals | lag p50 / p95 / max | deletions reached the "
                  "target after | tool CPU per arrival | requests per idle look (source, "
                  "target) | save file lines, bytes, studies |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: "
                  "| ---: |"]
        for run_ in soaks:
            steady = [(x, y) for x, y in run_.memory if x >= steady_from]
            per_second = slope(steady)  # KB a second
            present, kept = run_.target.instances(), run_.source.instances()
            landed = sum(1 for instance in run_.arrived if instance in present)
            wanted = sum(1 for instance in run_.arrived if instance in kept)
            lags = run_.lags()
            text = run_.save.read_text()
            studies = len({line.split("\t")[1] for line in text.splitlines()
                           if line.startswith("study\t")})
            lines.append(
                f"| {run_.label} | {minutes:g} | {len(run_.arrived)} | {landed} of {wanted} | "
                f"{run_.memory[0][1] / 1024:.1f}, {run_.memory[-1][1] / 1024:.1f} MB | "
                f"{per_second * 3600 / 1024:+.2f} MB/h | "
                f"{per_second / SOAK_RATE * 1000 / 1024:+.3f} MB | "
                f"{percentile(lags, 0.5):.0f} / {percentile(lags, 0.95):.0f} / "
                f"{max(lags, default=float('nan')):.0f} s | "
                f"{', '.join(f'{seconds:.0f} s' for seconds in run_.deletions)} | "
                f"{run_.cpu / max(1, len(run_.arrived)) * 1000:.1f} ms | "
                f"{run_.idle[0]:.1f}, {run_.idle[1]:.1f} | "
                f"{len(text.splitlines())}, {len(text.encode())}, {studies} |")
            lines.append(f"  {run_.label} RSS samples (minute: MB): " + ", ".join(
                f"{x / 60:.0f}: {y / 1024:.1f}" for x, y in run_.memory[::6]))
    finally:
        for run_ in soaks:
            run_.stop()
    return [f"--follow --delete --poll 2 under {SOAK_RATE:g} arrivals a second (studies of "
            f"{SOAK_STUDY}, 64 x 64), a deletion every {SOAK_DELETE_EVERY / 60:g} min:", ""] + lines


YEAR_STUDIES = 125_000  # an archive's studies when the year of following begins
YEAR_LOOKS = 365 * 10_000  # looks that copied something: 20,000 instances a day, 2 a look
OPEN_JOURNAL = """
import sys, time
sys.path.insert(0, sys.argv[1])
import replicate
started = time.monotonic()
journal = replicate.Journal(replicate.Path(sys.argv[2]), "http://old:8042",
                            "http://new:8042").open()
journal.close()
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(f"{time.monotonic() - started:.2f} {peak} {len(journal.studies)}")
"""  # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's, which holds the file


def save_file_year(work: Path, baseline: Optional[str], scale: str) -> list[str]:
    """A save file as a year of --follow writes it (YEAR_STUDIES studies, then YEAR_LOOKS looks
    that each take a study back, mark the log, record the study and the log's position) opened
    by each script as a restart opens it: seconds, peak RSS, and the file after. Then this
    script's second restart, on what its first left."""
    factor = 1 if scale == "full" else 1000
    path = work / "year.save"
    with open(path, "w", encoding="utf-8") as file:
        file.write(f"{replicate.SAVE_MAGIC}\tsource=http://old:8042\ttarget=http://new:8042\n")
        studies = [f"{number:08x}-00000000-00000000-00000000-00000000"
                   for number in range(YEAR_STUDIES // factor)]
        file.writelines(f"study\t{study}\t40\t0\t2025-01-01T00:00:00\t20240101\n"
                        for study in studies)
        for look in range(YEAR_LOOKS // factor):
            study = studies[-1 - (look // 10) % len(studies)]
            file.write(f"redo\t{study}\nmark\t{look * 8}\t{study}\n"
                       f"study\t{study}\t40\t0\t2025-06-01T00:00:00\t20250601\n"
                       f"changes\t{look * 8}\n")
    original = path.read_bytes()
    lines = ["| script | restart | lines before | seconds | peak RSS | lines after | bytes after |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, script in (("baseline", baseline), ("this", SCRIPT)):
        if script is None:
            continue
        path.write_bytes(original)
        for restart in ("first", "second") if label == "this" else ("first",):
            before = len(path.read_bytes().splitlines())
            answer = subprocess.run([sys.executable, "-c", OPEN_JOURNAL,
                                     str(Path(script).resolve().parent), str(path)],
                                    capture_output=True, text=True, check=True)
            seconds, rss, _ = answer.stdout.split()
            after = path.read_bytes()
            lines.append(f"| {label} | {restart} | {before:,} | {seconds} s | "
                         f"{int(rss) / 1024:.0f} MB | {len(after.splitlines()):,} | "
                         f"{len(after):,} |")
            print(lines[-1], file=sys.stderr, flush=True)
    path.unlink()
    return [f"a save file of a year of --follow ({YEAR_STUDIES // factor:,} studies, "
            f"{YEAR_LOOKS // factor:,} looks that copied something), opened by a restart:",
            ""] + lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="replicate.py against Orthanc's push")
    parser.add_argument("--corpora",
                        default="mixed,tiny,big,scale20k,scale,onestudy,wan,capped,check",
                        help="comma-separated; wan is the cases across a distant link, capped "
                             "those into a target larger than this machine, check the --check "
                             "of the scale corpus, soak a --follow under arrivals for "
                             "--minutes, savefile a restart on a year of following, verify "
                             "--verify into a target that re-encodes, status a copy watched "
                             "through --status (these four not in the default) (default: all "
                             "but soak, savefile, verify and status)")
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="how long the soak part follows (default: 20)")
    parser.add_argument("--baseline", default=None, metavar="SCRIPT",
                        help="another version's replicate.py, timed beside this one in the "
                             "capped and check parts (default: none)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each (default: 2)")
    parser.add_argument("--scale", choices=("full", "smoke"), default="full",
                        help="full corpora or seconds-long ones (default: full)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "replicate-bench"),
                        help="where generated corpora are kept between runs "
                             "(default: $TMPDIR/replicate-bench)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="replicate-bench-run-"))
    try:
        corpora = args.corpora.split(",")
        local = [corpus for corpus in corpora
                 if corpus not in ("wan", "check", "capped", "soak", "savefile", "verify",
                                   "status")]
        lines = run(local, args.repeat, args.scale, work, Path(args.cache)) if local else []
        if "wan" in corpora:
            lines += [""] + wan(args.scale, work, Path(args.cache))
        if "capped" in corpora:
            lines += [""] + capped(args.scale, work, Path(args.cache), args.baseline,
                                   args.repeat)
        if "check" in corpora:
            lines += [""] + checks(args.scale, work, Path(args.cache), args.baseline)
        if "savefile" in corpora:
            lines += [""] + save_file_year(work, args.baseline, args.scale)
        if "verify" in corpora:
            lines += [""] + verifications(args.scale, work, Path(args.cache))
        if "status" in corpora:
            lines += [""] + watched(args.scale, work, Path(args.cache), args.repeat)
        if "soak" in corpora:
            lines += [""] + soak(args.minutes, work, Path(args.cache), args.baseline,
                                 args.scale)
        for line in lines:
            print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
