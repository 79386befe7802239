"""Across a distant link (tests/linkproxy.py between the tool and one server): the tool finds
the link's round trip, keeps more downloads and checks in flight than it has workers, and
fetches bundles as the source's archives only where those were measured to shrink. The
speed itself is the benchmark's `wan` part, not asserted here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

import replicate
from dicomgen import write_corpus
from linkproxy import LinkProxy
from orthanc import PASSWORD, USER, OrthancServer
from test_replicate import run

RTT = 0.06  # seconds
RATE = 50e6  # bytes a second each way


@pytest.fixture(scope="module")
def middle_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """240 instances of about 51 KB in 4 studies (ZIPs the tool builds: above the size the
    source's archives take by default), with random pixels or with pixels that deflate to
    about half."""
    folder = tmp_path_factory.mktemp("middle")
    return {pixels: write_corpus(folder / pixels, 4, 2, 30, rows=160, columns=160,
                                 prefix=pixels[0].upper(), pixels=pixels)
            for pixels in ("random", "smooth")}


def copy_across(capsys: pytest.CaptureFixture, make_server, files: list[Path],
                target: OrthancServer, tmp_path: Path, distant: Optional[str],
                *extra: str, depth: Optional[int] = None, moved: Optional[list] = None,
                rtt: float = RTT, rate: float = RATE) -> dict:
    """Copy `files`, loaded into a new source, to `target` with the `distant` server
    ("source", "target" or None) behind the link (a deep queue of `depth` bytes a
    connection, if given); check that the copy is whole and return the run's report. The
    bytes that crossed the link towards the distant server go to `moved`."""
    source = make_server("SOURCE")
    source.upload(files)
    urls = [source.url, target.url]
    proxy = None
    if distant is not None:
        proxy = LinkProxy((source if distant == "source" else target).port, rtt, rate, depth)
        urls[0 if distant == "source" else 1] = proxy.url
    report = tmp_path / "report.json"
    try:
        code, out, err = run(capsys, [*urls, "--username", USER, "--password", PASSWORD,
                                      "--save", str(tmp_path / "save"), "--report",
                                      str(report), "--verify", "-q", *extra])
    finally:
        if proxy is not None:
            proxy.close()
            if moved is not None:
                moved.append(proxy.up.moved)
    assert code == 0, err
    assert target.instances() == source.instances()
    answer = json.loads(report.read_text())
    assert answer["verified"] == len(files) and answer["verify_problems"] == []
    return answer


def test_a_distant_source_gets_more_downloads_and_checks_in_flight(
        make_server, middle_corpus, target, tmp_path, capsys) -> None:
    link = copy_across(capsys, make_server, middle_corpus["random"], target, tmp_path,
                       "source")["link"]
    assert link["source_latency_ms"] >= RTT * 1000
    assert link["target_latency_ms"] < RTT * 1000
    # 4 workers: more than 4 files at once means the pace grew with the round trip.
    assert link["downloads_in_flight_max"] > 4
    # Random pixels do not shrink: archives only as samples, and the last one said so.
    assert link["archive_ratio"] > replicate.ARCHIVE_WORTH
    assert link["bundles"] >= 3
    assert link["bundles_as_archives"] <= 1 + link["bundles"] // 10


def test_threads_given_caps_what_is_in_flight(make_server, middle_corpus, target, tmp_path,
                                              capsys) -> None:
    link = copy_across(capsys, make_server, middle_corpus["random"], target, tmp_path,
                       "source", "--threads", "3")["link"]
    assert link["downloads_in_flight_max"] <= 3
    assert link["checks_in_flight_max"] <= 2


def test_bundles_from_a_distant_source_travel_as_archives_when_they_shrink(
        make_server, middle_corpus, target, tmp_path, capsys) -> None:
    link = copy_across(capsys, make_server, middle_corpus["smooth"], target, tmp_path,
                       "source")["link"]
    assert link["archive_ratio"] <= replicate.ARCHIVE_WORTH
    # 240 files of 51 KB make 3 or more bundles of at most 4 MB: all but those that began
    # while the first sample was being measured are archives.
    assert link["bundles"] >= 3
    assert link["bundles_as_archives"] >= link["bundles"] - 3


def test_next_to_the_source_nothing_is_deflated_and_one_download_a_worker(
        make_server, middle_corpus, target, tmp_path, capsys) -> None:
    link = copy_across(capsys, make_server, middle_corpus["smooth"], target, tmp_path,
                       None)["link"]
    assert link["bundles_as_archives"] == 0
    assert link["downloads_in_flight_max"] <= 4


def test_a_distant_target(make_server, middle_corpus, target, tmp_path, capsys) -> None:
    link = copy_across(capsys, make_server, middle_corpus["random"], target, tmp_path,
                       "target")["link"]
    assert link["target_latency_ms"] >= RTT * 1000
    assert link["bundles_as_archives"] == 0


def test_a_distant_target_gets_deflated_uploads_where_they_shrink(make_server, middle_corpus,
                                                                  target, tmp_path,
                                                                  capsys) -> None:
    files = middle_corpus["smooth"]
    moved: list[int] = []
    link = copy_across(capsys, make_server, files, target, tmp_path, "target",
                       moved=moved)["link"]
    assert link["upload_ratio"] <= replicate.ARCHIVE_WORTH
    assert link["uploads_deflated"] >= 3
    assert moved[0] < 0.8 * sum(path.stat().st_size for path in files)


def test_random_pixels_go_to_a_distant_target_as_they_are_but_for_samples(
        make_server, middle_corpus, target, tmp_path, capsys) -> None:
    link = copy_across(capsys, make_server, middle_corpus["random"], target, tmp_path,
                       "target")["link"]
    assert link["upload_ratio"] > replicate.ARCHIVE_WORTH
    assert link["uploads_deflated"] <= 1 + link["bundles"] // 10


def test_next_to_the_target_no_upload_is_deflated(make_server, middle_corpus, target,
                                                  tmp_path, capsys) -> None:
    link = copy_across(capsys, make_server, middle_corpus["smooth"], target, tmp_path,
                       "source")["link"]
    assert link["uploads_deflated"] == 0 and link["upload_ratio"] is None


def test_behind_a_deep_queue_no_upload_is_sent_twice(make_server, target, tmp_path,
                                                     capsys) -> None:
    """A FIFO of 4 MB a connection at 10 MB/s holds the uploads' first bytes for more than
    Orthanc's keep-alive of about a second: an upload on a kept-alive connection would find
    it closed when it arrives, and cross the link again. 6 MB bundles of random pixels,
    12 of them, 4 workers."""
    files = write_corpus(tmp_path / "deep", 6, 2, 16, rows=256, columns=256, prefix="Q")
    moved: list[int] = []
    link = copy_across(capsys, make_server, files, target, tmp_path, "target", "-v",
                       depth=4 * 1024 * 1024, moved=moved, rtt=0.002, rate=10e6)["link"]
    size = sum(path.stat().st_size for path in files)
    assert link["bytes_sent_again"] == 0
    assert moved[0] <= 1.02 * size + 1_000_000  # the files once, and the requests around them
