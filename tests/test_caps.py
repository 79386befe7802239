"""Server-side result caps (LimitFindResults, LimitFindInstances) must not shrink a selection:
every list the tool asks of a capped real Orthanc 1.9, 1.10 and 1.12 comes back whole."""

from __future__ import annotations

import json

import pytest

from dicomgen import write_corpus
from orthanc import NEW_ORTHANC_BINARY, OLD_ORTHANC_BINARY, ORTHANC_BINARY
from test_replicate import args, run, summary_value

CAPS = {"LimitFindResults": 2, "LimitFindInstances": 2}
VERSIONS = {"1.9": OLD_ORTHANC_BINARY, "1.10": ORTHANC_BINARY, "1.12": NEW_ORTHANC_BINARY}


@pytest.fixture(params=sorted(VERSIONS))
def capped_source(request, make_server, tmp_path):
    """A source whose finds stop at 2 resources, with 6 studies of 2020 and 2 of 2019."""
    binary = VERSIONS[request.param]
    if binary != ORTHANC_BINARY:
        request.getfixturevalue("old_orthanc" if request.param == "1.9" else "new_orthanc")
    source = make_server("SOURCE", binary=binary, **CAPS)
    new = source.upload(write_corpus(tmp_path / "new", 6, 1, 3, prefix="N",
                                     study_date="20200615"))
    old = source.upload(write_corpus(tmp_path / "old", 2, 1, 3, prefix="O",
                                     study_date="20190615"))
    # the cap is real: a plain find of the 6 studies does not return them all
    answer = source.session.post(source.url + "/tools/find", json={
        "Level": "Study", "Query": {"StudyDate": "20200101-20201231"}}, timeout=60).json()
    assert len(answer) < 6
    return source, set(new), set(old)


def test_a_capped_find_still_selects_every_match(capped_source, target, tmp_path,
                                                 capsys) -> None:
    source, new, old = capped_source
    save = tmp_path / "save"
    query = ("--query", "StudyDate=20200101-20201231")
    report = tmp_path / "dry.json"
    code, out, err = run(capsys, args(source, target, save, *query, "--dry-run",
                                      "--report", str(report)))
    assert code == 0, err
    assert summary_value(out, "Studies selected on the source:") == 6
    assert summary_value(out, "To transfer:") == 18
    assert json.loads(report.read_text())["planned"]["studies"] == 6

    code, out, err = run(capsys, args(source, target, save, *query))
    assert code == 0, err
    assert summary_value(out, "Studies selected on the source:") == 6
    assert summary_value(out, "Copied:") == 18
    assert target.instances() == new


def test_labels_on_more_resources_than_the_cap_all_travel(make_server, new_orthanc,
                                                          tmp_path, capsys) -> None:
    source = make_server("SOURCE", binary=new_orthanc, **CAPS)
    ids = source.upload(write_corpus(tmp_path / "c", 6, 1, 3, prefix="L"))
    studies = sorted(source.get("/studies"))
    for study in studies[:5]:
        source.session.put(f"{source.url}/studies/{study}/labels/reviewed",
                           timeout=60).raise_for_status()
    for instance in ids[:5]:  # more labelled instances than LimitFindInstances too
        source.session.put(f"{source.url}/instances/{instance}/labels/checked",
                           timeout=60).raise_for_status()
    target = make_server("TARGET", binary=new_orthanc)
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 0, err
    assert summary_value(out, "Metadata:") == 10
    assert [study for study in studies if target.get(f"/studies/{study}/labels")] == studies[:5]
    assert [instance for instance in ids
            if target.get(f"/instances/{instance}/labels")] == ids[:5]
