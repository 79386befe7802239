"""A sign-off an old archive can pass: targets that re-encode what they receive, compared by
tags and decoded pixels, and a source whose storage lost or damaged files, named apart and
accepted by list (--accept). Real servers: Debian's Orthanc 1.10.1 and 1.12.7, their storage
damaged on disk."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomgen import make_instance, orthanc_id, write_corpus, write_dicom
from orthanc import NEW_ORTHANC_BINARY, ORTHANC_BINARY, OrthancServer
from test_replicate import CORPUS_SIZE, args, run, summary_value

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
# Random pixels do not compress: Debian's Orthanc 1.10.1 re-encoding them to JPEG-LS corrupts
# its heap (seen: "corrupted double-linked list", then wrong answers to /numpy). Images
# compress; these do.
@pytest.fixture(scope="module")
def smooth(tmp_path_factory) -> list[Path]:
    """29 instances shaped as the corpus (see conftest), with smooth pixels."""
    folder = tmp_path_factory.mktemp("smooth")
    return (write_corpus(folder / "small", 3, 2, 4, prefix="S", pixels="smooth")
            + write_corpus(folder / "medium", 1, 1, 4, rows=128, columns=128, prefix="M",
                           pixels="smooth")
            + write_corpus(folder / "large", 1, 1, 1, rows=512, columns=512, frames=5,
                           prefix="L", pixels="smooth"))


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def syntax(server: OrthancServer, instance: str) -> str:
    response = server.session.get(f"{server.url}/instances/{instance}/metadata/TransferSyntax",
                                  timeout=30)
    response.raise_for_status()
    return response.text.strip()


def replace_on(server: OrthancServer, path: Path, change) -> str:
    """Store on `server`, instead of the instance of `path`, the same file (same UIDs) changed
    by `change(dataset)`."""
    dataset = pydicom.dcmread(path)
    change(dataset)
    changed = path.with_name(path.stem + "-changed.dcm")
    write_dicom(dataset, changed)
    instance = orthanc_id(path)
    server.session.delete(f"{server.url}/instances/{instance}", timeout=30).raise_for_status()
    assert server.upload([changed]) == [instance]
    return instance


def one_pixel_more(dataset: pydicom.Dataset) -> None:
    pixels = bytearray(dataset.PixelData)
    pixels[0] = (pixels[0] + 1) % 256
    dataset.PixelData = bytes(pixels)


@pytest.mark.parametrize("binary", [ORTHANC_BINARY, NEW_ORTHANC_BINARY], ids=["1.10", "1.12"])
def test_a_target_that_reencodes_losslessly_is_verified_by_tags_and_pixels(
        make_server, smooth, tmp_path, capsys, binary) -> None:
    corpus = smooth
    source = make_server("SOURCE")
    source.upload(corpus)
    target = make_server("TARGET", binary=binary, IngestTranscoding=JPEG_LS_LOSSLESS)
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save, "--verify"))
    assert code == 0, err
    some = orthanc_id(corpus[0])
    assert syntax(target, some) == JPEG_LS_LOSSLESS != syntax(source, some)
    assert f"Verified:      {CORPUS_SIZE} instances, {CORPUS_SIZE} re-encoded: tags and " \
           "pixels; 0 missing or different" in out
    code, out, err = run(capsys, args(source, target, save, "--check", "--verify"))
    assert code == 0, err
    assert f"{CORPUS_SIZE} re-encoded: tags and pixels" in out
    assert "the target holds every instance of the source" in out

    # one instance with a pixel one value off, one with another PatientName, same UIDs
    pixels = replace_on(target, corpus[1], one_pixel_more)
    name = replace_on(target, corpus[2], lambda dataset: setattr(dataset, "PatientName",
                                                                  "Other^Name"))
    assert syntax(target, pixels) == JPEG_LS_LOSSLESS
    table = tmp_path / "differences.csv"
    code, out, err = run(capsys, args(source, target, save, "--check", "--verify", "--recheck",
                                      "--csv", str(table)))
    assert code == 1, err
    assert summary_value(out, "Different:") == 2
    assert f"instance {pixels}: different on the target (re-encoded from " \
           f"1.2.840.10008.1.2.1 to {JPEG_LS_LOSSLESS}; the decoded pixels differ)" in err
    assert f"instance {name}: different on the target" in err
    assert "tags differ: 0010,0010 PatientName)" in err
    rows = {row["instance"]: row for row in csv.DictReader(table.open())}
    assert rows[pixels]["difference"] == rows[name]["difference"] == "different"
    assert "decoded pixels differ" in rows[pixels]["detail"]


GDCM_PLUGIN = "/usr/share/orthanc/plugins/libOrthancGdcm.so"  # Debian's orthanc-gdcm
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


def complete_ct(dataset: pydicom.Dataset) -> None:
    """The attributes of a CT image that GDCM's writer adds when they are missing (with
    values of its own: StudyTime now, PixelSpacing 1\\1...), which real images have."""
    dataset.StudyTime, dataset.AccessionNumber, dataset.ReferringPhysicianName = "101010", "", ""
    dataset.PatientBirthDate, dataset.PatientSex, dataset.StudyID = "", "", ""
    dataset.ImagePositionPatient, dataset.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    dataset.PixelSpacing, dataset.RescaleIntercept, dataset.RescaleSlope = [1, 1], 0, 1
    dataset.RescaleType = "HU"


def test_a_jpeg_2000_target_that_decodes_no_pixels_is_compared_by_tags(
        make_server, smooth, tmp_path, capsys) -> None:
    """Debian's 1.10.1 with the GDCM plugin stores JPEG 2000 but answers /numpy of it with
    NotImplemented: compared by tags, said so, at once (no retry waits for a decoder). The
    tags GDCM adds to an incomplete image are named."""
    if not Path(GDCM_PLUGIN).exists():
        raise pytest.UsageError(f"{GDCM_PLUGIN} is missing; bash .ci/run installs it")
    files = []
    for number, path in enumerate(smooth[:8]):
        dataset = pydicom.dcmread(path)
        if number:  # the first stays as it was: without StudyTime...
            complete_ct(dataset)
        files.append(tmp_path / path.name)
        write_dicom(dataset, files[-1])
    source = make_server("SOURCE")
    source.upload(files)
    target = make_server("TARGET", Plugins=[GDCM_PLUGIN], IngestTranscoding=JPEG_2000_LOSSLESS)
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--verify"))
    assert code == 1, err
    assert syntax(target, orthanc_id(files[1])) == JPEG_2000_LOSSLESS
    assert "Verified:      8 instances, 8 re-encoded: tags only (a server decodes no pixels " \
           "of that syntax); 1 missing or different" in out
    assert f"instance {orthanc_id(files[0])}: different on the target (re-encoded from " \
           f"1.2.840.10008.1.2.1 to {JPEG_2000_LOSSLESS}; tags differ: 0008,0030 StudyTime, " \
           "0008,0050 AccessionNumber, 0008,0090 ReferringPhysicianName and 9 more)" in err
    assert "retrying" not in err


def eight_bit_files(folder: Path, count: int) -> list[Path]:
    """8-bit images, which JPEG baseline can encode."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, paths = generate_uid(), generate_uid(), []
    for number in range(count):
        dataset = make_instance("E1", study, series, number + 1, 32, 32)
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
        dataset.PixelData = bytes((row * 8 + number) % 256 for row in range(32 * 32))
        write_dicom(dataset, folder / f"e{number}.dcm")
        paths.append(folder / f"e{number}.dcm")
    return paths


