"""The cut-over: --delete keeps the target an exact mirror of what this tool copied, --check
compares without writing. Real servers: Debian's Orthanc 1.10.1 (with /tools/bulk-delete) and
1.9.1 (without), with instances reaching the target from elsewhere to prove they stay."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import requests

import replicate
from dicomgen import make_instance, write_corpus, write_dicom
from orthanc import PASSWORD, USER, OrthancServer
from test_replicate import (CORPUS_SIZE, args, run, slow_request_lua, start_process,
                            summary_value, wait_for)

OTHER = ("modality", "other-password")  # someone else who uploads to the target
USERS = {USER: PASSWORD, OTHER[0]: OTHER[1]}


def studies_of(server: OrthancServer) -> dict[str, int]:
    """Study ID -> instance count."""
    return {study: len(server.get(f"/studies/{study}/instances"))
            for study in server.get("/studies")}


def largest_study(server: OrthancServer) -> str:
    counts = studies_of(server)
    return max(counts, key=lambda study: (counts[study], study))


def upload_as_other(target: OrthancServer, source: OrthancServer, study: str,
                    tmp_path: Path) -> str:
    """An instance added directly on the target, with other credentials, to a study copied
    there: a modality sending to the new server during the cut-over."""
    record = source.get(f"/studies/{study}")
    dataset = make_instance(record["PatientMainDicomTags"]["PatientID"],
                            record["MainDicomTags"]["StudyInstanceUID"],
                            "1.2.826.0.1.3680043.8.498.99", 99)
    path = tmp_path / f"other-{study[:8]}.dcm"
    write_dicom(dataset, path)
    answer = requests.post(target.url + "/instances", data=path.read_bytes(), auth=OTHER,
                           timeout=60)
    answer.raise_for_status()
    return answer.json()["ID"]


def target_own_study(target: OrthancServer, tmp_path: Path) -> str:
    """A study that only the target ever had, uploaded with the tool's own credentials."""
    paths = write_corpus(tmp_path / "own", 1, 1, 2, prefix="OWN")
    ids = target.upload(paths)
    return target.get(f"/instances/{ids[0]}/study")["ID"]


def delete(server: OrthancServer, path: str) -> None:
    server.session.delete(server.url + path, timeout=60).raise_for_status()


@pytest.fixture
def target(make_server) -> OrthancServer:  # noqa: F811 - two users on this one
    return make_server("TARGET", users=USERS)


def copied(source: OrthancServer, target: OrthancServer, save: Path, capsys) -> None:
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE


def test_a_study_deleted_on_the_source_leaves_with_a_plain_delete(source, target, tmp_path,
                                                                  capsys) -> None:
    save, report = tmp_path / "save", tmp_path / "report.json"
    copied(source, target, save, capsys)
    gone = largest_study(source)
    count = len(source.get(f"/studies/{gone}/instances"))
    other = upload_as_other(target, source, gone, tmp_path)
    own = target_own_study(target, tmp_path)
    own_instances = {record["ID"] for record in target.get(f"/studies/{own}/instances")}
    delete(source, f"/studies/{gone}")

    code, out, err = run(capsys, args(source, target, save, "--delete", "--report", str(report)))
    assert code == 0, err
    # of the study the source deleted, only what this tool copied went: the other's stays,
    # and so does the target's own study
    assert [record["ID"] for record in target.get(f"/studies/{gone}/instances")] == [other]
    assert target.instances() == source.instances() | {other} | own_instances
    assert (f"Deleted:       {count} instances in 1 study the source no longer has (1 kept "
            "there") in out
    assert f"gone\t{gone}" in save.read_text()
    written = json.loads(report.read_text())
    assert written["deleted"] == [{"study": gone, "instances": count, "kept": 1}]

    # nothing more to do: the next run deletes nothing and ends well
    code, out, err = run(capsys, args(source, target, save, "--delete"))
    assert code == 0, err
    assert "Deleted:" not in out


