"""Plain unit tests of the pure parts: URLs, credentials, planning, batching, the save file."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from typing import Callable
import threading
from pathlib import Path

import pytest
import requests
import urllib3

import replicate
from replicate import (Batch, HttpStatusError, Instance, Journal, RetryPolicy, UsageError,
                       call_with_retries, format_bytes, make_batches,
                       missing_instances, parse_url, pick_credentials, same_server)


# ---- URLs and credentials -------------------------------------------------------------------
def test_parse_url_strips_credentials_and_trailing_slash() -> None:
    assert parse_url("http://bob:s%40cret@old:8042/orthanc/", "source") == \
        ("http://old:8042/orthanc", "bob", "s@cret")
    assert parse_url("https://new", "target") == ("https://new", None, None)


@pytest.mark.parametrize("text", ["old:8042", "ftp://old", "http://", "http://old:99999",
                                  "http://old:8042/?x=1", "http://old:port"])
def test_parse_url_rejects_malformed(text: str) -> None:
    with pytest.raises(UsageError):
        parse_url(text, "source")


def test_malformed_url_message_hides_the_password() -> None:
    with pytest.raises(UsageError) as caught:
        parse_url("ftp://bob:hunter2@old", "source")
    assert "hunter2" not in str(caught.value)


def test_password_precedence_flag_env_url_shared() -> None:
    url = "http://u:from-url@h:1"
    env = {"REPLICATE_SOURCE_PASSWORD": "from-env"}
    assert pick_credentials("source", url, None, "flag", "x", "shared", env).password == "flag"
    assert pick_credentials("source", url, None, None, "x", "shared", env).password == "from-env"
    assert pick_credentials("source", url, None, None, "x", "shared", {}).password == "from-url"
    plain = "http://h:1"
    assert pick_credentials("source", plain, None, None, "x", "shared", {}).password == "shared"
    default = pick_credentials("source", plain, None, None, "x", None, {})
    assert (default.password, default.password_given) == ("orthanc", False)
    # the other side's variable is not used
    assert pick_credentials("target", plain, None, None, "x", None, env).password == "orthanc"


def test_username_precedence() -> None:
    assert pick_credentials("target", "http://u@h:1", "flag", None, "shared", None, {}).username == "flag"
    assert pick_credentials("target", "http://u@h:1", None, None, "shared", None, {}).username == "u"
    assert pick_credentials("target", "http://h:1", None, None, "shared", None, {}).username == "shared"


def test_same_server() -> None:
    assert same_server("http://localhost:8042", "http://127.0.0.1:8042/")
    assert not same_server("http://localhost:8042", "http://localhost:8043")
    assert not same_server("http://localhost:8042/a", "http://localhost:8042/b")


# ---- planning and batching ------------------------------------------------------------------
def test_study_check_lists_only_what_the_target_lacks() -> None:
    listed = [("i1", 10), ("i3", 30), ("i4", 40), ("i2", 20), ("i5", None)]
    check = missing_instances(listed, {"i3", "other"}, "A")
    assert [(i.id, i.study, i.size) for i in check.missing] == \
        [("i1", "A", 10), ("i4", "A", 40), ("i2", "A", 20)]
    assert check.present == 1
    assert check.vanished == 1  # i5 had no size: deleted from the source in between
    assert check.instances == 5


def test_study_check_with_nothing_missing_is_empty() -> None:
    check = missing_instances([("a", 1), ("b", 2)], {"a", "b"}, "A")
    assert check.missing == [] and check.present == 2 and check.vanished == 0


def _instances(*sizes: int) -> list[Instance]:
    return [Instance(f"i{n}", "S", size) for n, size in enumerate(sizes)]


def test_batches_by_size_class() -> None:
    big = replicate.STREAM_MIN_INSTANCE
    medium = replicate.ARCHIVE_MAX_INSTANCE + 1
    batches = make_batches(_instances(100, 100, medium, big, 100, medium), True, True)
    assert sorted((b.mode, [i.id for i in b.instances]) for b in batches) == [
        ("archive", ["i0", "i1", "i4"]), ("bundle", ["i2", "i5"]), ("single", ["i3"])]


def test_batches_respect_count_and_byte_limits() -> None:
    batches = make_batches(_instances(*[100] * 7), True, True, max_instances=3)
    assert [len(b.instances) for b in batches] == [3, 3, 1]
    assert batches[-1].mode == "single"
    batches = make_batches(_instances(*[100] * 5), True, True, max_bytes=250)
    assert [len(b.instances) for b in batches] == [2, 2, 1]


def test_batches_without_zip_upload_are_single() -> None:
    batches = make_batches(_instances(100, 100), zip_upload=False, archive_download=True)
    assert [b.mode for b in batches] == ["single", "single"]
    batches = make_batches(_instances(100, 100), zip_upload=True, archive_download=False)
    assert [b.mode for b in batches] == ["bundle"]


def test_batch_size() -> None:
    assert Batch("archive", _instances(1, 2, 3)).size == 6


# ---- small helpers --------------------------------------------------------------------------
def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(999) == "999 B"
    assert format_bytes(1500) == "1.5 KB"
    assert format_bytes(520_300_000) == "520.3 MB"


def test_version_at_least() -> None:
    assert replicate.version_at_least("1.10.1", (1, 8, 2))
    assert not replicate.version_at_least("1.8.1", (1, 8, 2))
    assert replicate.version_at_least("mainline", (1, 8, 2))


@pytest.mark.parametrize("error, expected", [
    (HttpStatusError("target", "POST", "/instances", 503, ""), replicate.RETRY),
    (HttpStatusError("target", "POST", "/instances", 429, ""), replicate.RETRY),
    (HttpStatusError("target", "POST", "/instances", 400, ""), replicate.RESOURCE),
    (HttpStatusError("source", "GET", "/instances/x/file", 404, ""), replicate.RESOURCE),
    (HttpStatusError("source", "GET", "/instances/x/file", 500,
                     '{"OrthancStatus": 2006, "Message": "not a regular file"}'),
     replicate.RESOURCE),
    (HttpStatusError("target", "POST", "/instances", 500,
                     '{"OrthancStatus": 19, "Message": "The file storage is full"}'),
     replicate.RESOURCE),
    (HttpStatusError("target", "POST", "/instances", 500, '{"OrthancStatus": 2001, "Message": '
                     '"Unable to create a subdirectory or a file in the file storage"}'),
     replicate.RETRY),
    (HttpStatusError("target", "POST", "/instances", 500,
                     '{"OrthancStatus": -1, "Message": "Internal error"}'), replicate.RETRY),
    (HttpStatusError("target", "POST", "/instances", 500, "<html>proxy error</html>"),
     replicate.RETRY),
    (replicate.TransportError("source", "GET", "/x", replicate.RESET), replicate.RETRY),
    (replicate.TransportError("source", "GET", "/x", replicate.TIMEOUT), replicate.RETRY),
    (replicate.TransportError("source", "GET", "/x", replicate.TLS), replicate.UNREACHABLE),
    (replicate.GaveUp(HttpStatusError("target", "POST", "/instances", 503, ""), 9),
     replicate.RESOURCE),
    (replicate.Rejected("the target answered Status FilteredOut"), replicate.RESOURCE),
    (replicate.Rejected("stored under another ID", renamed=True), replicate.DEFECT),
    (replicate.Unreadable("its file is gone"), replicate.RESOURCE),
    (replicate.UnexpectedAnswer("source", "GET", "/studies", "HTML"), replicate.DEFECT),
    (ValueError("bug"), replicate.DEFECT),
])
def test_classify(error: Exception, expected: str) -> None:
    assert replicate.classify(error) == expected


def chained(*errors: BaseException) -> BaseException:
    """The first error, raised while handling the next, and so on, as urllib3 raises them."""
    try:
        try:
            raise errors[-1]
        except BaseException:
            if len(errors) == 1:
                raise
            raise chained(*errors[:-1]) from errors[-1]  # noqa: B904
    except BaseException as error:  # noqa: B036
        return error


@pytest.mark.parametrize("error, kind", [
    (chained(urllib3.exceptions.NewConnectionError(None, "failed"),
             ConnectionRefusedError(111, "refused")), replicate.REFUSED),
    (chained(urllib3.exceptions.NewConnectionError(None, "failed"),
             socket.gaierror(-2, "unknown")), replicate.UNKNOWN_HOST),
    (urllib3.exceptions.ConnectTimeoutError(None, "connect timed out"), replicate.TIMEOUT),
    (urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out"), replicate.TIMEOUT),
    (chained(urllib3.exceptions.ProtocolError("aborted"), ConnectionResetError(104, "reset")),
     replicate.RESET),
    (chained(urllib3.exceptions.ProtocolError("aborted"),
             http.client.RemoteDisconnected("closed")), replicate.CLOSED),
    (chained(urllib3.exceptions.ProtocolError("broken"), http.client.IncompleteRead(b"")),
     replicate.CUT_SHORT),
    (chained(urllib3.exceptions.SSLError("failed"), ssl.SSLCertVerificationError(1, "x")),
     replicate.TLS),
    (OSError("something else"), replicate.CONNECTION),
])
def test_transport_errors_are_told_by_their_types(error: BaseException, kind: str) -> None:
    assert replicate.transport_kind(error)[0] == kind


def test_a_tls_failure_is_told_by_its_reason_code() -> None:
    failure = ssl.SSLError(1, "alert")
    failure.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert replicate.transport_kind(chained(urllib3.exceptions.SSLError("x"), failure)) == (
        replicate.TLS, "the server wants a client certificate; see --client-cert")


class Answer:
    def __init__(self, **headers: str) -> None:
        self.headers = requests.structures.CaseInsensitiveDict(
            {name.replace("_", "-"): value for name, value in headers.items()})
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_framing_of_an_answer() -> None:
    assert replicate.framing(Answer(content_length="12")) == "length"
    assert replicate.framing(Answer(transfer_encoding="Chunked")) == "chunked"
    assert replicate.framing(Answer(connection="close")) == "close"  # Orthanc's archives
    cut = Answer(connection="keep-alive")  # cut inside its headers: no way to end
    assert replicate.framing(cut) == ""


def test_http_errors_keep_orthancs_reason() -> None:
    error = HttpStatusError("source", "GET", "/instances/x/file", 500, json.dumps({
        "Details": "The path does not point to a regular file: /db/55/4c/x",
        "Message": "The specified path does not point to a regular file",
        "OrthancStatus": 2006}))
    assert error.orthanc_status == 2006
    assert str(error) == ("source answered HTTP 500 to GET /instances/x/file (The path does "
                          "not point to a regular file: /db/55/4c/x)")
    plain = HttpStatusError("target", "POST", "/instances", 502, "Bad   gateway\n")
    assert plain.orthanc_status is None and str(plain).endswith("(Bad gateway)")


def test_target_cannot_store() -> None:
    full = HttpStatusError("target", "POST", "/instances", 500, '{"OrthancStatus": 14}')
    assert replicate.target_cannot_store(full)
    assert replicate.target_cannot_store(replicate.GaveUp(full, 9))
    racing = HttpStatusError("target", "POST", "/instances", 500, '{"OrthancStatus": 2001}')
    assert replicate.target_cannot_store(replicate.GaveUp(racing, 9))
    assert not replicate.target_cannot_store(
        HttpStatusError("source", "GET", "/x", 500, '{"OrthancStatus": 14}'))
    assert not replicate.target_cannot_store(
        HttpStatusError("target", "POST", "/instances", 500, '{"OrthancStatus": -1}'))


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy()
    delays = [policy.delay(attempt) for attempt in range(1, 10)]
    assert 0.4 <= delays[0] <= 0.5
    assert all(delay <= replicate.BACKOFF_MAX for delay in delays)
    assert delays[4] > delays[1]
    # the default policy rides out a server that is down for 30 seconds
    assert sum(RetryPolicy().delay(a) * 1.0 for a in range(1, RetryPolicy().retries + 1)) > 30


def test_retries_then_gives_up_with_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RetryPolicy, "delay", lambda self, attempt: 0)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise replicate.TransportError("target", "POST", "/instances", replicate.RESET)
        return "ok"
    assert call_with_retries(flaky, "test", RetryPolicy(retries=5), threading.Event()) == "ok"
    assert len(calls) == 3

    def always() -> None:
        raise HttpStatusError("target", "POST", "/instances", 503, "busy")
    with pytest.raises(replicate.GaveUp) as caught:
        call_with_retries(always, "test", RetryPolicy(retries=2), threading.Event())
    assert caught.value.attempts == 3 and "HTTP 503" in str(caught.value)
    assert isinstance(caught.value.__cause__, HttpStatusError)


def test_client_errors_are_not_retried() -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        raise HttpStatusError("target", "POST", "/instances", 400, "bad file")
    with pytest.raises(HttpStatusError):
        call_with_retries(refused, "test", RetryPolicy(retries=5), threading.Event())
    assert len(calls) == 1


# ---- the save file --------------------------------------------------------------------------
def test_journal_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "save"
    journal = Journal(path, "http://a:1", "http://b:2").open()
    journal.studies_done([("s1", 3, 300, "")])
    journal.studies_done([("s2", 1, 10, "")])
    journal.close()
    first = path.read_text().splitlines()[0]
    assert first == "replicate.py save file 1\tsource=http://a:1\ttarget=http://b:2"
    again = Journal(path, "http://a:1", "http://b:2").open()
    assert again.studies == {"s1": 3, "s2": 1} and again.dates is None
    again.studies_done([("s3", 2, 20, "20190105")])
    again.close()
    assert path.read_text().splitlines()[-1].split("\t")[5] == "20190105"
    # --check reads the dates the save file gives (none for lines written without one)
    dated = Journal(path, "http://a:1", "http://b:2", dates=True).open(read_only=True)
    assert dated.studies == {"s1": 3, "s2": 1, "s3": 2} and dated.dates == {"s3": "20190105"}


def test_journal_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "save"
    journal = Journal(path, "http://a:1", "http://b:2").open()
    journal.studies_done([("s1", 3, 300, "")])
    journal.close()
    with open(path, "a") as file:
        file.write("study\ts2\t4")  # a crash in the middle of a line
    journal = Journal(path, "http://a:1", "http://b:2").open()
    assert journal.studies == {"s1": 3}
    journal.studies_done([("s3", 2, 20, "")])
    journal.close()
    assert path.read_text().splitlines()[1:] == [
        line for line in path.read_text().splitlines()[1:] if line.startswith("study\ts")]
    assert [line.split("\t")[1] for line in path.read_text().splitlines()[1:]] == ["s1", "s3"]


def test_journal_compacts_to_its_live_lines(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(replicate, "COMPACT_MIN", 10)
    path = tmp_path / "save"
    journal = Journal(path, "http://a:1", "http://b:2").open()
    journal.begin(5, "i5", (), reset=False)
    journal.changes_read(7, [("Study", "s1")])
    for round_ in range(10):  # the looks of a follow: taken back, recorded again
        journal.studies_done([("s1", 3, 30, "20200101"), ("s2", 1, 10, ""), ("s3", 2, 5, "-")])
        journal.begin(5 + round_, f"i{round_}", ["s1", "s2"], reset=False)
    journal.studies_done([("s1", 4, 40, "20200102")])
    journal.gone(["s3"])
    state = (dict(journal.studies), set(journal.known), journal.mark, journal.position,
             set(journal.candidates))
    assert state[:2] == ({"s1": 4}, {"s1", "s2"}) and journal.compact_due()
    journal.compact()
    assert not journal.compact_due()
    journal.studies_done([("s4", 1, 1, "")])  # written to the new file, still locked
    with pytest.raises(UsageError, match="in use"):
        Journal(path, "http://a:1", "http://b:2").open()
    journal.close()
    lines = path.read_text().splitlines()
    assert lines[1:] == ["mark\t14\ti9", "changes\t7", "meta\tStudy\ts1",
                         lines[4], lines[5], "redo\ts2", lines[7]]
    assert lines[4].split("\t")[:3] == ["study", "s1", "4"] and lines[4].endswith("20200102")
    assert lines[5].split("\t")[:3] == ["study", "s2", "1"]
    again = Journal(path, "http://a:1", "http://b:2", dates=True).open(read_only=True)
    assert (again.studies, again.known, again.mark, again.position, again.candidates) == (
        {**state[0], "s4": 1}, state[1] | {"s4"}, *state[2:])
    assert again.dates == {"s1": "20200102"} and again.lines == 8


def test_a_save_file_with_many_dead_lines_is_compacted_as_it_opens(tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(replicate, "COMPACT_MIN", 10)
    path = tmp_path / "save"
    journal = Journal(path, "http://a:1", "http://b:2").open()
    for _ in range(30):
        journal.studies_done([("s1", 3, 30, "")])
    journal.close()
    assert len(path.read_text().splitlines()) == 31
    journal = Journal(path, "http://a:1", "http://b:2").open()
    journal.close()
    assert len(path.read_text().splitlines()) == 2 and journal.studies == {"s1": 3}


def test_journal_refuses_another_pair(tmp_path: Path) -> None:
    path = tmp_path / "save"
    Journal(path, "http://a:1", "http://b:2").open().close()
    with pytest.raises(UsageError, match="belongs to source http://a:1 and target http://b:2"):
        Journal(path, "http://a:1", "http://c:3").open()


def test_journal_refuses_a_pickle_and_a_corrupt_line(tmp_path: Path) -> None:
    path = tmp_path / "save"
    path.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00]\x94.")
    with pytest.raises(UsageError, match="not a replicate.py save file"):
        Journal(path, "http://a:1", "http://b:2").open()
    path.write_text("replicate.py save file 1\tsource=http://a:1\ttarget=http://b:2\n"
                    "garbage\n" "study\ts1\t1\t1\tx\n")
    with pytest.raises(UsageError, match="line 2 is corrupt"):
        Journal(path, "http://a:1", "http://b:2").open()


# ---- rates, queries and the rate limiter ----------------------------------------------------
def test_parse_rate() -> None:
    assert replicate.parse_rate("2000") == 2000
    assert replicate.parse_rate("512K") == 512 * 1024
    assert replicate.parse_rate("10M") == 10 * 1024 ** 2
    assert replicate.parse_rate("1.5g") == 1.5 * 1024 ** 3
    assert replicate.parse_rate("10MB/s") == 10 * 1024 ** 2
    for bad in ("fast", "10X", "", "-1M", "0"):
        with pytest.raises(UsageError):
            replicate.parse_rate(bad)


def test_parse_query() -> None:
    assert replicate.parse_query(["StudyDate=20200101-20201231", "ModalitiesInStudy=CT"]) == \
        {"StudyDate": "20200101-20201231", "ModalitiesInStudy": "CT"}
    for bad in ("StudyDate", "=CT", "Modality="):
        with pytest.raises(UsageError):
            replicate.parse_query([bad])


class FakeClock:
    """Time that passes only when somebody sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_limiter_paces_blocks_evenly() -> None:
    clock = FakeClock()
    limiter = replicate.RateLimiter(1000, clock=clock, sleep=clock.sleep, burst=0)
    for _ in range(10):
        limiter.take(100)
    # 1,000 bytes at 1,000 B/s: the first block goes at once, then one every 0.1 s
    assert clock.sleeps == pytest.approx([0.1] * 9)
    assert clock.now - 100.0 == pytest.approx(0.9)