def test_lossy_files_are_compared_by_tags_and_kept_ones_by_md5(make_server, new_orthanc,
                                                               tmp_path, capsys) -> None:
    # a source whose files are JPEG baseline (it re-encoded them when it received them)
    source = make_server("SOURCE", IngestTranscoding=JPEG_BASELINE)
    stored = source.upload(eight_bit_files(tmp_path / "files", 3))
    assert {syntax(source, instance) for instance in stored} == {JPEG_BASELINE}

    target = make_server("TARGET", IngestTranscoding=JPEG_LS_LOSSLESS)
    code, out, err = run(capsys, args(source, target, tmp_path / "one", "--verify"))
    assert code == 0, err
    assert {syntax(target, instance) for instance in stored} == {JPEG_LS_LOSSLESS}
    assert "Verified:      3 instances, 3 re-encoded with a lossy syntax: tags only;" in out

    keeps = make_server("KEEPS", binary=new_orthanc, IngestTranscoding=JPEG_LS_LOSSLESS,
                        IngestTranscodingOfCompressed=False)
    code, out, err = run(capsys, args(source, keeps, tmp_path / "two", "--verify"))
    assert code == 0, err
    assert "Verified:      3 instances, 3 by MD5;" in out

    # a target that would re-encode to a lossy syntax gives each instance a new identity:
    # 1.12 says so before anything is sent
    lossy = make_server("LOSSY", binary=new_orthanc, IngestTranscoding=JPEG_BASELINE)
    code, out, err = run(capsys, args(source, lossy, tmp_path / "three"))
    assert code == 2, err
    assert "a lossy syntax: it gives each instance a new SOPInstanceUID" in err
    assert lossy.instances() == set()


