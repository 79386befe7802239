"""A run that can be watched: --status serves a page, Prometheus metrics and the run's state,
read by a real Prometheus (Debian's `prometheus`) and a real headless browser (Debian's
`chromium`); --report rewritten while the run goes on; a --follow's summary that counts each
instance and study once. Real Orthanc servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import requests

import replicate
from dicomgen import write_corpus
from orthanc import free_port, stop_gently, wait_until_ready
from test_replicate import CORPUS_SIZE, SCRIPT, args, slow_lua, summary_value

PROMETHEUS = "/usr/bin/prometheus"
CHROMIUM = "/usr/bin/chromium"
SECRET = "Pa55-w0rd-4a7c1e"  # the tool's password on both servers
TOKEN = "t0ken-value-93b2f"  # a header's value


def installed(binary: str) -> str:
    if not os.access(binary, os.X_OK):
        raise pytest.UsageError(f"{binary} is missing; bash .ci/run installs it")
    return binary


def wait_for(condition: Callable[[], object], seconds: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Prometheus:
    """A Prometheus server in a temp folder on a free port, scraping 127.0.0.1:`target` every
    second."""

    def __init__(self, folder: Path, target: int) -> None:
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n  - job_name: replicate\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n")
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "Prometheus":
        log = open(self.folder / "log", "ab")
        self.process = subprocess.Popen(
            [installed(PROMETHEUS), f"--config.file={self.folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()

        def ready() -> bool:
            try:
                return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False
        wait_until_ready(self.process, ready, "Prometheus", 60,
                         lambda: (self.folder / "log").read_text(errors="replace")[-2000:])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def value(self, query: str) -> Optional[float]:
        """The value of an instant query with one series, or None (none yet)."""
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": query},
                              timeout=10).json()
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop_gently(self.process, signal.SIGTERM, 30)


def tool(argv: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def get(port: int, path: str, **kwargs: object) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=10, **kwargs)


def raw(port: int, request: bytes) -> bytes:
    """What the status server answers to bytes sent as they are."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        return connection.recv(4096)


def live(port: int) -> dict:
    return get(port, "/status.json").json()["live"]


def test_prometheus_scrapes_the_copy_and_a_mirror_s_lag(make_server, tmp_path) -> None:
    source = make_server("SOURCE")
    source.upload(write_corpus(tmp_path / "first", 1, 2, 4, prefix="F"))
    # a target that takes a second for each instance: a look lasts long enough to be seen
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 1)])
    port = free_port()
    prometheus = Prometheus(tmp_path / "prometheus", port).start()
    process = tool(args(source, target, tmp_path / "save", "--follow", "--poll", "0.5",
                        "--no-metadata", "--status", str(port)))
    try:
        wait_for(lambda: len(target.instances()) == 8, 90, "the first pass")
        wait_for(lambda: prometheus.value("replicate_instances_copied_total") == 8, 60,
                 "Prometheus to scrape the copy")
        assert prometheus.value("replicate_instances_copied_total") == \
            len(target.instances())
        assert prometheus.value("replicate_follow_lag_seconds") == 0
        arrived: set[str] = set()
        for number in range(3):  # 3 studies of 3, arriving while the target is slow
            arrived |= set(source.upload(write_corpus(tmp_path / f"a{number}", 1, 1, 3,
                                                      prefix=f"A{number}")))
            time.sleep(1)
        wait_for(lambda: arrived <= target.instances(), 120, "the arrivals")
        wait_for(lambda: prometheus.value("replicate_instances_copied_total") == 17, 60,
                 "the arrivals' count")
        peak = prometheus.value("max_over_time(replicate_follow_lag_seconds[5m])")
        assert peak is not None and peak >= 2, peak  # it rose while the looks copied
        wait_for(lambda: prometheus.value("replicate_follow_lag_seconds") == 0, 30,
                 "the lag to fall back")
        look = prometheus.value("replicate_follow_last_look_seconds")
        assert look is not None and abs(time.time() - look) < 30
        assert prometheus.value('replicate_info{order="newest",follow="true"}') == 1
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        prometheus.stop()
    assert process.returncode == 130, err
    assert summary_value(out, "Copied:") == 17