def test_rate_limiter_is_shared_and_forgets_long_idleness() -> None:
    clock = FakeClock()
    limiter = replicate.RateLimiter(1000, clock=clock, sleep=clock.sleep, burst=0.05)
    limiter.take(500)
    limiter.take(500)  # a second worker: waits for the first one's share
    assert clock.sleeps == pytest.approx([0.5])
    clock.now += 60  # a minute of idleness buys at most `burst` seconds of credit
    limiter.take(1000)
    limiter.take(1000)
    assert clock.sleeps[-1] == pytest.approx(0.95)


def completions(pace: replicate.Pace, clock: FakeClock, count: int, seconds: float) -> None:
    for _ in range(count):
        clock.now += seconds / count
        pace.done()


def test_pace_keeps_a_round_trip_of_completions_in_flight_with_a_margin() -> None:
    clock = FakeClock()
    pace = replicate.Pace(4, 32, clock=clock)
    assert pace.width(0.08) == 4  # nothing done yet: the floor
    pace.done()
    clock.now += 10  # from now on rates are measured over whole windows
    completions(pace, clock, 50, 0.5)  # 100 a second
    # 100/s x 80 ms = 8 in a round trip; (1 + 8) x 2 = 18
    assert pace.width(0.08) == round(replicate.PACE_MARGIN * 9)
    completions(pace, clock, 500, 0.5)  # 1,000 a second: more than the ceiling allows
    assert pace.width(0.08) == 32
    # Next to the server a round trip is a fraction of a millisecond: the floor holds.
    assert pace.width(0.0003) == 4
    clock.now += 10  # nothing done for a while: the rate, and the width, fall back
    assert pace.width(0.08) == 4