def test_a_target_that_renames_what_it_stores_stops_the_run(make_server, tmp_path,
                                                            capsys) -> None:
    """1.10 does not tell its IngestTranscoding: the first upload answered with other IDs
    stops the run, even with --ignore-errors, instead of storing new copies of each."""
    source = make_server("SOURCE")
    source.upload(eight_bit_files(tmp_path / "one", 3) + eight_bit_files(tmp_path / "two", 3))
    target = make_server("TARGET", IngestTranscoding=JPEG_BASELINE)
    save = tmp_path / "save"
    for attempt in range(2):
        code, out, err = run(capsys, args(source, target, save, "--ignore-errors", "--threads",
                                          "1"))
        assert code == 1, err
        assert re.search(r"replicate.py: stopped: the target stored \d+ instances \(", err), err
        assert "under another ID" in err and "lossless IngestTranscoding or none" in err
        assert "Traceback" not in err and "copy failed" not in err  # said once
    # the first batch, once in each run; never again one by one (which made 24 of 6)
    assert 0 < len(target.instances()) <= 12
    assert not target.instances() & source.instances()


def storage_file(server: OrthancServer, instance: str) -> Path:
    uuid = server.get(f"/instances/{instance}/attachments/dicom/info")["Uuid"]
    return server.folder / "storage" / uuid[:2] / uuid[2:4] / uuid


def test_files_the_source_lost_are_named_counted_and_accepted(make_server, corpus, target,
                                                              tmp_path, capsys) -> None:
    # no cache: a file removed from the storage folder is gone at once
    source = make_server("SOURCE", MaximumStorageCacheSize=0)
    source.upload(corpus)
    small = [orthanc_id(path) for path in corpus[:24]]
    removed, also_removed, not_dicom, rotted = small[0], small[9], small[17], small[5]
    kept = storage_file(source, removed).read_bytes()
    storage_file(source, removed).unlink()
    storage_file(source, also_removed).unlink()
    storage_file(source, not_dicom).write_bytes(b"this is no longer a DICOM file\n" * 40)
    damaged = storage_file(source, rotted)
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x55  # inside PixelData, the last element: still DICOM
    damaged.write_bytes(bytes(data))

    save, report = tmp_path / "save", tmp_path / "report.json"
    code, out, err = run(capsys, args(source, target, save, "--ignore-errors"))
    assert code == 1, err
    assert summary_value(out, "Unreadable:") == 3
    assert summary_value(out, "Failed:") == 0
    for instance in (removed, also_removed):
        assert f"instance {instance} (study" in err
    assert "The path does not point to a regular file" in err
    assert f"{not_dicom} (study" in err and "no longer matches the MD5" in err
    assert len(target.instances()) == CORPUS_SIZE - 3

    # --verify names the rotted file as the source's fault, not as a difference
    code, out, err = run(capsys, args(source, target, save, "--ignore-errors", "--verify",
                                      "--report", str(report)))
    assert code == 1, err
    assert summary_value(out, "Unreadable:") == 4
    assert f"Verified:      {CORPUS_SIZE - 3} instances, {CORPUS_SIZE - 3} by MD5; 0 missing " \
           "or different" in out
    unreadable = {entry["id"]: entry for entry in json.loads(report.read_text())["unreadable"]}
    assert set(unreadable) == {removed, also_removed, not_dicom, rotted}
    assert "no longer matches the MD5" in unreadable[rotted]["reason"]

    # --check counts them in a column of their own
    table = tmp_path / "check.csv"
    code, out, err = run(capsys, args(source, target, save, "--check", "--csv", str(table)))
    assert code == 1, err
    assert summary_value(out, "Missing:") == 0 and summary_value(out, "Unreadable:") == 3
    header = next(line for line in out.splitlines() if line.strip().startswith("year"))
    assert "unreadable" in header.split()
    by_year = list(csv.DictReader((tmp_path / "check-by-year.csv").open()))
    assert by_year[-1]["unreadable_instances"] == "3"
    rows = [row for row in csv.DictReader(table.open()) if row["difference"] == "unreadable"]
    assert {row["instance"] for row in rows} == {removed, also_removed, not_dicom}

    # accepted: the copy, its verification and the check pass, and say so
    code, out, err = run(capsys, args(source, target, save, "--verify", "--accept",
                                      str(report)))
    assert code == 0, err
    assert "the target holds every instance of the source but 4 accepted as unreadable on " \
           "the source" in out
    (tmp_path / "list").write_text(f"# lost in 2019\n{removed}\n{also_removed}\n"
                                   f"{pydicom.dcmread(corpus[17]).SOPInstanceUID}\n")
    code, out, err = run(capsys, args(source, target, save, "--check", "--accept",
                                      str(tmp_path / "list")))
    assert code == 0, err
    assert "Unreadable:    3 instances the source cannot serve as it received them, in" in out
    assert "(3 accepted by --accept)" in out

    # a file back on the source is no longer excused, and the next copy copies it
    storage_file(source, removed).write_bytes(kept)
    code, out, err = run(capsys, args(source, target, save, "--check", "--accept",
                                      str(tmp_path / "list")))
    assert code == 1, err
    assert summary_value(out, "Missing:") == 1 and summary_value(out, "Unreadable:") == 2
    code, out, err = run(capsys, args(source, target, save, "--accept", str(report)))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 1
    assert "but 2 accepted as unreadable" in out
    assert removed in target.instances()