def test_series_and_instances_deleted_on_the_source_leave_with_recheck(source, target, tmp_path,
                                                                       capsys) -> None:
    save = tmp_path / "save"
    copied(source, target, save, capsys)
    study = largest_study(source)
    series = source.get(f"/studies/{study}")["Series"]
    gone_series = sorted(series)[0]
    gone_series_instances = set(source.get(f"/series/{gone_series}")["Instances"])
    delete(source, f"/series/{gone_series}")
    kept_series_instance = source.get(f"/series/{sorted(series)[1]}")["Instances"][0]
    delete(source, f"/instances/{kept_series_instance}")
    other = upload_as_other(target, source, study, tmp_path)

    # the change log holds no deletion: a plain --delete takes the study on trust
    code, out, err = run(capsys, args(source, target, save, "--delete"))
    assert code == 0, err
    assert gone_series_instances <= target.instances()

    code, out, err = run(capsys, args(source, target, save, "--delete", "--recheck"))
    assert code == 0, err
    assert target.instances() == source.instances() | {other}
    assert summary_value(out, "Deleted:") == len(gone_series_instances) + 1


def test_max_delete_below_the_pending_count_deletes_nothing(source, target, tmp_path,
                                                            capsys) -> None:
    save = tmp_path / "save"
    copied(source, target, save, capsys)
    for study in sorted(source.get("/studies"))[:2]:
        delete(source, f"/studies/{study}")
    before = target.instances()
    pending = len(before) - len(source.instances())
    code, out, err = run(capsys, args(source, target, save, "--delete", "--max-delete",
                                      str(pending - 1)))
    assert code == 1, err
    assert target.instances() == before
    assert (f"--delete: {pending} instances to delete from the target, more than --max-delete "
            f"{pending - 1}; nothing was deleted") in err
    code, out, err = run(capsys, args(source, target, save, "--delete", "--max-delete",
                                      str(pending)))
    assert code == 0, err
    assert target.instances() == source.instances()


def test_dry_run_delete_names_what_it_would_delete_and_deletes_nothing(source, target, tmp_path,
                                                                      capsys) -> None:
    save = tmp_path / "save"
    copied(source, target, save, capsys)
    gone = largest_study(source)
    count = len(source.get(f"/studies/{gone}/instances"))
    delete(source, f"/studies/{gone}")
    before, saved = target.instances(), save.read_bytes()
    code, out, err = run(capsys, args(source, target, save, "--delete", "--dry-run"))
    assert code == 0, err
    assert target.instances() == before and save.read_bytes() == saved
    assert f"would delete: {count} instances of study {gone} (all the source deleted)" in err
    assert summary_value(out, "Would delete:") == count


def test_the_check_lists_extras_names_what_is_missing_and_writes_nothing(source, target,
                                                                         tmp_path,
                                                                         capsys) -> None:
    save, report, table = tmp_path / "save", tmp_path / "report.json", tmp_path / "check.csv"
    copied(source, target, save, capsys)
    own = target_own_study(target, tmp_path)
    saved, count = save.read_bytes(), len(target.instances())
    code, out, err = run(capsys, args(source, target, save, "--check", "--csv", str(table)))
    assert code == 0, err
    assert "Result:        the target holds every instance of the source" in out
    assert "taken on trust" in out
    rows = list(csv.DictReader(table.open()))
    assert [(row["difference"], row["study"]) for row in rows] == [("extra-study", own)]
    assert rows[0]["patient_id"] == "OWN00000" and rows[0]["study_instance_uid"]

    lost = sorted(source.instances())[0]
    delete(target, f"/instances/{lost}")
    code, out, err = run(capsys, args(source, target, save, "--check", "--recheck", "--csv",
                                      str(table), "--report", str(report)))
    assert code == 1, err
    assert summary_value(out, "Missing:") == 1
    assert "Result:        the target differs from the source" in out
    rows = list(csv.DictReader(table.open()))
    assert ("missing", lost) in [(row["difference"], row["instance"]) for row in rows]
    written = json.loads(report.read_text())["check"]
    assert written["missing"] == 1 and written["extra_studies"] == 1
    assert any(record.get("missing") == [lost] for record in written["differences"])
    # nothing was written: not the save file, not the target
    assert save.read_bytes() == saved
    assert len(target.instances()) == count - 1


