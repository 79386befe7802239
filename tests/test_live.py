"""Live migration and selection against real Orthanc servers: --dry-run, --query/--study,
--bwlimit, user metadata and attachments, --report and --follow."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from dicomgen import write_corpus
from orthanc import OrthancServer
from test_replicate import (COUNT_POSTS_LUA, CORPUS_SIZE, args, instances_of_patient,
                            journal_studies, lua, posts_seen, run, start_process,
                            summary_value, wait_for)


def test_dry_run_writes_nothing(make_server, source, tmp_path, capsys) -> None:
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "count", COUNT_POSTS_LUA)])
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save, "--dry-run"))
    assert code == 0, err
    assert summary_value(out, "To transfer:") == CORPUS_SIZE
    assert "Dry run" in out
    assert target.instances() == set() and posts_seen(target) == 0
    assert not save.exists()


def test_selection_by_query_and_study(make_server, target, tmp_path, capsys) -> None:
    source = make_server("SOURCE")
    old = source.upload(write_corpus(tmp_path / "old", 2, 1, 3, prefix="O",
                                     study_date="20190615"))
    new = source.upload(write_corpus(tmp_path / "new", 2, 1, 3, prefix="N",
                                     study_date="20200615"))
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save, "--query",
                                      "StudyDate=20200101-20201231", "--verify"))
    assert code == 0, err
    assert target.instances() == set(new)
    assert summary_value(out, "Studies selected on the source:") == 2
    assert "Verified:      6 instances, 6 by MD5; 0 missing or different" in out

    # --study adds one study of 2019; wildcards work on other tags
    one_old = source.get(f"/instances/{old[0]}/study")["ID"]
    code, out, err = run(capsys, args(source, target, save, "--study", one_old))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 3
    assert target.instances() == set(new) | instances_of_patient(source, "O00000")
    code, out, err = run(capsys, args(source, target, save, "--query", "PatientID=O*"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 3 and target.instances() == source.instances()

    code, out, err = run(capsys, args(source, target, save, "--study", "no-such-study"))
    assert code == 2 and "--study no-such-study" in err
    code, out, err = run(capsys, args(source, target, save, "--study", "1.2.3.999"))
    assert code == 2 and "--study 1.2.3.999: no such study" in err


def test_study_by_its_uid(make_server, target, tmp_path, capsys) -> None:
    source = make_server("SOURCE")
    source.upload(write_corpus(tmp_path / "corpus", 3, 1, 2))
    studies = source.get("/studies")
    uid = source.get(f"/studies/{studies[1]}")["MainDicomTags"]["StudyInstanceUID"]
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--study", uid))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 2
    assert target.get("/studies") == [studies[1]]


def test_bwlimit_holds_the_rate(source, target, tmp_path, capsys) -> None:
    size = int(source.get("/statistics")["TotalUncompressedSize"])
    started = time.monotonic()
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--bwlimit", "2M"))
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert target.md5s() == source.md5s()
    # a lower bound only: a busy machine can make it slower, never faster than the limit
    assert elapsed >= size / (2 * 1024 ** 2) - 0.1, (elapsed, size)


METADATA_CONFIG = {"UserMetadata": {"Sample": 1024}, "UserContentType": {"report": 1025}}


def put(server: OrthancServer, path: str, data: bytes) -> None:
    server.session.put(server.url + path, data=data, timeout=60).raise_for_status()


def fetch(server: OrthancServer, path: str) -> bytes:
    """The raw answer to a GET: a metadata value or an attachment's data."""
    answer = server.session.get(server.url + path, timeout=60)
    answer.raise_for_status()
    return answer.content


