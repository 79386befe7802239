"""Failures by type: what one resource's failure costs (a count and a name), what ends the run
cleanly (an answer the tool cannot understand, a defect), and the metadata, confirmation and
resume paths where a server's odd answer used to end or skip a stage. Real servers, with an
HTTP proxy in front of one of them that answers some requests itself."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from pydicom.uid import generate_uid

import replicate
from dicomgen import make_instance, write_dicom
from faultproxy import Answer, AnswerProxy
from orthanc import PASSWORD, USER, OrthancServer, ephemeral_ports, free_port
from test_live import METADATA_CONFIG, fetch, put
from test_replicate import CORPUS_SIZE, args, journal_studies, run, summary_value

HTML = b"<html><head><title>Portal login</title></head><body>Sign in first</body></html>"


def urls(source: str, target: str, save: Path, *extra: str) -> list[str]:
    return [source, target, "--username", USER, "--password", PASSWORD, "--save", str(save),
            *extra]


class Once:
    """A rule that answers the `nth` request matching (method, path pattern), and no other;
    `armed` False passes everything on."""

    def __init__(self, method: str, pattern: str, answer: Answer, nth: int = 1,
                 every_after: bool = False,
                 until: Optional[Callable[[], bool]] = None) -> None:
        self.method, self.pattern, self.answer = method, re.compile(pattern), answer
        self.nth, self.every_after, self.seen, self.armed = nth, every_after, 0, True
        self.until = until  # a hit answers once this holds (waited for, 60 s at most)
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str) -> Optional[Answer]:
        if not self.armed or method != self.method or not self.pattern.fullmatch(path):
            return None
        with self.lock:
            self.seen += 1
            hit = self.seen == self.nth or (self.every_after and self.seen > self.nth)
        if hit and self.until is not None:
            deadline = time.monotonic() + 60
            while not self.until() and time.monotonic() < deadline:
                time.sleep(0.02)
        return self.answer if hit else None


# ---- what ends the run, and how cleanly -----------------------------------------------------
def test_a_proxys_html_page_to_a_check_stops_the_run_with_what_was_asked(
        source, target, tmp_path, capsys) -> None:
    save = tmp_path / "save"
    # the page comes once a study was journaled: the walk has something in flight to drain
    # however slowly this machine uploads
    rule = Once("GET", r"/studies/[0-9a-f-]+/instances", (200, "text/html", HTML), nth=3,
                until=lambda: save.exists() and bool(journal_studies(save)))
    proxy = AnswerProxy(source.port, rule)
    try:
        code, out, err = run(capsys, urls(proxy.url, target.url, save, "--threads", "1",
                                          "--order", "source"))
        assert code == 1, err
        line = next(line for line in err.splitlines() if line.startswith("replicate.py:"))
        assert re.search(r"stopped: check of study [0-9a-f-]{44}: source answered GET "
                         r"/studies/[0-9a-f-]+/instances with something that is not JSON "
                         r"\(HTTP 200, text/html, 79 bytes: 'Portal login'\)", line), line
        first = summary_value(out, "Copied:")
        done = journal_studies(save)
        assert done and first > 0  # what was in flight landed, and was journaled
        for study in done:  # each study journaled is whole on the target
            assert {record["ID"] for record in source.get(f"/studies/{study}/instances")} <= \
                target.instances()
        rule.armed = False
        code, out, err = run(capsys, urls(proxy.url, target.url, save))
    finally:
        proxy.close()
    assert code == 0, err
    # every instance that landed in the first run was counted there: none is copied twice
    assert first + summary_value(out, "Copied:") == CORPUS_SIZE
    assert target.md5s() == source.md5s()


def test_a_listing_without_sizes_stops_at_once_even_with_ignore_errors(
        source, target, tmp_path, capsys) -> None:
    studies = sorted(source.get("/studies"))
    broken = studies[1]
    records = json.dumps([{"ID": record["ID"], "Type": "Instance"} for record in
                          source.get(f"/studies/{broken}/instances")]).encode()
    proxy = AnswerProxy(source.port, Once("GET", f"/studies/{broken}/instances",
                                          (200, "application/json", records)))
    try:
        code, out, err = run(capsys, urls(proxy.url, target.url, tmp_path / "save",
                                          "--ignore-errors"))
    finally:
        proxy.close()
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("replicate.py:")]
    assert len(lines) == 1 and f"check of study {broken}: KeyError: 'FileSize' (the last " \
        f"answer read: source GET /studies/{broken}/instances answered HTTP 200, " \
        "application/json" in lines[0], err
    assert "Traceback" not in err and "check failed" not in err


def test_an_html_answer_to_uploads_stops_at_once_even_with_ignore_errors(
        source, target, tmp_path, capsys) -> None:
    # a captive portal in front of the target: every upload answered with its login page
    proxy = AnswerProxy(target.port, Once("POST", "/instances", (200, "text/html", HTML),
                                          every_after=True))
    try:
        code, out, err = run(capsys, urls(source.url, proxy.url, tmp_path / "save",
                                          "--ignore-errors", "-v"))
    finally:
        proxy.close()
    assert code == 1, err
    assert "copy failed" not in err  # not a failure of each instance: one stop
    assert re.search(r"replicate\.py: stopped: copy of \d+ instances? \([0-9a-f-]{44} \.\.\.\): "
                     r"target answered POST /instances with something that is not JSON "
                     r"\(HTTP 200, text/html", err), err
    assert "Traceback" in err  # -v shows where
    assert summary_value(out, "Copied:") == 0 and summary_value(out, "Failed:") == 0


# ---- metadata, the confirmation and resuming ------------------------------------------------
def test_a_503_to_a_metadata_write_is_retried(make_server, corpus, tmp_path, capsys) -> None:
    source = make_server("SOURCE", **METADATA_CONFIG)
    instance = source.upload(corpus[:4])[0]
    put(source, f"/instances/{instance}/metadata/2000", b"a value")
    target = make_server("TARGET", **METADATA_CONFIG)
    rule = Once("PUT", r"/instances/[0-9a-f-]+/metadata/2000",
                (503, "text/plain", b"busy"))
    proxy = AnswerProxy(target.port, rule)
    try:
        code, out, err = run(capsys, urls(source.url, proxy.url, tmp_path / "save"))
    finally:
        proxy.close()
    assert code == 0, err
    assert proxy.answered == [("PUT", f"/instances/{instance}/metadata/2000", 503)]
    assert fetch(target, f"/instances/{instance}/metadata/2000") == b"a value"
    assert summary_value(out, "Metadata:") == 1


def test_an_attachment_gone_before_its_download_is_skipped(make_server, corpus, tmp_path,
                                                           capsys) -> None:
    source = make_server("SOURCE", **METADATA_CONFIG)
    ids = source.upload(corpus[:4])
    study = source.get(f"/instances/{ids[0]}/study")["ID"]
    put(source, f"/studies/{study}/attachments/3000", b"deleted meanwhile")
    put(source, f"/instances/{ids[1]}/metadata/2000", b"copied all the same")
    target = make_server("TARGET", **METADATA_CONFIG)
    proxy = AnswerProxy(source.port, Once("GET", f"/studies/{study}/attachments/3000/data", (
        404, "application/json", b'{"HttpStatus": 404, "Message": "Unknown resource"}')))
    try:
        code, out, err = run(capsys, urls(proxy.url, target.url, tmp_path / "save"))
    finally:
        proxy.close()
    assert code == 0, err
    assert len(proxy.answered) == 1
    assert fetch(target, f"/instances/{ids[1]}/metadata/2000") == b"copied all the same"
    assert target.session.get(f"{target.url}/studies/{study}/attachments/3000/data",
                              timeout=60).status_code == 404


def test_a_confirmation_whose_source_listing_fails_is_no_success(source, target, tmp_path,
                                                                 capsys) -> None:
    # the target's second study listing (the confirmation's) names none: every study looks
    # lost, and the source's second listing, which tells a loss from a deletion, fails
    lying = AnswerProxy(target.port, Once("GET", "/studies", (200, "application/json", b"[]"),
                                          nth=2))
    failing = AnswerProxy(source.port, Once("GET", "/studies", (503, "text/plain", b"busy"),
                                            nth=2, every_after=True))
    try:
        code, out, err = run(capsys, urls(failing.url, lying.url, tmp_path / "save",
                                          "--retries", "0", "--order", "source"))
    finally:
        lying.close()
        failing.close()
    assert code == 1, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert "could not confirm that the target kept what it stored (source answered HTTP " \
        "503 to GET /studies (busy) after 1 attempts)" in err


def test_metadata_written_in_a_new_change_log_is_synced(make_server, corpus, tmp_path,
                                                        capsys) -> None:
    """The source restarted on a new database: its change log starts again from 1, below
    the position the save file gives. Metadata written there must be read from its start."""
    source = make_server("SOURCE", **METADATA_CONFIG)
    source.upload(corpus)
    target = make_server("TARGET", **METADATA_CONFIG)
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    old_position = source.get("/changes?last")["Last"]
    source.stop()
    fresh = OrthancServer(tmp_path / "fresh", "SOURCE", **METADATA_CONFIG)
    fresh.port = fresh.config["HttpPort"] = source.port  # the same URL, a new database
    fresh.start()
    try:
        instance = fresh.upload(corpus[:1])[0]
        put(fresh, f"/instances/{instance}/metadata/2000", b"after the restart")
        assert fresh.get("/changes?last")["Last"] < old_position
        code, out, err = run(capsys, args(fresh, target, save))
    finally:
        fresh.stop()
    assert code == 0, err
    assert "is not the one the save file's mark was taken from" in err
    assert fetch(target, f"/instances/{instance}/metadata/2000") == b"after the restart"


# ---- the pieces --------------------------------------------------------------------------------
def test_a_large_series_gives_each_instance_its_own_size(make_server, tmp_path,
                                                         monkeypatch) -> None:
    # one series of small instances and one large one: its mean would put the large one in
    # a bundle, which is read whole
    study, series = generate_uid(), generate_uid()
    paths = []
    for number, rows in enumerate((8, 8, 8, 512)):
        paths.append(tmp_path / f"{number}.dcm")
        write_dicom(make_instance("P", study, series, number + 1, rows=rows, columns=rows),
                    paths[-1])
    source = make_server("SOURCE")
    source.upload(paths)
    monkeypatch.setattr(replicate, "SERIES_LISTING_MAX", 2)
    client = replicate.OrthancClient(replicate.Endpoint("source", source.url, USER, PASSWORD),
                                     replicate.RetryPolicy(), threading.Event())
    try:
        sizes = {record["ID"]: record["FileSize"] for record in source.get("/instances?expand")}
        layout = replicate.study_layout(client, source.get("/studies")[0])
        assert [len(instances) for instances in layout.values()] == [4]
        assert replicate.series_sizes(client, layout, set(sizes)) == sizes
        assert max(sizes.values()) > 100 * min(sizes.values())
    finally:
        client.close()


def test_differences_close_their_spool(tmp_path) -> None:
    differences = replicate.Differences(tmp_path / "diff.csv")
    differences.add("s", {"patient_id": "", "study_date": "", "study_instance_uid": ""},
                    {"missing": ["i"]}, {"missing": "the target lacks it"})
    assert list(differences.records())
    differences.close()
    assert differences.spool.closed and differences.csv_file is None


def test_bwlimit_rates_are_shown_in_the_units_they_are_written_in() -> None:
    shown = {text: replicate.describe_rate(replicate.parse_rate(text))
             for text in ("10M", "512K", "1.5G", "1M", "100")}
    assert shown == {"10M": "10 MiB/s", "512K": "512 KiB/s", "1.5G": "1.5 GiB/s",
                     "1M": "1 MiB/s", "100": "100 B/s"}


def test_ports_are_never_handed_out_twice_nor_from_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    low, high = ephemeral_ports()
    assert not any(low <= port <= high for port in ports)