def chromium_dom(url: str, folder: Path) -> tuple[str, str]:
    """The DOM of `url` after its scripts ran, and what Chromium logged (its console too)."""
    answer = subprocess.run(
        [installed(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={folder}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr[-2000:]
    return answer.stdout, answer.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if "CONSOLE" in line or "Uncaught" in line or "Content Security Policy" in line]


def test_the_page_in_a_browser_and_what_no_answer_shows(make_server, corpus, tmp_path) -> None:
    users = {"replicator": SECRET}
    source = make_server("SOURCE", users=users)
    source.upload(corpus)
    target = make_server("TARGET", users=users)
    port = free_port()
    argv = [source.url, target.url, "--username", "replicator", "--save",
            str(tmp_path / "save"), "--status", str(port), "--bwlimit", "300K",
            "--header", f"X-Site-Token: {TOKEN}", "--order", "newest"]
    process = tool(argv, REPLICATE_SOURCE_PASSWORD=SECRET, REPLICATE_TARGET_PASSWORD=SECRET)
    try:
        wait_for(lambda: process.poll() is not None or _answers(port), 30, "the status server")
        wait_for(lambda: process.poll() is not None or live(port)["years"], 30, "the years")
        dom, log = chromium_dom(f"http://127.0.0.1:{port}/", tmp_path / "chromium")
        assert process.poll() is None, "the copy ended before the page was read"
        answers = [get(port, path).text for path in ("/", "/metrics", "/status.json")]
        # hostile requests: each a 4xx, none disturbs the copy
        assert requests.post(f"http://127.0.0.1:{port}/status.json", data=b"x",
                             timeout=10).status_code == 405
        assert raw(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.0 400")
        assert raw(port, b"GET / HTTP/7.0\r\n\r\n").startswith(b"HTTP/1.0 400")
        assert raw(port, b"DELETE /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").startswith(
            b"HTTP/1.0 405")
        assert get(port, "/../../etc/passwd").status_code == 404
        assert get(port, "/", headers={"Host": "rebound.example"}).status_code == 400
        idle = socket.create_connection(("127.0.0.1", port))  # says nothing, stays open
        out, err = process.communicate(timeout=180)
        idle.close()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert target.md5s() == source.md5s()
    assert "<table id=\"where\">" in dom or "<table id=where>" in dom, dom[:2000]
    assert "Instances" in dom and "done of 29" in dom and "copying" in dom
    assert 'class="bar"' in dom and dom.count("<tr>") > 10  # the years, as bars
    assert "Pause" in dom and "running (--bwlimit 300K)" in dom
    assert console_errors(log) == [], console_errors(log)
    names = {f"Test^{path.stem.split('-')[0]}" for path in corpus} | {"Test^"}
    for answer in answers:
        assert SECRET not in answer and TOKEN not in answer
        assert not any(name in answer for name in names)
    assert "replicate_instances_copied_total" in answers[1]
    assert json.loads(answers[2])["live"]["instances"] == CORPUS_SIZE


def _answers(port: int) -> bool:
    try:
        return get(port, "/metrics").status_code == 200
    except requests.ConnectionError:
        return False


def test_a_run_started_inside_a_pause_says_so_and_until_when(source, target, tmp_path) -> None:
    hour = time.localtime().tm_hour
    window = f"{(hour - 1) % 24:02d}:00,pause {(hour + 2) % 24:02d}:00,off"
    port = free_port()
    process = tool(args(source, target, tmp_path / "save", "--status", str(port),
                        "--bwlimit", window))
    try:
        wait_for(lambda: process.poll() is not None or _answers(port), 30, "the status server")
        wait_for(lambda: live(port)["paused_until"], 30, "the pause")
        dom, log = chromium_dom(f"http://127.0.0.1:{port}/", tmp_path / "chromium")
        metrics = get(port, "/metrics").text
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    until = f"{(hour + 2) % 24:02d}:00"
    assert "<title>replicate.py: paused</title>" in dom
    assert "paused until" in dom and until in dom, dom[-3000:]
    assert "replicate_paused 1" in metrics
    assert console_errors(log) == []
    assert target.instances() == set()


def test_the_report_is_whole_json_while_the_copy_runs_and_its_counts_grow(
        make_server, source, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(replicate, "REPORT_EVERY", 0.3)
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.2)])
    report = tmp_path / "report.json"
    config = replicate.Config.from_argv(args(source, target, tmp_path / "save", "--report",
                                             str(report), "-q", "--threads", "1"))
    copier = threading.Thread(target=replicate.replicate, args=(config,))
    seen: list[tuple[float, int]] = []
    copier.start()
    try:
        while copier.is_alive():
            if report.exists():
                written = json.loads(report.read_text())  # whole, or this fails
                seen.append((written["seconds"], written["copied"]))
            time.sleep(0.02)
    finally:
        copier.join(120)
    final = json.loads(report.read_text())
    assert final["copied"] == CORPUS_SIZE and final["exit_status"] == 0
    during = {write for write in seen if write[1] < CORPUS_SIZE}
    assert len(during) >= 2, sorted(set(seen))  # written more than once while it ran
    assert seen == sorted(seen)  # its counts only grow


def test_a_follow_counts_each_arrival_and_each_study_once(make_server, tmp_path, capsys) -> None:
    source = make_server("SOURCE")
    source.upload(write_corpus(tmp_path / "first", 1, 1, 4, prefix="F"))
    target = make_server("TARGET")
    save = tmp_path / "save"
    config = replicate.Config.from_argv(args(source, target, save, "--follow", "--poll", "0.2",
                                             "--no-metadata"))
    stop = threading.Event()
    follower = threading.Thread(target=replicate.replicate, args=(config, stop))
    follower.start()
    try:
        wait_for(lambda: len(target.instances()) == 4, 60, "the first pass")
        studies = [write_corpus(tmp_path / f"s{number}", 1, 1, 4, prefix=f"N{number}")
                   for number in range(3)]
        for position in range(4):  # each study grows by one instance at each round
            for files in studies:
                source.upload([files[position]])
            wait_for(lambda: len(target.instances()) == 4 + 3 * (position + 1), 60,
                     "a round")
    finally:
        stop.set()
        follower.join(60)
    out = capsys.readouterr().out
    assert "To transfer:   16 instances in 4 studies" in out, out
    assert summary_value(out, "Copied:") == 16
    assert summary_value(out, "Already there:") == 0