def test_user_metadata_and_attachments_travel(make_server, corpus, tmp_path, capsys) -> None:
    source = make_server("SOURCE", **METADATA_CONFIG)
    instance = source.upload(corpus[:4])[0]
    series = source.get(f"/instances/{instance}")["ParentSeries"]
    study = source.get(f"/series/{series}")["ParentStudy"]
    patient = source.get(f"/studies/{study}")["ParentPatient"]
    put(source, f"/instances/{instance}/metadata/Sample", b"instance value")
    put(source, f"/series/{series}/metadata/2000", b"series value")
    put(source, f"/studies/{study}/attachments/report", b"%PDF-1.4 a report")
    put(source, f"/patients/{patient}/attachments/3000", b"numbered attachment")
    target = make_server("TARGET", **METADATA_CONFIG)
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert fetch(target, f"/instances/{instance}/metadata/Sample") == b"instance value"
    assert fetch(target, f"/series/{series}/metadata/2000") == b"series value"
    assert fetch(target, f"/studies/{study}/attachments/report/data") == b"%PDF-1.4 a report"
    assert fetch(target, f"/patients/{patient}/attachments/3000/data") == b"numbered attachment"
    assert summary_value(out, "Metadata:") == 4
    # system metadata stay the target's own
    assert target.get(f"/instances/{instance}/metadata?expand")["Origin"] == "RestApi"

    # a re-run writes nothing; a changed value on the source is copied again
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0 and "Metadata:" not in out
    put(source, f"/instances/{instance}/metadata/Sample", b"changed")
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0 and summary_value(out, "Metadata:") == 1
    assert fetch(target, f"/instances/{instance}/metadata/Sample") == b"changed"

    # --no-metadata copies the instances alone
    bare = make_server("BARE", **METADATA_CONFIG)
    code, out, err = run(capsys, args(source, bare, tmp_path / "bare", "--no-metadata"))
    assert code == 0 and bare.instances() == source.instances()
    assert bare.session.get(f"{bare.url}/instances/{instance}/metadata/Sample").status_code \
        == 404


def test_from_an_orthanc_1_9_source(make_server, old_orthanc, corpus, tmp_path,
                                     capsys) -> None:
    """Migrations start from older servers: Orthanc 1.9 lists attachments by name only
    (no ?full) and its answers differ in places from 1.10's."""
    source = make_server("SOURCE", binary=old_orthanc, **METADATA_CONFIG)
    assert source.get("/system")["Version"] == "1.9.1"
    ids = source.upload(corpus)
    series = source.get(f"/instances/{ids[0]}")["ParentSeries"]
    study = source.get(f"/series/{series}")["ParentStudy"]
    put(source, f"/instances/{ids[0]}/metadata/Sample", b"old value")
    put(source, f"/studies/{study}/attachments/report", b"%PDF-1.4 an old report")
    put(source, f"/studies/{study}/attachments/3000", b"numbered attachment")
    target = make_server("TARGET", **METADATA_CONFIG)
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--verify"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == len(corpus)
    assert summary_value(out, "Verified:") == len(corpus)
    assert summary_value(out, "Metadata:") == 3
    assert target.md5s() == source.md5s()
    assert fetch(target, f"/instances/{ids[0]}/metadata/Sample") == b"old value"
    assert fetch(target, f"/studies/{study}/attachments/report/data") == b"%PDF-1.4 an old report"
    assert fetch(target, f"/studies/{study}/attachments/3000/data") == b"numbered attachment"


def test_to_an_orthanc_1_12_target(make_server, new_orthanc, source, tmp_path,
                                   capsys) -> None:
    """Migrations go to newer servers: Orthanc 1.12 lists by ID and stores differently."""
    target = make_server("TARGET", binary=new_orthanc)
    assert target.get("/system")["Version"] == "1.12.7"
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--verify"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert summary_value(out, "Verified:") == CORPUS_SIZE
    assert target.md5s() == source.md5s()


def label(server: OrthancServer, path: str, name: str) -> None:
    server.session.put(f"{server.url}{path}/labels/{name}", timeout=60).raise_for_status()


