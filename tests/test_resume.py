"""Re-runs priced by what changed, and never at the cost of a lost instance: the save file's
mark and the source's change log, against real Orthanc servers."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.uid import generate_uid

import replicate
from dicomgen import make_instance, write_corpus, write_dicom
from orthanc import MariaDBServer, OrthancServer, PostgresCluster
from test_replicate import (CORPUS_SIZE, args, journal_studies, run, slow_lua, start_process,
                            summary_value, wait_for)


def add_late_instance(source: OrthancServer, study_id: str, folder: Path, name: str) -> str:
    """An instance that arrives in an existing study, in a series of its own."""
    study = source.get(f"/studies/{study_id}")
    late = make_instance(study["PatientMainDicomTags"]["PatientID"],
                         study["MainDicomTags"]["StudyInstanceUID"], generate_uid(), 1)
    write_dicom(late, folder / f"{name}.dcm")
    return source.upload([folder / f"{name}.dcm"])[0]


def skipped(out: str) -> int:
    return summary_value(out, "Skipped:") if "\nSkipped:" in out else 0


def test_a_rerun_looks_only_at_what_changed(source, target, tmp_path, capsys) -> None:
    save = tmp_path / "save"
    assert run(capsys, args(source, target, save))[0] == 0
    studies = sorted(source.get("/studies"))

    # nothing changed: every study is skipped, nothing is looked at
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert skipped(out) == 5 and summary_value(out, "Already there:") == CORPUS_SIZE
    assert summary_value(out, "To transfer:") == 0

    # an instance arrives in a complete study: that study alone is looked at again
    late = add_late_instance(source, studies[0], tmp_path, "late")
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 1 and skipped(out) == 4
    assert late in target.instances()

    # a study deleted from the target is copied again
    gone = target.get(f"/studies/{studies[1]}/instances")
    target.session.delete(f"{target.url}/studies/{studies[1]}").raise_for_status()
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "Copied:") == len(gone) and skipped(out) == 4
    assert target.md5s() == source.md5s()

    # an instance deleted from the target inside a complete study (of several instances: the
    # last one would take the study with it): only --recheck finds it
    several = next(study for study in studies[2:]
                   if len(target.get(f"/studies/{study}/instances")) > 1)
    lost = target.get(f"/studies/{several}/instances")[0]["ID"]
    target.session.delete(f"{target.url}/instances/{lost}").raise_for_status()
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 0 and lost not in target.instances()
    code, out, err = run(capsys, args(source, target, save, "--recheck"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 1 and skipped(out) == 0
    assert target.md5s() == source.md5s()


def test_what_arrives_during_a_run_is_copied_by_the_next(make_server, source, tmp_path,
                                                         capsys) -> None:
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.1)])
    save = tmp_path / "save"
    process = start_process(args(source, target, save, "--threads", "1"))
    # a study recorded complete while the run still goes, then an instance arrives in it
    wait_for(lambda: save.exists() and len(journal_studies(save)) >= 1)
    late = add_late_instance(source, journal_studies(save)[0], tmp_path, "during")
    new_study = source.upload(write_corpus(tmp_path / "new", 1, 1, 2, prefix="NEW"))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err

    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert late in target.instances() and set(new_study) <= target.instances()
    assert target.md5s() == source.md5s()


def test_a_cleared_change_log_means_every_study_is_looked_at(source, target, tmp_path,
                                                             capsys) -> None:
    save = tmp_path / "save"
    assert run(capsys, args(source, target, save))[0] == 0
    late = add_late_instance(source, sorted(source.get("/studies"))[0], tmp_path, "late")
    source.session.delete(f"{source.url}/changes").raise_for_status()
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert "looking at every study again" in err
    assert skipped(out) == 0 and summary_value(out, "Copied:") == 1
    assert late in target.instances()


def test_a_source_restarted_on_another_database_is_looked_at_whole(make_server, corpus,
                                                                   target, tmp_path,
                                                                   capsys) -> None:
    first = make_server("SOURCE")
    first.upload(corpus)
    save = tmp_path / "save"
    assert run(capsys, args(first, target, save))[0] == 0
    # the same address now serves a new database: one study, plus an instance the target
    # lacks; its change log restarts from 1, far below the save file's mark
    first.kill()
    second = OrthancServer(tmp_path / "second", "SOURCE")
    second.port = second.config["HttpPort"] = first.port
    second.start()
    try:
        one_study = [path for path in corpus if path.name.startswith("S-0-")]
        second.upload(one_study)
        late = add_late_instance(second, second.get("/studies")[0], tmp_path, "restarted")
        code, out, err = run(capsys, args(second, target, save))
        assert code == 0, err
        assert "looking at every study again" in err
        assert summary_value(out, "Copied:") == 1 and late in target.instances()
    finally:
        second.kill()


def test_a_postgresql_source_written_to_while_it_is_copied(make_server,
                                                           postgres: PostgresCluster,
                                                           tmp_path, capsys) -> None:
    """The PostgreSQL index pages in hash order: studies that arrive during a walk would
    shift its pages. The walk lists studies whole, and what arrives after the run began is
    in the change log for the next run: nothing is lost."""
    postgres.create_database("livesource")
    source = make_server("PGSOURCE", **postgres.orthanc_config("livesource"))
    initial = set(source.upload(write_corpus(tmp_path / "initial", 8, 2, 3, prefix="I")))
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.05)])
    save = tmp_path / "save"
    process = start_process(args(source, target, save, "--threads", "2"))
    wait_for(lambda: len(target.instances()) >= 1)
    arrived = set(source.upload(write_corpus(tmp_path / "arriving", 4, 1, 3, prefix="A")))
    arrived.add(add_late_instance(source, sorted(source.get("/studies"))[0], tmp_path, "pg"))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert initial <= target.instances()  # everything there when the run began

    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert arrived <= target.instances()
    assert target.md5s() == source.md5s()


def test_sqlite_with_compression_to_a_mysql_target(make_server, corpus,
                                                   mariadb: MariaDBServer, tmp_path,
                                                   capsys) -> None:
    """The migration this tool was first written for."""
    source = make_server("SOURCE", StorageCompression=True)
    source.upload(corpus)
    mariadb.create_database("target")
    target = make_server("MYSQLTARGET", **mariadb.orthanc_config("target"))
    assert "MySQLIndex" in target.get("/system")["DatabaseBackendPlugin"]
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save, "--verify"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert "Verified:      29 instances, 29 by MD5; 0 missing or different" in out
    assert target.md5s() == source.md5s()
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0 and skipped(out) == 5 and summary_value(out, "Copied:") == 0, err


def test_a_study_too_large_to_list_whole_is_walked_series_by_series(source, target, tmp_path,
                                                                    capsys,
                                                                    monkeypatch) -> None:
    """Above STUDY_ANSWER_MAX bytes a study's listing is not read: its series are, one by
    one, and a series above SERIES_LISTING_MAX instances is sized by its average."""
    monkeypatch.setattr(replicate, "STUDY_ANSWER_MAX", 3000)  # about 6 instances
    monkeypatch.setattr(replicate, "SERIES_LISTING_MAX", 3)
    biggest = max(source.get("/studies"),
                  key=lambda study: len(source.get(f"/studies/{study}/instances")))
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--verify"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert "Verified:      29 instances, 29 by MD5; 0 missing or different" in out
    assert target.md5s() == source.md5s()
    # a study the target has in part: only what it lacks travels
    lost = target.get(f"/studies/{biggest}/instances")[:3]
    for record in lost:
        target.session.delete(f"{target.url}/instances/{record['ID']}").raise_for_status()
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--recheck"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 3 and target.md5s() == source.md5s()


def test_a_change_log_page_skimmed_gives_what_decoding_it_gives(source) -> None:
    """Pages without a change the run wants are skimmed for where they end, not decoded."""
    for query in ("since=0&limit=10000", "since=5&limit=7", "since=100000&limit=10"):
        body = source.session.get(f"{source.url}/changes?{query}", timeout=60).content
        decoded = json.loads(body)
        skimmed = replicate.skim_changes(body)
        assert skimmed == {"Changes": [{"ID": change["ID"], "Seq": change["Seq"]}
                                       for change in decoded["Changes"][-1:]],
                           "Done": decoded["Done"], "Last": decoded["Last"]}
    assert replicate.skim_changes(b'{"Changes": [], "Last": 3}') is None  # not Orthanc's layout