def test_pace_halves_its_ceiling_when_a_server_is_overloaded_and_recovers() -> None:
    clock = FakeClock()
    pace = replicate.Pace(4, 32, clock=clock)
    completions(pace, clock, 500, 0.5)
    pace.back_off()
    assert pace.width(0.08) == 16
    pace.back_off()
    pace.back_off()
    pace.back_off()
    assert pace.width(0.08) == 4  # never below the floor
    for _ in range(3):
        clock.now += replicate.PACE_WINDOW
        pace.done()
        pace.width(0.08)
    assert pace.ceiling == 4 + 3  # one more each calm window


def upload_rounds(uploads: replicate.UploadLimit, clock: FakeClock, seconds: float,
                  capacity: Callable[[int], float], refuse_above: int = 0,
                  offered: int = 1000) -> list[int]:
    """Uploads of 1 MB in rounds: as many as the limit allows (and `offered` gives) begin
    together and end together, after the time a target that moves capacity(n) bytes a second
    with n at once takes; past `refuse_above` at once (if given), it answers 503. The limit
    at each round."""
    seen = []
    stop = threading.Event()
    end = clock.now + seconds
    while clock.now < end:
        number = min(uploads.limit, offered)
        seen.append(number)
        tokens = [uploads.enter(stop) for _ in range(number)]
        clock.now += number * 1e6 / capacity(number)
        for position, token in enumerate(tokens, 1):
            if refuse_above and position > refuse_above:
                uploads.refused(token, 503)
                uploads.leave(token, 0, 0)
            else:
                uploads.leave(token, 1_000_000, 1)
    return seen


def test_uploads_double_while_the_rate_does_and_go_back_when_it_stops() -> None:
    clock = FakeClock()
    uploads = replicate.UploadLimit(4, fixed=False, ceiling=32, clock=clock)
    # each upload at 1 MB/s, at most 6 MB/s in all: 8 pays (6 against 4), 16 does not
    seen = upload_rounds(uploads, clock, 20, lambda number: min(number, 6) * 1e6)
    assert seen[:3] == [4, 4, 8] and 16 in seen
    assert uploads.limit == 8
    assert uploads.why.startswith("the rate stopped growing: ")
    # UPLOAD_HOLD later, a quarter more is tried, and given up again
    seen = upload_rounds(uploads, clock, replicate.UPLOAD_HOLD + 10,
                         lambda number: min(number, 6) * 1e6)
    assert 10 in seen and uploads.limit == 8