def test_labels_travel_between_orthanc_1_12_servers(make_server, new_orthanc, corpus,
                                                    tmp_path, capsys) -> None:
    source = make_server("SOURCE", binary=new_orthanc, **METADATA_CONFIG)
    ids = source.upload(corpus)
    study = source.get(f"/instances/{ids[0]}/study")["ID"]
    patient = source.get(f"/studies/{study}")["ParentPatient"]
    label(source, f"/studies/{study}", "urgent")
    label(source, f"/studies/{study}", "second-read")
    label(source, f"/patients/{patient}", "vip")
    label(source, f"/instances/{ids[-1]}", "checked")
    put(source, f"/studies/{study}/attachments/report", b"%PDF-1.4 a report")
    target = make_server("TARGET", binary=new_orthanc, **METADATA_CONFIG)
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save, "--verify"))
    assert code == 0, err
    assert summary_value(out, "Metadata:") == 5  # four labels and the attachment
    assert target.get(f"/studies/{study}/labels") == ["second-read", "urgent"]
    assert target.get(f"/patients/{patient}/labels") == ["vip"]
    assert target.get(f"/instances/{ids[-1]}/labels") == ["checked"]
    assert target.get(f"/instances/{ids[0]}/labels") == []
    assert target.md5s() == source.md5s()

    # one more label on each side: the source's is added, the target's own stays
    label(source, f"/instances/{ids[0]}", "late")
    label(target, f"/studies/{study}", "target-only")
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "Metadata:") == 1
    assert target.get(f"/instances/{ids[0]}/labels") == ["late"]
    assert target.get(f"/studies/{study}/labels") == ["second-read", "target-only", "urgent"]


def test_labels_a_target_cannot_store_are_a_failure(make_server, new_orthanc, corpus, target,
                                                    tmp_path, capsys) -> None:
    source = make_server("SOURCE", binary=new_orthanc)
    ids = source.upload(corpus)
    label(source, f"/instances/{ids[0]}", "checked")
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 1
    assert summary_value(out, "Copied:") == len(corpus)
    assert ("1 resources carry labels on the source, but the target (Orthanc 1.10.1) cannot "
            "store labels") in err


SLOW_METADATA_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if method == "PUT" and string.find(uri, "/metadata/") then
    print("PUT-METADATA")
    os.execute("sleep 0.2")
  end
  return true
