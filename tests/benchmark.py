"""Benchmark replicate.py against Orthanc's own push (POST /peers/{peer}/store jobs).

Generates three corpora with pydicom, loads each into a source Orthanc, and times on fresh,
empty targets, alternately, Orthanc's push and replicate.py with default options. Prints a table
of best times, their ratio and replicate.py's peak RSS, then the re-run with nothing to copy on
the tiny corpus and what planning costs. Every copy is checked (instance IDs and sizes, and MD5s
in smoke mode). Not part of the pytest run, except for its smoke scale.

usage: python tests/benchmark.py [--corpora mixed,tiny,big] [--repeat 2] [--scale full|smoke]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import requests  # noqa: E402

import replicate  # noqa: E402
from dicomgen import write_corpus  # noqa: E402
from orthanc import PASSWORD, USER, OrthancServer  # noqa: E402

SCRIPT = str(HERE.parent / "replicate.py")

# corpus -> list of (studies, series, instances, rows, columns, frames)
CORPORA = {
    "full": {
        "mixed": [(40, 3, 25, 256, 256, 1), (2, 1, 1, 2048, 1024, 15)],
        "tiny": [(600, 2, 20, 8, 8, 1)],
        "big": [(3, 1, 1, 4096, 2048, 12)],
    },
    "smoke": {
        "mixed": [(2, 2, 4, 256, 256, 1), (1, 1, 1, 512, 512, 6)],
        "tiny": [(6, 2, 5, 8, 8, 1)],
        "big": [(1, 1, 1, 1024, 1024, 3)],
    },
}
PUSH_PER_STUDY = {"tiny"}  # one huge push job is pathologically slow; one job per study is fair
FLOOR_CORPORA = {"tiny"}  # where the target's own ingestion decides the time


@dataclass
class Timing:
    """One timed copy: wall seconds and the CPU seconds each process spent on it."""
    seconds: float
    source_cpu: float = 0.0
    target_cpu: float = 0.0
    client_cpu: float = 0.0


@dataclass
class Measure:
    corpus: str
    instances: int = 0
    size: int = 0
    push: list[Timing] = field(default_factory=list)
    ours: list[Timing] = field(default_factory=list)
    floor: list[Timing] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)


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
        for number, (studies, series, instances, rows, columns, frames) in \
                enumerate(CORPORA[scale][kind]):
            write_corpus(folder, studies, series, instances, rows, columns, frames,
                         prefix=f"{kind[0].upper()}{number}")
        marker.write_text("")
    return sorted(folder.glob("*.dcm"))


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
        session = server.new_session()
        session.post(server.url + "/instances", data=buffer.getvalue(),
                     timeout=600).raise_for_status()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, groups))
    server.upload(large)


def push(source: OrthancServer, target: OrthancServer, per_study: bool) -> Timing:
    source.session.put(f"{source.url}/peers/bench", json={
        "Url": target.url, "Username": USER, "Password": PASSWORD}, timeout=60).raise_for_status()
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
    """The target's own ingestion: the source's ZIPs of replicate.py's batch size, made in
    advance, posted with as many threads as replicate.py uses. No copier can beat this."""
    ids = source.get("/instances")
    step = replicate.BATCH_MAX_INSTANCES
    archives = [source.session.post(f"{source.url}/tools/create-archive", timeout=600,
                                    json={"Resources": ids[start:start + step]}).content
                for start in range(0, len(ids), step)]
    local = threading.local()

    def post(archive: bytes) -> None:
        if not hasattr(local, "session"):
            local.session = target.new_session()
        local.session.post(f"{target.url}/instances", data=archive,
                           timeout=600).raise_for_status()
    settle()
    clock = ServerClock(source, target)
    with ThreadPoolExecutor(replicate.Config.threads) as pool:
        list(pool.map(post, archives))
    return clock.stop()


def ours(source: OrthancServer, target: OrthancServer, save: Path) -> tuple[Timing, int, str]:
    """Run replicate.py with default options; (timing, peak RSS in KB, stdout).

    The peak is the child's VmHWM, polled every 20 ms: it is a high-water mark of the child's
    own memory, whereas wait4's ru_maxrss would start from this (much larger) parent's size.
    Its CPU is read at the same polls (the last 20 ms may be missed)."""
    clock = ServerClock(source, target)
    process = subprocess.Popen([sys.executable, SCRIPT, source.url, target.url, "--save",
                                str(save), "-q", "--username", USER, "--password", PASSWORD],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    if process.returncode != 0:
        raise RuntimeError(f"replicate.py exited {process.returncode}: {err}")
    return timing, peak, out


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


def count_requests(function: object, *args: object) -> tuple[object, int, int]:
    """Call `function` counting HTTP requests and the peak of traced Python memory."""
    counter = {"requests": 0}
    lock = threading.Lock()
    original = requests.Session.request

    def counting(self: requests.Session, *a: object, **k: object) -> requests.Response:
        with lock:
            counter["requests"] += 1
        return original(self, *a, **k)
    requests.Session.request = counting  # type: ignore[method-assign]
    tracemalloc.start()
    try:
        result = function(*args)  # type: ignore[operator]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        requests.Session.request = original  # type: ignore[method-assign]
    return result, counter["requests"], peak


def plan_cost(source: OrthancServer, target: OrthancServer) -> tuple[int, int, int]:
    """(requests, peak bytes, instances) of planning a full copy into `target`."""
    stop = threading.Event()
    policy = replicate.RetryPolicy()
    clients = [replicate.OrthancClient(replicate.Endpoint(role, server.url, USER, PASSWORD),
                                       policy, stop) for role, server in
               (("source", source), ("target", target))]
    for client in clients:
        client.check()
    plan, requests_made, peak = count_requests(replicate.scan, clients[0], clients[1], 4)
    return requests_made, peak, plan.source_instances  # type: ignore[attr-defined]


def run(corpora: list[str], repeat: int, scale: str, work: Path, cache: Path) -> list[str]:
    lines: list[str] = []
    measures = []
    deep = scale == "smoke"
    rerun = None
    planning = None
    unchanged = 0
    for kind in corpora:
        files = generate(kind, scale, cache)
        source = OrthancServer(work / f"source-{kind}", "SOURCE").start()
        try:
            load(source, files)
            statistics = source.get("/statistics")
            measure = Measure(kind, statistics["CountInstances"],
                              int(statistics["TotalUncompressedSize"]))
            for _ in range(repeat):
                target = fresh_target(work, "push")
                settle()
                measure.push.append(push(source, target, kind in PUSH_PER_STUDY))
                check_copy(source, target, deep)
                discard(target)
                target = fresh_target(work, "ours")
                save = target.folder / "save"
                settle()
                timing, rss, _ = ours(source, target, save)
                measure.ours.append(timing)
                measure.rss_kb.append(rss)
                check_copy(source, target, deep)
                if kind == "tiny" and rerun is None:
                    rerun = rerun_nothing(source, target, save, work)
                    unchanged = plan_cost(source, target)[0]
                    empty = fresh_target(work, "plan")
                    planning = plan_cost(source, empty)
                    discard(empty)
                discard(target)
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
                 "peak RSS |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for measure in measures:
        best_push, best_ours = best(measure.push), best(measure.ours)
        lines.append(f"| {measure.corpus} | {measure.instances:,} | "
                     f"{replicate.format_bytes(measure.size)} | {best_push.seconds:.2f} s | "
                     f"{best_ours.seconds:.2f} s | {best_ours.seconds / best_push.seconds:.2f} | "
                     f"{max(measure.rss_kb) / 1024:.0f} MB |")
    lines.append("")
    lines.append("all times: " + "; ".join(
        f"{m.corpus} push {', '.join(f'{t.seconds:.2f}' for t in m.push)} / ours "
        f"{', '.join(f'{t.seconds:.2f}' for t in m.ours)}" for m in measures))
    lines.append("")
    lines.append("where the time goes (best run of each; CPU seconds of each process):")
    lines.append("")
    lines.append("| corpus | run | wall | source CPU | target CPU | replicate.py CPU | "
                 "wall / push |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for measure in measures:
        push_seconds = best(measure.push).seconds
        for name, timings in (("push", measure.push), ("replicate.py", measure.ours),
                              ("target ingestion alone", measure.floor)):
            if timings:
                timing = best(timings)
                lines.append(f"| {measure.corpus} | {name} | {timing.seconds:.2f} s | "
                             f"{timing.source_cpu:.1f} | {timing.target_cpu:.1f} | "
                             f"{timing.client_cpu:.1f} | {timing.seconds / push_seconds:.2f} |")
    lines.append("")
    if rerun is not None and planning is not None:
        tiny = next(m for m in measures if m.corpus == "tiny")
        seconds, posts = rerun
        lines.append(f"tiny re-run with nothing to copy: {seconds:.2f} s = "
                     f"{seconds / best(tiny.ours).seconds * 100:.1f}% of a full copy, {posts} "
                     "POSTs to the target")
        requests_made, peak, instances = planning
        lines.append(f"planning a full copy of tiny: {requests_made} requests, peak traced "
                     f"memory {peak / instances:.0f} bytes per instance ({instances:,} instances)")
        lines.append(f"planning with nothing to copy: {unchanged} requests for both servers "
                     "together, whatever the corpus size")
    return lines


def rerun_nothing(source: OrthancServer, target: OrthancServer, save: Path,
                  work: Path) -> tuple[float, int]:
    """Restart the filled target with a Lua script that logs every POST, re-run, count them."""
    script = work / "count.lua"
    script.write_text('function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n'
                      '  if method == "POST" then print("POST-SEEN " .. uri) end\n'
                      '  return true\nend\n')
    target.stop()
    target.config["LuaScripts"] = [str(script)]
    target.start()
    timing, _, _ = ours(source, target, save)
    posts = (target.folder / "orthanc.log").read_text().count("POST-SEEN")
    return timing.seconds, posts


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="replicate.py against Orthanc's push")
    parser.add_argument("--corpora", default="mixed,tiny,big",
                        help="comma-separated (default: mixed,tiny,big)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each (default: 2)")
    parser.add_argument("--scale", choices=("full", "smoke"), default="full",
                        help="full corpora or seconds-long ones (default: full)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "replicate-bench"),
                        help="where generated corpora are kept between runs "
                             "(default: $TMPDIR/replicate-bench)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="replicate-bench-run-"))
    try:
        for line in run(args.corpora.split(","), args.repeat, args.scale, work,
                        Path(args.cache)):
            print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
