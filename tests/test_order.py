"""The order a PACS team needs, against real Orthanc servers: newest studies first (the study
listing sorted on 1.10.1, sorted finds on 1.12.7), --order oldest and source, a resumed copy
that keeps the order, --study @FILE, and --bwlimit's pauses (counted at the servers, with a
real and an injected clock)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import replicate
from dicomgen import make_instance, write_dicom
from orthanc import OrthancServer
from pydicom.uid import generate_uid
from test_replicate import SCRIPT, args, journal_studies, lua, run, wait_for

STUDIES, UNDATED = 60, 6  # dated over 2005-2024, and without a StudyDate
LOG_REQUESTS_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  print("REQUEST " .. method .. " " .. uri)
  return true
end
"""


@pytest.fixture(scope="module")
def dated_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """STUDIES studies of 2 tiny instances, dated at random over 20 years (with a StudyTime),
    and UNDATED more without a StudyDate."""
    folder = tmp_path_factory.mktemp("dated")
    chance = random.Random(25)
    paths = []
    for number in range(STUDIES + UNDATED):
        date = (f"{chance.randint(2005, 2024)}{chance.randint(1, 12):02d}"
                f"{chance.randint(1, 28):02d}") if number < STUDIES else None
        study, series = generate_uid(), generate_uid()
        for instance in range(2):
            dataset = make_instance(f"D{number:03d}", study, series, instance + 1,
                                    study_date=date or "20000101")
            if date is None:
                del dataset.StudyDate
            else:
                dataset.StudyTime = f"{chance.randint(0, 23):02d}{chance.randint(0, 59):02d}00"
            path = folder / f"D{number}-{instance}.dcm"
            write_dicom(dataset, path)
            paths.append(path)
    return paths


def when(server: OrthancServer) -> dict[str, str]:
    """Study ID -> StudyDate + StudyTime ('' without a date)."""
    found = {}
    for study in server.get("/studies"):
        tags = server.get(f"/studies/{study}")["MainDicomTags"]
        found[study] = tags.get("StudyDate", "") and tags["StudyDate"] + tags.get("StudyTime", "")
    return found


def inversions(order: list[str], newest: bool, window: int = 0) -> list[tuple[str, str]]:
    """Pairs of dates out of order (studies without a date belong last) further apart in
    `order` than `window`."""
    def key(date: str) -> str:
        return (date or "0") if newest else (date or "99999999")
    found = []
    for first, earlier in enumerate(order):
        for later in order[first + window + 1:]:
            if (key(earlier) < key(later)) if newest else (key(earlier) > key(later)):
                found.append((earlier, later))
    return found


@pytest.fixture
def dated_source(make_server, dated_corpus) -> OrthancServer:
    server = make_server("SOURCE")
    server.upload(dated_corpus)
    return server


def completed(save: Path, dates: dict[str, str]) -> list[str]:
    return [dates[study] for study in journal_studies(save)]


# ---- the order ------------------------------------------------------------------------------
def test_newest_first_from_the_study_listing(dated_source, make_server, tmp_path,
                                             capsys) -> None:
    """Orthanc 1.10.1 sorts no find: its study listing, sorted, newest first; the studies
    without a date last. One transfer at a time: the order of completion is the order
    exactly; with the default transfers, studies swap only within as many as the run had in
    flight at once."""
    dates = when(dated_source)
    assert inversions(list(dates.values()), newest=True, window=16), \
        "the source's own listing must be out of date order for this test to mean anything"
    for name, extra in (("one", ["--threads", "1"]), ("default", [])):
        target, save = make_server(f"TARGET-{name}"), tmp_path / f"{name}.save"
        report = tmp_path / f"{name}.json"
        code, out, err = run(capsys, args(dated_source, target, save, "--report", str(report),
                                          *extra))
        assert code == 0, err
        assert "Order:         newest StudyDate first" in out
        order = completed(save, dates)
        assert sorted(order) == sorted(dates.values())
        in_flight = replicate.json.loads(report.read_text())["link"]["studies_in_flight_max"]
        window = 0 if extra else in_flight  # one transfer at a time: the exact order
        assert in_flight > 0
        assert inversions(order, newest=True, window=window) == [], (name, window)
        assert order[-UNDATED - window:].count("") == UNDATED


def test_oldest_first_and_the_source_order(dated_source, make_server, tmp_path, capsys) -> None:
    dates = when(dated_source)
    target, save = make_server("TARGET-old"), tmp_path / "old.save"
    code, out, err = run(capsys, args(dated_source, target, save, "--order", "oldest",
                                      "--threads", "1", "--report", str(tmp_path / "r.json")))
    assert code == 0, err
    order = completed(save, dates)
    assert inversions(order, newest=False) == [] and order[-UNDATED:] == [""] * UNDATED
    assert '"reached": "undated"' in (tmp_path / "r.json").read_text()
    target, save = make_server("TARGET-src"), tmp_path / "src.save"
    code, out, err = run(capsys, args(dated_source, target, save, "--order", "source",
                                      "--threads", "1"))
    assert code == 0, err
    assert "Order:" not in out
    assert journal_studies(save) == dated_source.get("/studies")