def test_uploads_stop_at_the_ceiling_that_bounds_memory() -> None:
    clock = FakeClock()
    uploads = replicate.UploadLimit(4, fixed=False, ceiling=16, clock=clock)
    seen = upload_rounds(uploads, clock, 60, lambda number: number * 1e6)
    assert max(seen) == 16 and uploads.limit == 16
    assert uploads.why.startswith("the ceiling that bounds memory (16)")


def test_uploads_settle_below_the_number_a_target_refuses_with_503() -> None:
    clock = FakeClock()
    uploads = replicate.UploadLimit(4, fixed=False, ceiling=32, clock=clock)
    seen = upload_rounds(uploads, clock, 200, lambda number: number * 1e6, refuse_above=6)
    first = seen.index(8)  # the doubling went past 6 once
    assert max(seen[first + 1:]) <= 6
    assert uploads.limit <= 6
    assert "503 with" in uploads.why or "refused" in uploads.why
    # REFUSED_MEMORY later, the number may be tried again
    clock.now += replicate.REFUSED_MEMORY
    seen = upload_rounds(uploads, clock, replicate.UPLOAD_HOLD + 20,
                         lambda number: number * 1e6)
    assert max(seen) > 6


def test_uploads_do_not_grow_when_the_walk_gives_fewer_batches() -> None:
    clock = FakeClock()
    uploads = replicate.UploadLimit(4, fixed=False, ceiling=32, clock=clock)
    upload_rounds(uploads, clock, 30, lambda number: number * 1e6, offered=2)
    assert uploads.limit == 4
    assert uploads.why == "the walk had fewer batches than 4 at once"


def test_threads_fixes_the_uploads_at_once() -> None:
    clock = FakeClock()
    uploads = replicate.UploadLimit(3, fixed=True, clock=clock)
    seen = upload_rounds(uploads, clock, 30, lambda number: number * 1e6, refuse_above=2)
    assert set(seen) == {3} and uploads.why == "fixed by --threads 3"


def test_pace_forgets_completions_older_than_its_window_even_when_not_asked() -> None:
    # Next to the source nobody asks the width of downloads, but each one still ends:
    # what the pace keeps must stay one window long, not grow with the copy.
    clock = FakeClock()
    pace = replicate.Pace(4, 32, clock=clock)
    completions(pace, clock, 10_000, 100.0)  # 100 a second for 100 seconds
    assert len(pace.done_at) <= 100 * replicate.PACE_WINDOW + 1
    assert pace.width(0.08) == round(replicate.PACE_MARGIN * (1 + 0.08 * 100))


def test_pace_with_equal_bounds_is_fixed() -> None:
    clock = FakeClock()
    pace = replicate.Pace(3, 3, clock=clock)
    completions(pace, clock, 500, 0.5)
    assert pace.width(0.2) == 3


def test_gate_lets_through_its_limit_which_may_change() -> None:
    gate = replicate.Gate(2)
    stop = threading.Event()
    gate.enter(stop)
    gate.enter(stop)
    entered = threading.Event()

    def third() -> None:
        gate.enter(stop)
        entered.set()
    worker = threading.Thread(target=third)
    worker.start()
    assert not entered.wait(0.2)
    gate.resize(3)  # a wider gate lets the waiting one in
    assert entered.wait(5)
    worker.join()
    assert gate.held == gate.held_max == 3
    gate.leave()
    gate.resize(1)
    stop.set()  # full, and asked to stop: the next one gives up
    with pytest.raises(replicate.Interrupted):
        gate.enter(stop)


def test_upload_body_reads_in_blocks_through_the_limiter() -> None:
    import io
    clock = FakeClock()
    limiter = replicate.RateLimiter(1000, clock=clock, sleep=clock.sleep, burst=0)
    body = replicate.UploadBody(io.BytesIO(b"x" * 2500).read, 2500, threading.Event(), limiter)
    assert len(body) == 2500
    blocks = [body.read(1000) for _ in range(4)]
    assert [len(block) for block in blocks] == [1000, 1000, 500, 0]
    assert sum(clock.sleeps) == pytest.approx(2.0)


def test_upload_body_notices_a_short_source() -> None:
    import io
    body = replicate.UploadBody(io.BytesIO(b"x" * 10).read, 20, threading.Event())
    body.read(100)
    with pytest.raises(replicate.TransportError):
        body.read(100)


def test_metadata_candidates_from_the_change_log() -> None:
    changes = [
        {"ChangeType": "NewInstance", "ResourceType": "Instance", "ID": "i1", "Seq": 1},
        {"ChangeType": "UpdatedMetadata", "ResourceType": "Instance", "ID": "i1", "Seq": 2},
        {"ChangeType": "UpdatedAttachment", "ResourceType": "Study", "ID": "s1", "Seq": 3},
        {"ChangeType": "StableStudy", "ResourceType": "Study", "ID": "s1", "Seq": 4},
    ]
    assert replicate.metadata_candidates(changes) == {("Instance", "i1"), ("Study", "s1")}


def test_journal_keeps_the_change_position_and_candidates(tmp_path: Path) -> None:
    path = tmp_path / "save"
    journal = Journal(path, "http://a:1", "http://b:2").open()
    journal.changes_read(40, [("Study", "s1")])
    journal.changes_read(45, [("Study", "s1"), ("Instance", "i9")])
    journal.close()
    again = Journal(path, "http://a:1", "http://b:2").open(read_only=True)
    assert again.position == 45
    assert again.candidates == {("Study", "s1"), ("Instance", "i9")}
    assert path.read_text().count("meta\t") == 2


def test_journal_mark_redo_and_reset(tmp_path: Path) -> None:
    path = tmp_path / "save"
    journal = Journal(path, "http://a:1", "http://b:2").open()
    journal.begin(10, "c10", (), reset=False)
    journal.studies_done([("s1", 3, 300, ""), ("s2", 4, 0, ""), ("s3", 1, 0, "")])
    journal.begin(20, "c20", ["s2", "unknown"], reset=False)  # instances arrived in s2
    journal.close()
    again = Journal(path, "http://a:1", "http://b:2").open()
    assert again.mark == (20, "c20")
    assert again.studies == {"s1": 3, "s3": 1}
    again.begin(25, "c25", (), reset=True)  # the source's log was cleared: look at everything
    again.studies_done([("s3", 2, 0, "")])
    again.close()
    lines = path.read_text().splitlines()
    assert lines.count("redo\ts2") == 1 and not any(line.endswith("unknown") for line in lines)
    last = Journal(path, "http://a:1", "http://b:2").open(read_only=True)
    assert last.mark == (25, "c25") and last.studies == {"s3": 2}


def test_read_only_journal_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "save"
    journal = Journal(path, "http://a:1", "http://b:2").open(read_only=True)
    journal.studies_done([("s1", 1, 1, "")])
    journal.close()
    assert not path.exists()


def test_progress_line_and_durations() -> None:
    assert replicate.progress_line("copying", 1_200_000, 3_600_000, True, 1.2,
                                   "120 copied") == \
        "copying: 120 copied, 1.2 MB of 3.6 MB (33%), 1.0 MB/s, about 2 s left"
    assert replicate.progress_line("copying", 400, 1200, False, 40.0, "120 copied, 1.2 MB") \
        == "copying: 120 copied, 1.2 MB, 400 of 1,200 instances (33%), 10/s, about 1 min left"
    assert replicate.progress_line("scanning", 12_000, 24_000, False, 4.0) == \
        "scanning: 12,000 of 24,000 instances (50%), 3,000/s, about 4 s left"
    # a selection: no total, so no share and no estimate
    assert replicate.progress_line("copying", 50, None, False, 5.0) == \
        "copying: 50 instances, 10/s"
    assert replicate.progress_line("copying", 0, 100, True, 0.0) == "copying: 0 B of 100 B (0%)"
    assert [replicate.format_duration(seconds) for seconds in
            (0, 44.6, 60, 3599, 3 * 3600 + 300, 3 * 86400 + 4 * 3600)] == \
        ["0 s", "45 s", "1 min", "59 min", "3 h 5 min", "3 d 4 h"]


