"""Generate synthetic DICOM files with pydicom for the tests and the benchmark.

Every file is an image in Explicit VR Little Endian with random pixels, so that no two
instances share bytes and a copy can be checked by MD5. Random pixels do not compress; "smooth"
ones (a gradient with 5 bits of noise in each 16-bit pixel) deflate to about half, as many
real images do.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path

import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid


def make_instance(patient_id: str, study_uid: str, series_uid: str, number: int,
                  rows: int = 8, columns: int = 8, frames: int = 1,
                  study_date: str = "20200101", modality: str = "CT",
                  pixels: str = "random") -> FileDataset:
    """One CT instance; `frames` > 1 makes a multi-frame instance of rows x columns x frames x 2 bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientID = patient_id
    dataset.PatientName = f"Test^{patient_id}"
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.StudyDate = study_date
    dataset.Modality = modality
    dataset.StudyDescription = f"study {study_uid[-6:]}"
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = number
    dataset.Rows = rows
    dataset.Columns = columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.PixelData = (smooth_pixels(rows, columns * frames) if pixels == "smooth"
                         else os.urandom(rows * columns * frames * 2))
    return dataset


NOISE = bytes(value & 0x1F for value in range(256))


def smooth_pixels(rows: int, columns: int) -> bytes:
    """16-bit little-endian pixels: the high byte a gradient down the rows, the low byte 5
    random bits."""
    pixels = bytearray(rows * columns * 2)
    pixels[0::2] = os.urandom(rows * columns).translate(NOISE)
    pixels[1::2] = b"".join(bytes([row * 200 // max(1, rows)]) * columns for row in range(rows))
    return bytes(pixels)


def write_corpus(folder: Path, studies: int, series: int, instances: int,
                 rows: int = 8, columns: int = 8, frames: int = 1,
                 prefix: str = "P", study_date: str = "20200101",
                 modality: str = "CT", pixels: str = "random") -> list[Path]:
    """Write studies x series x instances files under `folder` and return their paths.
    `study_date` "spread": each study its own day of 2005 to 2024, in no order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for study in range(studies):
        patient_id = f"{prefix}{study:05d}"
        study_uid = generate_uid()
        date = spread_date(prefix, study) if study_date == "spread" else study_date
        for serie in range(series):
            series_uid = generate_uid()
            for number in range(instances):
                dataset = make_instance(patient_id, study_uid, series_uid, number + 1,
                                        rows, columns, frames, date, modality, pixels)
                path = folder / f"{prefix}-{study}-{serie}-{number}.dcm"
                write_dicom(dataset, path)
                paths.append(path)
    return paths



def spread_date(prefix: str, study: int) -> str:
    """A day of 2005 to 2024 for a study, the same on every run, unrelated to its number."""
    day = int(hashlib.sha1(f"{prefix}{study}".encode()).hexdigest()[:8], 16) % (20 * 365)
    return (datetime.date(2005, 1, 1) + datetime.timedelta(days=day)).strftime("%Y%m%d")


def write_dicom(dataset: FileDataset, path: Path) -> None:
    """Write a DICOM file with its preamble and meta header, with pydicom 3 or 2 (which
    Python 3.9 gets)."""
    try:
        dataset.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom 2: the same, under its older name
        dataset.save_as(path, write_like_original=False)


def orthanc_id(path: Path) -> str:
    """The ID Orthanc gives an instance: a SHA-1 of its patient and UIDs, in five groups."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    digest = hashlib.sha1(f"{dataset.PatientID}|{dataset.StudyInstanceUID}|"
                          f"{dataset.SeriesInstanceUID}|{dataset.SOPInstanceUID}".encode()
                          ).hexdigest()
    return "-".join(digest[start:start + 8] for start in range(0, 40, 8))