def test_sorted_finds_on_1_12_7_and_a_few_studies_one_by_one(new_orthanc, make_server,
                                                              dated_corpus, tmp_path,
                                                              capsys) -> None:
    """A source that sorts its finds (HasExtendedFind) is read in that order; later, the few
    studies that arrived since are ordered by their own dates."""
    source = make_server("SOURCE", binary=new_orthanc)
    later, first = dated_corpus[:6], dated_corpus[6:]  # 3 dated studies arrive later
    source.upload(first)
    target, save = make_server("TARGET"), tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save, "--threads", "1"))
    assert code == 0, err
    order = completed(save, when(source))
    assert inversions(order, newest=True) == [] and order[-UNDATED:] == [""] * UNDATED
    source.upload(later)
    dates = when(source)
    code, out, err = run(capsys, args(source, target, save, "--threads", "1"))
    assert code == 0, err
    fresh = [dates[study] for study in journal_studies(save)[STUDIES + UNDATED - 3:]]
    assert len(fresh) == 3 and all(fresh) and fresh == sorted(fresh, reverse=True)


def test_the_first_studies_go_before_the_whole_listing_is_read(make_server, dated_corpus,
                                                              tmp_path, capsys,
                                                              monkeypatch) -> None:
    """A listing of several pages (10 studies each here): the studies dated from the newest
    date of its last page on (oldest first: up to the oldest of its first page) are found
    at once and checked while the rest is read; the order stays exact. When that find
    answers HEAD_LIMIT studies or more, which may not be all of them, the listing alone
    decides. Requests counted in the source's log (the log shows no query: all pages and the
    first listing of IDs are `GET /studies`)."""
    monkeypatch.setattr(replicate, "STUDY_PAGE", 10)
    source = make_server("SOURCE", LuaScripts=[lua(tmp_path, "requests", LOG_REQUESTS_LUA)])
    source.upload(dated_corpus)
    dates = when(source)
    for name, order, limit in (("newest", "newest", 200), ("oldest", "oldest", 200),
                               ("cut", "newest", 2)):
        monkeypatch.setattr(replicate, "HEAD_LIMIT", limit)
        target, save = make_server(f"TARGET-{name}"), tmp_path / f"{name}.save"
        before = len(requests_seen(source))
        code, out, err = run(capsys, args(source, target, save, "--order", order,
                                          "--threads", "1"))
        assert code == 0, err
        completion = completed(save, dates)
        assert sorted(completion) == sorted(dates.values())
        assert inversions(completion, newest=order == "newest") == [], name
        seen = requests_seen(source)[before:]
        pages = [number for number, request in enumerate(seen) if request == "GET /studies"]
        checks = [number for number, request in enumerate(seen)
                  if request.startswith("GET /studies/") and request.endswith("/instances")]
        assert "POST /tools/find" in seen and len(pages) >= 1 + (STUDIES + UNDATED) // 10
        assert (checks[0] < pages[-1]) == (name != "cut"), name