def test_stored_zip_is_a_zip_that_zipfile_reads_back() -> None:
    import io
    import zipfile
    files = [("a.dcm", b"first file"), ("b.dcm", bytes(range(256)) * 300), ("empty.dcm", b"")]
    archive = zipfile.ZipFile(io.BytesIO(replicate.stored_zip(files)))
    assert archive.testzip() is None
    assert [(info.filename, info.compress_type) for info in archive.infolist()] == \
        [(name, zipfile.ZIP_STORED) for name, _ in files]
    assert [archive.read(name) for name, _ in files] == [content for _, content in files]


# ---- what the target does with what it accepts ----------------------------------------------
RECYCLING = {"MaximumPatientCount": 4, "MaximumStorageSize": 0, "MaximumStorageMode": "Recycle"}
SOURCE_STATISTICS = {"CountPatients": "3", "TotalUncompressedSize": str(300 * 1024 * 1024)}


def target_statistics(patients: int, disk: int) -> dict:
    return {"CountPatients": patients, "TotalDiskSize": str(disk)}


def test_storage_limits_and_recycling_as_orthanc_reports_them() -> None:
    assert replicate.storage_limits({}) == []  # Orthanc before 1.12 reports nothing
    assert replicate.storage_limits(RECYCLING) == ["MaximumPatientCount 4"]
    assert replicate.recycles(RECYCLING)
    assert not replicate.recycles({**RECYCLING, "MaximumStorageMode": "Reject"})
    assert not replicate.recycles({"MaximumPatientCount": 0, "MaximumStorageSize": 0,
                                   "MaximumStorageMode": "Recycle"})


def test_room_problem_counts_what_the_target_holds_and_what_the_source_adds() -> None:
    assert replicate.room_problem(RECYCLING, SOURCE_STATISTICS, target_statistics(1, 0)) is None
    problem = replicate.room_problem(RECYCLING, SOURCE_STATISTICS, target_statistics(2, 0))
    assert problem is not None and "MaximumPatientCount is 4" in problem
    sized = {"MaximumStorageSize": 400, "MaximumStorageMode": "Recycle"}  # MB, as configured
    assert replicate.room_problem(sized, SOURCE_STATISTICS,
                                  target_statistics(0, 100 * 1024 * 1024)) is None
    problem = replicate.room_problem(sized, SOURCE_STATISTICS,
                                     target_statistics(0, 100 * 1024 * 1024 + 1))
    assert problem is not None and "MaximumStorageSize is 400 MB" in problem


def test_a_405_to_an_upload_means_the_target_stores_nothing() -> None:
    refused = HttpStatusError("target", "POST", "/instances", 405, "")
    assert replicate.target_cannot_store(refused)
    assert not replicate.target_cannot_store(HttpStatusError("target", "GET", "/x", 405, ""))
    assert not replicate.target_cannot_store(HttpStatusError("source", "POST", "/x", 405, ""))
    assert "takes no uploads" in replicate.cannot_store_line(refused, {})
    full = str(HttpStatusError("target", "POST", "/instances", 507, '{"OrthancStatus": 19}'))
    assert "is its disk full?" in replicate.cannot_store_line(full, {})
    rejecting = {"MaximumStorageSize": 1, "MaximumStorageMode": "Reject"}
    assert "MaximumStorageSize 1 (MB) with MaximumStorageMode \"Reject\" is reached" in \
        replicate.cannot_store_line(full, rejecting)


def test_lost_line_names_the_settings_or_someone_deleting() -> None:
    line = replicate.lost_line(["a", "b"], {})
    assert line.startswith("the target deleted 2 studies after storing them (a ...)")
    assert "MaximumPatientCount" in line and "someone deleting on the target" in line
    assert "its MaximumPatientCount 4 in MaximumStorageMode \"Recycle\"" in \
        replicate.lost_line(["a"], RECYCLING)


def test_journal_forgets_studies_the_target_lost(tmp_path: Path) -> None:
    path = tmp_path / "save"
    journal = Journal(path, "http://a", "http://b").open()
    journal.studies_done([("kept", 3, 10, ""), ("lost", 2, 10, "")])
    journal.forget(["lost", "never-recorded"])
    journal.close()
    assert Journal(path, "http://a", "http://b").open(read_only=True).studies == {"kept": 3}
    assert path.read_text().count("redo\t") == 1


# ---- the sites' access rules: headers, secrets in messages, the bandwidth timetable ----------
def test_headers_from_the_line_the_environment_or_a_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-a-file\n")
    environ = {"KEY": "from-the-environment"}
    assert replicate.parse_header("api-key: plain", "--header", environ) == ("api-key", "plain")
    assert replicate.parse_header("api-key: env:KEY", "--header", environ) == \
        ("api-key", "from-the-environment")
    name, value = replicate.parse_header(f"Authorization:@{token}", "--header", environ)
    assert name == "Authorization" and value.current() == "from-a-file"
    # --target-header wins over --header for the same name, whatever its case
    assert replicate.pick_headers(["api-key: a", "X-Site: s"], ["API-Key: b"], "target",
                                  environ) == (("API-Key", "b"), ("X-Site", "s"))


@pytest.mark.parametrize("text, expected", [
    ("api-key secret-value", "takes"), ("bad name: secret-value", "takes"),
    ("api-key: env:UNSET", "UNSET is not set"), ("api-key: @/nonexistent/file", "cannot read"),
    ("api-key:", "empty")])
def test_bad_headers_say_what_to_fix_and_never_show_the_value(text: str, expected: str) -> None:
    with pytest.raises(UsageError) as raised:
        replicate.parse_header(text, "--header", {})
    assert expected in str(raised.value)
    assert "secret-value" not in str(raised.value)


def test_mistyped_options_never_repeat_a_secret(capsys: pytest.CaptureFixture) -> None:
    for argv in (["http://a", "http://b", "--hedaer", "api-key: s3cret-token"],
                 ["http://a", "http://b", "--target-header=api-key: s3cret-token", "--threads"],
                 ["http://a", "http://b", "--pass", "s3cret-token", "extra"],
                 ["http://a", "http://b", "s3cret-token"]):
        assert replicate.main(argv) == 2
        err = capsys.readouterr().err
        assert "s3cret" not in err and "see --help" in err, err


def test_a_proxys_html_error_page_becomes_its_title() -> None:
    page = ("<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
            "<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>"
            "\r\n</body>\r\n</html>\r\n")
    error = HttpStatusError("target", "POST", "/instances", 413, page)
    assert str(error) == ("target answered HTTP 413 to POST /instances (413 Request Entity Too "
                          "Large)")
    assert error.status == 413 and error.detail == "413 Request Entity Too Large"
    line = replicate.too_large_line([60_000_000, 70_000_000])
    assert "2 instances of 60.0 MB and more were not copied" in line
    assert "client_max_body_size" in line


def test_timetable_like_rclone() -> None:
    table = replicate.parse_bwlimit("08:00,512K 12:30,10M 19:00,off")
    assert table is not None
    assert table.rate_at(7 * 60 + 59) is None  # before the first entry: last night's
    assert table.rate_at(8 * 60) == 512 * 1024
    assert table.rate_at(12 * 60 + 30) == 10 * 1024 ** 2
    assert table.rate_at(23 * 60) is None
    assert replicate.parse_bwlimit("2M").rate_at(600) == 2 * 1024 ** 2  # a plain rate, all day
    assert replicate.parse_bwlimit("off") is None
    assert replicate.parse_bwlimit("08:00,off 20:00,off") is None
    for bad in ("8h,512K", "08:00", "25:00,1M", "08:00,1M 08:00,2M", "Xyz-08:00,1M",
                "08:00,fast", "Mon-08:00,1M Mon-08:00,off"):
        with pytest.raises(UsageError):
            replicate.parse_bwlimit(bad)


