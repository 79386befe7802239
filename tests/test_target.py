"""What the target does with what it accepts: storage limits that recycle or refuse, read-only
targets, transcoding, and studies deleted from the target during a run. Real servers:
Debian's Orthanc 1.10.1, which does not report its settings, and 1.12.7, which does."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import replicate
from dicomgen import write_corpus
from orthanc import OrthancServer
from test_replicate import (CORPUS_SIZE, args, journal_studies, lua, run, slow_lua,
                            start_process, summary_value, wait_for)

IMPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2"


def complete_in_save_file(save: Path) -> set[str]:
    """The studies the save file counts as complete: recorded, and not taken back since."""
    complete: set[str] = set()
    for line in save.read_text().splitlines()[1:]:
        kind, *values = line.split("\t")
        if kind == "study":
            complete.add(values[0])
        elif kind == "redo":
            complete.discard(values[0])
        elif kind == "reset":
            complete.clear()
    return complete


def studies(server: OrthancServer) -> set[str]:
    return set(server.get("/studies"))


def test_a_recycling_target_that_does_not_say_so_never_ends_well(make_server, source, tmp_path,
                                                                 capsys) -> None:
    """Orthanc 1.10.1 reports no limit: the loss is noticed at the end of each run."""
    target = make_server("TARGET", MaximumPatientCount=4)
    save = tmp_path / "save"
    for attempt in range(2):
        code, out, err = run(capsys, args(source, target, save))
        assert code == 1, (attempt, err)
        assert "the target deleted 1 study after storing them" in err
        assert "MaximumPatientCount" in err
        assert summary_value(out, "Lost:") == 1
        assert len(studies(target)) == 4
        # the save file counts as complete exactly what the target still holds
        assert complete_in_save_file(save) == studies(target)
    assert summary_value(out, "Copied:") > 0  # the re-run sent the lost study again


def test_a_recycling_1_12_target_is_refused_before_anything_is_copied(make_server, new_orthanc,
                                                                      source, tmp_path,
                                                                      capsys) -> None:
    target = make_server("TARGET", binary=new_orthanc, MaximumPatientCount=4)
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 2, err
    assert "would delete what it receives: its MaximumPatientCount is 4" in err
    assert "Recycle" in err and "Traceback" not in err
    assert target.instances() == set()
    assert not (tmp_path / "save").exists()


def test_a_1_12_target_whose_limits_leave_room_is_used(make_server, new_orthanc, source,
                                                       tmp_path, capsys) -> None:
    target = make_server("TARGET", binary=new_orthanc, MaximumPatientCount=20,
                         MaximumStorageSize=500)
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 0, err
    assert len(target.instances()) == CORPUS_SIZE


def test_a_read_only_target_is_refused_naming_the_setting(make_server, new_orthanc, source,
                                                          tmp_path, capsys) -> None:
    target = make_server("TARGET", binary=new_orthanc, ReadOnly=True)
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 2, err
    assert "is read-only" in err and "ReadOnly" in err


def test_a_target_that_rejects_past_its_limit_fails_the_run(make_server, new_orthanc, source,
                                                            tmp_path, capsys) -> None:
    """The corpus holds 3.5 MB; the target takes 1 MB and refuses the rest."""
    target = make_server("TARGET", binary=new_orthanc, MaximumStorageMode="Reject",
                         MaximumStorageSize=1)
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--ignore-errors"))
    assert code == 1, err
    assert "warning: the target refuses what exceeds its limits" in err
    assert "its MaximumStorageSize 1 (MB) with MaximumStorageMode \"Reject\" is reached" in err
    assert len(target.instances()) < CORPUS_SIZE


def test_studies_deleted_on_the_target_during_a_run_fail_it(make_server, source, tmp_path) -> None:
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.15)])
    save = tmp_path / "save"
    process = start_process(args(source, target, save, "--threads", "1"))
    wait_for(lambda: save.exists() and journal_studies(save) != [])
    deleted = journal_studies(save)[0]
    target.session.delete(f"{target.url}/studies/{deleted}", timeout=60).raise_for_status()
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert "the target deleted 1 study after storing them" in err
    assert "someone deleting on the target" in err
    assert deleted not in complete_in_save_file(save)

    # the target keeps what it gets now: the re-run copies the study again and ends well
    process = start_process(args(source, target, save))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert deleted in studies(target)
    assert len(target.instances()) == CORPUS_SIZE


def test_a_transcoding_target_is_verified_by_tags_and_pixels(make_server, new_orthanc, source,
                                                             tmp_path, capsys) -> None:
    """What /system says (1.12 shows IngestTranscoding) changes nothing: each instance is
    compared by what its two files are."""
    target = make_server("TARGET", binary=new_orthanc, IngestTranscoding=IMPLICIT_LITTLE_ENDIAN)
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--verify"))
    assert code == 0, err
    assert f"Verified:      {CORPUS_SIZE} instances, {CORPUS_SIZE} re-encoded: tags and " \
           "pixels; 0 missing or different" in out
    md5s = target.md5s()
    assert md5s.keys() == source.md5s().keys()
    assert md5s != source.md5s()  # the files did change: an MD5 comparison would have failed


def test_user_metadata_the_target_does_not_declare_is_said_at_the_start(make_server, new_orthanc,
                                                                        tmp_path, capsys) -> None:
    source = make_server("SOURCE", binary=new_orthanc,
                         UserMetadata={"Sample": 1024, "Report": 1025})
    target = make_server("TARGET", binary=new_orthanc, UserMetadata={"Report": 1025})
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--dry-run"))
    assert code == 0, err
    assert "the source declares user metadata that the target does not (Sample)" in err


def test_a_follow_look_confirms_the_target_kept_its_studies(make_server, source, corpus,
                                                            tmp_path, capsys,
                                                            monkeypatch) -> None:
    """The target holds the first pass's 5 patients; a sixth arrives on the source during
    --follow, the look copies it, and the target recycles an older one. The look's
    confirmation (here at once, rather than a minute after the last) stops following."""
    monkeypatch.setattr(replicate, "CONFIRM_EVERY", 0.0)
    target = make_server("TARGET", MaximumPatientCount=5)
    newcomer = write_corpus(tmp_path / "newcomer", 1, 1, 2, prefix="N")
    timeout = threading.Timer(60, lambda: os.kill(os.getpid(), signal.SIGINT))

    def arrive() -> None:
        wait_for(lambda: len(target.instances()) == CORPUS_SIZE)
        source.upload(newcomer)
    threading.Thread(target=arrive, daemon=True).start()
    timeout.start()
    try:
        code, out, err = run(capsys, args(source, target, tmp_path / "save", "--follow",
                                          "--poll", "0.2"))
    finally:
        timeout.cancel()
    assert code == 1, err
    assert "the target deleted 1 study after storing them" in err
    assert summary_value(out, "Copied:") == CORPUS_SIZE + 2


def test_a_confirmation_that_cannot_be_made_is_no_success(make_server, source, tmp_path,
                                                          capsys) -> None:
    """The target answers its first study listing (the start of the run) and refuses the
    second (the confirmation at the end): exit 1, saying what could not be confirmed."""
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "second-listing", """
listings = 0
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if method == "GET" and uri == "/studies" then
    listings = listings + 1
    return listings < 2
  end
  return true
end
""")])
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 1, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert "could not confirm that the target kept what it stored (target answered HTTP 403 " \
        "to GET /studies" in err