def test_a_resumed_copy_keeps_the_order(make_server, tmp_path) -> None:
    """Interrupted (Ctrl-C) after some studies, then run again: what is left goes newest
    first too, and nothing is missing. Each study is one instance of 2 MB, streamed alone
    and paced, so that studies land one by one (tiny ones would land in one ZIP)."""
    source = make_server("SOURCE")
    chance = random.Random(7)
    for number in range(12):
        path = tmp_path / f"R{number}.dcm"
        write_dicom(make_instance(f"R{number:02d}", generate_uid(), generate_uid(), 1,
                                  rows=1024, columns=1024, study_date=f"{2005 + number}"
                                  f"{chance.randint(1, 12):02d}{chance.randint(1, 28):02d}"),
                    path)
        source.upload([path])
    dates = when(source)
    target, save = make_server("TARGET"), tmp_path / "save"
    argv = args(source, target, save, "--threads", "1")
    process = subprocess.Popen([sys.executable, SCRIPT, *argv, "--bwlimit", "4M"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: save.exists() and len(journal_studies(save)) >= 4, 60)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert process.returncode == 130
    done = len(journal_studies(save))
    assert done < 12
    finished = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr
    order = completed(save, dates)
    assert sorted(order) == sorted(dates.values())
    assert inversions(order[:done], newest=True) == []
    assert inversions(order[done:], newest=True) == []


def test_a_list_of_studies_from_a_file(dated_source, make_server, tmp_path, capsys) -> None:
    """--study @FILE: copied in the file's order; a line that names nothing is named and left
    out; a list that names nothing at all is a usage error."""
    studies = dated_source.get("/studies")
    uid = dated_source.get(f"/studies/{studies[3]}")["MainDicomTags"]["StudyInstanceUID"]
    listing = tmp_path / "priors.txt"
    listing.write_text(f"# priors for Monday\n{studies[5]}\n\n1.2.3.404\n{uid}  # by UID\n"
                       f"{studies[1]}\n")
    target, save = make_server("TARGET"), tmp_path / "save"
    code, out, err = run(capsys, args(dated_source, target, save, "--study", f"@{listing}",
                                      "--threads", "1"))
    assert code == 0, err
    assert "--study: 1 of 4 values name no study on the source and is left out: 1.2.3.404" in err
    assert "Not found:     1 --study value naming no study" in out
    assert journal_studies(save) == [studies[5], studies[3], studies[1]]
    assert len(target.get("/studies")) == 3
    listing.write_text("1.2.3.404\nffffffff-ffffffff-ffffffff-ffffffff-ffffffff\n")
    code, out, err = run(capsys, args(dated_source, target, save, "--study", f"@{listing}"))
    assert code == 2 and "no such study on the source" in err and "1.2.3.404" in err


# ---- pauses ---------------------------------------------------------------------------------
def requests_seen(server: OrthancServer) -> list[str]:
    return [line.split("REQUEST ", 1)[1] for line in
            (server.folder / "orthanc.log").read_text(errors="replace").splitlines()
            if "REQUEST " in line]


def test_a_run_started_in_a_pause_sends_nothing_and_ctrl_c_ends_it(make_server, dated_corpus,
                                                                    tmp_path) -> None:
    logger = lua(tmp_path, "requests", LOG_REQUESTS_LUA)
    source = make_server("SOURCE", LuaScripts=[logger])
    source.upload(dated_corpus[:4])
    target = make_server("TARGET", LuaScripts=[logger])
    before = len(requests_seen(source)), len(requests_seen(target))
    process = subprocess.Popen([sys.executable, SCRIPT, *args(source, target, tmp_path / "save",
                                                               "--bwlimit", "00:00,pause")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    seen = requests_seen(source)[before[0]:], requests_seen(target)[before[1]:]
    time.sleep(3)
    assert (requests_seen(source)[before[0]:], requests_seen(target)[before[1]:]) == seen
    assert all(request == "GET /system" for request in seen[0] + seen[1]), seen
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 130 and time.monotonic() - interrupted < 3
    assert "paused with no end in the timetable" in err
    assert target.instances() == set()


MONDAY_07, MONDAY_20 = 7 * 60, 20 * 60  # minutes of the week


def test_pauses_by_the_clock_inside_a_run(make_server, tmp_path, capsys, monkeypatch) -> None:
    """With an injected clock: a run that starts paused sends nothing but its start-up until
    the pause ends, then copies; a pause mid-copy stops new transfers within seconds (what
    is in flight ends) and the copy resumes by itself. The report counts the time paused."""
    source = make_server("SOURCE")
    paths = []
    for study in range(8):  # 16 instances of 512 KB: bundles of up to 4 MB, one at a time
        study_uid, series_uid = generate_uid(), generate_uid()
        for number in range(2):
            path = tmp_path / f"big-{study}-{number}.dcm"
            write_dicom(make_instance(f"B{study}", study_uid, series_uid, number + 1, rows=512,
                                      columns=512), path)
            paths.append(path)
    source.upload(paths)
    minute = [MONDAY_07]
    monkeypatch.setattr(replicate, "local_minute", lambda: minute[0])
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "requests", LOG_REQUESTS_LUA)])
    before = len(requests_seen(target))
    report = tmp_path / "report.json"
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(replicate.main(args(
        source, target, tmp_path / "save", "--threads", "1", "--report", str(report),
        "--bwlimit", "Mon-07:00,pause Mon-20:00,1M"))))
    runner.start()
    time.sleep(3)
    assert requests_seen(target)[before:] == ["GET /system"]
    minute[0] = MONDAY_20  # the pause ends: the copy runs at 1 MB/s
    wait_for(lambda: len(target.instances()) >= 2, 60)
    minute[0] = MONDAY_07  # paused again mid-copy
    time.sleep(6)  # what was in flight ends (a bundle of 4 MB at most)
    held = len(requests_seen(target)), len(target.instances())
    time.sleep(3)
    assert (len(requests_seen(target)) - 1, len(target.instances())) == held  # - its own GET
    assert held[1] < len(paths)
    minute[0] = MONDAY_20
    runner.join(120)
    assert result == [0]
    assert len(target.instances()) == len(paths)
    assert replicate.json.loads(report.read_text())["paused_seconds"] >= 8
    err = capsys.readouterr().err
    assert "paused until Mon 20:00" in err and "the pause ended" in err