MONDAY, SATURDAY = 0, 5 * 24 * 60  # minutes of the week


def test_timetable_by_day_of_the_week_and_pauses() -> None:
    """Nights on weekdays, all weekend: rclone's day form, with pause by day."""
    text = " ".join(f"{day}-07:00,pause {day}-20:00,off" for day in
                    ("Mon", "Tue", "Wed", "Thu", "Fri")) + " Sat-00:00,10M"
    table = replicate.parse_bwlimit(text)
    assert table is not None
    # Monday before 07:00: the weekend's rate goes on
    assert table.rate_at(MONDAY + 6 * 60 + 59) == 10 * 1024 ** 2
    assert table.rate_at(MONDAY + 7 * 60) == replicate.PAUSE
    assert table.until(MONDAY + 8 * 60) == MONDAY + 20 * 60
    assert replicate.describe_minute(table.until(MONDAY + 8 * 60)) == "Mon 20:00"
    assert table.rate_at(MONDAY + 20 * 60) is None
    assert table.rate_at(4 * 24 * 60 + 12 * 60) == replicate.PAUSE  # Friday noon
    assert table.rate_at(SATURDAY + 12 * 60) == 10 * 1024 ** 2
    assert table.rate_at(6 * 24 * 60 + 23 * 60) == 10 * 1024 ** 2  # Sunday night: Saturday's
    # an entry without a day stands on every day; a day's own entry wins at its minute
    daily = replicate.parse_bwlimit("07:00,pause 20:00,off Sun-07:00,1M")
    assert daily.rate_at(2 * 24 * 60 + 8 * 60) == replicate.PAUSE
    assert daily.rate_at(6 * 24 * 60 + 8 * 60) == 1024 ** 2
    assert replicate.parse_bwlimit("00:00,pause").until(0) is None  # paused for good


def test_a_rate_of_zero_says_to_write_pause_or_off() -> None:
    with pytest.raises(UsageError, match="pause.*off"):
        replicate.parse_bwlimit("07:00,0 20:00,off")


def test_a_pause_holds_requests_and_is_counted() -> None:
    """With an injected clock: hold() waits while paused, says till when, and the time
    paused is counted; a stop ends the wait at once."""
    clock = FakeClock()
    minute = [MONDAY + 7 * 60]
    limiter = replicate.RateLimiter(replicate.parse_bwlimit("Mon-07:00,pause Mon-20:00,off"),
                                    clock=clock, sleep=clock.sleep, minute=lambda: minute[0])
    assert limiter.paused() == "until Mon 20:00"
    clock.now += 3600
    assert limiter.paused_seconds == pytest.approx(3600)
    stop = threading.Event()
    stop.set()
    with pytest.raises(replicate.Interrupted):
        limiter.hold(stop)
    minute[0] = MONDAY + 20 * 60
    clock.now += 60
    limiter.hold(threading.Event())  # not paused: returns at once
    assert limiter.paused() is None and limiter.paused_seconds == pytest.approx(3660)


