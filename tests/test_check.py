"""--check as a sign-off, against real Orthanc servers: the table by year of StudyDate equals the
counts taken from the servers themselves (studies without a date included), with and without
the save file's trust, and the CSV names each differing instance by its DICOM UIDs."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import replicate
from dicomgen import make_instance, write_dicom
from orthanc import OrthancServer
from pydicom import dcmread
from pydicom.uid import generate_uid
from test_order import LOG_REQUESTS_LUA, requests_seen
from test_replicate import args, lua, run

# (StudyDate or None, instances): studies in three years, two on one day, one without a date
STUDIES = [("20190105", 3), ("20190620", 2), ("20210311", 4), ("20210311", 1),
           ("20240102", 2), (None, 3)]


def write_study(folder: Path, number: int, date: str | None, count: int) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    paths = []
    for instance in range(count):
        dataset = make_instance(f"Y{number:02d}", study, series, instance + 1,
                                study_date=date or "20000101")
        if date is None:
            del dataset.StudyDate
        path = folder / f"Y{number}-{instance}.dcm"
        write_dicom(dataset, path)
        paths.append(path)
    return paths


def counted(server: OrthancServer) -> dict[str, tuple[str, set[str]]]:
    """Study ID -> (the table's row for its StudyDate, its instance IDs), read from the
    server itself."""
    found = {}
    for study in server.get("/studies"):
        date = server.get(f"/studies/{study}")["MainDicomTags"].get("StudyDate", "")
        found[study] = (replicate.year_label(date),
                        {record["ID"] for record in server.get(f"/studies/{study}/instances")})
    return found


def expected_table(source: OrthancServer, target: OrthancServer,
                   trusted: int = 0) -> dict[str, dict[str, int]]:
    on_source, on_target = counted(source), counted(target)
    rows: dict[str, Counter] = {}
    for study in set(on_source) | set(on_target):
        row, mine = on_source.get(study) or on_target[study]
        theirs = on_target.get(study, ("", set()))[1]
        mine = on_source.get(study, ("", set()))[1]
        counts = rows.setdefault(row, Counter())
        for side, instances in (("source", mine), ("target", theirs),
                                ("missing", mine - theirs), ("extra", theirs - mine)):
            if instances:
                counts[f"{side}_studies"] += 1
                counts[f"{side}_instances"] += len(instances)
    for counts in rows.values():
        counts["trusted_studies"] = 0
    return {row: {column: counts[column] for column in replicate.YEAR_COLUMNS}
            for row, counts in rows.items()}


def table_of(path: Path) -> dict[str, dict[str, int]]:
    rows = {row.pop("year"): {key: int(value) for key, value in row.items()}
            for row in csv.DictReader(path.open())}
    total = rows.pop("total")
    for column in replicate.YEAR_COLUMNS:
        assert total[column] == sum(row[column] for row in rows.values()), column
    return rows


def test_the_table_by_year_and_the_uids_of_each_difference(make_server, tmp_path,
                                                          capsys) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    files = [write_study(folder, number, date, count)
             for number, (date, count) in enumerate(STUDIES)]
    source, target = make_server("SOURCE"), make_server("TARGET")
    source.upload(path for study in files for path in study)
    # the target: all but the 2024 study, one 2019 instance lost, a study of its own (2021)
    target.upload(path for study in files[:4] + files[5:] for path in study[:])
    lost = target.upload(files[0][:1])[0]
    target.session.delete(f"{target.url}/instances/{lost}").raise_for_status()
    own = write_study(folder, 9, "20210704", 2)
    target.upload(own)
    # and in a study both have, a series only the target has
    alone = make_instance("Y02", dcmread(files[2][0]).StudyInstanceUID, generate_uid(), 1,
                          study_date="20210311")
    write_dicom(alone, folder / "alone.dcm")
    target.upload([folder / "alone.dcm"])
    table, report = tmp_path / "check.csv", tmp_path / "report.json"
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--check", "--csv",
                                      str(table), "--report", str(report)))
    assert code == 1, err
    by_year = table_of(tmp_path / "check-by-year.csv")
    assert by_year == expected_table(source, target)
    assert set(by_year) == {"2019", "2021", "2024", "no date"}
    assert by_year["2021"]["extra_studies"] == 2 and by_year["2024"]["missing_studies"] == 1
    assert "By year of StudyDate (studies / instances):" in out
    assert json.loads(report.read_text())["check"]["by_year"][-1]["year"] == "total"
    # each missing instance is named by its DICOM UIDs, as the source stores them
    rows = list(csv.DictReader(table.open()))
    missing = [row for row in rows if row["difference"] == "missing"]
    assert {row["instance"] for row in missing} == \
        set(source.get("/instances")) - set(target.get("/instances"))
    extra = [row for row in rows if row["difference"] == "extra"]
    assert len(extra) == 1 and extra[0]["sop_instance_uid"] == alone.SOPInstanceUID
    for row in missing + extra:
        server = source if row["difference"] == "missing" else target
        instance = server.get(f"/instances/{row['instance']}")
        series = server.get(f"/series/{instance['ParentSeries']}")
        assert row["sop_instance_uid"] == instance["MainDicomTags"]["SOPInstanceUID"]
        assert row["series_instance_uid"] == series["MainDicomTags"]["SeriesInstanceUID"]


def test_the_table_counts_what_the_save_file_takes_on_trust(make_server, tmp_path,
                                                            capsys) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    source, target = make_server("SOURCE"), make_server("TARGET")
    source.upload(path for number, (date, count) in enumerate(STUDIES)
                  for path in write_study(folder, number, date, count))
    save, table = tmp_path / "save", tmp_path / "check.csv"
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    code, out, err = run(capsys, args(source, target, save, "--check", "--csv", str(table)))
    assert code == 0, err
    by_year = table_of(tmp_path / "check-by-year.csv")
    expected = expected_table(source, target)
    for row in expected.values():
        row["trusted_studies"] = row["source_studies"]
    assert by_year == expected
    assert sum(row["trusted_studies"] for row in by_year.values()) == len(STUDIES)


def test_the_table_takes_the_years_of_trusted_studies_from_the_save_file(make_server, tmp_path,
                                                                         capsys) -> None:
    """A copy in date order writes each study's StudyDate in the save file: a check of the
    complete target, with or without --recheck, then asks the source for no study's date.
    A save file without dates (an older version's, or --order source's) has them read."""
    folder = tmp_path / "files"
    folder.mkdir()
    source = make_server("SOURCE", LuaScripts=[lua(tmp_path, "requests", LOG_REQUESTS_LUA)])
    target = make_server("TARGET")
    source.upload(path for number, (date, count) in enumerate(STUDIES)
                  for path in write_study(folder, number, date, count))
    save, table = tmp_path / "save", tmp_path / "check.csv"
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    untrusted = expected_table(source, target)
    expected = expected_table(source, target)
    for row in expected.values():
        row["trusted_studies"] = row["source_studies"]
    undated = save.with_name("undated")
    undated.write_text("".join("\t".join(line.split("\t")[:5]) + "\n"
                               for line in save.read_text().splitlines()))
    asked = []
    for journal, options, rows in ((save, (), expected), (save, ("--recheck",), untrusted),
                                   (undated, (), expected)):
        before = len(requests_seen(source))
        code, out, err = run(capsys, args(source, target, journal, "--check", "--csv",
                                          str(table), *options))
        assert code == 0, err
        assert table_of(tmp_path / "check-by-year.csv") == rows
        asked.append([request for request in requests_seen(source)[before:]
                      if re.fullmatch(r"GET /studies(/[^/]+)?", request)])
    assert asked[0] == asked[1] == ["GET /studies"], asked
    assert len(asked[2]) > 1, asked