def test_check_with_delete_asks_for_an_exact_mirror(source, target, tmp_path, capsys) -> None:
    save = tmp_path / "save"
    copied(source, target, save, capsys)
    target_own_study(target, tmp_path)
    code, out, err = run(capsys, args(source, target, save, "--check", "--delete"))
    assert code == 0, err  # the target's own study is no reason to fail
    gone = largest_study(source)
    count = len(source.get(f"/studies/{gone}/instances"))
    delete(source, f"/studies/{gone}")
    code, out, err = run(capsys, args(source, target, save, "--check", "--delete"))
    assert code == 1, err
    assert f"--delete would remove {count} instances" in out


def test_a_study_deleted_on_an_orthanc_1_9_source_and_target(make_server, old_orthanc, corpus,
                                                            tmp_path, capsys) -> None:
    """Orthanc 1.9 has no /tools/bulk-delete: instances are deleted one by one."""
    source = make_server("SOURCE", binary=old_orthanc)
    source.upload(corpus)
    target = make_server("TARGET", binary=old_orthanc, users=USERS)
    save = tmp_path / "save"
    copied(source, target, save, capsys)
    gone = largest_study(source)
    other = upload_as_other(target, source, gone, tmp_path)
    delete(source, f"/studies/{gone}")
    code, out, err = run(capsys, args(source, target, save, "--delete"))
    assert code == 0, err
    assert target.instances() == source.instances() | {other}


def test_a_study_deleted_during_follow_leaves_within_the_interval(source, target, tmp_path,
                                                                  capsys, monkeypatch) -> None:
    monkeypatch.setattr(replicate, "DELETE_EVERY", 1.0)
    gone = largest_study(source)
    timeout = threading.Timer(60, lambda: os.kill(os.getpid(), signal.SIGINT))

    def cut_over() -> None:
        wait_for(lambda: len(target.instances()) == CORPUS_SIZE)
        delete(source, f"/studies/{gone}")
        wait_for(lambda: gone not in target.get("/studies"), seconds=20)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=cut_over, daemon=True).start()
    timeout.start()
    try:
        code, out, err = run(capsys, args(source, target, tmp_path / "save", "--follow",
                                          "--delete", "--poll", "0.2"))
    finally:
        timeout.cancel()
    assert code == 130, err
    assert gone not in target.get("/studies")
    assert target.instances() == source.instances()


def test_a_run_killed_during_deletions_resumes_cleanly(make_server, source, tmp_path,
                                                       capsys) -> None:
    target = make_server("TARGET", users=USERS,
                         LuaScripts=[slow_request_lua(tmp_path, "POST", "/tools/bulk-delete",
                                                      "BULK-DELETE", 1)])
    save = tmp_path / "save"
    copied(source, target, save, capsys)
    for study in sorted(source.get("/studies"))[:3]:
        delete(source, f"/studies/{study}")
    process = start_process(args(source, target, save, "--delete"))
    wait_for(lambda: target.log_tail().count("BULK-DELETE") >= 2)
    process.kill()
    process.communicate()
    assert target.instances() != source.instances(), "the kill came too late to test"

    code, out, err = run(capsys, args(source, target, save, "--delete"))
    assert code == 0, err
    assert target.instances() == source.instances()
    lines = save.read_text().splitlines()
    assert not any(line.startswith("study\t") and line.split("\t")[1] not in source.get(
        "/studies") and f"gone\t{line.split(chr(9))[1]}" not in lines for line in lines)