def test_study_lists_from_a_file(tmp_path: Path) -> None:
    listing = tmp_path / "priors.txt"
    listing.write_text("# priors of Monday\n1.2.3\n\n  1.2.4  # a comment\n")
    assert replicate.study_values(["abc", f"@{listing}"]) == ["abc", "1.2.3", "1.2.4"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    for bad in (f"@{tmp_path / 'empty.txt'}", f"@{tmp_path / 'missing.txt'}"):
        with pytest.raises(UsageError, match="--study @"):
            replicate.study_values([bad])


def test_study_dates_and_plurals() -> None:
    assert replicate.study_when({"MainDicomTags": {"StudyDate": "20190301"}}) == ("20190301", "")
    assert replicate.study_when(None) == ("", "")
    assert [replicate.plural(count, "study", "studies") for count in (0, 1, 2)] == [
        "0 studies", "1 study", "2 studies"]
    assert replicate.plural(1200, "instance") == "1,200 instances"


def test_rate_limiter_follows_the_timetable_inside_a_run() -> None:
    clock = FakeClock()
    minute = [8 * 60]
    table = replicate.parse_bwlimit("08:00,1K 09:00,off 10:00,2K")
    limiter = replicate.RateLimiter(table, clock=clock, sleep=clock.sleep, burst=0,
                                    minute=lambda: minute[0])
    for _ in range(3):
        limiter.take(1024)
    assert clock.sleeps == pytest.approx([1.0, 1.0])  # 1 KB/s
    minute[0] = 9 * 60
    before = clock.now
    for _ in range(100):
        limiter.take(1024)
    assert clock.now == before and limiter.in_force is None  # off: no wait at all
    minute[0] = 10 * 60
    clock.now += 10  # an idle gap earns no credit beyond the burst
    for _ in range(3):
        limiter.take(1024)
    assert clock.sleeps[-2:] == pytest.approx([0.5, 0.5])  # 2 KB/s


def test_a_deflated_zip_reads_back_and_stores_what_does_not_shrink() -> None:
    import io
    import os
    import zipfile
    shrinks, random_bytes = b"\x00\x01" * 50_000, os.urandom(20_000)
    parts = replicate.zip_parts([("a.dcm", shrinks), ("b.dcm", random_bytes)], deflate=True)
    archive = zipfile.ZipFile(io.BytesIO(b"".join(parts)))
    assert archive.read("a.dcm") == shrinks and archive.read("b.dcm") == random_bytes
    methods = {info.filename: info.compress_type for info in archive.infolist()}
    assert methods == {"a.dcm": zipfile.ZIP_DEFLATED, "b.dcm": zipfile.ZIP_STORED}
    assert sum(map(len, parts)) < len(shrinks) // 10 + len(random_bytes) + 500


def test_prefixed_reader_gives_what_was_read_first_then_the_rest() -> None:
    import io
    rest = io.BytesIO(b"DEFGHIJ")
    read = replicate.prefixed(b"ABC", rest.read)
    assert [read(2), read(2), read(4), read(4)] == [b"AB", b"C", b"DEFG", b"HIJ"]
    body = replicate.UploadBody(replicate.prefixed(b"ABC", io.BytesIO(b"DE").read), 6,
                                threading.Event())
    with pytest.raises(replicate.TransportError):
        while body.read(4):
            pass


def test_a_header_given_in_any_case_replaces_the_tools_own() -> None:
    endpoint = replicate.Endpoint("target", "http://new:8042", "orthanc", "secret",
                                  headers=(("authorization", "Bearer t0ken"),
                                           ("user-agent", "site-gateway")))
    client = replicate.OrthancClient(endpoint, RetryPolicy(), threading.Event())
    sent = {name.lower(): value for name, value in client.headers.items()}
    assert len(sent) == len(client.headers)  # no name twice, whatever its case
    assert sent["authorization"] == "Bearer t0ken" and sent["user-agent"] == "site-gateway"
    client.close()


def test_a_header_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("Bearer first\n")
    now = [0.0]
    header = replicate.HeaderFile(token, "--header", "Authorization", clock=lambda: now[0])
    endpoint = replicate.Endpoint("target", "http://new:8042", "orthanc", "secret",
                                  headers=(("Authorization", header),))
    client = replicate.OrthancClient(endpoint, RetryPolicy(), threading.Event())
    assert "Authorization" not in client.headers and client.files == [("Authorization", header)]
    assert header.current() == "Bearer first"
    token.write_text("Bearer renewed\n")  # a sidecar renews the token
    assert header.current() == "Bearer first"  # looked at once every HEADER_LOOK at most
    now[0] += replicate.HEADER_LOOK
    assert header.current() == "Bearer renewed"
    token.unlink()  # between the sidecar's removal and its new file: the last value stays
    now[0] += replicate.HEADER_LOOK
    assert header.current() == "Bearer renewed"
    replacement = tmp_path / "token.new"
    replacement.write_text("Bearer third\n")
    replacement.rename(token)  # written aside, then renamed over it
    now[0] += replicate.HEADER_LOOK
    assert header.current() == "Bearer third"
    token.write_text("")  # empty: not a value to send
    now[0] += replicate.HEADER_LOOK
    assert header.current() == "Bearer third"
    client.close()


def test_summary_lines_say_one_study_and_one_instance() -> None:
    import re
    outcome = replicate.Outcome(missing=1, studies_missing=1, copied=1, vanished=1,
                                deleted=[("a", 1, 0)], lost=["b"], metadata_written=1)
    text = "\n".join(replicate.summary_lines(outcome, 1.0))
    assert "To transfer:   1 instance in 1 study," in text
    assert "Copied:        1 instance," in text and "Metadata:      1 item copied, 0 problems" in text
    assert "Deleted:       1 instance in 1 study the source no longer has" in text
    assert "Lost:          1 study the target" in text
    assert "Vanished:      1 instance deleted" in text
    assert not re.search(r"\b1 (instances|studies|items)\b", text), text
    differences = replicate.Differences(None)
    differences.studies["extra-study"], differences.counts["extra"] = 1, 1
    lines, differs = replicate.check_lines(replicate.Outcome(
        studies_checked=1, missing=1, studies_missing=1), differences, False, False)
    assert differs and "Only target:   1 study and 1 instance of studies both have" in lines
    assert "Missing:       1 instance the target lacks, in 1 study" in lines


def test_the_table_by_year_orders_its_rows_and_adds_them_up() -> None:
    from concurrent.futures import Future
    table = replicate.YearTable()
    table.years = Future()
    table.add("a", 3, 2, missing=1)  # before the years are read: counted once they are
    table.add("c", 2, 2, trusted=True)
    assert table.rows == {} and len(table.waiting) == 2
    table.years.set_result({"a": "2019", "b": "before 1900", "c": "2021"})
    table.add("b", 1, 1)
    assert not table.waiting
    table.add("d", 4, 0, missing=3, unreadable=1)  # no date
    table.add("e", 0, 5, extra=5, row=replicate.year_label("20210101"))
    records = table.records()
    assert [record["year"] for record in records] == [
        "before 1900", "2019", "2021", "no date", "total"]
    assert records[-1]["source_studies"] == 4 and records[-1]["source_instances"] == 10
    assert records[-1]["target_studies"] == 4 and records[-1]["missing_studies"] == 2
    assert records[2]["extra_instances"] == 5 and records[2]["trusted_studies"] == 1
    assert replicate.year_label("") == "no date" and replicate.year_label("18991231") == \
        "before 1900"
    assert records[3]["unreadable_instances"] == 1 and records[3]["missing_instances"] == 3
    assert records[-1]["unreadable_studies"] == 1
    assert table.lines()[1].split() == ["year", "source", "target", "missing", "unreadable",
                                        "only", "target", "on", "trust"]


def test_read_ahead_hands_out_without_waiting_and_wakes_the_reader() -> None:
    """The walk takes sorted studies as they come: `take(wait=False)` says NOT_YET instead
    of waiting, and the producer wakes the reader once the next one is there; an error in
    producing them reaches the reader."""
    more, woken = threading.Event(), threading.Event()

    def studies():
        yield "a"
        more.wait(10)
        yield "b"
    ahead = replicate.ReadAhead(studies(), 4, woken.set)
    assert ahead.take() == "a"
    assert ahead.take(wait=False) is replicate.ReadAhead.NOT_YET
    assert not woken.is_set()
    more.set()
    assert woken.wait(10)
    assert ahead.take(wait=False) == "b"
    assert ahead.take() is replicate.ReadAhead.END
    assert ahead.take(wait=False) is replicate.ReadAhead.END

    def failing():
        yield "c"
        raise ValueError("listing failed")
    assert next(iter(replicate.ReadAhead(failing(), 1))) == "c"
    with pytest.raises(ValueError, match="listing failed"):
        list(replicate.ReadAhead(failing(), 1))


def test_the_order_says_where_the_walk_stands_not_what_was_read_ahead() -> None:
    order = replicate.StudyOrder(None, "newest", 1)  # type: ignore[arg-type]
    order.dates.update({"a": "20190304", "b": replicate.NO_STUDY_DATE, "ahead": "20010101"})
    assert order.describe() == ""
    order.took("a")
    assert order.describe() == "2019-03"
    order.took("b")
    assert order.describe() == "undated"
    order.took("arrived meanwhile")
    assert order.describe() == "undated"


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_the_order_sorts_by_date_then_time_as_the_tuples_would(order: str) -> None:
    """The packed strings the order sorts give the order of ((date, time), study), dates
    and times of any length included; studies without a date are noted, not sorted."""
    found = [(("20190304", "101500"), "b"), (("20190304", "1015"), "a"),
             (("2019030", "235959"), "c"), (("20190304", "101500"), "a"),
             (("20240101", ""), "d"), (("", "120000"), "undated"), (("19991231", "9"), "e")]
    sorter = replicate.StudyOrder(None, order, 1)  # type: ignore[arg-type]
    expected = sorted((entry for entry in found if entry[0][0]), key=lambda entry: (
        entry[0], entry[1]), reverse=order == "newest")
    assert list(sorter.sort(found)) == [(study, when[0]) for when, study in expected]
    assert sorter.dates == {"undated": replicate.NO_STUDY_DATE}


# ---- verification of re-encoded instances, and what the source cannot serve -----------------
def npy(descr: str, shape: tuple, data: bytes, version: int = 1) -> bytes:
    """A .npy file as numpy writes one (and Orthanc's /numpy)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    size = len(header).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


def digest_of(body: bytes, block: int = 7) -> str:
    import hashlib
    import io
    digest = hashlib.sha256()
    stream = io.BytesIO(body)
    replicate.npy_digest(lambda size: stream.read(min(size, block)), digest)
    return digest.hexdigest()


def test_a_pixel_digest_reads_the_array_whatever_the_header_s_layout() -> None:
    pixels = bytes(range(256)) * 4
    same = digest_of(npy("<u2", (1, 16, 32, 1), pixels))
    assert digest_of(npy("<u2", (1, 16, 32, 1), pixels), block=1000) == same
    assert digest_of(npy("<u2", (1, 16, 32, 1), pixels, version=2)) == same
    # Orthanc 1.10 writes "(1, 64,64,1)": the shape, not its spacing, counts
    spaced = npy("<u2", (1, 16, 32, 1), pixels).replace(b"(1, 16, 32, 1)", b"(1, 16,32,1)  ")
    assert digest_of(spaced) == same
    assert digest_of(npy("<u2", (1, 16, 32, 1), pixels[:-1] + b"\x01")) != same
    assert digest_of(npy("<u2", (1, 32, 16, 1), pixels)) != same
    assert digest_of(npy("|u1", (1, 32, 32, 1), pixels)) != same
    with pytest.raises(ValueError):
        digest_of(b'{"HttpError": "Not Found"}')
    with pytest.raises(ValueError):
        digest_of(npy("<u2", (1, 16, 32, 1), pixels)[:20])


def test_tags_an_encoding_keeps_leave_out_the_meta_group_and_the_pixels() -> None:
    source = {"0002,0010": {"Name": "TransferSyntaxUID", "Value": "1.2.840.10008.1.2.1"},
              "0010,0010": {"Name": "PatientName", "Value": "A^B"},
              "7fe0,0010": {"Name": "PixelData", "Type": "Null"}}
    target = {"0002,0010": {"Name": "TransferSyntaxUID", "Value": "1.2.840.10008.1.2.4.80"},
              "0010,0010": {"Name": "PatientName", "Value": "A^B"},
              "7fe0,0010": {"Name": "PixelData", "Type": "Binary"}}
    kept = [replicate.kept_tags(tags) for tags in (source, target)]
    assert replicate.tags_differ(*kept) == []
    target["0010,0010"] = {"Name": "PatientName", "Value": "C^D"}
    target["0008,2111"] = {"Name": "DerivationDescription", "Value": "Lossy"}
    assert replicate.tags_differ(source, replicate.kept_tags(target)) == [
        "0002,0010 TransferSyntaxUID", "0008,2111 DerivationDescription",
        "0010,0010 PatientName", "7fe0,0010 PixelData"]
    assert replicate.tags_differ(*[replicate.kept_tags(tags) for tags in (source, target)]) == [
        "0008,2111 DerivationDescription", "0010,0010 PatientName"]


@pytest.mark.parametrize("first, second, same", [
    ("-1024.0", "-1024", True), ("0.0\\0.0\\0.0", "0\\0\\0", True), ("1.5e1", "15", True),
    ("0.5\\0.5", "0.5\\0.6", False), ("0.5\\0.5", "0.5", False), ("A^B", "A^B ", False),
    ("", "0", False), ("nan", "nan", True)])
def test_values_that_are_the_same_numbers_written_another_way(first: str, second: str,
                                                              same: bool) -> None:
    values = [{"Name": "RescaleIntercept", "Type": "String", "Value": value}
              for value in (first, second)]
    assert replicate.same_value(*values) is same


def test_a_sample_of_studies_is_the_same_on_every_run() -> None:
    studies = [f"{number:08x}-00000000-00000000-00000000-00000000" for number in range(2000)]
    taken = [study for study in studies if replicate.in_sample(study, 10)]
    assert 150 < len(taken) < 250
    assert taken == [study for study in studies if replicate.in_sample(study, 10.0)]
    assert all(replicate.in_sample(study, 100) for study in studies)
    assert set(taken) <= {study for study in studies if replicate.in_sample(study, 50)}


@pytest.mark.parametrize("text, value", [("10", 10.0), ("2.5%", 2.5), ("100", 100.0)])
def test_a_percentage(text: str, value: float) -> None:
    assert replicate.percentage(text) == value


@pytest.mark.parametrize("text", ["0", "101", "-5", "ten"])
def test_a_percentage_out_of_range(text: str) -> None:
    with pytest.raises(Exception):
        replicate.percentage(text)


INSTANCE = "0a1b2c3d-4e5f6a7b-8c9d0e1f-2a3b4c5d-6e7f8091"
OTHER = "1a1b2c3d-4e5f6a7b-8c9d0e1f-2a3b4c5d-6e7f8091"


def test_accepted_instances_from_a_report_a_csv_or_a_list(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"copied": 3, "unreadable": [
        {"id": INSTANCE, "study": "s", "reason": "gone", "accepted": False}]}))
    assert replicate.Accepted.read(report).ids == {INSTANCE}
    table = tmp_path / "check.csv"
    table.write_text(",".join(replicate.CSV_COLUMNS) + "\n"
                     f"unreadable,P1,20200101,1.2.3,s,{INSTANCE},1.2.3.4,1.2.3.4.5,gone\n"
                     f"missing,P1,20200101,1.2.3,s,{OTHER},1.2.3.4,1.2.3.4.6,lacks\n")
    assert replicate.Accepted.read(table).ids == {INSTANCE}
    listing = tmp_path / "list"
    listing.write_text(f"# lost in the flood of 2019\n{INSTANCE}\n\n  1.2.840.99.7  # a UID\n")
    accepted = replicate.Accepted.read(listing)
    assert accepted.ids == {INSTANCE} and accepted.uids == {"1.2.840.99.7"}
    assert INSTANCE in accepted and OTHER not in accepted


@pytest.mark.parametrize("text, why", [
    ("P00001\n", "line 1: 'P00001' is neither an Orthanc instance ID nor a SOPInstanceUID"),
    ('{"copied": 3, "unreadable": [{"name": "x"}]}', "not a report of this tool")])
def test_an_accept_file_that_names_nothing_usable(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "accept"
    path.write_text(text)
    with pytest.raises(UsageError, match=why):
        replicate.Accepted.read(path)
    with pytest.raises(UsageError, match="no such file|No such file"):
        replicate.Accepted.read(tmp_path / "absent")


def test_which_download_errors_say_the_source_lost_its_file() -> None:
    lost = HttpStatusError("source", "GET", "/instances/x/file", 500, json.dumps(
        {"OrthancStatus": 2006, "Details": "The path does not point to a regular file: /s/1"}))
    assert replicate.unreadable_reason(lost) == (
        "the source cannot read its file (HTTP 500: The path does not point to a regular "
        "file: /s/1)")
    assert replicate.unreadable_reason(replicate.GaveUp(lost, 3)) is not None
    busy = HttpStatusError("source", "GET", "/instances/x/file", 503, "")
    assert replicate.unreadable_reason(busy) is None
    target = HttpStatusError("target", "POST", "/instances", 500, json.dumps(
        {"OrthancStatus": 2006}))
    assert replicate.unreadable_reason(target) is None


# ---- watching a run --------------------------------------------------------------------------
def test_metrics_name_each_metric_once_whatever_its_labels() -> None:
    config = replicate.Config.from_argv(["http://old:8042", "http://new:8042", "--follow"])
    state = {"started": 1.0, "copied": 3, "bytes": 30, "already_there": 0, "retried": 2,
             "failed_by": {"http_500": 1, "http_503": 2, "transport": 1, "refused_by_target": 4},
             "deleted": 0, "metadata": 0, "studies": 2, "studies_complete": 1,
             "instances_left": None, "rate_bytes": 1.5, "uploads": 4, "paused_until": None,
             "reached": "20240131", "follow": {"lag_seconds": 12.5, "changes_pending": 3,
                                               "last_look": 100.0}}
    lines = replicate.metric_lines(state, config)
    types = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    assert 'replicate_instances_failed_total{reason="http_503"} 2' in lines
    assert "replicate_instances_left" not in "\n".join(lines)  # not known: not given
    assert "replicate_study_date_reached_seconds 1706659200" in lines
    assert "replicate_follow_lag_seconds 12.5" in lines
    assert all(line.startswith("#") or line.split()[-1].replace(".", "").replace(
        "e+", "").isdigit() for line in lines)


@pytest.mark.parametrize("text, address", [("8099", ("127.0.0.1", 8099)),
                                           ("0.0.0.0:8099", ("0.0.0.0", 8099)),
                                           ("[::1]:0", ("::1", 0))])
def test_status_addresses(text: str, address: tuple) -> None:
    assert replicate.parse_status(text) == address


@pytest.mark.parametrize("text", ["", "host:", "8099x", "70000", "a:b"])
def test_status_addresses_that_are_not(text: str) -> None:
    with pytest.raises(UsageError, match="give PORT or ADDR:PORT"):
        replicate.parse_status(text)


def test_the_next_pause_of_a_timetable() -> None:
    table = replicate.parse_bwlimit("Mon-07:00,pause Mon-20:00,off Tue-07:00,pause Tue-20:00,1M")
    assert table.next_pause(6 * 60) == 7 * 60  # Monday 06:00: Monday 07:00
    assert table.next_pause(21 * 60) == 24 * 60 + 7 * 60  # Monday 21:00: Tuesday 07:00
    assert replicate.parse_bwlimit("08:00,512K 19:00,off").next_pause(0) is None