end
"""


def test_ctrl_c_during_the_metadata_counts_what_was_written(make_server, corpus, tmp_path,
                                                            capsys) -> None:
    source = make_server("SOURCE", **METADATA_CONFIG)
    ids = source.upload(corpus)
    for instance in ids:
        put(source, f"/instances/{instance}/metadata/Sample", instance.encode())
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "slow", SLOW_METADATA_LUA)],
                         **METADATA_CONFIG)
    process = start_process(args(source, target, tmp_path / "save", "--threads", "2"))
    wait_for(lambda: (target.folder / "orthanc.log").read_text().count("PUT-METADATA") >= 4)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    written = sum(target.session.get(f"{target.url}/instances/{instance}/metadata/Sample"
                                     ).status_code == 200 for instance in ids)
    assert 0 < written < len(ids), "the interrupt came too late to test"
    assert summary_value(out, "Metadata:") == written


def test_metadata_the_target_does_not_declare_is_a_failure(make_server, corpus, tmp_path,
                                                           capsys) -> None:
    source = make_server("SOURCE", **METADATA_CONFIG)
    instance = source.upload(corpus[:2])[0]
    put(source, f"/instances/{instance}/metadata/Sample", b"value")
    target = make_server("TARGET")
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 1
    assert "metadata 'Sample'" in err and "UserMetadata" in err


def test_report(make_server, source, tmp_path, capsys) -> None:
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "refuse", """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.PatientID ~= "S00001"
end
""")])
    report = tmp_path / "report.json"
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--ignore-errors",
                                      "--report", str(report), "--threads", "3"))
    assert code == 1
    data = json.loads(report.read_text())
    assert data["copied"] == CORPUS_SIZE - 8 and data["skipped"] == 0
    assert {entry["id"] for entry in data["failed"]} == instances_of_patient(source, "S00001")
    assert all("FilteredOut" in entry["reason"] for entry in data["failed"])
    assert data["bytes"] > 0 and isinstance(data["seconds"], float)
    assert data["source"] == source.url and data["target"] == target.url
    assert data["options"]["threads"] == 3 and data["options"]["ignore_errors"] is True
    assert data["exit_status"] == 1 and data["error"] is None
    assert "password" not in report.read_text()


def test_follow_copies_new_arrivals_and_resumes(source, target, tmp_path) -> None:
    save = tmp_path / "save"
    process = follow(source, target, save)
    try:
        wait_for(lambda: len(target.instances()) == CORPUS_SIZE)
        arrived = source.upload(write_corpus(tmp_path / "live", 1, 1, 3, prefix="F"))
        wait_for(lambda: set(arrived) <= target.instances(), seconds=20)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "stopped following" in err and "Traceback" not in err
    assert summary_value(out, "Copied:") == CORPUS_SIZE + 3
    position = [line for line in save.read_text().splitlines() if line.startswith("changes\t")]
    assert position, save.read_text()

    # stopped: one more arrives; a restarted --follow takes it, sending nothing else again
    late = source.upload(write_corpus(tmp_path / "late", 1, 1, 1, prefix="G"))
    process = follow(source, target, save)
    try:
        wait_for(lambda: set(late) <= target.instances(), seconds=20)
        time.sleep(1)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert summary_value(out, "Copied:") == 1
    assert target.md5s() == source.md5s()
    assert len(journal_studies(save)) >= 6


def follow(source: OrthancServer, target: OrthancServer, save, *extra: str) -> subprocess.Popen:
    return start_process(args(source, target, save, "--follow", "--poll", "0.3", *extra))


def test_follow_waits_for_servers_that_restart(source, target, tmp_path) -> None:
    process = follow(source, target, tmp_path / "save", "--retries", "1")
    try:
        wait_for(lambda: len(target.instances()) == CORPUS_SIZE)
        source.kill()
        time.sleep(3)  # several looks give up in that time: --retries 1 waits 0.5 s
        assert process.poll() is None, "following ended while the source was down"
        source.start()
        # the target is down when new instances arrive: they wait for it
        target.kill()
        arrived = source.upload(write_corpus(tmp_path / "live", 1, 1, 2, prefix="R"))
        time.sleep(3)
        assert process.poll() is None, "following ended while the target was down"
        target.start()
        wait_for(lambda: set(arrived) <= target.instances(), seconds=20)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "source GET /changes" in err and "target GET /system" in err
    assert "looking again in 0.3 s" in err
    assert summary_value(out, "Copied:") == CORPUS_SIZE + 2
    assert summary_value(out, "Failed:") == 0
    assert target.md5s() == source.md5s()


def test_a_fatal_error_while_following_still_prints_the_summary(source, target,
                                                                tmp_path) -> None:
    process = follow(source, target, tmp_path / "save")
    try:
        wait_for(lambda: len(target.instances()) == CORPUS_SIZE)
        source.kill()
        source.users = source.config["RegisteredUsers"] = {"someone": "else"}  # changed
        source.session = source.new_session()
        source.start()
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 3, err
    assert "401" in err and "Traceback" not in err
    assert summary_value(out, "Copied:") == CORPUS_SIZE


COUNT_METADATA_READS_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if method == "GET" and string.find(uri, "/metadata$") then print("GET-METADATA") end
  return true
end
"""


def test_follow_syncs_the_metadata_that_changes_and_no_other(make_server, corpus,
                                                             tmp_path) -> None:
    source = make_server("SOURCE", LuaScripts=[lua(tmp_path, "count",
                                                   COUNT_METADATA_READS_LUA)],
                         **METADATA_CONFIG)
    first, second = source.upload(corpus[:2])
    put(source, f"/instances/{first}/metadata/Sample", b"before")
    target = make_server("TARGET", **METADATA_CONFIG)
    process = follow(source, target, tmp_path / "save")

    def target_value(instance: str) -> str:
        answer = target.session.get(f"{target.url}/instances/{instance}/metadata/Sample")
        return answer.text if answer.status_code == 200 else ""
    try:
        wait_for(lambda: target_value(first) == "before")
        time.sleep(2)  # about six looks with nothing new
        reads = (source.folder / "orthanc.log").read_text().count("GET-METADATA")
        put(source, f"/instances/{second}/metadata/Sample", b"during")
        wait_for(lambda: target_value(second) == "during", seconds=20)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert reads == 1, "idle looks read metadata again"  # the first pass's sync of `first`
    assert (source.folder / "orthanc.log").read_text().count("GET-METADATA") == 2
    assert summary_value(out, "Metadata:") == 2
