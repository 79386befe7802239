#!/usr/bin/env python3
"""replicate.py: copy the whole content of one Orthanc server to another through their REST APIs.

usage: python replicate.py SOURCE TARGET [options]   (--help lists them, with exit statuses)

SOURCE and TARGET are http(s)://[user:password@]host:port[/prefix]. Both servers keep running.
The tool walks the source study by study, finds by Orthanc instance ID what the target lacks
of each and copies it at once; nothing the target already has is sent again and nothing on the
target is touched. Interrupt it at any time and run the same command again to resume: studies
complete since the last run and untouched in the source's change log are not looked at again.

The file reads top down, each section building on those above it: facts (constants,
errors, data classes, pure helpers); the Orthanc client; walking the source (listings, finds,
the change log) and the order of studies; the journal (save file); the transfer engine
(Copier, UploadLimit, RateLimiter) and progress; then the stages of a run, each a section
that owns its state, and the command line and main. A run:

    Run.execute: connect, preflight (the target's settings), open the Journal
      -> resume: what the save file lets the run skip (the change log since its mark)
      -> Walk: studies in StudyOrder, checked a few ahead of the Copier's transfers
         (RateLimiter paces them, and holds every request during a --bwlimit pause)
         and told to Mirror.observe
      -> Mirror.finish (--check, --delete) -> MetadataPass -> Confirmation -> verify_all
      -> Follow (--follow): the same Walk for each look at the change log

For a program built on this file, the API is `Config.from_argv(argv)` and
`replicate(config) -> Outcome`, which runs as the command does (summary on stdout, errors on
stderr) and returns the counts and the exit status:

    config = Config.from_argv(["http://old:8042", "http://new:8042", "--save", "old.save"])
    outcome = replicate(config)
    print(outcome.copied, outcome.failed, outcome.exit_status)
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import csv
import ctypes
import getpass
import hashlib
import html
import http.server
import http.client
import io
import ipaddress
import itertools
import json
import logging
import os
import queue
import random
import re
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from collections import Counter, deque
from typing import Any, BinaryIO, Callable, Collection, Iterable, Iterator, Optional, TypeVar

import requests
import requests.adapters
import urllib3

try:
    import fcntl  # the save file's lock; Windows has none, and goes without
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__version__ = "1.0.0"

# ---- constants and exit codes ---------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_SERVER = 3
EXIT_INTERRUPTED = 130

SAVE_MAGIC = "replicate.py save file 1"
STORED_STATUSES = ("Success", "AlreadyStored")
# Instances up to this size travel in ZIP archives that the source builds
# (POST /tools/create-archive): one request for hundreds of them. The source deflates those
# archives, which costs more CPU than it saves above a few tens of KB, so larger instances are
# fetched one by one instead.
ARCHIVE_MAX_INSTANCE = 32 * 1024
# Instances from this size up are streamed alone, from the source's answer straight into the
# target's request, so memory does not grow with their size.
STREAM_MIN_INSTANCE = 2 * 1024 * 1024
BATCH_MAX_INSTANCES = 200
BATCH_MAX_BYTES = 4 * 1024 * 1024
CHUNK_SIZE = 1024 * 1024
# An upload of this many bytes or more goes on a new connection, never a kept-alive one (see
# OrthancClient.attempt): below it, a cut costs less than the handshake would.
FRESH_UPLOAD = 64 * 1024
GATHER_BYTES = 256 * 1024  # an archive next to its server is read in pieces of this much
PACED_BLOCK = 64 * 1024
LISTING_PAGE = 2000
LISTING_TIMEOUT = 600.0  # seconds to the first byte of an answer over the whole server
PROGRESS_LOG_SECONDS = 60.0  # without a terminal, a progress line in the log this often
# A study whose expanded instance listing is up to this long (about 4,400 instances of 450
# bytes; 1 KB of memory each while it is read) is described by it; a larger one series by
# series, each series of up to SERIES_LISTING_MAX instances by its own expanded listing.
STUDY_ANSWER_MAX = 2_000_000
SERIES_LISTING_MAX = 4000
# Studies checked ahead of the transfers, and instances waiting for a batch, at most.
CHECKS_AHEAD = 8
WAITING_MAX = 4 * BATCH_MAX_INSTANCES
# Across a distant link, requests are kept in flight by Little's law: as many as complete
# in one round trip, times PACE_MARGIN so that the number grows while the rate does (see
# Pace). Without --threads, at most FAR_REQUESTS_MAX file downloads and CHECKS_MAX checks.
PACE_MARGIN = 2.0
PACE_WINDOW = 0.5  # seconds of completions a rate is measured over, at least
FAR_REQUESTS_MAX = 32
HEADER_LOOK = 1.0  # seconds between looks at a --header file, for a renewed value
PAUSE_LOOK = 0.5  # seconds between looks at the clock while --bwlimit pauses the run
CONFIRM_EVERY = 60.0  # --follow: seconds at least between confirmations of the target's studies
# Checks in flight across a link at most (the quickest --check across one: tests/BENCHMARKS.md)
CHECKS_MAX = 24
# Uploads at once without --threads, found by measurement: see UploadLimit. In its rate, an
# instance weighs INSTANCE_WORK bytes besides its own (a server's cost of any instance).
UPLOADS_MAX = 16
UPLOAD_MEMORY = 48 * 1024 * 1024
UPLOAD_GROWTH = 1.1
UPLOAD_HOLD = 30.0
REFUSED_MEMORY = 600.0
INSTANCE_WORK = 64 * 1024
UPLOAD_WINDOW = 1.0
# A server whose quickest answer took longer than this is across a network (see as_archive
# and deflate_upload for what it changes).
REMOTE_LATENCY = 0.004
ARCHIVE_WORTH = 0.8
UPLOAD_DEFLATE_LEVEL = 1  # zlib level of the uploads deflated for a distant target
PROBE_BYTES = 64 * 1024  # what is deflated to guess, before anything was measured
ARCHIVE_SAMPLE_EVERY = 10
# Below this share of the source (1/20) the details of missing instances are asked one by one;
# above it one paged listing is cheaper.
DETAIL_ONE_BY_ONE_RATIO = 20
# Resource levels as the change log names them -> their REST path.
LEVEL_PATHS = {"Patient": "patients", "Study": "studies", "Series": "series",
               "Instance": "instances"}
# Metadata Orthanc itself writes (read-only through REST); everything else is the user's.
SYSTEM_METADATA = frozenset([
    "IndexInSeries", "ReceptionDate", "RemoteAET", "ModifiedFrom", "AnonymizedFrom",
    "LastUpdate", "Origin", "TransferSyntax", "SopClassUid", "RemoteIP", "CalledAET",
    "HttpUsername", "PixelDataOffset", "MainDicomTagsSignature", "PixelDataVR"])
USER_MIN = 1024
SYSTEM_ATTACHMENTS = frozenset(["dicom", "dicom-as-json", "dicom-until-pixel-data"])
CHANGES_PAGE = 10000
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")
DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)+")
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
# Orthanc's error codes about a stored file, which no retry mends: InexistentFile,
# FullStorage, CorruptedFile, RegularFileExpected (a missing file). Not FileStorageCannotWrite
# (2001): two uploads creating the same storage subfolder race to it, and a second try mends.
LASTING_ORTHANC_ERRORS = frozenset([13, 19, 20, 2006])
# The target's codes for "cannot write a file" (a full disk, most often), after which every
# instance would fail: CannotWriteFile, FullStorage, FileStorageCannotWrite (after retries).
TARGET_CANNOT_STORE = frozenset([14, 19, 2001])

TOO_LARGE = object()  # what OrthancClient.request gives for an answer above its `limit`

log = logging.getLogger("replicate")
A = TypeVar("A")
T = TypeVar("T")


# ---- errors ---------------------------------------------------------------------------------
# What an error asks of the run (see classify): a retry; to be counted as the failure of the
# one resource it concerns; a stop, since no request to that server can succeed (exit 3);
# or a stop, since the tool met an answer it cannot understand or a defect of its own (exit 1).
RETRY, RESOURCE, UNREACHABLE, DEFECT = "retry", "resource", "unreachable", "defect"


class ReplicateError(Exception):
    """An error that ends the run with a one-line message and the given exit status."""

    exit_code = EXIT_FAILURES


class UsageError(ReplicateError):
    exit_code = EXIT_USAGE


class ServerError(ReplicateError):
    exit_code = EXIT_SERVER


class CredentialsRefused(ServerError):
    """A server refused the credentials (HTTP 401 or 403 to GET /system)."""


class TargetRefused(ReplicateError):
    """The target is configured to delete or refuse what it would be sent (exit 2: a setting
    to change before any copy, like a usage error)."""

    exit_code = EXIT_USAGE


class Interrupted(Exception):
    """Raised inside workers and waits once a stop was asked for."""


class RequestError(Exception):
    """A request to one server that failed: which server, what was asked."""

    def __init__(self, role: str, method: str, path: str, message: str) -> None:
        self.role, self.method, self.path = role, method, path
        super().__init__(message)


class HttpStatusError(RequestError):
    """A server answered with an HTTP error status; `orthanc_status` is Orthanc's own error
    code when its answer gives one."""

    def __init__(self, role: str, method: str, path: str, status: int, body: str) -> None:
        self.status, self.orthanc_status, detail = status, None, body
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and "OrthancStatus" in answer:
            self.orthanc_status = answer["OrthancStatus"]
            detail = str(answer.get("Details") or answer.get("Message") or "")
        self.detail = page_text(detail)
        super().__init__(role, method, path, f"{role} answered HTTP {status} to {method} {path}"
                         + (f" ({self.detail})" if self.detail else ""))


# TransportError kinds: how a request failed on the way, told by the exception's type
REFUSED, UNKNOWN_HOST, RESET, CLOSED = ("connection refused", "unknown host name",
                                        "connection reset", "remote end closed connection")
TIMEOUT, CUT_SHORT, CONNECTION, TLS = ("timed out", "the answer was cut short",
                                       "connection failed", "TLS failed")


class TransportError(RequestError):
    """A request that got no whole answer: `kind` says how (one of the kinds above)."""

    def __init__(self, role: str, method: str, path: str, kind: str, detail: str = "") -> None:
        self.kind = kind
        super().__init__(role, method, path, kind + (f" ({detail})" if detail else ""))


class UnexpectedAnswer(RequestError):
    """An answer this tool cannot understand (not JSON, not the records asked for)."""

    def __init__(self, role: str, method: str, path: str, came: str) -> None:
        super().__init__(role, method, path, f"{role} answered {method} {path} with {came}")


class GaveUp(Exception):
    """A retryable operation that kept failing; the last cause is chained."""

    def __init__(self, cause: BaseException, attempts: int, what: str = "") -> None:
        self.cause, self.attempts, self.what = cause, attempts, what
        super().__init__(f"{describe_error(cause)} after {attempts} attempts")


class Defect(Exception):
    """An error no request explains, met while doing `what`: named with the last answer the
    thread read, so that a person can tell a server's odd answer from a bug of this tool."""

    def __init__(self, what: str, cause: BaseException) -> None:
        self.cause = cause
        last = None if isinstance(cause, UnexpectedAnswer) else getattr(EXCHANGES, "last", None)
        read = f", {last[5]:,} bytes" if last and last[5] is not None else ""
        super().__init__(f"{what}: {describe_error(cause)}" + (
            " (the last answer read: {} {} {} answered HTTP {}, {}".format(*last[:5]) + read
            + ")" if last else ""))


# .last: the thread's last request and answer (role, method, path, status, Content-Type,
# bytes read), kept as it comes and put into words only when a Defect names it
EXCHANGES = threading.local()


# ---- small data classes ---------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """Where a server is and how to log in; `url` never holds credentials."""

    role: str
    url: str
    username: str
    password: str = field(repr=False)
    password_given: bool = True
    # (name, value) sent with every request: a proxy's API key or token (--header); a value
    # read from a file is a HeaderFile
    headers: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    cert: Any = None  # a client certificate: its file, or (certificate, key) files

    def with_password(self, password: str) -> "Endpoint":
        return replace(self, password=password, password_given=True)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 8
    timeout: float = 60.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with a little jitter: 0.5, 1, 2, 4, 8, 15, 15 ... seconds."""
        base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1))
        return base * random.uniform(0.8, 1.0)


@dataclass(frozen=True)
class Config:
    source: Endpoint
    target: Endpoint
    save: Path
    threads: int = 4
    pace: bool = True  # requests in flight follow the link (no --threads given)
    ignore_errors: bool = False
    policy: RetryPolicy = RetryPolicy()
    quiet: bool = False
    verbose: bool = False
    prompt: bool = True
    tls_verify: Any = True  # True, False (--insecure) or the path of a CA bundle
    verify: bool = False
    dry_run: bool = False
    query: dict[str, str] = field(default_factory=dict)
    studies: list[str] = field(default_factory=list)
    order: str = "newest"  # newest or oldest StudyDate first, or source: as listed
    bwlimit: Optional["Timetable"] = None  # bytes per second to the target, by time of day
    metadata: bool = True
    report: Optional[Path] = None
    follow: bool = False
    poll: float = 2.0
    recheck: bool = False
    delete: bool = False  # remove from the target what this tool copied and the source lost
    max_delete: Optional[int] = None  # --delete deletes nothing when more is pending
    accept: Optional["Accepted"] = None  # instances accepted as unreadable on the source
    verify_sample: float = 100.0  # --verify: % of studies whose re-encoded pixels are compared
    status: Optional[tuple[str, int]] = None  # --status: where to serve the run's page
    check: bool = False  # compare only: write nothing anywhere
    csv: Optional[Path] = None  # --check: every difference, as CSV

    @classmethod
    def from_argv(cls, argv: list[str], environ: Optional[dict] = None) -> "Config":
        """The configuration `python replicate.py ARGV...` would run with; passwords and
        headers may come from `environ` (default: os.environ). Raises UsageError."""
        return parse_config(argv, dict(os.environ if environ is None else environ))


class Instance:
    """One instance to copy. Slots keep the plan small: a few hundred bytes an instance."""

    __slots__ = ("id", "study", "size")

    def __init__(self, id: str, study: str, size: int) -> None:
        self.id, self.study, self.size = id, study, size

    def __repr__(self) -> str:
        return f"Instance({self.id!r}, {self.study!r}, {self.size})"


@dataclass
class Batch:
    """Instances that travel together. `mode` is archive, bundle or single."""

    mode: str
    instances: list[Instance]

    @property
    def size(self) -> int:
        return sum(instance.size for instance in self.instances)


@dataclass
class StudyCheck:
    """What one study holds on the source and what of it the target lacks."""

    study: str
    missing: list[Instance] = field(default_factory=list)
    present: int = 0  # instances the target already had
    vanished: int = 0  # listed by the source, then gone before their size was read
    gone: bool = False  # the study itself is no longer on the source
    extra: list[str] = field(default_factory=list)  # instances only the target has
    # --check: missing instances the source cannot serve as it received them, and why
    unreadable: list[tuple[Instance, str]] = field(default_factory=list)
    # --check, a study that differs: what a person knows it by (see study_tags), and each
    # differing instance's (SeriesInstanceUID, SOPInstanceUID)
    tags: dict[str, str] = field(default_factory=dict)
    uids: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return len(self.missing) + len(self.unreadable) + self.present + self.vanished


@dataclass
class Seen:
    """What the listings of a study named, kept where --check describes a difference."""

    instances: dict[str, tuple[str, str]] = field(default_factory=dict)  # ID -> (series, SOP UID)
    series: dict[str, str] = field(default_factory=dict)  # series ID -> SeriesInstanceUID

    def series_of(self, instance: str) -> str:
        return self.instances.get(instance, ("", ""))[0]

    def uids(self, instance: str) -> tuple[str, str]:
        series, sop = self.instances.get(instance, ("", ""))
        return self.series.get(series, ""), sop


class Rejected(Exception):
    """The target answered an upload without storing the instance (a Status other than
    Success or AlreadyStored), or stored it under another ID (`renamed`: it changed what it
    received, a lossy re-encoding's new SOPInstanceUID most often; each upload would store
    one more copy, so the run stops)."""

    def __init__(self, message: str, renamed: bool = False) -> None:
        self.renamed = renamed
        super().__init__(message)


@dataclass
class BatchResult:
    batch: Batch
    stored: list[Instance] = field(default_factory=list)
    already: list[Instance] = field(default_factory=list)
    failed: list[tuple[Instance, BaseException]] = field(default_factory=list)
    vanished: list[Instance] = field(default_factory=list)

    def answered(self, instance: Instance, status: Optional[str]) -> None:
        """What the target's answer to an upload said of the instance."""
        if status == "Success":
            self.stored.append(instance)
        elif status == "AlreadyStored":
            self.already.append(instance)
        else:
            self.failed.append((instance, Rejected(f"the target answered Status {status}")))

    def add(self, other: "BatchResult") -> None:
        for name in ("stored", "already", "failed", "vanished"):
            getattr(self, name).extend(getattr(other, name))


@dataclass
class Outcome:
    studies: int = 0  # studies on the source, or selected there
    studies_skipped: int = 0  # complete in earlier runs and untouched since: not looked at
    skipped_instances: int = 0  # what the save file says those studies hold
    studies_checked: int = 0
    present: int = 0  # instances of the studies checked that the target already had
    missing: int = 0  # instances of the studies checked that the target lacked
    missing_bytes: int = 0
    studies_missing: int = 0  # studies checked that lacked something
    copied: int = 0
    copied_bytes: int = 0
    already: int = 0
    vanished: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # instance or study, why
    failed_studies: set[str] = field(default_factory=set)  # those of `failed` that are studies
    interrupted: bool = False
    stopped_on_failure: bool = False
    target_full: Optional[BaseException] = None  # why the run stopped for the target's storage
    verified: Optional[int] = None  # instances --verify compared, None without --verify
    verified_by: Counter[str] = field(default_factory=Counter)  # by how (see COMPARED)
    verify_problems: list[tuple[str, str]] = field(default_factory=list)
    # (instance, study, why, accepted by --accept): what the source cannot serve as it
    # received it (see Unreadable)
    unreadable: list[tuple[str, str, str, bool]] = field(default_factory=list)
    failed_by: Counter[str] = field(default_factory=Counter)  # see failure_reason
    # --follow: the studies counted in studies_missing, each once however many looks
    counted: Optional[set[str]] = None
    metadata_written: int = 0
    checks_max: int = 0  # study checks in flight at most
    studies_max: int = 0  # studies in flight at most: being checked, or instances travelling
    metadata_problems: list[tuple[str, str]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # studies stored, then gone from the target
    unconfirmed: Optional[str] = None  # why the target's studies could not be confirmed
    too_large: list[int] = field(default_factory=list)  # sizes of the instances refused (413)
    # --delete: (study, instances deleted, instances kept: not copied by this tool), and with
    # --dry-run or --check what would be; why nothing was deleted (--max-delete)
    deleted: list[tuple[str, int, int]] = field(default_factory=list)
    would_delete: list[tuple[str, int, int]] = field(default_factory=list)
    delete_refused: Optional[str] = None
    reached: str = ""  # --order: the StudyDate of the last study the walk was handed
    not_found: list[str] = field(default_factory=list)  # --study values naming no study
    paused: float = 0.0  # seconds --bwlimit's timetable paused the run
    exit_status: int = EXIT_OK  # the command's (see the module's docstring)
    error: Optional[str] = None  # the line that says why an error ended the run, if one did

    def found_unreadable(self, instance: str, study: str, reason: str,
                         accept: Optional["Accepted"]) -> bool:
        """An instance the source cannot serve as it received it; whether --accept accepts
        it."""
        accepted = accept is not None and instance in accept
        self.unreadable.append((instance, study, reason, accepted))
        return accepted

    @property
    def unaccepted(self) -> int:
        """Instances unreadable on the source that --accept does not accept."""
        return sum(not accepted for *_, accepted in self.unreadable)

    @property
    def already_there(self) -> int:
        return self.skipped_instances + self.present + self.already

    def fail_study(self, study: str, what: str, error: BaseException) -> None:
        """A failure named by study: `what` could not be done, and why."""
        self.failed.append((study, f"{what}: {describe_error(error)}"))
        self.failed_studies.add(study)

    def kind(self, failed: str) -> str:
        """What a failure names: a study or an instance."""
        return "study" if failed in self.failed_studies else "instance"


# ---- pure helpers ---------------------------------------------------------------------------
def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_count(count: int) -> str:
    return f"{count:,}"


def plural(count: int, word: str, words: str = "") -> str:
    """'1 study', '2 studies', '1,000 instances': the count and the word that goes with it."""
    return f"{count:,} {word if count == 1 else words or word + 's'}"


def instance_count(count: int) -> str:
    return plural(count, "instance")


def study_count(count: int) -> str:
    return plural(count, "study", "studies")


RATE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def parse_rate(text: str) -> float:
    """Bytes per second from `10M`, `512K`, `1.5G` or `2000` (binary units, as in rclone)."""
    cleaned = text.strip().upper().removesuffix("/S").removesuffix("B")
    unit = cleaned[-1:] if cleaned[-1:] in ("K", "M", "G") else ""
    try:
        value = float(cleaned[:len(cleaned) - len(unit)])
    except ValueError:
        raise UsageError(f"--bwlimit {text!r} is not a rate; write it like 512K, 10M or 1G"
                         ) from None
    if not value > 0:
        raise UsageError(f"--bwlimit {text!r}: a rate must be more than 0; write pause for no "
                         "request at all then, or off for no limit")
    return value * RATE_UNITS[unit]


PAUSE = 0.0  # a timetable's rate for `pause`: no request at all to either server
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
WEEK = 7 * 24 * 60  # minutes


@dataclass(frozen=True)
class Timetable:
    """--bwlimit: bytes per second by time of the week, as rclone writes it ("08:00,512K
    19:00,off": 512 KiB/s from 8 in the morning, no limit from 7 in the evening, every day;
    "Mon-07:00,pause Mon-20:00,off": no request at all on Mondays by day), or one rate.
    `entries`: (minute of the week from Monday 00:00, rate: None for no limit, PAUSE), in
    order; an entry without a day stands on every day."""

    entries: tuple[tuple[int, Optional[float]], ...]
    text: str

    def rate_at(self, minute: int) -> Optional[float]:
        """The rate in force at that minute of the week: the last entry at or before it, or,
        before the first entry, the week's last one (it goes on over the weekend)."""
        return self.entries[self.index_at(minute)][1]

    def index_at(self, minute: int) -> int:
        index = -1
        for position, (start, _) in enumerate(self.entries):
            if start > minute:
                break
            index = position
        return index % len(self.entries)

    def next_pause(self, minute: int) -> Optional[int]:
        """The minute of the week at which the next pause after the rate in force begins, or
        None when none is in the timetable."""
        now = self.index_at(minute)
        for step in range(1, len(self.entries)):
            start, rate = self.entries[(now + step) % len(self.entries)]
            if rate == PAUSE:
                return start
        return None

    def until(self, minute: int) -> Optional[int]:
        """The minute of the week at which the rate in force at `minute` ends, or None when
        it never does."""
        now = self.index_at(minute)
        for step in range(1, len(self.entries)):
            start, rate = self.entries[(now + step) % len(self.entries)]
            if rate != self.entries[now][1]:
                return start
        return None


TIMETABLE_ENTRY = re.compile(r"(?:([A-Za-z]{3})-)?(\d{1,2}):(\d{2}),(\S+)")


def parse_bwlimit(text: str) -> Optional[Timetable]:
    """A plain rate (`10M`), `off`, or rclone's timetable of `[DAY-]HH:MM,RATE` entries (a
    RATE may be `off`, or `pause`), separated by spaces. None: no limit at any time."""
    words = text.split()
    if len(words) == 1 and "," not in words[0]:
        if words[0].lower() == "off":
            return None
        return Timetable(((0, parse_rate(words[0])),), text)
    every_day: dict[int, Optional[float]] = {}
    own_day: dict[int, Optional[float]] = {}  # a day's own entry wins over an every-day one
    for word in words:
        match = TIMETABLE_ENTRY.fullmatch(word)
        day = match[1].title() if match and match[1] else None
        if not match or int(match[2]) > 23 or int(match[3]) > 59 or (day and day not in DAYS):
            raise UsageError(f"--bwlimit {word!r}: each entry of a timetable is [DAY-]HH:MM,RATE "
                             "with RATE a rate, off or pause, like \"Mon-07:00,pause Mon-20:00,"
                             "off\" (separate upload:download rates are not supported)")
        minute = int(match[2]) * 60 + int(match[3]) + (DAYS.index(day) * 24 * 60 if day else 0)
        entries = own_day if day else every_day
        if minute in entries:
            raise UsageError(f"--bwlimit: {word.split(',')[0]} is given twice")
        rate = match[4].lower()
        entries[minute] = None if rate == "off" else PAUSE if rate == "pause" else \
            parse_rate(match[4])
    if not every_day and not own_day:
        raise UsageError("--bwlimit is empty; give a rate like 10M or a timetable")
    weekly = {day * 24 * 60 + minute: rate for day in range(7)
              for minute, rate in every_day.items()}
    weekly.update(own_day)
    if all(rate is None for rate in weekly.values()):
        return None
    return Timetable(tuple(sorted(weekly.items())), text)


def local_minute() -> int:
    """The minute of the week (Monday 00:00 is 0) on this machine's clock, which --bwlimit's
    timetable follows."""
    now = time.localtime()
    return now.tm_wday * 24 * 60 + now.tm_hour * 60 + now.tm_min


def describe_minute(minute: int) -> str:
    """'Mon 20:00'"""
    day, minute = divmod(minute % WEEK, 24 * 60)
    return f"{DAYS[day]} {minute // 60:02d}:{minute % 60:02d}"


def describe_rate(rate: Optional[float]) -> str:
    """A --bwlimit rate in the binary units it is written in: 10M is '10 MiB/s'."""
    if rate is None or rate == PAUSE:
        return "no limit" if rate is None else "paused"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if rate < 1024 or unit == "GiB":
            return f"{rate:.3g} {unit}/s"
        rate /= 1024
    raise AssertionError("unreachable")


def parse_query(items: list[str]) -> dict[str, str]:
    """`--query TAG=VALUE` options into an Orthanc find query."""
    query: dict[str, str] = {}
    for item in items:
        tag, equals, value = item.partition("=")
        if not equals or not tag.strip() or not value:
            raise UsageError(f"--query {item!r} must look like TAG=VALUE, e.g. "
                             "StudyDate=20200101-20201231")
        query[tag.strip()] = value
    return query


def study_values(values: list[str]) -> list[str]:
    """--study values, each @FILE replaced by the studies it names, one a line."""
    found = []
    for value in values:
        if not value.startswith("@"):
            found.append(value.strip())
            continue
        try:
            text = Path(value[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--study {value}: cannot read it: "
                             f"{getattr(error, 'strerror', None) or 'not text'}") from None
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        if not any(lines):
            raise UsageError(f"--study {value}: the file names no study (one Orthanc study ID "
                             "or StudyInstanceUID a line)")
        found.extend(line for line in lines if line)
    return found


def parse_url(text: str, role: str) -> tuple[str, Optional[str], Optional[str]]:
    """Split an Orthanc URL into (url without credentials, user, password); UsageError if
    malformed."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"{role} URL {redact_url(text)!r} must start with http:// or https://")
    if not parts.hostname:
        raise UsageError(f"{role} URL {redact_url(text)!r} has no host name")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"{role} URL {redact_url(text)!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise UsageError(f"{role} URL {redact_url(text)!r} must not have a query or fragment")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return url, user, password


def redact_url(text: str) -> str:
    """The URL with any user:password@ removed, for messages."""
    parts = urllib.parse.urlsplit(text)
    if "@" not in parts.netloc:
        return text
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def server_identity(url: str) -> tuple[str, frozenset, int, str]:
    """(scheme, addresses, port, path): two URLs with overlapping addresses name the same server."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    try:
        addresses = frozenset(info[4][0] for info in socket.getaddrinfo(host, port))
    except OSError:
        addresses = frozenset([host.lower()])
    if any(address.startswith("127.") or address == "::1" for address in addresses):
        addresses = frozenset(["loopback"])
    return parts.scheme, addresses, port, parts.path.rstrip("/")


def same_server(first: str, second: str) -> bool:
    a, b = server_identity(first), server_identity(second)
    return a[0] == b[0] and bool(a[1] & b[1]) and a[2] == b[2] and a[3] == b[3]


def pick_credentials(role: str, url_text: str, username_flag: Optional[str],
                     password_flag: Optional[str], shared_username: str,
                     shared_password: Optional[str], environ: dict) -> Endpoint:
    """Precedence for passwords: --ROLE-password, REPLICATE_ROLE_PASSWORD, the URL, --password;
    for user names: --ROLE-username, the URL, --username."""
    url, url_user, url_password = parse_url(url_text, role)
    env_password = environ.get(f"REPLICATE_{role.upper()}_PASSWORD")
    for password in (password_flag, env_password, url_password, shared_password):
        if password is not None:
            break
    given = password is not None
    username = username_flag or url_user or shared_username
    return Endpoint(role, url, username, password if given else "orthanc", given)


HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
HEADER_FORM = ('"Name: value", "Name: env:VARIABLE" (the value from the environment) or '
               '"Name: @FILE" (the value in a file)')


def parse_header(text: str, option: str, environ: dict) -> tuple[str, "str | HeaderFile"]:
    """One --header: `Name: value`, `Name: env:VARIABLE` or `Name: @FILE` (a HeaderFile), so
    that a token need never be on the command line. Messages never show a value."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not HEADER_NAME.fullmatch(name):
        raise UsageError(f"{option} takes {HEADER_FORM}; what was given is not shown")
    if value.startswith("@"):
        return name, HeaderFile(Path(value[1:]), option, name)
    if value.startswith("env:"):
        variable = value[4:]
        if variable not in environ:
            raise UsageError(f"{option} {name}: the environment variable {variable} is not set")
        value = environ[variable].strip()
    try:
        return name, one_line(value)
    except ValueError as problem:
        raise UsageError(f"{option} {name}: {problem}") from None


def one_line(value: str) -> str:
    """A header's value, which must be one line and not empty (ValueError)."""
    if not value or "\n" in value or "\r" in value:
        raise ValueError("the value is empty or spans several lines")
    return value


class HeaderFile:
    """A --header value read from a file (`Name: @FILE`), read again when the file changes (a
    token that a sidecar renews every hour, in a run of days), looked at every HEADER_LOOK
    seconds at most. A file that cannot be read, or reads empty, leaves the last value."""

    def __init__(self, path: Path, option: str, name: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.what, self.clock = path, f"{option} {name}", clock
        self.lock, self.looked = threading.Lock(), clock()
        try:
            self.stamp, self.value = self.read()
        except ValueError as problem:
            raise UsageError(f"{self.what}: {problem}") from None

    def read(self) -> tuple[tuple[int, int, int], str]:
        try:
            state = os.stat(self.path)
            value = self.path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read {self.path}: "
                             f"{getattr(error, 'strerror', None) or 'not text'}") from None
        return (state.st_mtime_ns, state.st_size, state.st_ino), one_line(value)

    def current(self) -> str:
        with self.lock:
            if self.clock() - self.looked >= HEADER_LOOK:
                self.looked = self.clock()
                try:
                    state = os.stat(self.path)
                    if (state.st_mtime_ns, state.st_size, state.st_ino) != self.stamp:
                        self.stamp, self.value = self.read()
                        log.info("%s: read again from %s", self.what, self.path)
                except (OSError, ValueError) as problem:
                    log.debug("%s: %s; the last value stays", self.what, problem)
            return self.value


def pick_headers(shared: list[str], own: list[str], role: str,
                 environ: dict) -> tuple[tuple[str, "str | HeaderFile"], ...]:
    """--header for both servers, then --ROLE-header, which wins for the same name."""
    chosen: dict[str, tuple[str, Any]] = {}
    for option, texts in (("--header", shared), (f"--{role}-header", own)):
        for text in texts:
            name, value = parse_header(text, option, environ)
            chosen[name.lower()] = (name, value)
    return tuple(chosen.values())


SECRET_OPTIONS = ("--password", "--source-password", "--target-password", "--header",
                  "--source-header", "--target-header")


def secret_arguments(argv: list[str]) -> list[str]:
    """What on a command line may be a secret, to keep out of messages even when an option
    is mistyped: the values of the password and header options (as argparse takes them:
    abbreviated, or joined by =), and anything shaped like a header."""
    secrets = []
    for index, token in enumerate(argv):
        option, equals, value = token.partition("=")
        if len(option) > 3 and any(name.startswith(option) for name in SECRET_OPTIONS):
            if equals:
                secrets.append(value)
            elif index + 1 < len(argv):
                secrets.append(argv[index + 1])
        elif "://" not in token and re.match(HEADER_NAME.pattern + r"\s*:\s*\S", token):
            secrets.append(token)
    return [secret for secret in secrets if secret]


def missing_instances(listed: Iterable[tuple[str, Optional[int]]], present: Collection[str],
                      study: str) -> StudyCheck:
    """Planning one study: its instances on the source with their sizes (`listed`), and those
    the target has (`present`). A listed instance without a size was deleted from the source
    between its listing and the reading of its size: it is counted as vanished, not copied.
    What the target has and the source does not list is `extra` (for --delete, --check)."""
    check = StudyCheck(study)
    unmatched = set(present)  # what the target has of the study and the source does not list
    for instance_id, size in listed:
        if instance_id in present:
            check.present += 1
            unmatched.discard(instance_id)
        elif size is not None:
            check.missing.append(Instance(instance_id, study, size))
        else:
            check.vanished += 1
    check.extra = sorted(unmatched)
    return check


class Batcher:
    """Cuts instances, as they come, into batches: small ones into source-built archives,
    middle ones into bundles this tool zips, large ones (and everything when the target takes
    no ZIP uploads) one by one. Batches span studies: studies of a few small instances still
    travel hundreds to a request."""

    def __init__(self, zip_upload: bool, archive_download: bool,
                 max_instances: int = BATCH_MAX_INSTANCES,
                 max_bytes: int = BATCH_MAX_BYTES) -> None:
        self.zip_upload, self.archive_download = zip_upload, archive_download
        self.max_instances, self.max_bytes = max_instances, max_bytes
        self.open: dict[str, Batch] = {}
        self.open_bytes: dict[str, int] = {}
        self.waiting = 0  # instances in open batches

    def add(self, instance: Instance) -> Optional[Batch]:
        """Take one instance; return a batch that is now full, if one is."""
        size = instance.size
        if not self.zip_upload or size >= STREAM_MIN_INSTANCE:
            return Batch("single", [instance])
        mode = "archive" if self.archive_download and size <= ARCHIVE_MAX_INSTANCE else "bundle"
        full = None
        batch = self.open.get(mode)
        if batch is not None and self.open_bytes[mode] + size > self.max_bytes:
            full, batch = self.close(mode), None
        if batch is None:
            batch = self.open[mode] = Batch(mode, [])
            self.open_bytes[mode] = 0
        batch.instances.append(instance)
        self.open_bytes[mode] += size
        self.waiting += 1
        if len(batch.instances) >= self.max_instances:
            return self.close(mode)
        return full

    def close(self, mode: str) -> Batch:
        batch = self.open.pop(mode)
        del self.open_bytes[mode]
        self.waiting -= len(batch.instances)
        if len(batch.instances) == 1:
            batch.mode = "single"
        return batch

    def flush(self) -> list[Batch]:
        """The batches not yet full, to send now."""
        return [self.close(mode) for mode in list(self.open)]


def make_batches(instances: Iterable[Instance], zip_upload: bool, archive_download: bool,
                 max_instances: int = BATCH_MAX_INSTANCES,
                 max_bytes: int = BATCH_MAX_BYTES) -> list[Batch]:
    """All the batches a list of instances makes."""
    batcher = Batcher(zip_upload, archive_download, max_instances, max_bytes)
    batches = [batch for batch in map(batcher.add, instances) if batch is not None]
    return batches + batcher.flush()


def version_at_least(version: str, wanted: tuple[int, int, int]) -> bool:
    """Orthanc versions are like 1.10.1; 'mainline' and unknown forms count as recent."""
    try:
        numbers = tuple(int(part) for part in version.split(".")[:3])
    except ValueError:
        return True
    return numbers >= wanted


def classify(error: BaseException) -> str:
    """The one place that decides what an error asks of the run. Connection trouble, timeouts,
    408, 429 and 5xx are worth a retry (RETRY), but Orthanc's errors about a stored file
    (missing, corrupted, storage full): waiting does not bring a file back. Those, the other
    HTTP errors, refused uploads and retries that ran out are the failure of one resource
    (RESOURCE). A TLS failure (a certificate not trusted) fails every request to its server
    (UNREACHABLE). Anything else is an answer not understood or a bug (DEFECT)."""
    if isinstance(error, GaveUp):
        return RESOURCE
    if isinstance(error, TransportError):
        return UNREACHABLE if error.kind == TLS else RETRY
    if isinstance(error, HttpStatusError):
        if error.orthanc_status in LASTING_ORTHANC_ERRORS:
            return RESOURCE
        return RETRY if error.status in (408, 429) or error.status >= 500 else RESOURCE
    if isinstance(error, Rejected):
        return DEFECT if error.renamed else RESOURCE
    return RESOURCE if isinstance(error, Unreadable) else DEFECT


def stops_run(error: BaseException) -> bool:
    """Whether an error that reached the walk ends the run rather than one resource: a server
    no request can reach, an answer not understood, a defect, or an error that ends the run
    anyway (a save file that cannot be written)."""
    return classify(error) in (UNREACHABLE, DEFECT)


def target_cannot_store(error: BaseException) -> bool:
    """Whether the target answered that it cannot write files, itself or after retries, or
    that it takes no uploads at all (HTTP 405 to a POST: a read-only Orthanc, or a proxy that
    lets no POST through)."""
    cause = error.cause if isinstance(error, GaveUp) else error
    return (isinstance(cause, HttpStatusError) and cause.role == "target"
            and (cause.orthanc_status in TARGET_CANNOT_STORE
                 or (cause.status == 405 and cause.method == "POST")))


def describe_error(error: BaseException) -> str:
    """A short reason without URLs (which could carry credentials) or tracebacks."""
    if isinstance(error, (RequestError, GaveUp, Defect, Rejected, ReplicateError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


# What a TLS failure's reason code (ssl.SSLError.reason, OpenSSL's) means to a person
REFUSED_CERTIFICATE = "the server refused the client certificate"
TLS_REASONS = {"CERTIFICATE_VERIFY_FAILED": "certificate verify failed",
               "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server wants a client certificate; "
                                                    "see --client-cert",
               "SSLV3_ALERT_BAD_CERTIFICATE": REFUSED_CERTIFICATE,
               "TLSV1_ALERT_UNKNOWN_CA": REFUSED_CERTIFICATE,
               "WRONG_VERSION_NUMBER": "the server does not speak TLS on that port"}


def transport_kind(error: BaseException) -> tuple[str, str]:
    """(kind, detail) of a request that failed on the way, read from the types of urllib3's
    exception and of the causes it chains, never from their words."""
    chain: list[BaseException] = []
    cause: Optional[BaseException] = error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    failed = [cause for cause in chain if isinstance(cause, ssl.SSLError)]
    if failed or any(isinstance(cause, urllib3.exceptions.SSLError) for cause in chain):
        reason = getattr(failed[0], "reason", None) if failed else None
        return TLS, TLS_REASONS.get(reason or "", "handshake failed")
    kinds = ((socket.gaierror, UNKNOWN_HOST), (ConnectionRefusedError, REFUSED),
             (http.client.RemoteDisconnected, CLOSED), (ConnectionError, RESET),
             ((TimeoutError, socket.timeout, urllib3.exceptions.TimeoutError), TIMEOUT),
             ((http.client.IncompleteRead, urllib3.exceptions.IncompleteRead,
               urllib3.exceptions.ProtocolError), CUT_SHORT))
    for types, kind in kinds:  # the most telling kind, wherever in the chain
        if any(isinstance(cause, types) for cause in chain):
            return kind, ""
    return CONNECTION, ""


def page_text(text: str) -> str:
    """What a person reads of an answer's body, on one line: a proxy's HTML page is its title,
    or its text."""
    if "<" in text:
        title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = title.group(1) if title else re.sub(r"<[^>]*>", " ", text)
    return " ".join(text.split())[:200]


def framing(response: Any) -> str:
    """How an answer says where it ends: "length", "chunked", "close" (Orthanc's archives end
    by closing the connection), or "" for none of them (cut inside its headers: http.client
    would take an empty body for it)."""
    headers = response.headers
    if "Content-Length" in headers:
        return "length"
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return "chunked"
    return "close" if headers.get("Connection", "").lower() == "close" else ""


def discard(response: Any) -> None:
    """Give up an answer: its connection is closed, and goes back to its pool to be made anew."""
    response.close()
    response.release_conn()


def gather(response: urllib3.HTTPResponse, size: int) -> None:
    """Have the socket of an answer ended by closing its connection wake the reader only
    once `size` bytes are in, or the answer ended (SO_RCVLOWAT), rather than at each piece
    the server writes. Only there: on a connection kept alive, a shorter answer would then
    wait for the timeout. Where the system has no such option, nothing changes."""
    if framing(response) != "close" or not hasattr(socket, "SO_RCVLOWAT"):
        return
    try:  # the connection handed its socket to the answer: reached through a copy of its fd
        with socket.socket(fileno=os.dup(response.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
    except (OSError, ValueError):
        pass


def unless_missing(action: Callable[[], T]) -> Optional[T]:
    """The action's result, or None when the server answered 404 (the resource is not there)."""
    try:
        return action()
    except HttpStatusError as error:
        if error.status == 404:
            return None
        raise


def call_with_retries(action: Callable[[], T], what: str, policy: RetryPolicy,
                      stop: threading.Event,
                      worth: Optional[Callable[[BaseException], bool]] = None) -> T:
    """Run `action`, retrying with backoff the errors `worth` a retry (default: those classify
    calls so); GaveUp chains the last cause."""
    attempt = 1
    while True:
        if stop.is_set():
            raise Interrupted()
        try:
            return action()
        except Interrupted:
            raise
        except Exception as error:
            if not (worth(error) if worth is not None else classify(error) == RETRY):
                raise
            if attempt > policy.retries:
                raise GaveUp(error, attempt, what) from error
            # A kept-alive connection the server had closed: at once, on a new one.
            closed = isinstance(error, TransportError) and error.kind == CLOSED
            delay = 0.0 if attempt == 1 and closed else policy.delay(attempt)
            RETRIED.add()
            log.debug("%s: %s (attempt %d/%d), retrying in %.1f s", what,
                      describe_error(error), attempt, policy.retries + 1, delay)
            if stop.wait(delay):
                raise Interrupted() from None
            attempt += 1


def guarded(what: str, action: Callable[[], T]) -> T:
    """`action`, with a defect (see classify) raised as a Defect that names `what`."""
    try:
        return action()
    except Exception as error:
        if classify(error) != DEFECT or isinstance(error, (Defect, Interrupted,
                                                           ReplicateError)):
            raise
        raise Defect(what, error) from error


# ---- the Orthanc client ---------------------------------------------------------------------
class Transport(requests.adapters.HTTPAdapter):
    """requests' adapter for one server and one thread, through whose urllib3 connection pool
    the client sends every request itself (see OrthancClient.attempt): requests' pools and
    TLS settings, without the objects it builds around each request and answer. Bodies go in
    blocks of CHUNK_SIZE, not http.client's 16 KiB."""

    def __init__(self, url: str, tls_verify: Any, cert: Any) -> None:
        self.url, self.tls_verify, self.cert = url, tls_verify, cert
        self.current: Optional[urllib3.HTTPConnectionPool] = None
        super().__init__(pool_connections=1, pool_maxsize=2)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["blocksize"] = CHUNK_SIZE
        super().init_poolmanager(*args, **kwargs)

    def pool(self) -> urllib3.HTTPConnectionPool:
        if self.current is None:
            self.current = self.poolmanager.connection_from_url(self.url)
            self.cert_verify(self.current, self.url, self.tls_verify, self.cert)
        return self.current

    def renew(self) -> None:
        """Close the idle kept-alive connections, so that the next request opens a new one."""
        self.poolmanager.clear()
        self.current = None


class OrthancClient:
    """One server. `request` is the one way to ask it anything; each thread sends through a
    Transport of its own (its own kept-alive connections)."""

    def __init__(self, endpoint: Endpoint, policy: RetryPolicy, stop: threading.Event,
                 tls_verify: Any = True) -> None:
        self.endpoint = endpoint
        self.tls_verify = tls_verify
        self.role = endpoint.role
        self.policy = policy
        self.stop = stop
        self.system: dict = {}
        # The headers of every request, the credentials encoded by requests. Orthanc 1.10
        # deflates every answer when asked to, which is slower than the network: identity.
        template = requests.PreparedRequest()
        template.headers = requests.structures.CaseInsensitiveDict({
            "User-Agent": f"replicate.py/{__version__}", "Accept-Encoding": "identity",
            "Accept": "*/*"})
        requests.auth.HTTPBasicAuth(endpoint.username, endpoint.password)(template)
        # A proxy's own headers (--header) go with every request and replace the tool's of
        # the same name, whatever its case: an Authorization header replaces the basic
        # credentials. A value from a file is read again when the file changes.
        given = {name.lower() for name, _ in endpoint.headers}
        self.headers = {name: value for name, value in template.headers.items()
                        if name.lower() not in given}
        self.headers.update((name, value) for name, value in endpoint.headers
                            if isinstance(value, str))
        self.files = [(name, value) for name, value in endpoint.headers
                      if isinstance(value, HeaderFile)]
        self.prefix = urllib.parse.urlsplit(endpoint.url).path.rstrip("/")
        self.timeout = urllib3.Timeout(connect=min(10.0, policy.timeout), read=policy.timeout)
        self.find_caps: dict[str, Optional[int]] = {}  # level -> what its finds return at most
        # The quickest answer seen, in seconds: the round trip to the server, plus the least
        # it takes to answer anything. Pace reads it.
        self.latency = float("inf")
        self.sent_again = 0  # bytes of request bodies cut short, to be sent again
        # --bwlimit's pauses: called before each request, waits while the timetable pauses
        self.hold: Optional[Callable[[threading.Event], None]] = None
        self._local = threading.local()
        self._transports: dict[threading.Thread, Transport] = {}
        self._lock = threading.Lock()

    def transport(self) -> Transport:
        """The thread's own. Those of threads that ended are closed as a new one is made: a
        walk's pools end with it, and a follow of weeks makes one walk a look."""
        transport = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._local.transport = Transport(self.endpoint.url, self.tls_verify,
                                                          self.endpoint.cert)
            with self._lock:
                for ended in [thread for thread in self._transports if not thread.is_alive()]:
                    self._transports.pop(ended).close()
                self._transports[threading.current_thread()] = transport
        return transport

    @property
    def distant(self) -> bool:
        """Whether the server is across a network: its quickest answer took REMOTE_LATENCY
        or more (none yet: not known, not distant)."""
        return REMOTE_LATENCY <= self.latency < float("inf")

    def close(self) -> None:
        with self._lock:
            for transport in self._transports.values():
                transport.close()
            self._transports.clear()

    def request(self, method: str, path: str, *, json: Any = None, data: Any = None,
                headers: Optional[dict[str, str]] = None, read: str = "json",
                limit: Optional[int] = None, timeout: Optional[float] = None,
                retry: "bool | Callable[[BaseException], bool]" = True) -> Any:
        """Ask the server. What comes back, by `read`: "json" (decoded), "bytes", "text"
        (stripped), or "stream": the answer unread, which the caller reads, then discards.
        `retry`: True retries what classify calls worth a retry, with backoff, up to the
        policy's retries (GaveUp then chains the last error); False sends once; or a function
        that decides for each error. An answer that announces more than `limit` bytes is not
        read: TOO_LARGE. `timeout`: how long the first byte may take, if longer than
        --timeout (a listing of the whole server, which Orthanc sends only once it has all of
        it). Raises HttpStatusError, TransportError, UnexpectedAnswer."""
        def once() -> Any:
            return self.attempt(method, path, json, data, headers, read, limit, timeout)
        if retry is False:
            return once()
        return call_with_retries(once, f"{self.role} {method} {path.split('?')[0]}",
                                 self.policy, self.stop, None if retry is True else retry)

    def get(self, path: str) -> Any:
        """request("GET", path): decoded JSON, retried."""
        return self.request("GET", path)

    def attempt(self, method: str, path: str, body_json: Any, data: Any,
                headers: Optional[dict[str, str]], read: str, limit: Optional[int],
                timeout: Optional[float]) -> Any:
        """One request (see request), sent straight to the thread's urllib3 pool."""
        if self.hold is not None:
            self.hold(self.stop)
        request_headers = self.headers.copy()
        request_headers.update((name, value.current()) for name, value in self.files)
        body = data
        if body_json is not None:
            body = json.dumps(body_json).encode("utf-8")
            request_headers["Content-Type"] = "application/json"
        if headers:
            request_headers.update(headers)
        chunked = body is not None and not hasattr(body, "__len__")  # a generator of blocks
        if body is not None and not chunked:
            request_headers["Content-Length"] = str(len(body))
        transport = self.transport()
        if body is not None and (chunked or len(body) >= FRESH_UPLOAD):
            # Orthanc closes a kept-alive connection idle for about a second: behind a link
            # that queues longer (a FIFO in a router or VPN), a body sent on one crosses it
            # for nothing. A new connection is waited on for tens of seconds.
            transport.renew()
        short = path.split("?")[0]
        started = time.perf_counter()
        try:
            response = transport.pool().urlopen(
                method, self.prefix + path, body=body, headers=request_headers, retries=False,
                redirect=False, assert_same_host=False, chunked=chunked,
                timeout=self.timeout if timeout is None else urllib3.Timeout(
                    connect=self.timeout.connect_timeout, read=max(self.policy.timeout,
                                                                   timeout)),
                preload_content=False, release_conn=False, decode_content=True,
                enforce_content_length=True)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            if body is not None:  # what was sent of it crossed the link for nothing
                sent = getattr(body, "sent", 0 if chunked else len(body))
                with self._lock:
                    self.sent_again += sent
            raise TransportError(self.role, method, short, *transport_kind(error)) from error
        self.latency = min(self.latency, time.perf_counter() - started)
        kind = response.headers.get("Content-Type", "no type").split(";")[0]
        EXCHANGES.last = (self.role, method, short, response.status, kind, None)
        if response.status >= 300:
            # An error answer is short (Orthanc's is a small JSON); read at most 64 KiB of it.
            try:
                text = response.read(65536).decode("utf-8", "replace")
            except (urllib3.exceptions.HTTPError, OSError):
                text = ""
            discard(response)
            raise HttpStatusError(self.role, method, short, response.status, text)
        if not framing(response):
            discard(response)
            raise TransportError(self.role, method, short, CUT_SHORT, "inside its headers")
        length = response.headers.get("Content-Length")
        if length is not None and not length.strip().isdigit():
            discard(response)
            raise UnexpectedAnswer(self.role, method, short,
                                   f"a Content-Length that is not a number ({length[:40]!r})")
        if read == "stream":
            return response
        if limit is not None and length is not None and int(length) > limit:
            discard(response)
            return TOO_LARGE
        if read == "bytes" and not self.distant:  # an archive, in pieces of a file each
            gather(response, GATHER_BYTES)
        try:
            content = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as error:
            discard(response)
            raise TransportError(self.role, method, short, CUT_SHORT) from error
        EXCHANGES.last = (*EXCHANGES.last[:5], len(content))
        if read == "bytes":
            return content
        if read == "text":
            return content.decode("utf-8", "replace").strip()
        try:
            return json.loads(content)
        except ValueError:
            raise UnexpectedAnswer(self.role, method, short, f"something that is not JSON "
                                   f"(HTTP {response.status}, {kind}, {len(content):,} bytes: "
                                   f"{page_text(content[:4096].decode('utf-8', 'replace'))!r})"
                                   ) from None

    def md5(self, instance_id: str) -> Optional[str]:
        """The MD5 Orthanc stored for the instance's DICOM file (of the uncompressed file,
        whatever StorageCompression says), or None when the instance is not there."""
        return unless_missing(lambda: self.request(
            "GET", f"/instances/{instance_id}/attachments/dicom/md5", read="text"))

    def check(self) -> dict:
        """GET /system, every way it can fail turned into a one-line ServerError. Resets,
        timeouts and 5xx are retried like any request; a refused connection, an unknown host
        or a TLS failure are most likely a wrong URL and fail at once."""
        url = self.endpoint.url

        def worth(error: BaseException) -> bool:
            return classify(error) == RETRY and not (
                isinstance(error, TransportError) and error.kind in (REFUSED, UNKNOWN_HOST))
        try:
            system = self.request("GET", "/system", retry=worth)
        except (TransportError, GaveUp) as error:
            tls = isinstance(error, TransportError) and error.kind == TLS
            raise ServerError(f"cannot reach {self.role} {url}: {error}"
                              + ("; see --ca-bundle and --insecure" if tls else "")) from error
        except HttpStatusError as error:
            if error.status in (401, 403):
                headers = ", ".join(name for name, _ in self.endpoint.headers)
                raise CredentialsRefused(
                    f"{self.role} {url} refused the credentials of user "
                    f"{self.endpoint.username!r}" + (f" and the headers {headers}" if headers
                                                     else "")
                    + f" (HTTP {error.status}); check --{self.role}-username/--{self.role}-"
                    f"password, or, behind a proxy that wants an API key or a token, "
                    f"--{self.role}-header") from None
            if error.status == 400:  # never Orthanc's answer to GET /system: a proxy's
                sent = "none was sent" if self.endpoint.cert is None else \
                    "it refused the one sent"
                raise ServerError(
                    f"{self.role} {url}: a proxy in front of it refused the request (HTTP 400"
                    + (f": {error.detail}" if error.detail else "") + "); if it wants a client "
                    f"certificate ({sent}), give it with --client-cert and --client-key, or "
                    f"--{self.role}-client-cert and --{self.role}-client-key") from None
            system = error.status
        except UnexpectedAnswer:
            system = 200
        if not isinstance(system, dict) or "Version" not in system or "ApiVersion" not in system:
            raise ServerError(f"{self.role} {url} answers but is not an Orthanc server (GET "
                              f"/system gave HTTP {system if isinstance(system, int) else 200}"
                              "); check the URL")
        self.system = system
        return system

    @property
    def version(self) -> str:
        return str(self.system.get("Version", "?"))


# ---- walking the source ---------------------------------------------------------------------
def parallel_map(function: Callable[[A], T], items: Iterable[A], threads: int) -> Iterator[T]:
    """`function` over `items` on `threads` threads, results in order, reading `items` only a
    few ahead of the results (memory stays bounded however many there are). Stopped early
    (Ctrl-C), it drops what has not started and waits for what has."""
    pool = ThreadPoolExecutor(max(1, threads))
    ahead: deque[Future] = deque()
    try:
        for item in items:
            ahead.append(pool.submit(function, item))
            if len(ahead) >= threads * 4:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        for future in ahead:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class ReadAhead:
    """`items`, produced on a thread of their own up to `size` ahead of the reader: iterated,
    it waits for each; `take(wait=False)` does not, and `wake` is called once the next item
    is there after a take that found none. An error in producing them is raised to the
    reader; `close` (or a reader that stops iterating) stops the thread at its next item."""

    END, NOT_YET = object(), object()

    def __init__(self, items: Iterable[Any], size: int,
                 wake: Optional[Callable[[], None]] = None) -> None:
        self.ahead: queue.Queue[tuple[bool, Any]] = queue.Queue(size)
        self.quit = threading.Event()
        self.wake, self.hungry, self.ended = wake, False, False
        threading.Thread(target=self.produce, args=(items,), name="ahead", daemon=True).start()

    def produce(self, items: Iterable[Any]) -> None:
        try:
            for item in items:
                if not self.offer((True, item)):
                    return
            self.offer((False, None))
        except BaseException as error:  # noqa: B036 (raised to the reader)
            self.offer((False, error))

    def offer(self, entry: tuple[bool, Any]) -> bool:
        while not self.quit.is_set():
            try:
                self.ahead.put(entry, timeout=0.5)
            except queue.Full:
                continue
            if self.hungry and self.wake is not None:
                self.hungry = False
                self.wake()
            return True
        return False

    def take(self, wait: bool = True) -> Any:
        """The next item, END after the last, or NOT_YET (not `wait`ing, none is there)."""
        if self.ended:
            return self.END
        self.hungry = not wait  # before looking: an item put meanwhile wakes the reader
        try:
            more, item = self.ahead.get(block=wait)
        except queue.Empty:
            return self.NOT_YET
        self.hungry = False
        if not more:
            self.ended = True
            if item is not None:
                raise item
            return self.END
        return item

    def close(self) -> None:
        self.quit.set()

    def __iter__(self) -> Iterator[Any]:
        try:
            while (item := self.take()) is not self.END:
                yield item
        finally:
            self.close()


def study_layout(server: OrthancClient, study: str,
                 seen: Optional[Seen] = None) -> Optional[dict[str, list[str]]]:
    """Series ID -> instance IDs of a study (about 60 bytes of answer an instance), or None
    when the server does not have the study. `seen` keeps each series' UID."""
    series = unless_missing(lambda: server.get(f"/studies/{study}/series"))
    if series is None:
        return None
    if seen is not None:
        for record in series:
            seen.series[record["ID"]] = record.get("MainDicomTags", {}).get("SeriesInstanceUID",
                                                                            "")
            seen.instances.update((instance, (record["ID"], "")) for instance in
                                  record["Instances"] if instance not in seen.instances)
    return {record["ID"]: record["Instances"] for record in series}


def series_sizes(source: OrthancClient, layout: dict[str, list[str]],
                 wanted: set[str]) -> dict[str, int]:
    """The sizes of the `wanted` instances of a large study, series by series: an expanded
    listing of each series that has any, or for a series too large for that, each instance
    asked for on its own (a series' mean size would let a large instance into a bundle,
    which is read whole into memory)."""
    sizes: dict[str, int] = {}
    for series, instances in layout.items():
        if wanted.isdisjoint(instances):
            continue
        if len(instances) <= SERIES_LISTING_MAX:
            records = unless_missing(lambda: source.get(f"/series/{series}/instances")) or []
            sizes.update((record["ID"], int(record["FileSize"])) for record in records
                         if record["ID"] in wanted)
        else:
            sizes.update(fetch_details(source, [instance for instance in instances
                                                if instance in wanted], None, "instances",
                                       CHECKS_AHEAD, lambda record: int(record["FileSize"])))
    return sizes


def check_study(source: OrthancClient, target: OrthancClient, study: str,
                on_target: bool, seen: Optional[Seen] = None) -> StudyCheck:
    """What the target lacks of one study. The target is asked for the study's series only
    if it has the study (`on_target`); the source for the study's instances, expanded with
    their sizes, or series by series where that listing would exceed STUDY_ANSWER_MAX (memory
    grows with a series at most). `seen` (--check) keeps what the listings say of each
    instance and series, the target's first."""
    found = study_layout(target, study, seen) if on_target else None
    present = {instance for instances in (found or {}).values() for instance in instances}
    records = unless_missing(lambda: source.request("GET", f"/studies/{study}/instances",
                                                    limit=STUDY_ANSWER_MAX))
    if records is None:
        return StudyCheck(study, gone=True)
    if records is not TOO_LARGE:
        if seen is not None:
            seen.instances.update((record["ID"], (record.get("ParentSeries", ""), record.get(
                "MainDicomTags", {}).get("SOPInstanceUID", ""))) for record in records)
        return missing_instances(((record["ID"], int(record["FileSize"])) for record in records),
                                 present, study)
    layout = study_layout(source, study, seen)
    if layout is None:
        return StudyCheck(study, gone=True)
    wanted = {instance for instances in layout.values() for instance in instances
              if instance not in present}
    sizes = series_sizes(source, layout, wanted)
    return missing_instances(((instance, sizes.get(instance)) for instances in layout.values()
                              for instance in instances), present, study)


def study_tags(server: OrthancClient, study: str) -> dict[str, str]:
    """What a person recognises a study by: patient ID, study date, StudyInstanceUID."""
    record = unless_missing(lambda: server.get(f"/studies/{study}")) or {}
    main, patient = record.get("MainDicomTags", {}), record.get("PatientMainDicomTags", {})
    return {"patient_id": patient.get("PatientID", ""), "study_date": main.get("StudyDate", ""),
            "study_instance_uid": main.get("StudyInstanceUID", "")}


def described_check(source: OrthancClient, target: OrthancClient, study: str, on_target: bool,
                    pool: ThreadPoolExecutor, uids: bool,
                    accepted: Optional[Accepted] = None) -> StudyCheck:
    """check_study for --check, with what a person knows a difference by: the study's tags
    (one request) and, with `uids` (for --csv), each differing instance's SeriesInstanceUID
    and SOPInstanceUID (at most a request for the source's series and one for each target
    series with instances only the target has). For a study the target lacks, they are
    asked for on `pool` beside its listing: across a link, one round trip in all."""
    seen, series = Seen(), Seen()
    tags = pool.submit(study_tags, source, study) if not on_target else None
    listed = pool.submit(study_layout, source, study, series) if uids and not on_target \
        else None
    check = check_study(source, target, study, on_target, seen if uids else None)
    if check.gone or not (check.missing or check.extra):
        return check
    # Of what the target lacks, what the source can no longer serve: the instances missing
    # from a study the target holds (a copy went through it) and those --accept lists. A
    # study not copied yet costs no file read.
    suspects = [instance for instance in check.missing
                if on_target or (accepted is not None and instance.id in accepted)]
    faults = [pool.submit(source_fault, source, instance.id) for instance in suspects]
    for instance, fault in zip(suspects, faults):
        if fault.result() is not None:
            check.unreadable.append((instance, fault.result()))
    if check.unreadable:
        unreadable = {instance.id for instance, _ in check.unreadable}
        check.missing = [instance for instance in check.missing if instance.id not in unreadable]
    tags = tags or pool.submit(study_tags, source, study)
    if not uids:
        check.tags = tags.result()
        return check
    if listed is None and any(seen.series_of(instance.id) not in seen.series
                              for instance in check.missing):
        listed = pool.submit(study_layout, source, study, series)

    def target_series(series_id: str) -> None:
        records = unless_missing(lambda: target.get(f"/series/{series_id}/instances")) or []
        seen.instances.update((record["ID"], (series_id, record.get("MainDicomTags", {}).get(
            "SOPInstanceUID", ""))) for record in records)
    holding = {seen.series_of(instance) for instance in check.extra} - {""}
    for done in [pool.submit(target_series, series_id) for series_id in sorted(holding)]:
        done.result()
    if listed is not None:
        listed.result()
        seen.series.update(series.series)
    check.tags = tags.result()
    check.uids = {instance: seen.uids(instance) for instance in itertools.chain(
        (instance.id for instance in check.missing), check.extra,
        (instance.id for instance, _ in check.unreadable))}
    return check


FIND_PAGE = 1000  # IDs a /tools/find page asks for, where the server can page its finds


def find_all(source: OrthancClient, body: dict) -> list[str]:
    """Every resource a /tools/find matches, whatever LimitFindResults or LimitFindInstances
    the source has. Orthanc 1.12.5+ (`HasExtendedFind`) pages its finds until one comes back
    empty, the only proof of the end. Older servers find at most cap+1 resources whatever
    Since and Limit say: their cap is found once (find_cap), and a find it may have cut is
    done again in slices smaller than the cap (find_in_slices)."""
    if source.system.get("Capabilities", {}).get("HasExtendedFind"):
        found: list[str] = []
        while True:
            page = source.request("POST", "/tools/find",
                                  json={**body, "Since": len(found), "Limit": FIND_PAGE},
                                  timeout=LISTING_TIMEOUT)
            if not page:
                return found
            found.extend(page)
    found = source.request("POST", "/tools/find", json=body, timeout=LISTING_TIMEOUT)
    # A find of every instance would make the server list its whole archive: an instance-level
    # find (labels, Orthanc 1.12.0 to 1.12.4) is taken as it comes.
    cap = None if body["Level"] == "Instance" else find_cap(source, body["Level"])
    if cap is None or len(found) <= cap:
        return found
    if body["Level"] != "Study" or "StudyInstanceUID" in body.get("Query", {}):
        raise UsageError(f"the source (Orthanc {source.version}) stops its finds at {cap} "
                         "resources (LimitFindResults) and cannot page them; set "
                         "LimitFindResults to 0 in its configuration for the migration, or "
                         "use Orthanc 1.12.5+")
    return find_in_slices(source, body, cap)


def find_cap(source: OrthancClient, level: str) -> Optional[int]:
    """The most resources of `level` that the source's finds return (before Orthanc 1.12.5),
    or None when no cap cuts them: a find of every resource of the level, compared with the
    count in /statistics. Asked once per run and level."""
    caps = source.find_caps
    if level not in caps:
        counts = source.get("/statistics")
        count = int(counts.get(f"Count{LEVEL_PATHS[level].capitalize()}", 0))
        everything = source.request("POST", "/tools/find", json={"Level": level, "Query": {}},
                                    timeout=LISTING_TIMEOUT)
        # cut, a server answers cap + 1 resources (Orthanc 1.9 to 1.12.4)
        caps[level] = len(everything) - 1 if len(everything) < count else None
        if caps[level] is not None:
            log.debug("source finds stop at %d %s resources", caps[level], level)
    return caps[level]


def find_in_slices(source: OrthancClient, body: dict, cap: int) -> list[str]:
    """A study-level find on a server whose cap cut it: the same query over slices of at most
    `cap` studies named by their StudyInstanceUIDs (DICOM list matching), so that no slice can
    be cut. Needs the UID of every study: one paged expanded listing of the studies."""
    studies = source.request("GET", "/studies", timeout=LISTING_TIMEOUT)
    uids = fetch_details(source, {study: study for study in studies}, len(studies), "studies",
                         4, lambda record: record["MainDicomTags"].get("StudyInstanceUID", ""))
    ordered = sorted(set(uid for uid in uids.values() if uid))
    found: dict[str, None] = {}  # in the order found, each once
    size = max(1, min(cap, 500))
    for start in range(0, len(ordered), size):
        query = {**body["Query"], "StudyInstanceUID": "\\".join(ordered[start:start + size])}
        found.update(dict.fromkeys(source.request("POST", "/tools/find",
                                                  json={**body, "Query": query},
                                                  timeout=LISTING_TIMEOUT)))
    return list(found)


def fetch_details(source: OrthancClient, wanted: Collection[str], total: Optional[int],
                  level: str, threads: int, read: Callable[[dict], T]) -> dict[str, T]:
    """Details of the `wanted` resources of a level: one paged expanded listing when they are
    many (`total` None: never), one request each for the rest (paging is unstable while the
    server receives data); one gone (404) is left out. `wanted` may map each ID to itself:
    the answer is then keyed by those strings rather than by a copy of each."""
    found: dict[str, T] = {}
    if total is not None and len(wanted) * DETAIL_ONE_BY_ONE_RATIO > total:
        since = 0
        while True:
            page = source.get(f"/{level}?expand&since={since}&limit={LISTING_PAGE}")
            for record in page:
                if record["ID"] in wanted:
                    key = wanted[record["ID"]] if isinstance(wanted, dict) else record["ID"]
                    found[key] = read(record)
            if len(page) < LISTING_PAGE:
                break
            since += LISTING_PAGE
    rest = [resource for resource in wanted if resource not in found]

    def one(resource: str) -> Optional[dict]:
        return unless_missing(lambda: source.get(f"/{level}/{resource}"))
    for resource, record in zip(rest, parallel_map(one, rest, threads)):
        if record is not None:
            found[resource] = read(record)
    return found


def select_studies(server: OrthancClient, query: dict[str, str], studies: list[str],
                   unknown: list[str]) -> list[str]:
    """Study IDs of the selection on a server: those matching every --query tag, then each
    --study's, in the order given, each once. A --study that names no study there goes to
    `unknown`."""
    selected = dict.fromkeys(find_all(server, {"Level": "Study", "Query": query,
                                               "Expand": False}) if query else [])
    for study in studies:
        found = find_study(server, study)
        if not found:
            unknown.append(study)
        selected.update(dict.fromkeys(found))
    return list(selected)


def find_study(server: OrthancClient, study: str) -> list[str]:
    """The Orthanc IDs a --study value names: itself, or the studies with that StudyInstanceUID
    (one per patient that has it); none when the server has no such study."""
    if ORTHANC_ID.fullmatch(study):
        return [study] if unless_missing(lambda: server.get(f"/studies/{study}")) else []
    found = server.request("POST", "/tools/lookup", data=study.encode())
    return [record["ID"] for record in found if record.get("Type") == "Study"]


@dataclass
class ChangeLog:
    """What a stretch of the source's change log says: the changes kept, and where it ends."""

    changes: list[dict]
    last: int  # the position of the last change read
    last_id: str = ""  # the resource that change names, which anchors the position


def read_changes(source: OrthancClient, since: int, kinds: Collection[str],
                 until: Optional[int] = None) -> ChangeLog:
    """The changes after `since` (up to `until`) whose ChangeType is one of `kinds`, filtered
    page by page: a first run reads the whole log, four records an instance. A page that
    names none of `kinds` is only skimmed for where it ends (skim_changes). Orthanc's `Done`,
    not the length of a page, says where the log ends: a server may give fewer than asked."""
    log_read = ChangeLog([], since)
    markers = [kind.encode() for kind in kinds]
    while True:
        path = f"/changes?since={log_read.last}&limit={CHANGES_PAGE}"
        body = source.request("GET", path, read="bytes")
        page = None if any(marker in body for marker in markers) else skim_changes(body)
        if page is not None and until is not None and page["Last"] > until:
            page = None  # where to stop inside the page: each change's position is needed
        if page is None:
            try:
                page = json.loads(body)
            except ValueError:
                raise UnexpectedAnswer("source", "GET", "/changes",
                                       "something that is not JSON") from None
        records = page.get("Changes", [])
        for change in records:
            if until is not None and int(change["Seq"]) > until:
                return log_read
            if change.get("ChangeType") in kinds:
                log_read.changes.append(change)
            log_read.last, log_read.last_id = int(change["Seq"]), str(change.get("ID", ""))
        if page.get("Done", True) or not records:
            return log_read


CHANGE_RECORD = re.compile(rb'"ID"\s*:\s*"([^"]*)"[^{}]*?"Seq"\s*:\s*(\d+)')
CHANGES_END = re.compile(rb'"Done"\s*:\s*(true|false)\s*,\s*"Last"\s*:\s*(\d+)\s*}\s*$')


def skim_changes(body: bytes) -> Optional[dict]:
    """A page of the change log reduced to where it ends, read without decoding the JSON: its
    last change (ID and Seq) if it has any, Done and Last. None when the page is not laid
    out as Orthanc writes it (keys in alphabetical order, the last change's Seq equal to
    Last), and must be decoded."""
    end = CHANGES_END.search(body)
    if end is None:
        return None
    last = int(end.group(2))
    records = []
    start = body.rfind(b'"ID"')
    if start >= 0:
        found = CHANGE_RECORD.match(body, start)
        if found is None or int(found.group(2)) != last:
            return None
        records.append({"ID": found.group(1).decode(), "Seq": last})
    elif b'"Seq"' in body:
        return None
    return {"Changes": records, "Done": end.group(1) == b"true", "Last": last}


def change_at(source: OrthancClient, position: int) -> Optional[str]:
    """The resource the change at `position` names, or None when the log no longer holds it
    (cleared with DELETE /changes, restarted, or the resource deleted since)."""
    page = source.get(f"/changes?since={position - 1}&limit=1")
    records = page.get("Changes", [])
    if records and int(records[0]["Seq"]) == position:
        return str(records[0].get("ID", ""))
    return None


METADATA_CHANGES = frozenset(["UpdatedMetadata", "UpdatedAttachment"])
ARRIVALS = frozenset(["NewInstance", "NewSeries", "NewStudy"])


def is_metadata_change(change: dict) -> bool:
    """Metadata or attachments written through the API (Orthanc logs those writes as
    UpdatedMetadata and UpdatedAttachment; system metadata are not logged)."""
    return (change.get("ChangeType") in METADATA_CHANGES
            and change.get("ResourceType") in LEVEL_PATHS)


def is_arrival(change: dict) -> bool:
    """A change that says a study may hold more than before: an instance, series or study
    arrived (stable-study and metadata changes name a study the same way, harmlessly)."""
    return change.get("ChangeType") in ARRIVALS


def metadata_candidates(changes: list[dict]) -> set[tuple[str, str]]:
    """The resources whose metadata or attachments the changes say were written."""
    return {(change["ResourceType"], change["ID"]) for change in changes
            if is_metadata_change(change)}


def touched_studies(source: OrthancClient, changes: list[dict], threads: int) -> set[str]:
    """The studies that the arrivals among `changes` went into. A new series is asked for once
    (its study and its instances); an instance that arrived in an older series, once each.
    Resources deleted since are left out: there is nothing of them to copy."""
    studies = {change["ID"] for change in changes
               if is_arrival(change) and change["ResourceType"] == "Study"}
    series = sorted({change["ID"] for change in changes
                     if is_arrival(change) and change["ResourceType"] == "Series"})
    instances = {change["ID"] for change in changes
                 if is_arrival(change) and change["ResourceType"] == "Instance"}
    for record in parallel_map(lambda one: unless_missing(lambda: source.get(f"/series/{one}")),
                               series, threads):
        if record is not None:
            studies.add(record["ParentStudy"])
            instances.difference_update(record.get("Instances", []))
    rest = sorted(instances)
    for record in parallel_map(
            lambda one: unless_missing(lambda: source.get(f"/instances/{one}/study")),
            rest, threads):
        if record is not None:
            studies.add(record["ID"])
    return studies


# ---- the order of studies: --order ------------------------------------------------------------
DATED = "00010101-99991231"  # a StudyDate range that every date matches, and no empty one
# Studies a page of the expanded study listing holds: about 1 KB of answer, 3 KB parsed each.
STUDY_PAGE = 500
UNDATED = "undated"  # where the walk stands once it hands out the studies without a date
HEAD_LIMIT = 200  # studies the find of the first ones may return (see StudyOrder.head)
NO_STUDY_DATE = "-"  # in the save file: the study has no StudyDate (see Journal)


def study_when(record: Optional[dict]) -> tuple[str, str]:
    """(StudyDate, StudyTime) of a study's record, as they sort; empty when not known."""
    tags = (record or {}).get("MainDicomTags", {})
    return tags.get("StudyDate", ""), tags.get("StudyTime", "")


def study_page(source: OrthancClient, since: int) -> list[tuple[str, tuple[str, str]]]:
    """(ID, (StudyDate, StudyTime)) of a page of the source's expanded study listing, cut down
    to those as it arrives."""
    return [(record["ID"], study_when(record)) for record in source.request(
        "GET", f"/studies?expand&since={since}&limit={STUDY_PAGE}", timeout=LISTING_TIMEOUT)]


def study_records(source: OrthancClient,
                  count: int = 0) -> Iterator[tuple[str, tuple[str, str]]]:
    """(ID, (StudyDate, StudyTime)) of every study, from the source's expanded study listing,
    two pages at a time up to `count` studies (what the source holds, as far as known), then
    one after the other while pages come back full, each cut down to those as it arrives:
    cheaper for an older Orthanc than finds by StudyDate range, each of which reads its whole
    index. Paging is unstable while the source receives studies: one may be missed."""
    with ThreadPoolExecutor(2, thread_name_prefix="listing") as pool:
        ahead, since = deque([pool.submit(study_page, source, 0)]), STUDY_PAGE
        while ahead:
            while len(ahead) < 2 and since < count:
                ahead.append(pool.submit(study_page, source, since))
                since += STUDY_PAGE
            records = ahead.popleft().result()
            yield from records
            if not ahead and len(records) == STUDY_PAGE:  # the source grew meanwhile
                ahead.append(pool.submit(study_page, source, since))
                since += STUDY_PAGE


def study_dates(source: OrthancClient, studies: Collection[str], archive: int,
                threads: int) -> Iterator[tuple[str, tuple[str, str]]]:
    """(study, (StudyDate, StudyTime)) of each of `studies` the source has: each asked for on
    its own (`threads` at a time) when they are few against the `archive`'s studies, else
    from the expanded listing of all, keeping those asked for."""
    if len(studies) * DETAIL_ONE_BY_ONE_RATIO <= archive:
        def when(study: str) -> tuple[str, str]:
            return study_when(unless_missing(lambda: source.get(f"/studies/{study}")))
        return zip(studies, parallel_map(when, studies, threads))
    wanted = studies if isinstance(studies, (set, dict)) else set(studies)
    return ((study, when) for study, when in study_records(source, archive)
            if study in wanted)


class StudyOrder:
    """--order newest or oldest: the studies to look at by StudyDate (then StudyTime), newest
    or oldest first; then those without a date, and any the dated listings did not name
    (arrived meanwhile), in the order given: every study given is handed out once. A source
    that sorts its finds (Orthanc 1.12.5+, HasExtendedFind) is read page by page in that
    order. An older one's expanded study listing is read and sorted after the first few
    studies went out from one find (see head). When the studies to look at are few against
    the archive, each is asked for its own date instead."""

    def __init__(self, source: OrthancClient, order: str, threads: int) -> None:
        self.source, self.newest, self.threads = source, order == "newest", threads
        self.pending: dict[str, None] = {}  # the studies not handed out yet
        self.reached = ""  # the StudyDate of the last study the walk took (see took)
        self.dates: dict[str, str] = {}  # StudyDate of the studies handed out (see date_of)

    def arrange(self, studies: list[str], archive: Optional[int]) -> Iterator[str]:
        """`studies` in order; `archive`: how many studies the source holds (None: ask)."""
        self.pending = dict.fromkeys(studies)
        if archive is None:
            archive = int(self.source.get("/statistics")["CountStudies"])
        few = len(studies) * DETAIL_ONE_BY_ONE_RATIO <= archive
        if not few and self.source.system.get("Capabilities", {}).get("HasExtendedFind"):
            dated = iter(ReadAhead(self.sorted_pages(), 2 * FIND_PAGE))
        elif not few and archive > STUDY_PAGE:
            dated = self.listed(archive)
        else:
            dated = self.sort((when, study) for study, when in study_dates(
                self.source, self.pending, archive, self.threads))
        for study, date in dated:
            if study in self.pending:
                del self.pending[study]
                self.dates[study] = date
                yield study
        yield from (study for study in studies if self.pending.pop(study, True) is None)

    def sort(self, found: Iterable[tuple[tuple[str, str], str]]) -> Iterator[tuple[str, str]]:
        """(study, date) of the dated ones of ((date, time), study), in order; those found
        without a date are noted as such (NO_STUDY_DATE).

        Each is held as one string "date\\1time\\0study" while they are sorted, which sorts
        as the tuple would (the separators sort before any character of a date or time), in
        a third of the tuple's memory."""
        dated = []
        for (date, time_), study in found:
            if date:
                dated.append(f"{date}\1{time_}\0{study}")
            else:
                self.dates[study] = NO_STUDY_DATE
        dated.sort(reverse=self.newest)
        return ((key.rpartition("\0")[2], key.partition("\1")[0]) for key in dated)

    def listed(self, archive: int) -> Iterator[tuple[str, str]]:
        """(study, date) in order: the head, then the sorted listing (the head's studies come
        again in it, and are skipped as handed out)."""
        yield from self.head(archive)
        yield from self.sort((when, study) for study, when in study_records(self.source,
                                                                          archive))

    def head(self, archive: int) -> list[tuple[str, str]]:
        """(study, date) of the studies that go first, in order, before the whole listing is
        read: every study dated from the newest date on the listing's last page on (oldest
        first: up to the oldest date on its first page), from one find of that StudyDate
        range: a source's last arrivals hold its newest studies. Empty (the listing alone
        decides) when the page holds no date, or when the find may not have found them all:
        HEAD_LIMIT answers or more, or the cap of the source's finds if known (see find_cap).
        A cap below HEAD_LIMIT - 1 unknown to the run may put the first ones out of order,
        never leave one out: the listing hands out every study."""
        since = max(0, archive - STUDY_PAGE) if self.newest else 0
        dates = [when[0] for _, when in study_page(self.source, since) if when[0]]
        if not dates:
            return []
        edge = max(dates) if self.newest else min(dates)
        found = self.source.request("POST", "/tools/find", json={
            "Level": "Study", "Query": {"StudyDate": f"{edge}-" if self.newest else f"-{edge}"},
            "Expand": True, "Limit": HEAD_LIMIT}, timeout=LISTING_TIMEOUT)
        cap = self.source.find_caps.get("Study")
        if len(found) >= (HEAD_LIMIT if cap is None else min(HEAD_LIMIT, cap + 1)):
            return []
        return list(self.sort((study_when(record), record["ID"]) for record in found))

    def sorted_pages(self) -> Iterator[tuple[str, str]]:
        body = {"Level": "Study", "Query": {"StudyDate": DATED},
                "OrderBy": [{"Type": "DicomTag", "Key": key,
                             "Direction": "DESC" if self.newest else "ASC"}
                            for key in ("StudyDate", "StudyTime")],
                "ResponseContent": ["MainDicomTags"], "Limit": FIND_PAGE}
        since = 0
        while True:  # pages until one comes back empty (see find_all)
            page = self.source.request("POST", "/tools/find", json={**body, "Since": since},
                                       timeout=LISTING_TIMEOUT)
            if not page:
                return
            yield from ((record["ID"], study_when(record)[0]) for record in page)
            since += len(page)

    def took(self, study: str) -> None:
        """The walk took `study`, handed out a few studies before (see Walk.run)."""
        date = self.dates.get(study, NO_STUDY_DATE)
        self.reached = UNDATED if date == NO_STUDY_DATE else date

    def date_of(self, study: str) -> str:
        """The StudyDate of a study handed out, once (for its line in the save file), or ""."""
        return self.dates.pop(study, "")

    def describe(self) -> str:
        """Where the walk stands in the order: '2019-03', or 'undated'."""
        date = self.reached
        return date if date in ("", UNDATED) else f"{date[:4]}-{date[4:6]}"


# ---- the journal (save file) ----------------------------------------------------------------
COMPACT_MIN = 10000  # dead lines a save file keeps at least before it is compacted


def lock(handle: BinaryIO, path: Path) -> None:
    """Lock a save file for this run: a second run on the same file is refused, not mixed in
    (Windows has no such lock, and goes without)."""
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"save file {path} is in use by another run of replicate.py; let "
                             "it finish, or choose another --save") from None


class Journal:
    """The save file: plain text, one record a line, appended and flushed as studies complete.

    First line: `replicate.py save file 1<TAB>source=URL<TAB>target=URL` (URLs without
    credentials). Then, as work completes:
    - `mark<TAB>SEQ<TAB>ID`: the source's change log stood at SEQ, a change naming ID, when a
      run began: every study recorded complete (and not taken back) after this line was
      complete at or after that moment, so only changes after SEQ can have added to it;
    - `study<TAB>ID<TAB>instances<TAB>bytes<TAB>time[<TAB>StudyDate]`: a study found complete
      on the target, with the instances it holds there, the bytes this run sent of it and,
      where the walk knew it (--order), its StudyDate (`-`: it has none), which --check's
      table by year reads for the studies it takes on trust rather than asking the source;
    - `redo<TAB>ID`: a study recorded complete that has to be looked at again (instances
      arrived in it, or some failed); `reset`: every study recorded so far, likewise;
    - `meta<TAB>Level<TAB>ID`: a resource whose user metadata or attachments changed on the
      source; `changes<TAB>SEQ`: the position up to which the log was read for those;
    - `gone<TAB>ID`: a study --delete removed from the target (or that is on neither server):
      no longer one this tool copied.
    Every study ever recorded complete, though taken back since, stays one this tool copied
    (`known`) until a `gone` line: --delete removes from the target only what it copied.
    A torn last line (a crash while writing) is dropped on open. Once its dead lines outweigh
    its live ones (a --follow writes a few a look), the file is rewritten whole (compact).
    What a study holds on each server decides what is copied; the journal only says which
    studies need no look.
    """

    def __init__(self, path: Path, source_url: str, target_url: str,
                 dates: bool = False) -> None:
        self.path = path
        self.header = f"{SAVE_MAGIC}\tsource={source_url}\ttarget={target_url}"
        self.studies: dict[str, int] = {}  # complete studies -> instances they hold
        # with `dates` (--check): the StudyDate the save file gives of studies
        self.dates: Optional[dict[str, str]] = {} if dates else None
        self.known: set[str] = set()  # studies this tool copied (see the docstring)
        self.mark: Optional[tuple[int, str]] = None  # see the docstring
        self.position: Optional[int] = None  # the source's change log read up to here
        self.candidates: set[tuple[str, str]] = set()  # resources with user metadata changes
        self.file: Optional[io.TextIOWrapper] = None
        self.lines = 0  # in the file, live or dead (see compact)

    def open(self, read_only: bool = False) -> "Journal":
        """Read and check the save file; unless `read_only` (--dry-run), lock it for this run
        (a second run on the same file is refused, not mixed in) and open it to append."""
        if read_only:
            try:
                with open(self.path, "rb") as handle:
                    self._parse(handle)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise UsageError(f"cannot read save file {self.path}: {error.strerror}; "
                                 "choose another --save") from error
            return self
        try:
            handle = open(self.path, "a+b")  # noqa: SIM115
        except OSError as error:
            raise UsageError(f"cannot write save file {self.path}: {error.strerror}; "
                             "choose another --save") from error
        try:
            lock(handle, self.path)
            if os.stat(self.path).st_ino != os.fstat(handle.fileno()).st_ino:
                handle.close()  # a compaction renamed a new file over it meanwhile
                return self.open()
            keep = self._parse(handle)
            handle.truncate(keep)  # a torn last line goes
            self.file = io.TextIOWrapper(handle, encoding="utf-8", newline="\n")
            if not keep:
                self._write([self.header])
            elif self.compact_due():
                self.compact()
        except OSError as error:
            handle.close()
            raise UsageError(f"cannot write save file {self.path}: {error.strerror}; "
                             "choose another --save") from error
        except BaseException:
            handle.close()
            raise
        return self

    def _parse(self, handle: BinaryIO) -> int:
        """Check the records, read line by line; return how many bytes to keep (a torn last
        line goes)."""
        handle.seek(0)
        first = handle.readline()
        if not first.strip() and not handle.read(1 << 16).strip():
            return 0
        try:
            header = first[:-1].decode("utf-8") if first.endswith(b"\n") else ""
        except UnicodeDecodeError:
            header = ""
        if not header.startswith(SAVE_MAGIC):
            raise UsageError(f"{self.path} is not a replicate.py save file (an older tool's "
                             "pickle?); move it away or choose another --save")
        if header != self.header:
            fields = dict(part.split("=", 1) for part in header.split("\t")[1:] if "=" in part)
            raise UsageError(f"{self.path} belongs to source {fields.get('source', '?')} and "
                             f"target {fields.get('target', '?')}; choose another --save for "
                             "this pair")
        keep, self.lines = len(first), 1
        for number, raw in enumerate(handle, start=2):
            if not raw.endswith(b"\n"):
                log.debug("save file: dropping a torn last line of %d bytes", len(raw))
                break
            keep, self.lines = keep + len(raw), number
            try:
                kind, *values = raw[:-1].decode("utf-8").split("\t")
                if kind == "study" and len(values) >= 2:
                    self.studies[values[0]] = int(values[1])
                    self.known.add(values[0])
                    if self.dates is not None and len(values) >= 5 and values[4]:
                        self.dates[values[0]] = sys.intern(values[4])
                elif kind == "gone" and len(values) == 1:
                    self.studies.pop(values[0], None)
                    self.known.discard(values[0])
                elif kind == "redo" and len(values) == 1:
                    self.studies.pop(values[0], None)
                elif kind == "reset" and len(values) <= 1:
                    self.studies.clear()
                elif kind == "mark" and len(values) == 2:
                    self.mark = (int(values[0]), values[1])
                elif kind == "changes" and len(values) == 1:
                    self.position = int(values[0])
                elif kind == "meta" and len(values) == 2 and values[0] in LEVEL_PATHS:
                    self.candidates.add((values[0], values[1]))
                else:
                    raise ValueError(kind)
            except (UnicodeDecodeError, ValueError):
                raise UsageError(f"{self.path} line {number} is corrupt; fix or remove that "
                                 "line, or choose another --save") from None
        return keep

    def _write(self, lines: list[str]) -> None:
        """Append whole lines, then flush and fsync once for all of them."""
        if self.file is None or not lines:  # read-only (dry run), or nothing to say
            return
        try:
            self.file.write("".join(line + "\n" for line in lines))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.lines += len(lines)
        except OSError as error:  # a full disk: the run stops, the next open drops a torn line
            broken, self.file = self.file, None
            try:
                broken.close()
            except OSError:
                pass
            raise UsageError(f"cannot write save file {self.path}: {error.strerror}; make "
                             "room, then run the same command again") from error

    def changes_read(self, position: int, candidates: Iterable[tuple[str, str]]) -> None:
        """Record new metadata candidates, then the change log position they were read to."""
        fresh = sorted(set(candidates) - self.candidates)
        self._write([f"meta\t{level}\t{resource}" for level, resource in fresh])
        self.candidates.update(fresh)
        if position != self.position:
            self._write([f"changes\t{position}"])
            self.position = position

    def share_keys(self, studies: Iterable[str]) -> None:
        """Key the complete studies by these equal strings (the source's listing) rather than
        by the save file's own copies, which are then freed."""
        shared, known, dates = {}, set(), {}
        for study in studies:
            count = self.studies.pop(study, None)
            if count is not None:
                shared[study] = count
            if study in self.known:
                known.add(study)
                self.known.discard(study)
            date = self.dates.pop(study, None) if self.dates else None
            if date is not None:
                dates[study] = date
        shared.update(self.studies)
        known.update(self.known)
        self.studies, self.known = shared, known
        if self.dates is not None:
            self.dates = dates  # those of studies the source no longer has are not asked for

    def begin(self, position: int, anchor: str, redo: Iterable[str], reset: bool) -> None:
        """Take back the studies that must be looked at again (all of them, with `reset`),
        then mark where the source's change log stands as this run begins."""
        lines = [f"reset\t{time.strftime('%Y-%m-%dT%H:%M:%S')}"] if reset else []
        redo = [study for study in redo if study in self.studies] if not reset else []
        lines += [f"redo\t{study}" for study in sorted(redo)]
        if self.mark != (position, anchor):
            lines.append(f"mark\t{position}\t{anchor}")
        self._write(lines)
        if reset:
            self.studies.clear()
        for study in redo:
            del self.studies[study]
        self.mark = (position, anchor)

    def forget(self, studies: Iterable[str]) -> None:
        """Take back studies recorded complete that are not complete any more (the target
        lost them): the next run looks at them again."""
        gone = [study for study in studies if study in self.studies]
        self._write([f"redo\t{study}" for study in gone])
        for study in gone:
            del self.studies[study]

    def studies_done(self, records: list[tuple[str, int, int, str]]) -> None:
        """Record studies complete on the target: (study ID, instances it holds there, bytes
        this run sent of it, its StudyDate or "" when not known)."""
        now = time.strftime('%Y-%m-%dT%H:%M:%S')
        self._write([f"study\t{study}\t{instances}\t{size}\t{now}" + (f"\t{date}" if date
                                                                         else "")
                     for study, instances, size, date in records])
        self.studies.update((study, instances) for study, instances, _, _ in records)
        self.known.update(study for study, _, _, _ in records)

    def gone(self, studies: Iterable[str]) -> None:
        """Record studies that are no longer this tool's to mirror: removed from the target
        by --delete, or on neither server."""
        gone = [study for study in studies if study in self.known or study in self.studies]
        self._write([f"gone\t{study}" for study in gone])
        for study in gone:
            self.studies.pop(study, None)
            self.known.discard(study)

    def compact_due(self) -> bool:
        """Whether the file's dead lines (studies taken back and recorded again, marks and
        positions passed) outweigh its live ones, and COMPACT_MIN: a --follow of weeks writes
        a few lines for each instance that arrives."""
        live = 3 + len(self.candidates) + 2 * len(self.known) - len(self.studies)
        return self.file is not None and self.lines - live > max(live, COMPACT_MIN)

    def compact(self) -> None:
        """Rewrite the save file with its live lines only: the header, the mark, the position,
        the metadata candidates, each study's last `study` line, and a `redo` line for those
        taken back since. Written to a file beside it, locked, flushed and renamed over it,
        so that a crash at any moment leaves the old file or the new one, whole."""
        assert self.file is not None
        self.file.flush()
        last: dict[str, bytes] = {}  # the last line of each study this tool copied
        with open(self.path, "rb") as old:
            for raw in old:
                if raw.startswith(b"study\t"):
                    study = raw.split(b"\t", 2)[1].decode("utf-8")
                    if study in self.known:
                        last[study] = raw
        temporary = self.path.with_name(self.path.name + ".compacting")
        handle = open(temporary, "w+b")  # noqa: SIM115
        try:
            lock(handle, temporary)
            head = [self.header] + ([f"mark\t{self.mark[0]}\t{self.mark[1]}"] if self.mark
                                    else []) + ([f"changes\t{self.position}"]
                                                if self.position is not None else [])
            head += [f"meta\t{level}\t{resource}" for level, resource in
                     sorted(self.candidates)]
            handle.write("".join(line + "\n" for line in head).encode("utf-8"))
            handle.writelines(last.values())
            redo = [study for study in last if study not in self.studies]
            handle.write("".join(f"redo\t{study}\n" for study in redo).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except OSError as error:  # the file as it was stays in use, and is tried again later
            handle.close()
            log.warning("warning: cannot compact save file %s: %s", self.path, error.strerror)
            self.lines = 0
            return
        except BaseException:
            handle.close()
            raise
        with contextlib.suppress(OSError):  # the rename itself survives a power cut
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        dead, self.file = self.file, io.TextIOWrapper(handle, encoding="utf-8", newline="\n")
        dead.close()
        log.debug("save file compacted: %d lines to %d", self.lines,
                  len(head) + len(last) + len(redo))
        self.lines = len(head) + len(last) + len(redo)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---- the transfer engine --------------------------------------------------------------------
class RateLimiter:
    """Paces bytes to `rate` per second across all workers together: each block takes the
    next free slot of a shared timeline (virtual scheduling), a smooth flow; at most `burst`
    seconds of idleness are made up for. A timetable's rate is read at each block. A pause
    holds every request to either server before it starts (hold, which each client calls):
    what is in flight ends at the rate before it, and the time paused is counted. The clocks
    and the sleep are injected so tests need no real time."""

    def __init__(self, rate: "float | Timetable", clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = time.sleep, burst: float = 0.05,
                 minute: Optional[Callable[[], int]] = None) -> None:
        self.timetable = rate if isinstance(rate, Timetable) else \
            Timetable(((0, float(rate)),), str(rate))
        self.clock, self.sleep, self.burst = clock, sleep, burst
        self.minute = minute if minute is not None else local_minute
        self.next_free = clock()
        self.lock = threading.Lock()
        self.in_force = self.rate  # the rate of the last block, to tell a change
        self.pause_began: Optional[float] = None  # the pause in force: when it began
        self.pause_until = ""  # and when it ends, as "until Mon 20:00"
        self.paused_before = 0.0  # seconds of the pauses that ended

    @property
    def rate(self) -> Optional[float]:
        """Bytes per second now; None: no limit now; PAUSE: paused."""
        return self.timetable.rate_at(self.minute())

    def take(self, count: int) -> None:
        rate = self.rate
        if rate == PAUSE:  # in flight as the pause began: ends at the rate before it
            rate = None if self.in_force == PAUSE else self.in_force
        elif rate != self.in_force:
            self.in_force = rate
            log.info("%s: bandwidth limit now %s (--bwlimit %s)", time.strftime("%H:%M:%S"),
                     describe_rate(rate), self.timetable.text)
        if rate is None:
            return
        with self.lock:
            now = self.clock()
            start = max(self.next_free, now - self.burst)
            self.next_free = start + count / rate
        if start > now:
            self.sleep(start - now)

    def paused(self) -> Optional[str]:
        """"until Mon 20:00" while the timetable pauses the run, else None. The first look
        in a pause logs it and starts counting its time; the first after it, its end."""
        minute = self.minute()
        paused = self.timetable.rate_at(minute) == PAUSE
        with self.lock:
            if paused and self.pause_began is None:
                end = self.timetable.until(minute)
                self.pause_began = self.clock()
                self.pause_until = "with no end in the timetable" if end is None else \
                    f"until {describe_minute(end)}"
                log.info("%s: paused %s (--bwlimit %s): no request to either server",
                         time.strftime("%H:%M:%S"), self.pause_until, self.timetable.text)
            elif not paused and self.pause_began is not None:
                self.paused_before += self.clock() - self.pause_began
                self.pause_began = None
                log.info("%s: the pause ended (--bwlimit %s)", time.strftime("%H:%M:%S"),
                         self.timetable.text)
        return self.pause_until if paused else None

    def hold(self, stop: threading.Event) -> None:
        """Wait while the timetable pauses the run (before each request to either server);
        Interrupted once a stop is asked for."""
        while self.paused() is not None:
            if stop.wait(PAUSE_LOOK):
                raise Interrupted()

    @property
    def paused_seconds(self) -> float:
        """The time spent paused so far."""
        with self.lock:
            return self.paused_before + (0.0 if self.pause_began is None
                                         else self.clock() - self.pause_began)


class Pace:
    """How many requests to keep in flight to a server so that its round trip costs no time,
    by Little's law: as many as complete during one round trip (the `latency`, the quickest
    answer seen), times PACE_MARGIN, between `low` and `high`. While the link is not full
    the rate follows the number, which about doubles at each look until the link or a
    server is the limit; the margin keeps that many again queued on it. Next to the servers
    `low` holds. A 429 or 503 halves the ceiling, which grows back by one each PACE_WINDOW."""

    def __init__(self, low: int, high: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.low, self.high, self.clock = low, high, clock
        self.ceiling = high
        self.started: Optional[float] = None  # the first completion
        self.calmed = clock()
        self.done_at: deque[float] = deque()
        self.window = PACE_WINDOW  # seconds of completions the rate is measured over
        self.lock = threading.Lock()

    def done(self) -> None:
        with self.lock:
            now = self.clock()
            self.done_at.append(now)
            if self.started is None:
                self.started = now
            # Only the last window counts; whether width is asked or not (next to a server
            # it is not), older completions go, so that memory does not grow with the copy.
            self.forget(now)

    def forget(self, now: float) -> None:
        """Drop the completions older than the window (the lock held)."""
        while self.done_at and self.done_at[0] < now - self.window:
            self.done_at.popleft()

    def back_off(self) -> None:
        with self.lock:
            self.ceiling = max(self.low, self.ceiling // 2)
            self.calmed = self.clock()

    def width(self, latency: float) -> int:
        if self.low >= self.high or latency == float("inf"):  # fixed, or nothing answered yet
            return self.low
        with self.lock:
            now = self.clock()
            self.window = window = max(PACE_WINDOW, 4 * latency)
            self.forget(now)
            if self.ceiling < self.high and now - self.calmed >= PACE_WINDOW:
                self.ceiling += 1
                self.calmed = now
            if self.started is None:
                return self.low
            rate = len(self.done_at) / max(min(window, now - self.started), 0.05)
            wanted = PACE_MARGIN * (1 + latency * rate)
            return max(self.low, min(self.ceiling, round(wanted)))


class Gate:
    """A semaphore whose count may change while it is held, and that can be closed (halt)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.held_max = 0
        self.halted = False  # no one enters; those waiting give up (Interrupted)
        self.changed = threading.Condition()  # a re-entrant lock: subclasses hold it around

    def resize(self, limit: int) -> None:
        with self.changed:
            if limit != self.limit:
                self.limit = limit
                self.changed.notify_all()

    def halt(self, halted: bool = True) -> None:
        with self.changed:
            self.halted = halted
            self.changed.notify_all()

    def enter(self, stop: threading.Event) -> None:
        with self.changed:
            while self.held >= self.limit or self.halted:
                if stop.is_set() or self.halted:
                    raise Interrupted()
                self.changed.wait(0.5)
            self.held += 1
            self.held_max = max(self.held_max, self.held)

    def leave(self) -> None:
        with self.changed:
            self.held -= 1
            self.changed.notify()


# ---- how many batches at once ---------------------------------------------------------------
class UploadLimit(Gate):
    """How many uploads (POSTs to the target) are in flight at once, found by measurement as
    TCP finds its window. From the start (--threads, twice that to a distant target) the
    number doubles while the rate doubles; from the first step that does not pay, it grows
    by a quarter, at once after a step that paid, UPLOAD_HOLD seconds after one that did
    not. A step is kept if the rate grew by UPLOAD_GROWTH, else undone. A 503 or 429 (a
    cluster's database retries ran out, a proxy's limit) takes the number below the uploads
    in flight when it came, three quarters at most, and that many is not tried again for
    REFUSED_MEMORY seconds. The ceiling (UPLOADS_MAX) bounds memory with batch_bytes.

    A window's rate is the work (bytes, and INSTANCE_WORK an instance) of the uploads that
    ended in it over its time, from the end of the first upload begun at the current number
    until as many as the number have ended, UPLOAD_WINDOW at least. A window with fewer
    uploads in flight than the number decides nothing: the target was not what bounded it.
    Workers enter before an upload and leave after it; the walk reads `limit`."""

    def __init__(self, start: int, fixed: bool, ceiling: int = UPLOADS_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(start)  # held: uploads in flight; halted: the walk is stopping
        self.clock, self.fixed = clock, fixed
        self.ceiling = start if fixed else max(start, ceiling)
        self.why = f"fixed by --threads {start}" if fixed else "measuring"
        self.doubling = True
        self.kept: Optional[tuple[int, float]] = None  # (number, rate) of the kept number
        self.next_try = 0.0  # when a step up may be tried, after one that did not pay
        self.refused_at: Optional[int] = None  # uploads in flight when a 503 or 429 came
        self.refused_when = 0.0
        self.epoch = 0  # windows begun
        self.changes = 0  # changes of the number
        self.new_window(clock())

    def new_window(self, now: float) -> None:
        self.epoch += 1  # uploads begun before this are of the last window
        self.started: Optional[float] = None  # when the window began measuring
        self.ticked = now
        self.busy = 0.0  # uploads in flight, integrated over the window's time
        self.work = 0.0
        self.ended = 0

    def tick(self, now: float, held: int) -> None:
        """The window's integral, `held` uploads in flight since the last tick."""
        if self.started is not None:
            self.busy += held * (now - self.ticked)
        self.ticked = now

    def enter(self, stop: threading.Event) -> tuple[int, int, int]:  # type: ignore[override]
        """Wait for room to upload; the upload's token (the window and the number it began
        in, the uploads in flight with it)."""
        with self.changed:
            super().enter(stop)
            self.tick(self.clock(), self.held - 1)
            return self.epoch, self.changes, self.held

    def leave(self, token: tuple[int, int, int],  # type: ignore[override]
              bytes_moved: int, instances: int) -> None:
        """An upload ended; what it carried (nothing if it failed)."""
        with self.changed:
            now = self.clock()
            self.tick(now, self.held)
            super().leave()
            if self.fixed:
                return
            if self.started is None:
                if token[0] == self.epoch:
                    self.started = now
                return
            self.work += bytes_moved + instances * INSTANCE_WORK
            self.ended += 1
            if self.ended >= max(4, self.limit) and now - self.started >= UPLOAD_WINDOW:
                self.decide(now)

    def refused(self, token: tuple[int, int, int], status: int) -> None:
        """The target answered 503 or 429 to an upload begun with `token`."""
        with self.changed:
            if self.fixed or token[1] != self.changes:
                return  # the number has changed since that upload began
            now = self.clock()
            count = token[2]  # uploads in flight as it began, itself included
            if self.refused_at is None or now - self.refused_when > REFUSED_MEMORY:
                self.refused_at = count
            self.refused_at = min(self.refused_at, count)
            self.refused_when = now
            self.set_limit(max(1, min(count - 1, self.limit * 3 // 4)))
            self.why = (f"the target answered HTTP {status} with {count} at once; not "
                        f"tried again for {REFUSED_MEMORY / 60:.0f} minutes")
            self.kept, self.doubling, self.next_try = None, False, now + UPLOAD_HOLD
            log.debug("uploads at once: %d (%s)", self.limit, self.why)
            self.new_window(now)

    def top(self, now: float) -> tuple[int, str]:
        """The most the number may be now, and why."""
        if self.refused_at is not None and now - self.refused_when <= REFUSED_MEMORY:
            return (max(1, min(self.ceiling, self.refused_at - 1)),
                    f"below the {self.refused_at} at once the target refused with 503 or 429")
        return self.ceiling, f"the ceiling that bounds memory ({self.ceiling})"

    def decide(self, now: float) -> None:
        """The end of a window (the lock held): keep, step up or go back."""
        number = self.limit
        elapsed = max(now - self.started, 1e-6)  # type: ignore[operator]
        rate = self.work / elapsed
        starved = self.busy / elapsed < 0.75 * number
        trying = self.kept is not None and number > self.kept[0]
        if trying and not starved and rate >= self.kept[1] * UPLOAD_GROWTH:  # type: ignore
            before = self.kept
            self.kept = (number, rate)
            self.step_up(now, f"the rate grew: {format_bytes(before[1])}/s at {before[0]}, "
                         f"{format_bytes(rate)}/s at {number}", grew=True)  # type: ignore
        elif trying:
            kept_number, kept_rate = self.kept  # type: ignore[misc]
            self.set_limit(kept_number)
            self.doubling, self.next_try = False, now + UPLOAD_HOLD
            self.why = ("the walk had fewer batches than that" if starved else
                        f"the rate stopped growing: {format_bytes(kept_rate)}/s at "
                        f"{kept_number}, {format_bytes(rate)}/s at {number}")
        elif starved:  # decides nothing: the number stays, for the reason it had
            if self.kept is None and self.refused_at is None:  # nothing decided yet
                self.why = f"the walk had fewer batches than {number} at once"
        else:
            self.kept = (number, rate)
            if self.doubling or now >= self.next_try:
                self.step_up(now, f"trying more: {format_bytes(rate)}/s at {number}")
        log.debug("uploads at once: %d (%s)", self.limit, self.why)
        self.new_window(now)

    def set_limit(self, number: int) -> None:
        if number != self.limit:
            self.changes += 1
            self.resize(number)

    def step_up(self, now: float, why: str, grew: bool = False) -> None:
        number = self.limit
        top, reason = self.top(now)
        wanted = number * 2 if self.doubling else number + max(1, number // 4)
        self.set_limit(min(top, wanted))
        if self.limit <= number:
            self.why = f"{reason}; {why}" if grew else reason
            self.next_try = now + UPLOAD_HOLD
        else:
            self.why = why

    @property
    def batch_bytes(self) -> int:
        """The most a batch may hold: BATCH_MAX_BYTES, less when UPLOAD_MEMORY would not
        hold as many as may be in flight (sent and fetched ahead); 1 MB at least."""
        return max(CHUNK_SIZE, min(BATCH_MAX_BYTES,
                                   UPLOAD_MEMORY // (self.limit + self.spare)))

    @property
    def copies_max(self) -> int:
        """The most batches in flight: uploads at the ceiling and those fetched ahead."""
        return self.ceiling + (0 if self.fixed else max(1, self.ceiling // 4))

    @property
    def spare(self) -> int:
        """Batches fetched ahead of their upload, beside the uploads at once; none when the
        number is fixed (--threads N: N copies, each fetching then sending, as asked)."""
        return 0 if self.fixed else max(1, self.limit // 4)


class UploadBody:
    """A request body read in blocks with a known length (sent with a Content-Length, never
    held whole), paced by the rate limiter, stopping promptly when asked to."""

    def __init__(self, read: Callable[[int], bytes], length: int, stop: threading.Event,
                 limiter: Optional[RateLimiter] = None) -> None:
        self._read, self.length, self.stop, self.limiter = read, length, stop, limiter
        self.sent = 0

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise Interrupted()
        if size is None or size < 0:
            size = CHUNK_SIZE
        if self.limiter is not None:
            size = min(size, PACED_BLOCK)  # small blocks keep a limited flow smooth
        data = self._read(min(size, max(self.length - self.sent, 0)))
        self.sent += len(data)
        if not data and self.sent < self.length:
            raise TransportError("source", "GET", "/instances/{id}/file", CUT_SHORT,
                                 f"after {self.sent} of {self.length} bytes")
        if self.limiter is not None and data:
            self.limiter.take(len(data))
        return data


class Copier:
    """Moves batches from source to target. Runs in worker threads and only returns results."""

    def __init__(self, source: OrthancClient, target: OrthancClient, policy: RetryPolicy,
                 stop: threading.Event, limiter: Optional[RateLimiter] = None,
                 workers: int = Config.threads, far_max: int = FAR_REQUESTS_MAX,
                 adapt: bool = True) -> None:
        self.source, self.target, self.policy, self.stop = source, target, policy, stop
        self.limiter = limiter
        # Uploads at once (see UploadLimit): the round trip is known before the walk.
        self.uploads = UploadLimit(workers * (2 if adapt and target.distant else 1),
                                   fixed=not adapt)
        # File downloads in flight: one a worker next to the source, up to `far_max` across
        # a link, on a pool shared by the workers' bundles.
        self.workers = workers
        self.download_pace = Pace(workers, max(workers, far_max))
        self.fetchers = ThreadPoolExecutor(max(workers, far_max), thread_name_prefix="fetch")
        # What the source's archives weigh against their files, last sampled (see as_archive)
        self.archive_ratio: Optional[float] = None
        self.archives = version_at_least(source.version, (1, 8, 2))
        self.bundles = 0  # batches of the "bundle" mode sent, and those fetched as archives
        self.bundles_archived = 0
        self.sampling = False  # a first archive is being measured
        # What the tool's deflated uploads to a distant target weighed against their files,
        # last measured (None: not yet), and how many uploads were deflated and sampled.
        self.upload_ratio: Optional[float] = None
        self.uploads_deflated = 0
        self.uploads_sent = 0
        self.downloads = 0  # file downloads in flight now, and at most (for the report)
        self.downloads_max = 0
        self.fetching = 0  # workers fetching the files of a bundle
        # The smallest batch (bytes of its files) that the target, or a proxy in front of it,
        # refused as too large (HTTP 413): batches as large are split before they are sent.
        self.too_large = float("inf")
        self.lock = threading.Lock()

    def close(self) -> None:
        self.fetchers.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def uploading(self, size: int, instances: int) -> Iterator[None]:
        """One of the uploads at once (see UploadLimit): waits for room, then tells the limit
        whether the target refused it (503, 429) or what it carried."""
        token = self.uploads.enter(self.stop)
        moved = 0
        try:
            yield
            moved = size
        except HttpStatusError as error:
            if error.role == "target" and error.status in (429, 503):
                self.uploads.refused(token, error.status)
            raise
        finally:
            self.uploads.leave(token, moved, instances if moved else 0)

    def copy(self, batch: Batch) -> BatchResult:
        if batch.mode == "single":
            return self.copy_singles(batch, batch.instances)
        if len(batch.instances) > 1 and batch.size >= self.too_large:
            return self.copy_halves(batch)
        result = BatchResult(batch)
        what = f"copy of {len(batch.instances)} instances ({batch.instances[0].id} ...)"
        try:
            answers = call_with_retries(lambda: self.upload_zip(batch), what, self.policy,
                                        self.stop)
        except HttpStatusError as error:
            if error.status == 413 and len(batch.instances) > 1:
                # A proxy's body limit (nginx's is 1 MB by default): halves, until they pass.
                with self.lock:
                    self.too_large = min(self.too_large, batch.size)
                log.debug("%s: %s; sending it in halves", what, error)
                return self.copy_halves(batch)
            # A refused batch is retried instance by instance, so that the culprit is named.
            log.debug("%s: %s; copying them one by one", what, error)
            return self.copy_singles(batch, batch.instances)
        except GaveUp as error:
            for instance in batch.instances:
                result.failed.append((instance, error))
            return result
        strangers = answers.keys() - {instance.id for instance in batch.instances}
        if strangers:  # sent one by one, each would be stored under a new ID again
            error = renamed(f"{len(batch.instances)} instances ({batch.instances[0].id} ...)",
                            min(strangers))
            result.failed.extend((instance, error) for instance in batch.instances)
            return result
        unconfirmed = []
        for instance in batch.instances:
            status = answers.get(instance.id)
            if status:
                result.answered(instance, status)
            else:
                unconfirmed.append(instance)
        if unconfirmed:
            # Answers for refused files may carry no ID; only one by one tells which and why.
            result.add(self.copy_singles(batch, unconfirmed))
        return result

    def copy_halves(self, batch: Batch) -> BatchResult:
        """A batch too large for the target's proxy, sent as two."""
        middle = len(batch.instances) // 2
        result = BatchResult(batch)
        for half in (batch.instances[:middle], batch.instances[middle:]):
            result.add(self.copy(Batch(batch.mode, half)))
        return result

    def copy_singles(self, batch: Batch, instances: list[Instance]) -> BatchResult:
        result = BatchResult(batch)
        for instance in instances:
            try:
                answer = call_with_retries(lambda: self.stream_one(instance),
                                           f"copy of instance {instance.id}", self.policy,
                                           self.stop)
            except Interrupted:
                break  # those already stored are reported; the rest stay to be copied
            except (HttpStatusError, GaveUp) as error:
                if isinstance(error, HttpStatusError) and error.role == "source" \
                        and error.status == 404 and self.vanished(instance):
                    result.vanished.append(instance)
                else:
                    fault = upload_fault(self.source, instance.id, error)
                    result.failed.append((instance, error if fault is None else
                                          Unreadable(fault)))
                continue
            status = answer.get("Status") if isinstance(answer, dict) else None
            if status in STORED_STATUSES and answer.get("ID") not in (None, instance.id):
                result.failed.append((instance, renamed(f"instance {instance.id}",
                                                        answer.get("ID"))))
            else:
                result.answered(instance, status)
        return result

    def vanished(self, instance: Instance) -> bool:
        """Whether the source deleted the instance, rather than lost its file (which a storage
        plugin may also answer with 404): the first is no failure, the second is."""
        try:
            return unless_missing(lambda: self.source.get(f"/instances/{instance.id}")) is None
        except (GaveUp, HttpStatusError, TransportError):
            return False  # cannot tell: reported as a failure, the safe side

    def stream_one(self, instance: Instance) -> Any:
        """GET the file and POST it as it arrives; memory stays at a few blocks."""
        with self.uploading(instance.size, 1):
            return self.stream(instance)

    def stream(self, instance: Instance) -> Any:
        download = self.source.request("GET", f"/instances/{instance.id}/file", read="stream",
                                       retry=False)
        try:
            encoding = download.headers.get("Content-Encoding", "identity").lower()
            length = download.headers.get("Content-Length")
            headers = {"Content-Type": "application/dicom"}
            if encoding == "identity" and length is not None:
                # Read as it comes: asked to decode, urllib3 would copy each block once more.
                read = partial(download.read, decode_content=False)
                # The first bytes decide whether to deflate, for a distant target only.
                first = read(min(PROBE_BYTES, int(length))) if self.target.distant else b""
                if self.deflate_upload(first):  # gzip-encoded as read (Orthanc 1.6+ takes it)
                    body: Any = self.paced(self.gzipped(
                        itertools.chain([first], iter(partial(read, CHUNK_SIZE), b"")),
                        instance.size))
                    headers["Content-Encoding"] = "gzip"
                else:
                    body = UploadBody(prefixed(first, read), int(length), self.stop,
                                      self.limiter)
            else:  # a server that compresses anyway: decode, send chunked
                body = self.paced(download.stream(CHUNK_SIZE))
            return self.target.request("POST", "/instances", data=body, headers=headers,
                                       retry=False)
        finally:
            discard(download)

    def gzipped(self, blocks: Iterable[bytes], size: int) -> Iterator[bytes]:
        """The blocks gzip-encoded on the way, and what they weighed noted at the end."""
        packer = zlib.compressobj(UPLOAD_DEFLATE_LEVEL, zlib.DEFLATED, 31)
        sent = 0
        for block in blocks:
            packed = packer.compress(block)
            if packed:
                sent += len(packed)
                yield packed
        packed = packer.flush()
        sent += len(packed)
        yield packed
        self.deflated(sent, size)

    def paced(self, blocks: Iterable[bytes]) -> Iterator[bytes]:
        for block in blocks:
            if self.limiter is not None:
                self.limiter.take(len(block))
            yield block

    def upload_zip(self, batch: Batch) -> dict[str, str]:
        """Send a batch as one ZIP; return instance ID -> Status from the target's answer."""
        ids = [instance.id for instance in batch.instances]
        body: Any
        if batch.mode == "archive":
            body = self.archive(ids)
        elif self.as_archive():
            body = self.sample_archive(batch, ids)
        else:
            # The ZIP goes in pieces, so that its files are held once, not twice.
            files = list(zip((f"{instance_id}.dcm" for instance_id in ids),
                             self.fetch_files(ids)))
            deflate = self.deflate_upload(files[0][1])
            parts = zip_parts(files, deflate)
            del files
            length = sum(map(len, parts))
            if deflate:
                self.deflated(length, batch.size)
            body = UploadBody(parts_reader(parts), length, self.stop, self.limiter)
        if isinstance(body, bytes) and self.limiter is not None:
            body = UploadBody(io.BytesIO(body).read, len(body), self.stop, self.limiter)
        with self.uploading(batch.size, len(ids)):
            answer = self.target.request("POST", "/instances", data=body, retry=False,
                                         headers={"Content-Type": "application/zip"})
        records = answer if isinstance(answer, list) else [answer]
        return {record["ID"]: record.get("Status", "") for record in records
                if isinstance(record, dict) and "ID" in record}

    def archive(self, ids: list[str]) -> bytes:
        """The instances as a ZIP archive that the source builds."""
        return self.source.request("POST", "/tools/create-archive", json={"Resources": ids},
                                   read="bytes", retry=False)

    def sample_archive(self, batch: Batch, ids: list[str]) -> bytes:
        """A bundle fetched as the source's archive, and what it weighed against its files."""
        try:
            archive = self.archive(ids)
        except BaseException:
            with self.lock:
                self.sampling = False
            raise
        ratio = len(archive) / max(1, batch.size)
        log.debug("an archive of %d instances weighs %.2f of their files", len(ids), ratio)
        with self.lock:
            self.archive_ratio, self.sampling = ratio, False
            self.bundles_archived += 1
        return archive

    def deflate_upload(self, sample: bytes) -> bool:
        """Whether to deflate the next upload, whose first file begins with `sample`: only to
        a distant target (next to it, the CPU costs more than the link saves), while the last
        upload measured shrank to ARCHIVE_WORTH of its files or less, else one upload in
        ARCHIVE_SAMPLE_EVERY, to measure again; at first, PROBE_BYTES of the sample decide."""
        if not self.target.distant:
            return False
        with self.lock:
            self.uploads_sent += 1
            ratio = self.upload_ratio
            resample = self.uploads_sent % ARCHIVE_SAMPLE_EVERY == 0
        if ratio is None:
            probe = sample[:PROBE_BYTES]
            ratio = len(zlib.compress(probe, UPLOAD_DEFLATE_LEVEL)) / max(1, len(probe))
            with self.lock:
                if self.upload_ratio is None:
                    self.upload_ratio = ratio
        return ratio <= ARCHIVE_WORTH or resample

    def deflated(self, sent: int, files: int) -> None:
        """Note what a deflated upload weighed against its files."""
        with self.lock:
            self.upload_ratio = sent / max(1, files)
            self.uploads_deflated += 1

    def as_archive(self) -> bool:
        """Whether to fetch the next bundle as an archive the source builds and deflates: only
        from a distant source (next to it, deflating costs more than it saves), as a sample
        once in ARCHIVE_SAMPLE_EVERY bundles (the first alone: the others fetch files
        meanwhile), and while the last sample shrank to ARCHIVE_WORTH of the files or less."""
        with self.lock:
            self.bundles += 1
            if not self.archives or not self.source.distant:
                return False
            if self.archive_ratio is None:
                if self.sampling:
                    return False
                self.sampling = True
                return True
            return (self.bundles % ARCHIVE_SAMPLE_EVERY == 0
                    or self.archive_ratio <= ARCHIVE_WORTH)

    def fetch_files(self, ids: list[str]) -> list[bytes]:
        """The files of a bundle, in order. Next to the source the worker fetches them itself,
        one after the other; across a link several at once on the shared pool, as many as
        the pace of downloads says (looked at again after each file), shared among the
        workers fetching at that moment (the others are sending)."""
        found: list[Optional[bytes]] = [None] * len(ids)
        running: dict[Future, int] = {}
        position = 0
        with self.lock:
            self.fetching += 1
        try:
            while position < len(ids) or running:
                if self.stop.is_set():
                    raise Interrupted()
                width = self.download_width()
                if width <= 1 and not running:
                    found[position] = self.fetch_file(ids[position])
                    position += 1
                    continue
                while position < len(ids) and len(running) < width:
                    running[self.fetchers.submit(self.fetch_file, ids[position])] = position
                    position += 1
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    found[running.pop(future)] = future.result()
        finally:
            with self.lock:
                self.fetching -= 1
            for future in running:
                future.cancel()
        return found  # type: ignore[return-value]

    def download_width(self) -> int:
        """Downloads in flight for one worker's bundle: one next to the source or with
        --threads given; across a link, the pace's number shared among the workers
        fetching at this moment."""
        if not self.source.distant or self.download_pace.high <= self.workers:
            return 1
        wanted = self.download_pace.width(self.source.latency)
        return -(-wanted // max(1, self.fetching))

    def fetch_file(self, instance_id: str) -> bytes:
        with self.lock:
            self.downloads += 1
            self.downloads_max = max(self.downloads_max, self.downloads)
        try:
            content = self.source.request("GET", f"/instances/{instance_id}/file", read="bytes",
                                          retry=False)
        except HttpStatusError as error:
            if error.status in (429, 503):
                self.download_pace.back_off()
            raise
        finally:
            with self.lock:
                self.downloads -= 1
        self.download_pace.done()
        return content


def renamed(what: str, stored_as: str) -> Rejected:
    return Rejected(f"the target stored {what} under another ID ({stored_as}): it changes what "
                    "it receives (a lossy IngestTranscoding gives each instance a new "
                    "SOPInstanceUID), and each copy would store one more; give it a lossless "
                    "IngestTranscoding or none", renamed=True)


def stored_zip(files: list[tuple[str, bytes]]) -> bytes:
    """A ZIP archive of `files` (name, content), stored without compression."""
    return b"".join(zip_parts(files))


def zip_parts(files: list[tuple[str, bytes]], deflate: bool = False) -> list[bytes]:
    """The pieces of a ZIP archive of `files` (name, content), to be sent one after the
    other: stored, the DICOM files are only checksummed, never copied (zipfile copies them
    twice). With `deflate`, each file is deflated (zlib's fastest level: about its default's
    size at a sixth of the CPU) unless that does not make it smaller. No ZIP64: a bundle is
    far below its limits (BATCH_MAX_INSTANCES files, BATCH_MAX_BYTES)."""
    parts: list[bytes] = []
    directory: list[bytes] = []
    offset = 0
    for name, content in files:
        encoded = name.encode("utf-8")
        checksum = zlib.crc32(content)
        method, data = 0, content
        if deflate:
            packer = zlib.compressobj(UPLOAD_DEFLATE_LEVEL, zlib.DEFLATED, -15)
            packed = packer.compress(content) + packer.flush()
            if len(packed) < len(content):
                method, data = 8, packed
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, ZIP_DATE, checksum,
                             len(data), len(content), len(encoded), 0)
        directory.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0,
                                     ZIP_DATE, checksum, len(data), len(content), len(encoded),
                                     0, 0, 0, 0, 0, offset) + encoded)
        parts += [header, encoded, data]
        offset += len(header) + len(encoded) + len(data)
    central = b"".join(directory)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(directory), len(directory),
                      len(central), offset, 0)
    return parts + [central, end]


def prefixed(first: bytes, read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """read(size) that gives `first` (already read) before what `read` gives."""
    pending = memoryview(first)

    def read_on(size: int) -> bytes:
        nonlocal pending
        if not pending:
            return read(size)
        block, pending = pending[:size], pending[size:]
        return bytes(block)
    return read_on


def parts_reader(parts: list[bytes]) -> Callable[[int], bytes]:
    """read(size) over pieces sent one after the other, without joining them."""
    left = deque(memoryview(part) for part in parts)

    def read(size: int) -> bytes:
        blocks = []
        wanted = size
        while left and wanted > 0:
            block = left[0][:wanted]
            blocks.append(block)
            wanted -= len(block)
            if len(block) == len(left[0]):
                left.popleft()
            else:
                left[0] = left[0][len(block):]
        return b"".join(blocks)
    return read


ZIP_DATE = (1 << 5) | 1  # 1980-01-01, the first day a ZIP can say


# ---- progress -------------------------------------------------------------------------------
class Progress:
    """An alive-progress bar on stderr when it is a terminal; else, when `log_every` is given
    (a run under cron, nohup or systemd), a progress line in the log that often; else
    nothing."""

    def __init__(self, enabled: bool, log_every: Optional[float] = None) -> None:
        self.enabled, self.log_every = enabled, log_every
        self._context: Any = None
        self._bar: Any = None
        self._logging: Optional[dict] = None
        self._paused: Optional[float] = None  # when --bwlimit paused the run, if it is paused
        self._held: Any = None  # the bar's pause
        self._owed = 0  # what ended while the bar was held

    def start(self, total: Optional[int], title: str) -> None:
        """A bar of instances; `total` None: not known (a selection), the bar only counts."""
        if not self.enabled:
            if self.log_every is not None:
                now = time.monotonic()
                self._logging = {"total": total, "title": title, "done": 0, "started": now,
                                 "logged": now}
            return
        from alive_progress import alive_bar
        self._context = alive_bar(total, title=title, file=sys.stderr, enrich_print=False,
                                  receipt_text=True, dual_line=False)
        self._bar = self._context.__enter__()

    def advance(self, amount: int, text: Callable[[], str] = str) -> None:
        """Move by `amount`; `text` is called only when something shows it."""
        if self._held is not None:
            self._owed += amount
        elif self._bar is not None:
            self._bar(amount)
            shown = text()
            if shown:
                self._bar.text(shown)
        state = self._logging
        if state is not None and self.log_every is not None:
            state["done"] += amount
            now = time.monotonic()
            if now - state["logged"] >= self.log_every and self._paused is None:
                state["logged"] = now
                log.info("%s %s", time.strftime("%H:%M:%S"), progress_line(
                    state["title"], state["done"], state["total"], False,
                    now - state["started"], text()))

    def pause(self, until: Optional[str]) -> None:
        """Hold the bar while --bwlimit pauses the run (`until`: till when; None: running
        again), so that its rate and the time left count running time only."""
        if (until is None) == (self._paused is None):
            return
        now = time.monotonic()
        if until is not None:
            self._paused = now
            if self._bar is not None:
                self._bar.text(f"paused {until}")
                self._held = self._bar.pause()
                self._held.__enter__()
            return
        if self._logging is not None:
            self._logging["started"] += now - self._paused
        self._paused = None
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None
            self._bar(self._owed)
            self._owed = 0

    def finish(self) -> None:
        self.pause(None)
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = self._bar = None
        self._logging = None


def progress_line(title: str, done: float, total: Optional[float], in_bytes: bool,
                  elapsed: float, text: str = "") -> str:
    """'copying: 120 copied, 1.2 MB, 400 of 1,200 instances (33%), 10/s, about 1 min left'"""
    show = format_bytes if in_bytes else format_count
    parts = [f"{title}:"]
    if text:
        parts.append(f"{text},")
    parts.append(f"{show(done)} of {show(total)}" if total is not None else show(done))
    if not in_bytes:
        parts[-1] += " instances"
    if total:
        parts[-1] += f" ({100 * done / total:.0f}%)"
    if done > 0 and elapsed > 0:
        rate = done / elapsed
        parts[-1] += ","
        parts.append(f"{show(rate)}/s" if in_bytes else f"{rate:,.0f}/s")
        if total is not None:
            parts[-1] += ","
            parts.append(f"about {format_duration(max(total - done, 0) / rate)} left")
    return " ".join(parts)


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 5 min', '2 d 4 h': precise enough for an estimate."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


# ---- the walk: checks feeding transfers -----------------------------------------------------
@dataclass
class Context:
    """What the stages of a run share: the options, the two servers, the save file, the
    copier, what happened so far, and the selection (None: the whole source)."""

    config: Config
    stop: threading.Event
    source: OrthancClient
    target: OrthancClient
    journal: Journal
    copier: Copier
    outcome: Outcome
    selected: Optional[list[str]] = None
    watch: Optional["Watch"] = None  # --status, --report: what is seen while the run goes on


class Walk:
    """Plans and copies at once: studies are checked (what does the target lack of each?) a
    few ahead of the transfers, their missing instances cut into batches as they come, and
    the batches sent by the workers: a bounded window of studies and batches is in memory,
    whatever the archive, and the first instances land once the first study is checked.
    This (the main) thread alone counts results into the caller's `outcome` (a Ctrl-C at any
    point leaves it counting every batch collected), moves the progress bar and writes the
    journal; workers only move bytes and return results."""

    def __init__(self, context: Context, progress: Progress,
                 observe: Optional[Callable[[str, StudyCheck], None]] = None,
                 order: Optional[StudyOrder] = None,
                 landed: Optional[Callable[[], None]] = None, again: bool = False) -> None:
        self.config, self.copier, self.journal = context.config, context.copier, context.journal
        # a look of --follow: what the target holds of a study was counted by the pass that
        # found or copied it
        self.again = again
        self.stop, self.outcome, self.progress = context.stop, context.outcome, progress
        self.order = order  # where the studies come from, for the progress (--order)
        self.describing: Optional[ThreadPoolExecutor] = None  # see run
        config, copier = self.config, self.copier
        self.observe = observe  # told each study's check (--delete, --check)
        self.landed = landed  # called once the first batch has been answered
        self.batcher = Batcher(version_at_least(copier.target.version, (1, 8, 2)),
                               version_at_least(copier.source.version, (1, 8, 2)))
        self.ready: deque[Batch] = deque()
        self.ready_count = 0
        # Checks in flight: half the workers (two at least), more across a link (see Pace).
        low = max(2, config.threads // 2)
        self.check_pace = Pace(low, CHECKS_MAX if config.pace else low)
        self.check_gate = Gate(low)
        self.checks: dict[Future, str] = {}
        self.transfers: dict[Future, Batch] = {}
        # Checks and transfers put themselves here as they end; the loop below waits on it
        # (concurrent.futures.wait would hook into every future in flight at each look).
        self.ended: queue.SimpleQueue[Future] = queue.SimpleQueue()
        # studies with instances still travelling -> [instances left, instances it holds,
        # bytes sent, failed?]: a study is recorded complete once every instance landed
        self.open_studies: dict[str, list] = {}
        self.broken: Optional[BaseException] = None  # what ends the run (see stops_run)

    def run(self, studies: Iterable[str], on_target: Callable[[str], bool]) -> None:
        """Check each study (`on_target`: whether the target has it at all, so that a study it
        lacks costs it no request) and copy what it lacks; with --dry-run, only count."""
        config, outcome = self.config, self.outcome
        # Sorted studies come from the source's listing, read while the first ones travel:
        # the loop takes them as they come, never waiting for them while it has work.
        pending = ReadAhead(studies, CHECKS_AHEAD, lambda: self.ended.put(None)) \
            if self.order is not None else iter(studies)
        more = True
        checkers = ThreadPoolExecutor(self.check_pace.high, thread_name_prefix="check")
        uploads = self.copier.uploads  # how many at once
        uploads.halt(False)  # what an earlier walk's failure closed
        senders = ThreadPoolExecutor(uploads.copies_max, thread_name_prefix="copy")
        # --check: the requests that describe a difference, a few for each check in flight
        self.describing = ThreadPoolExecutor(
            3 * self.check_pace.high, thread_name_prefix="describe") if config.check else None
        try:
            while True:
                stopping = self.stopping()
                if more and not stopping:
                    more = self.submit_checks(checkers, pending, on_target)
                self.batcher.max_bytes = uploads.batch_bytes  # less when many are in flight
                # A batch not yet full goes when the workers would otherwise idle, or at the end.
                if not self.ready and (len(self.transfers) < max(1, uploads.limit // 2)
                                       or (not more and not self.checks)):
                    for batch in self.batcher.flush():
                        self.queue(batch)
                while (self.ready and not stopping
                       and len(self.transfers) < uploads.limit + uploads.spare):
                    batch = self.ready.popleft()
                    self.ready_count -= len(batch.instances)
                    what = f"copy of {instance_count(len(batch.instances))} " \
                           f"({batch.instances[0].id} ...)"
                    future = senders.submit(guarded, what, partial(self.copier.copy, batch))
                    future.add_done_callback(self.ended.put)
                    self.transfers[future] = batch
                if not self.checks and not self.transfers and (
                        stopping or (not more and not self.ready and not self.batcher.waiting)):
                    break
                outcome.studies_max = max(outcome.studies_max,
                                          len(self.checks) + len(self.open_studies))
                if self.copier.limiter is not None:
                    self.progress.pause(self.copier.limiter.paused())
                for future in self.wait_ended(0.5):
                    batch = self.transfers.pop(future, None)
                    if batch is not None:
                        self.collect(future, batch)
                # Checks are taken in the order of the studies, so that batches (and the
                # progress) follow the source's listing whichever check ends first.
                while self.checks and next(iter(self.checks)).done():
                    future = next(iter(self.checks))
                    self.checked(future, self.checks.pop(future))
                if self.stopping():
                    # Batches queued but not begun are not in flight: they stay for a re-run.
                    for future in [future for future in self.transfers if future.cancel()]:
                        del self.transfers[future]
        except KeyboardInterrupt:
            outcome.interrupted = True
            self.stop.set()
            log.warning("interrupted: finishing the instances in flight (Ctrl-C again to quit "
                        "now)")
            wait(list(self.transfers), timeout=10)
            # What landed after the Ctrl-C is counted and journaled like the rest.
            for future in [future for future in self.transfers if future.done()]:
                self.collect(future, self.transfers.pop(future))
        finally:
            if isinstance(pending, ReadAhead):
                pending.close()
            outcome.checks_max = max(outcome.checks_max, self.check_gate.held_max)
            checkers.shutdown(wait=False, cancel_futures=True)
            if self.describing is not None:
                self.describing.shutdown(wait=False, cancel_futures=True)
            senders.shutdown(wait=False, cancel_futures=True)
        if self.broken is not None:  # what was in flight has ended, counted and journaled
            raise self.broken

    def submit_checks(self, checkers: ThreadPoolExecutor, pending: Iterator[str] | ReadAhead,
                      on_target: Callable[[str], bool]) -> bool:
        """Start checking the next studies, as many as the pace allows and the batches waiting
        leave room for, and as have come. Whether any study is left."""
        source, target = self.copier.source, self.copier.target
        width = self.check_pace.width(max(source.latency, target.latency))
        if source.distant or target.distant:  # listings are light: look further ahead
            width = max(width, min(CHECKS_AHEAD, self.check_pace.high))
        self.check_gate.resize(width)
        while (len(self.checks) < max(CHECKS_AHEAD, 2 * self.check_gate.limit)
               and self.ready_count + self.batcher.waiting < WAITING_MAX):
            try:
                study = pending.take(wait=False) if isinstance(pending, ReadAhead) else \
                    next(pending, ReadAhead.END)
            except Exception as error:  # the listing of the studies failed
                self.broken = error
                return False
            if study is ReadAhead.NOT_YET:
                return True
            if study is ReadAhead.END:
                return False
            if self.order is not None:
                self.order.took(study)
            future = checkers.submit(self.check, study, on_target(study))
            future.add_done_callback(self.ended.put)
            self.checks[future] = study
        return True

    def wait_ended(self, timeout: float) -> list[Future]:
        """The checks and transfers that ended since the last look, after waiting up to
        `timeout` for one."""
        ended: list[Future] = []
        try:
            ended.append(self.ended.get(timeout=timeout))
            while True:
                ended.append(self.ended.get_nowait())
        except queue.Empty:
            return ended

    def check(self, study: str, on_target: bool) -> StudyCheck:
        """check_study in a checker thread, as many at once as the gate lets through."""
        self.check_gate.enter(self.stop)
        try:
            if self.describing is not None:
                return guarded(f"check of study {study}", lambda: described_check(
                    self.copier.source, self.copier.target, study, on_target, self.describing,
                    self.config.csv is not None, self.config.accept))
            return guarded(f"check of study {study}", lambda: check_study(
                self.copier.source, self.copier.target, study, on_target))
        finally:
            self.check_gate.leave()
            self.check_pace.done()

    def stopping(self) -> bool:
        """Whether to start nothing more: after a failure (unless --ignore-errors), when the
        target cannot store, on an error that ends the run (`broken`), or on a stop. What is
        in flight lands; batches fetched but waiting for room to upload stay for a re-run."""
        outcome = self.outcome
        if outcome.target_full or ((outcome.failed or outcome.unaccepted)
                                   and not self.config.ignore_errors):
            outcome.stopped_on_failure = True
        if outcome.stopped_on_failure or self.broken is not None:
            self.copier.uploads.halt()
            return True
        return self.stop.is_set()

    def queue(self, batch: Batch) -> None:
        self.ready.append(batch)
        self.ready_count += len(batch.instances)

    def checked(self, future: Future, study: str) -> None:
        outcome = self.outcome
        try:
            check = future.result()
        except Interrupted:
            return
        except Exception as error:
            if stops_run(error):
                self.broken = self.broken or error
                return
            # The study could not be looked at: a failure named by study, not a lost study.
            outcome.fail_study(study, "could not look at it", error)
            log.error("check failed: study %s: %s", study, describe_error(error))
            return
        outcome.studies_checked += 1
        if not self.again:
            outcome.present += check.present
        for instance, reason in check.unreadable:
            outcome.found_unreadable(instance.id, study, reason, self.config.accept)
        outcome.vanished += check.vanished
        missing_bytes = sum(instance.size for instance in check.missing)
        outcome.missing += len(check.missing)
        outcome.missing_bytes += missing_bytes
        if check.missing and (outcome.counted is None or study not in outcome.counted):
            outcome.studies_missing += 1
            if outcome.counted is not None:
                outcome.counted.add(study)
        self.progress.advance(check.present + check.vanished + len(check.unreadable),
                              self.progress_text)
        if self.observe is not None:
            self.observe(study, check)
        if check.gone:
            return
        if not check.missing or self.config.dry_run:
            if not self.config.dry_run:
                self.journal.studies_done([(study, check.present, 0, self.date_of(study))])
            self.progress.advance(len(check.missing))
            return
        self.open_studies[study] = [len(check.missing), check.instances - check.vanished, 0,
                                    False]
        for instance in check.missing:
            batch = self.batcher.add(instance)
            if batch is not None:
                self.queue(batch)

    def collect(self, future: Future, batch: Batch) -> None:
        outcome = self.outcome
        try:
            result = future.result()
        except Interrupted:
            return
        except Exception as error:
            if stops_run(error):  # its instances stay for a re-run
                self.broken = self.broken or error
                return
            result = BatchResult(batch, failed=[(instance, error)
                                                for instance in batch.instances])
        if self.landed is not None:
            self.landed()
            self.landed = None
        open_studies = self.open_studies
        copied_bytes = 0
        for instance in result.stored:
            copied_bytes += instance.size
            open_studies[instance.study][2] += instance.size
        outcome.copied += len(result.stored)
        outcome.copied_bytes += copied_bytes
        outcome.already += len(result.already)
        outcome.vanished += len(result.vanished)
        for instance, error in result.failed:
            open_studies[instance.study][3] = True
            if stops_run(error):  # the target renames what it stores: no more uploads
                self.broken = self.broken or error
                outcome.failed.append((instance.id, describe_error(error)))
                continue  # said once, as the run's last line
            if isinstance(error, Unreadable):
                accepted = outcome.found_unreadable(instance.id, instance.study,
                                                    error.reason, self.config.accept)
                outcome.failed_by[failure_reason(error)] += not accepted
                log.log(logging.INFO if accepted else logging.ERROR,
                        "unreadable on the source: instance %s (study %s): %s%s", instance.id,
                        instance.study, error.reason, " (accepted)" if accepted else "")
                continue
            outcome.failed_by[failure_reason(error)] += 1
            outcome.failed.append((instance.id, describe_error(error)))
            if isinstance(error, HttpStatusError) and error.role == "target" \
                    and error.status == 413:  # a proxy's body limit
                outcome.too_large.append(instance.size)
            if outcome.target_full is None and target_cannot_store(error):
                outcome.target_full = error
            log.error("copy failed: instance %s (study %s): %s", instance.id,
                      instance.study, describe_error(error))
        # Instances that ended, counted by study (a batch holds a few studies, in order).
        ended = Counter(instance.study for instance in itertools.chain(
            result.stored, result.already, result.vanished,
            (instance for instance, _ in result.failed)))
        complete = []
        for study, count in ended.items():
            state = open_studies[study]
            state[0] -= count
            if state[0] == 0:
                del open_studies[study]
                if not state[3]:
                    complete.append((study, state[1], state[2], self.date_of(study)))
        self.journal.studies_done(complete)
        self.progress.advance(len(result.stored) + len(result.already) + len(result.vanished)
                              + len(result.failed), self.progress_text)

    def date_of(self, study: str) -> str:
        return self.order.date_of(study) if self.order is not None else ""

    def progress_text(self) -> str:
        outcome, limiter = self.outcome, self.copier.limiter
        reached = self.order.describe() if self.order is not None else ""
        return ((f"{reached}, " if reached else "")
                + f"{format_count(outcome.copied)} copied, {format_bytes(outcome.copied_bytes)}"
                + (f", {format_count(len(outcome.failed))} failed" if outcome.failed else "")
                + (f", {format_count(len(outcome.unreadable))} unreadable on the source"
                   if outcome.unreadable else "")
                + f", {plural(self.copier.uploads.limit, 'upload')} at once"
                + ("" if limiter is None else ", no bandwidth limit now"
                   if limiter.in_force is None else f", limit {describe_rate(limiter.in_force)}"))


# ---- what the target does with what it accepts ----------------------------------------------
MIB = 1024 * 1024  # Orthanc's MaximumStorageSize is in these


def storage_limits(system: dict) -> list[str]:
    """The storage limits a target's GET /system reports (Orthanc 1.12 and newer; older ones
    report none), as a person would write them in its configuration."""
    limits = []
    if int(system.get("MaximumPatientCount") or 0):
        limits.append(f"MaximumPatientCount {system['MaximumPatientCount']}")
    if int(system.get("MaximumStorageSize") or 0):
        limits.append(f"MaximumStorageSize {system['MaximumStorageSize']} (MB)")
    return limits


def recycles(system: dict) -> bool:
    """Whether the target deletes its oldest patients to make room (a limit in the default
    "Recycle" mode)."""
    return bool(storage_limits(system)) and system.get("MaximumStorageMode",
                                                       "Recycle") == "Recycle"


def room_problem(system: dict, source_statistics: dict,
                 target_statistics: dict) -> Optional[str]:
    """Which of the target's limits what it holds and the whole source could exceed, or None
    when both fit. The source's uncompressed size is an upper bound of what the target will
    store (Orthanc counts what it writes, compressed or not)."""
    patients = int(system.get("MaximumPatientCount") or 0)
    wanted = int(target_statistics["CountPatients"]) + int(source_statistics["CountPatients"])
    if patients and wanted > patients:
        return (f"its MaximumPatientCount is {patients}, and it holds "
                f"{format_count(int(target_statistics['CountPatients']))} patients to which "
                f"the source adds up to {format_count(int(source_statistics['CountPatients']))}")
    size = int(system.get("MaximumStorageSize") or 0) * MIB
    wanted = (int(target_statistics["TotalDiskSize"])
              + int(source_statistics["TotalUncompressedSize"]))
    if size and wanted > size:
        return (f"its MaximumStorageSize is {system['MaximumStorageSize']} MB, and it holds "
                f"{format_bytes(int(target_statistics['TotalDiskSize']))} to which the source "
                f"adds up to {format_bytes(int(source_statistics['TotalUncompressedSize']))}")
    return None


def preflight(source: OrthancClient, target: OrthancClient, metadata: bool,
              writes: bool = True) -> list[str]:
    """Look at the target's settings before anything is copied (Orthanc 1.12 and newer tell
    them in GET /system; older ones tell nothing, and only the confirmation at the end of the
    run can notice a loss). Raises TargetRefused for a target that stores nothing or would
    delete what it receives; returns the warnings to give once."""
    system = target.system
    if not writes:  # --check: whatever the target does with uploads, none is made
        return []
    if system.get("ReadOnly"):
        raise TargetRefused(f"target {target.endpoint.url} is read-only (\"ReadOnly\": true "
                            "in its configuration) and stores nothing; set ReadOnly to false "
                            "and restart it")
    warnings: list[str] = []
    if storage_limits(system):
        problem = room_problem(system, source.get("/statistics"), target.get("/statistics"))
        if problem and recycles(system):
            raise TargetRefused(
                f"target {target.endpoint.url} would delete what it receives: {problem}, and "
                "its MaximumStorageMode \"Recycle\" deletes its oldest patients to make room; "
                "set MaximumPatientCount and MaximumStorageSize to 0 (no limit) in its "
                "configuration, or raise them, and restart it")
        if problem:
            warnings.append(f"the target refuses what exceeds its limits (MaximumStorageMode "
                            f"\"{system.get('MaximumStorageMode')}\"): {problem}; the copy "
                            "will stop there")
    transcoding = system.get("IngestTranscoding")
    if transcoding and transcoding not in LOSSLESS_SYNTAXES:
        raise TargetRefused(
            f"target {target.endpoint.url} re-encodes what it receives to {transcoding} "
            "(IngestTranscoding), a lossy syntax: it gives each instance a new "
            "SOPInstanceUID, so no copy can be matched to its original and every run would "
            "store it again; set IngestTranscoding to a lossless syntax (JPEG-LS lossless is "
            "1.2.840.10008.1.2.4.80) or remove it, and restart the target")
    declared, accepted = source.system.get("UserMetadata"), system.get("UserMetadata")
    if metadata and isinstance(declared, dict) and isinstance(accepted, dict):
        lacking = sorted(name for name in declared if name not in accepted
                         and not name.isdigit())
        if lacking:
            warnings.append(f"the source declares user metadata that the target does not "
                            f"({', '.join(lacking)}): their values will fail to copy until "
                            "the target declares them in UserMetadata")
    if metadata and source.system.get("HasLabels") and not system.get("HasLabels"):
        labels = source.get("/tools/labels")
        if labels:
            warnings.append(f"the source uses {len(labels)} labels that the target (Orthanc "
                            f"{target.version}) cannot store: they will not be copied, and "
                            "the run will end with exit status 1")
    return warnings


def lost_studies(target: OrthancClient, complete: Iterable[str]) -> list[str]:
    """The studies of `complete` (recorded complete in the save file) that the target no
    longer lists: one listing of the target's studies, whatever the number of instances."""
    listed = set(target.request("GET", "/studies", timeout=LISTING_TIMEOUT))
    return [study for study in complete if study not in listed]


def lost_line(lost: list[str], system: dict) -> str:
    """The line that says the target deleted studies it had stored, and what may do that."""
    limits = storage_limits(system)
    cause = (f"its {' and '.join(limits)} in MaximumStorageMode "
             f"\"{system.get('MaximumStorageMode', 'Recycle')}\"" if limits else
             "a storage limit in \"Recycle\" mode (MaximumStorageSize, MaximumPatientCount), "
             "or someone deleting on the target")
    return (f"the target deleted {format_count(len(lost))} "
            f"{'study' if len(lost) == 1 else 'studies'} after storing them ({lost[0]}"
            f"{' ...' if len(lost) > 1 else ''}): {cause}; the save file no longer counts them "
            "as complete, and no run can end well while the target deletes what it receives")


def too_large_line(sizes: list[int]) -> str:
    """The line that says a proxy's body limit left instances out."""
    return (f"the target, or a proxy in front of it, refuses requests above a size (HTTP 413): "
            f"{format_count(len(sizes))} {'instance' if len(sizes) == 1 else 'instances'} of "
            f"{format_bytes(min(sizes))} and more {'was' if len(sizes) == 1 else 'were'} not "
            "copied (named above); raise the proxy's limit (nginx: client_max_body_size; "
            "Apache: LimitRequestBody), then run the same command again")


def cannot_store_line(error: BaseException, system: dict) -> str:
    """The line that stops a run whose target cannot store files (see target_cannot_store)."""
    reason = describe_error(error)
    cause = error.cause if isinstance(error, GaveUp) else error
    if isinstance(cause, HttpStatusError) and cause.status == 405:
        return (f"stopped: the target takes no uploads ({reason}); is it read-only (ReadOnly "
                "in its configuration), or does a proxy in front of it refuse POST?")
    limits = storage_limits(system)
    if limits and system.get("MaximumStorageMode") == "Reject":
        return (f"stopped: the target refuses to store more ({reason}): its "
                f"{' or '.join(limits)} with MaximumStorageMode \"Reject\" is reached; raise "
                "it in its configuration or make room, then run the same command again")
    return (f"stopped: the target cannot store files ({reason}); is its disk full? Make room, "
            "then run the same command again")


class Confirmation:
    """Whether the target kept what it stored: a target that recycles (Orthanc before 1.12
    does not say it does), or anyone deleting there, takes studies after they were stored.
    Asked at the end of a run, and during --follow after looks that copied something, at
    most once every CONFIRM_EVERY seconds. One request to the target, whatever the archive."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.confirmed = 0.0  # when the target's studies were last confirmed
        self.unconfirmed = False  # --follow: studies were copied since

    def confirm(self) -> None:
        """Whether every selected study the save file records complete is still on the target.
        Those gone are taken back in the save file and counted in `outcome.lost`."""
        context, outcome = self.context, self.context.outcome
        self.confirmed = time.monotonic()
        chosen = None if context.selected is None else set(context.selected)
        try:
            lost = lost_studies(context.target, (study for study in context.journal.studies
                                                 if chosen is None or study in chosen))
            # Gone from the source too (deleted on both), it is nobody's loss: only forgotten.
            on_source = set(context.source.request("GET", "/studies", timeout=LISTING_TIMEOUT)
                            ) if lost else set()
        except Exception as error:
            if stops_run(error):
                raise
            outcome.unconfirmed = describe_error(error)  # not known: not a success either
            return
        outcome.unconfirmed = None
        if lost:
            context.journal.forget(lost)
            outcome.lost.extend(study for study in lost if study in on_source)

    def after_copies(self, copied: bool) -> None:
        """--follow: confirm once studies were copied since the last confirmation, at most
        once every CONFIRM_EVERY seconds."""
        self.unconfirmed = self.unconfirmed or copied
        if self.unconfirmed and time.monotonic() - self.confirmed >= CONFIRM_EVERY:
            self.unconfirmed = False
            self.confirm()


# ---- the table by year: --check ---------------------------------------------------------------
YEAR_FIRST = 1900  # years before this one are counted together, and those after the next one
NO_DATE = "no date"
YEAR_COLUMNS = ("source_studies", "source_instances", "target_studies", "target_instances",
                "missing_studies", "missing_instances", "unreadable_studies",
                "unreadable_instances", "extra_studies", "extra_instances", "trusted_studies")
YEAR_SIDES = ("source", "target", "missing", "unreadable", "extra")


def year_place(row: str) -> tuple[int, str]:
    """Where a row of the table by year goes: years in order, "before" first, "after" and
    NO_DATE last."""
    return {"b": 0, "a": 2, "n": 3}.get(row[0], 1), row


def study_years(source: OrthancClient, studies: list[str], archive: Optional[int],
                threads: int) -> dict[str, str]:
    """The row of each study (see year_label), read from the source; `archive`: how many
    studies it holds (None: ask)."""
    if not studies:
        return {}
    count = archive if archive is not None else int(source.get("/statistics")["CountStudies"])
    return {study: year_label(when[0])
            for study, when in study_dates(source, studies, count, threads)}


def year_label(date: str) -> str:
    """The row of --check's table a StudyDate counts in: its year, or NO_DATE."""
    if not date[:4].isdigit():
        return NO_DATE
    year, now = int(date[:4]), time.localtime().tm_year
    return f"before {YEAR_FIRST}" if year < YEAR_FIRST else \
        f"after {now + 1}" if year > now + 1 else str(year)


class YearTable:
    """--check: studies and instances by year of StudyDate on the source, on the target,
    missing from the target, unreadable on the source (and so missing from the target), only
    on the target, and the studies taken on trust: the table
    an administrator signs. A study counts in its year on the source (one only the target
    has, in its year there), each once in the studies columns. Its year is the StudyDate the
    save file gives (of studies an --order walk copied), or read beside the walk (`look_up`),
    studies counted before it is known waiting for it."""

    def __init__(self, dates: Optional[dict[str, str]] = None) -> None:
        self.dates = dates or {}  # study -> StudyDate, from the save file
        self.years: Optional[Future[dict[str, str]]] = None  # study -> row, being read
        self.waiting: list[tuple[str, tuple[int, int, int, int, int, bool]]] = []
        self.rows: dict[str, Counter[str]] = {}

    def look_up(self, pool: ThreadPoolExecutor, source: OrthancClient, studies: list[str],
                archive: Optional[int], threads: int) -> None:
        """Read, on `pool`, the rows of the `studies` the save file gives no date of."""
        self.years = pool.submit(study_years, source, [
            study for study in studies if study not in self.dates], archive, threads)

    def add(self, study: str, source: int, target: int, missing: int = 0, extra: int = 0,
            trusted: bool = False, row: Optional[str] = None, unreadable: int = 0) -> None:
        counts = (source, target, missing, unreadable, extra, trusted)
        date = self.dates.get(study) if row is None else None
        if row is not None or date is not None:
            self.count(row or year_label(date or ""), *counts)
        elif self.years is None or not self.years.done():
            self.waiting.append((study, counts))
        else:
            self.settle()
            self.count(self.years.result().get(study, NO_DATE), *counts)

    def settle(self) -> None:
        """Count the studies that waited for their years (which this waits for)."""
        years = self.years.result() if self.years is not None else {}
        waiting, self.waiting = self.waiting, []
        for study, counts in waiting:
            self.count(years.get(study, NO_DATE), *counts)

    def count(self, row: str, source: int, target: int, missing: int, unreadable: int,
              extra: int, trusted: bool) -> None:
        counts = self.rows.setdefault(row, Counter())
        for side, count in zip(YEAR_SIDES, (source, target, missing, unreadable, extra)):
            if count:
                counts[f"{side}_studies"] += 1
                counts[f"{side}_instances"] += count
        counts["trusted_studies"] += trusted

    def records(self) -> list[dict]:
        """A record a row, years in order and NO_DATE last, then the total."""
        self.settle()
        rows = sorted(self.rows, key=year_place)
        total: Counter[str] = sum((self.rows[row] for row in rows), Counter())
        return [{"year": row, **{column: counts[column] for column in YEAR_COLUMNS}}
                for row, counts in [*((row, self.rows[row]) for row in rows), ("total", total)]]

    def lines(self) -> list[str]:
        """The table as --check prints it: studies / instances in each column."""
        header = ["year", "source", "target", "missing", "unreadable", "only target",
                  "on trust"]
        body = [[record["year"]] + [f"{format_count(record[f'{side}_studies'])} / "
                                    f"{format_count(record[f'{side}_instances'])}"
                                    for side in YEAR_SIDES]
            + [format_count(record["trusted_studies"])] for record in self.records()]
        widths = [max(len(row[column]) for row in [header] + body) for column in range(7)]
        return ["By year of StudyDate (studies / instances):"] + [
            "  " + "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                             for column, (cell, width) in enumerate(zip(row, widths)))
            for row in [header] + body]

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, ["year", *YEAR_COLUMNS])
            writer.writeheader()
            writer.writerows(self.records())


# ---- the mirror and the check: --delete, --check --------------------------------------------
DELETE_EVERY = 120.0  # --follow --delete: seconds between looks for studies the source deleted
BULK_DELETE = 1000  # instance IDs in one POST /tools/bulk-delete (Orthanc 1.10+)


def copied_by(metadata: dict, username: str) -> bool:
    """Whether an instance's metadata on the target say it came from this tool: received over
    REST from the user this tool logs in as (or from nobody: a target without authentication
    names no user). A modality's instance says Origin DicomProtocol; a person's upload, with
    other credentials, names that person."""
    return (metadata.get("Origin") == "RestApi"
            and metadata.get("HttpUsername", "") in (username, ""))


@dataclass
class Removal:
    """What --delete takes from one study on the target: the whole of it (the source deleted
    the study), or some of its instances (the source deleted them, found by --recheck)."""

    study: str
    whole: bool
    candidates: list[str]  # instances the target has there and the source does not
    ours: list[str] = field(default_factory=list)  # of those, copied by this tool: to delete
    kept: int = 0  # of those, from elsewhere: they stay


def examine(target: OrthancClient, removal: Removal, username: str, threads: int) -> Removal:
    """Sort a removal's candidates into this tool's copies and the others, by their metadata
    on the target (one request an instance; reads only). A study gone from the source is
    listed on the target first. Candidates gone meanwhile are neither."""
    if removal.whole:
        layout = study_layout(target, removal.study) or {}
        removal.candidates = [instance for instances in layout.values()
                              for instance in instances]

    def metadata(instance: str) -> Optional[dict]:
        return unless_missing(lambda: metadata_values(target, f"/instances/{instance}"))
    for instance, found in zip(removal.candidates,
                               parallel_map(metadata, removal.candidates, threads)):
        if found is None:
            continue
        if copied_by(found, username):
            removal.ours.append(instance)
        else:
            removal.kept += 1
    return removal


def remove(target: OrthancClient, instances: list[str]) -> None:
    """Delete instances from the target: in bulk where it can (Orthanc 1.10+), else one by one.
    Orthanc removes a series, study and patient with their last instance. Deleting is
    idempotent: what is already gone is no error."""
    if version_at_least(target.version, (1, 10, 0)):
        for start in range(0, len(instances), BULK_DELETE):
            target.request("POST", "/tools/bulk-delete", read="bytes",
                           json={"Resources": instances[start:start + BULK_DELETE]})
        return
    for instance in instances:
        unless_missing(lambda: target.request("DELETE", f"/instances/{instance}", read="bytes"))


CSV_COLUMNS = ["difference", "patient_id", "study_date", "study_instance_uid", "study",
               "instance", "series_instance_uid", "sop_instance_uid", "detail"]


class Differences:
    """--check: every difference found, study by study. Each goes at once to the CSV file (if
    asked) and to a spool of JSON lines that the report copies at the end, so that memory does
    not grow with the differences, however many. Only the counts are kept."""

    def __init__(self, csv_path: Optional[Path]) -> None:
        self.counts: Counter[str] = Counter()
        self.studies: Counter[str] = Counter()  # studies with a difference of each kind
        self.spool = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.csv_file = None
        if csv_path is not None:
            try:
                self.csv_file = open(csv_path, "w", newline="", encoding="utf-8")  # noqa: SIM115
            except OSError as error:
                raise UsageError(f"--csv {csv_path}: {error.strerror}") from None
            self.csv = csv.writer(self.csv_file)
            self.csv.writerow(CSV_COLUMNS)

    def add(self, study: str, tags: dict[str, str], found: dict[str, list[str]],
            detail: dict[str, str], uids: Optional[dict[str, tuple[str, str]]] = None,
            reasons: Optional[dict[str, str]] = None) -> None:
        """One study's differences: kind -> instance IDs (kind `extra-study` with no IDs for a
        study only the target has), with a detail by kind, or by instance (`reasons`);
        `uids`: each instance's SeriesInstanceUID and SOPInstanceUID, where known."""
        uids, reasons = uids or {}, reasons or {}
        record = {"study": study, **tags}
        for kind, instances in found.items():
            if not instances and kind != "extra-study":
                continue
            self.studies[kind] += 1
            self.counts[kind] += len(instances)
            record[kind] = instances
            if self.csv_file is not None:
                for instance in instances or [""]:
                    self.csv.writerow([kind, tags["patient_id"], tags["study_date"],
                                       tags["study_instance_uid"], study, instance,
                                       *uids.get(instance, ("", "")),
                                       reasons.get(instance, detail.get(kind, ""))])
        if detail:
            record["detail"] = detail
        if reasons:
            record["reasons"] = reasons
        self.spool.write(json.dumps(record) + "\n")

    def records(self) -> Iterator[str]:
        self.spool.seek(0)
        for line in self.spool:
            yield line.rstrip("\n")

    def close(self) -> None:
        """Once the report has copied the spool (see finish_report)."""
        if self.csv_file is not None:
            self.csv_file.close()
            self.csv_file = None
        self.spool.close()


def max_delete_line(count: int, limit: int) -> str:
    return (f"--delete: {instance_count(count)} to delete from the target, more than "
            f"--max-delete {format_count(limit)}; nothing was deleted. If the source really "
            "lost that much (not emptied or swapped by mistake), run again with a higher "
            "--max-delete")


class Mirror:
    """--delete and --check: what the target holds beyond the source. The two study lists give
    the selected studies only the target has (`extra`) and of those the ones this tool copied
    (`whole`, which --delete removes); each study's check (observe) names the instances only
    the target has. With --check every difference also goes to `differences`."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.removals: list[Removal] = []  # --delete: instances the walk found only on the target
        self.differences = Differences(context.config.csv) if context.config.check else None
        # --check: the table by year, whose years are read while the walk begins
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="years")
        self.years = YearTable(context.journal.dates) if context.config.check else None
        self.whole: list[str] = []
        self.extra: list[str] = []
        self.deletions_at = time.monotonic()  # --follow --delete: when the last look was

    def plan(self, studies: Collection[str], listed: set[str]) -> None:
        """The selected studies only the target has, and of those the ones this tool copied,
        from the two study lists the run reads anyway (with a selection, the whole source's
        list too, and the same --query on the target). Studies this tool copied that neither
        server has any more are forgotten (--delete)."""
        context, config = self.context, self.context.config
        if context.selected is None:
            on_source = studies if isinstance(studies, (set, dict)) else set(studies)
            chosen: Collection[str] = listed
        else:
            on_source = set(context.source.request("GET", "/studies", timeout=LISTING_TIMEOUT))
            chosen = set(select_studies(context.target, config.query, config.studies, [])
                         ) & listed
        self.extra = sorted(study for study in chosen if study not in on_source)
        if config.delete and not config.dry_run:
            context.journal.gone([study for study in context.journal.known
                                  if study not in on_source and study not in listed])
        self.whole = [study for study in self.extra if study in context.journal.known]

    def observe(self, study: str, check: StudyCheck) -> None:
        """What the walk found of a study (in the main thread)."""
        if self.context.config.delete and check.extra and study in self.context.journal.known:
            self.removals.append(Removal(study, False, check.extra))
        if self.years is not None and not check.gone:
            self.years.add(study, check.instances - check.vanished,
                           check.present + len(check.extra), len(check.missing), len(check.extra),
                           unreadable=len(check.unreadable))
        if self.differences is not None and (check.missing or check.extra or check.unreadable):
            self.differences.add(study, check.tags,
                                 {"missing": [instance.id for instance in check.missing],
                                  "extra": check.extra,
                                  "unreadable": [instance.id for instance, _ in check.unreadable]},
                                 {"missing": "the target lacks it",
                                  "extra": "the target has it, the source does not"}, check.uids,
                                 {instance.id: reason for instance, reason in check.unreadable})

    def trusted(self, study: str, instances: int) -> None:
        """A study the save file lets the walk skip: complete on the target."""
        if self.years is not None:
            self.years.add(study, instances, instances, trusted=True)

    def walking(self, studies: list[str], archive: Optional[int]) -> None:
        """The walk of `studies` begins: the years of those the save file gives no date of
        are read beside it (--check)."""
        if self.years is not None:
            self.years.look_up(self.reader, self.context.source, studies, archive,
                               self.context.config.threads)

    def finish(self) -> None:
        """After the walk: --check's studies only the target has, --delete's deletions."""
        if self.differences is not None:
            self.check_extras()
        csv_path = self.context.config.csv
        if self.years is not None and csv_path is not None:
            self.years.write_csv(csv_path.with_name(f"{csv_path.stem}-by-year{csv_path.suffix}"))
        if self.context.config.delete:
            self.delete()

    def delete(self) -> None:
        """--delete: remove from the target, of the studies the source deleted and of the
        instances the walk found only on the target, what this tool copied there: every
        candidate's metadata read first, then, unless --max-delete forbids it, study by
        study, each followed by its `gone` line (deleting is idempotent). With --dry-run or
        --check, only listed."""
        context, config, outcome = self.context, self.context.config, self.context.outcome
        removals = [Removal(study, True, []) for study in self.whole] + self.removals
        self.removals = []
        for removal in removals:
            try:
                examine(context.target, removal, config.target.username, config.threads)
            except (GaveUp, HttpStatusError) as error:
                outcome.fail_study(removal.study, "could not look at what to delete", error)
                removal.ours, removal.kept = [], 0
        planned = [removal for removal in removals if removal.ours or removal.kept]
        if config.dry_run:
            for removal in planned:
                outcome.would_delete.append((removal.study, len(removal.ours), removal.kept))
                if removal.ours:
                    log.info("would delete: %s of study %s%s", instance_count(len(removal.ours)),
                             removal.study, " (all the source deleted)" if removal.whole
                             else " (deleted from it on the source)")
            return
        count = sum(len(removal.ours) for removal in planned)
        if config.max_delete is not None and count > config.max_delete:
            outcome.delete_refused = max_delete_line(count, config.max_delete)
            return
        for removal in removals:
            if removal.ours:
                try:
                    remove(context.target, removal.ours)
                except (GaveUp, HttpStatusError) as error:
                    outcome.fail_study(removal.study, "could not delete from it", error)
                    continue
                log.info("deleted: %s of study %s%s", instance_count(len(removal.ours)),
                         removal.study, f", kept {removal.kept} not copied by this tool"
                         if removal.kept else "")
            if removal.whole:
                context.journal.gone([removal.study])
            if removal.ours or removal.kept:
                outcome.deleted.append((removal.study, len(removal.ours), removal.kept))

    def check_extras(self) -> None:
        """--check: the studies only the target has, each a line of differences with its
        instance count and whether this tool copied it."""
        assert self.differences is not None and self.years is not None
        copied, target = set(self.whole), self.context.target

        def look(study: str) -> tuple[int, dict[str, str]]:  # in parallel, a few at a time
            statistics = unless_missing(lambda: target.get(f"/studies/{study}/statistics")) or {}
            return int(statistics.get("CountInstances", 0)), study_tags(target, study)
        for study, (count, tags) in zip(self.extra, parallel_map(look, self.extra, CHECKS_MAX)):
            self.years.add(study, 0, count, extra=count, row=year_label(tags["study_date"]))
            self.differences.add(study, tags, {"extra-study": []},
                                 {"extra-study": f"{plural(count, 'instance')} only the target "
                                  "has; " + ("copied by this tool (--delete removes them)"
                                             if study in copied else "not copied by this tool")})

    def follow_look(self) -> bool:
        """--follow --delete: every DELETE_EVERY seconds, one listing of each server's studies
        for those the source deleted. Whether following may go on."""
        context, config = self.context, self.context.config
        if time.monotonic() - self.deletions_at < DELETE_EVERY:
            return True
        self.deletions_at = time.monotonic()
        studies = context.source.request("GET", "/studies", timeout=LISTING_TIMEOUT) \
            if context.selected is None else \
            select_studies(context.source, config.query, config.studies, [])
        self.plan(studies, set(context.target.request("GET", "/studies",
                                                      timeout=LISTING_TIMEOUT)))
        if self.whole or self.removals:
            self.delete()
        return not context.outcome.delete_refused

    def close(self) -> None:
        self.reader.shutdown(wait=False, cancel_futures=True)


# ---- unreadable on the source: --accept -----------------------------------------------------
# Orthanc's error codes for a stored file it cannot read: InexistentFile, CorruptedFile,
# RegularFileExpected (the file is gone from its storage folder).
SOURCE_FILE_ERRORS = frozenset([13, 20, 2006])
BAD_FILE_FORMAT = 15  # Orthanc's code for a body that is not DICOM
NO_LONGER_MATCHES = "its file no longer matches the MD5 the source recorded when it received it"


class Unreadable(Exception):
    """The source cannot serve an instance as it received it: its stored file is missing or
    damaged, or the bytes it serves are not what it recorded. The source's fault, not the
    copy's: counted apart from failures, and --accept can accept it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"unreadable on the source: {reason}")


def unreadable_reason(error: BaseException) -> Optional[str]:
    """Why an error to a file's download says the source cannot read the file, or None."""
    cause = error.cause if isinstance(error, GaveUp) else error
    if isinstance(cause, HttpStatusError) and cause.role == "source" \
            and cause.orthanc_status in SOURCE_FILE_ERRORS:
        return f"the source cannot read its file (HTTP {cause.status}: {cause.detail})"
    return None


def source_fault(source: OrthancClient, instance_id: str) -> Optional[str]:
    """Why the source's stored file is not the one it received, or None when it is or the
    source cannot tell (a server or proxy without the request). POST .../verify-md5 reads
    the file and compares it with the MD5 recorded at reception; it changes nothing."""
    try:
        source.request("POST", f"/instances/{instance_id}/attachments/dicom/verify-md5",
                       data=b"", read="bytes")
    except HttpStatusError as error:
        if error.orthanc_status in SOURCE_FILE_ERRORS:
            return unreadable_reason(error)
        if error.status == 400 and error.orthanc_status is None:  # Orthanc's "no match"
            return NO_LONGER_MATCHES
    return None


def upload_fault(source: OrthancClient, instance: str, error: BaseException) -> Optional[str]:
    """Why a failed copy of one instance is the source's fault: it could not read the file,
    or the target found the bytes it served not DICOM and the source's file no longer
    matches what it received. None: an ordinary failure."""
    reason = unreadable_reason(error)
    if reason is None and isinstance(error, HttpStatusError) and error.role == "target" \
            and error.orthanc_status == BAD_FILE_FORMAT:
        try:
            reason = source_fault(source, instance)
        except (GaveUp, RequestError):  # cannot tell: the failure stays the target's answer
            return None
    return reason


class Accepted:
    """--accept FILE: instances accepted as unreadable on the source. The file is what
    --report wrote (its "unreadable" list), what --check --csv wrote (its "unreadable"
    lines), or a list: an Orthanc instance ID or a SOPInstanceUID a line, `#` comments. An
    instance counts as accepted only while the source still cannot serve it."""

    def __init__(self, ids: set[str], uids: set[str]) -> None:
        self.ids, self.uids = ids, uids

    @classmethod
    def read(cls, path: Path) -> "Accepted":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--accept {path}: {getattr(error, 'strerror', None) or error}"
                             ) from None
        ids, uids = set(), set()
        if text.lstrip().startswith("{"):
            try:
                entries = json.loads(text).get("unreadable") or []
                ids = {entry["id"] for entry in entries}
            except (ValueError, AttributeError, TypeError, KeyError):
                raise UsageError(f"--accept {path}: a JSON file that is not a report of this "
                                 "tool (no \"unreadable\" list of {\"id\": ...})") from None
        elif text.startswith(CSV_COLUMNS[0] + ","):
            rows = csv.DictReader(io.StringIO(text))
            ids = {row["instance"] for row in rows if row.get("difference") == "unreadable"}
        else:
            for number, line in enumerate(text.splitlines(), start=1):
                word = line.split("#", 1)[0].strip()
                if ORTHANC_ID.fullmatch(word):
                    ids.add(word)
                elif DICOM_UID.fullmatch(word):
                    uids.add(word)
                elif word:
                    raise UsageError(f"--accept {path}, line {number}: {word[:40]!r} is neither "
                                     "an Orthanc instance ID nor a SOPInstanceUID")
        return cls(ids, uids)

    def resolve(self, source: OrthancClient, threads: int) -> None:
        """The listed SOPInstanceUIDs as the source's instance IDs (one lookup each)."""
        def look(uid: str) -> list[str]:
            found = source.request("POST", "/tools/lookup", data=uid.encode())
            return [record["ID"] for record in found if record.get("Type") == "Instance"]
        for ids in parallel_map(look, sorted(self.uids), threads):
            self.ids.update(ids)
        self.uids = set()

    def __contains__(self, instance: str) -> bool:
        return instance in self.ids


def unreadable_lines(outcome: Outcome) -> list[str]:
    """stderr's list of the instances the source could not serve, at the end of a run."""
    return [f"  instance {instance} (study {study}): {reason}"
            + (" (accepted by --accept)" if accepted else "")
            for instance, study, reason, accepted in outcome.unreadable]


# ---- verification: --verify -----------------------------------------------------------------
# Transfer syntaxes whose decoded pixels are those the file was made from: uncompressed,
# deflated, RLE, JPEG lossless, JPEG-LS lossless, JPEG 2000 lossless, HTJ2K lossless. Any
# other (JPEG baseline, JPEG-LS near-lossless, JPEG 2000, video...) counts as lossy: its
# decoded pixels depend on the decoder, so only its tags are compared.
LOSSLESS_SYNTAXES = frozenset([
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202"])
PIXEL_DATA, NUMBER_OF_FRAMES = "7fe0,0010", "0028,0008"
# Orthanc's NotImplemented: what 1.10 answers for frames of a syntax it has no decoder of
# (JPEG 2000 stored through the GDCM plugin, whose decoder /numpy does not use)
NOT_IMPLEMENTED = 2
# How --verify compared an instance, as the summary says it
COMPARED = {"md5": "by MD5",
            "pixels": "re-encoded: tags and pixels",
            "lossy": "re-encoded with a lossy syntax: tags only",
            "no_pixels": "re-encoded: tags only (Orthanc before 1.10 decodes no pixels)",
            "no_decoder": "re-encoded: tags only (a server decodes no pixels of that syntax)",
            "sampled_out": "re-encoded: tags only (outside --verify-sample)"}


@dataclass
class Verdict:
    """What --verify found of one instance: how it compared it (a key of COMPARED; None:
    not compared), what differs on the target, or why the source's own file is at fault."""

    how: Optional[str] = None
    problem: Optional[str] = None
    fault: Optional[str] = None
    vanished: bool = False  # gone from the source meanwhile


def kept_tags(tags: dict) -> dict:
    """What a re-encoding keeps of an instance's tags (Orthanc's /tags): all but the file's
    meta information (group 0002) and the pixel data."""
    return {tag: value for tag, value in tags.items()
            if not tag.startswith("0002,") and tag != PIXEL_DATA}


def same_value(first: Optional[dict], second: Optional[dict]) -> bool:
    """Whether two of /tags' values are the same: equal, or the same numbers written another
    way ("-1024.0" and "-1024": GDCM's writer rewrites decimal strings so; /tags gives no VR
    to tell a decimal string from text, and a change of text that keeps its number is not one
    an encoder makes)."""
    if first == second:
        return True
    values = [(item or {}).get("Value") for item in (first, second)]
    if not all(isinstance(value, str) and value for value in values):
        return False
    try:
        numbers = [[float(part) for part in value.split("\\")] for value in values]
    except ValueError:
        return False
    return numbers[0] == numbers[1]


def tags_differ(source: dict, target: dict) -> list[str]:
    """The tags (with their names) whose values differ, in order."""
    return [f"{tag} {(source.get(tag) or target.get(tag) or {}).get('Name', '')}".strip()
            for tag in sorted(set(source) | set(target))
            if not same_value(source.get(tag), target.get(tag))]


def read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        block = read(size - len(data))
        if not block:
            raise ValueError("cut short")
        data += block
    return data


def npy_digest(read: Callable[[int], bytes], digest: Any) -> None:
    """Feed `digest` with the decoded pixels a .npy answer (Orthanc's /numpy) holds: their
    type and shape, then the array, a block at a time. Raises ValueError for another
    format."""
    head = read_exactly(read, 10)
    if head[:6] != b"\x93NUMPY" or head[6] not in (1, 2, 3):
        raise ValueError("not a .npy file")
    size = struct.unpack("<H", head[8:10])[0] if head[6] == 1 else \
        struct.unpack("<I", head[8:10] + read_exactly(read, 2))[0]
    text = read_exactly(read, size).decode("latin-1")
    fields = dict(re.findall(r"'(\w+)':\s*('[^']*'|\([^)]*\)|True|False)", text))
    if not {"descr", "shape"} <= fields.keys():
        raise ValueError("a .npy header without its type or shape")
    shape = tuple(int(number) for number in re.findall(r"\d+", fields["shape"]))
    digest.update(repr((fields["descr"], fields.get("fortran_order"), shape)).encode())
    while block := read(CHUNK_SIZE):
        digest.update(block)


def pixel_digest(server: OrthancClient, instance_id: str, frames: int) -> str:
    """A digest of an instance's decoded pixels, frame by frame (Orthanc 1.10+ decodes a
    frame into .npy without rescaling), computed as each answer streams in."""
    def once() -> str:
        digest = hashlib.sha256()
        for frame in range(frames):
            path = f"/instances/{instance_id}/frames/{frame}/numpy"
            response = server.request("GET", f"{path}?rescale=0", read="stream", retry=False)
            try:
                npy_digest(partial(response.read, decode_content=True), digest)
            except ValueError as error:
                discard(response)
                raise UnexpectedAnswer(server.role, "GET", path, str(error)) from None
            except (urllib3.exceptions.HTTPError, OSError) as error:
                discard(response)
                raise TransportError(server.role, "GET", path, CUT_SHORT) from error
            response.release_conn()
        return digest.hexdigest()
    def worth(error: BaseException) -> bool:  # no decoder: no retry brings one
        return classify(error) == RETRY and not (
            isinstance(error, HttpStatusError) and error.orthanc_status == NOT_IMPLEMENTED)
    return call_with_retries(once, f"{server.role} pixels of instance {instance_id}",
                             server.policy, server.stop, worth)


def verify_instance(source: OrthancClient, target: OrthancClient, instance_id: str,
                    pixels: bool) -> Verdict:
    """Compare one instance on both servers. Stored files of the same transfer syntax by the
    MD5 each server recorded (nothing is read); a file the target re-encoded (another
    syntax, whatever its settings say) by what an encoding keeps: its tags and, when both
    syntaxes are lossless, both servers decode pixels (1.10+) and `pixels` (the study is in
    --verify-sample), its decoded pixels. Whatever differs, or is re-encoded with its pixels
    compared, the source is asked whether its file is still the one it received."""
    expected = source.md5(instance_id)
    if expected is None:
        return Verdict(vanished=True)
    found = target.md5(instance_id)
    if found is None:
        return Verdict(problem="missing on the target")
    if found == expected:
        return Verdict("md5")
    path = f"/instances/{instance_id}"
    syntaxes = [unless_missing(lambda server=server: server.request(
        "GET", f"{path}/metadata/TransferSyntax", read="text")) for server in (source, target)]
    if syntaxes[0] == syntaxes[1]:
        verdict = Verdict("md5", f"different on the target (MD5 {found}, {expected} on the "
                                 "source)")
    else:
        tags = [kept_tags(unless_missing(lambda server=server: server.get(f"{path}/tags"))
                          or {}) for server in (source, target)]
        if not all(syntax in LOSSLESS_SYNTAXES for syntax in syntaxes):
            verdict = Verdict("lossy")
        elif not all(version_at_least(server.version, (1, 10, 0))
                     for server in (source, target)):
            verdict = Verdict("no_pixels")
        else:
            verdict = Verdict("pixels" if pixels else "sampled_out")
        differ = tags_differ(*tags)
        found_out = [f"tags differ: {', '.join(differ[:3])}"
                     + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")] \
            if differ else []
        if verdict.how == "pixels":
            frames = int((tags[0].get(NUMBER_OF_FRAMES) or {}).get("Value") or 1)
            try:
                if pixel_digest(source, instance_id, frames) != \
                        pixel_digest(target, instance_id, frames):
                    found_out.append("the decoded pixels differ")
            except HttpStatusError as error:
                if error.orthanc_status == NOT_IMPLEMENTED:
                    verdict.how = "no_decoder"
                else:  # a server that cannot decode what it holds
                    found_out.append(f"pixels not compared: {error}")
        if found_out:
            verdict.problem = (f"different on the target (re-encoded from {syntaxes[0]} to "
                               f"{syntaxes[1]}; {'; '.join(found_out)})")
    if verdict.problem or verdict.how == "pixels":
        verdict.fault = source_fault(source, instance_id)
    return verdict


def in_sample(study: str, percent: float) -> bool:
    """Whether --verify-sample takes the study: the same studies on every run."""
    return int(hashlib.sha1(study.encode()).hexdigest()[:8], 16) % 10000 < percent * 100


def verify_study(source: OrthancClient, target: OrthancClient, study: str, threads: int,
                 pixels: bool = True, skip: Collection[str] = ()) -> list[tuple[str, Verdict]]:
    """verify_instance for each instance of a study but those to `skip`, a few at once."""
    layout = study_layout(source, study) or {}
    instance_ids = [instance for instances in layout.values() for instance in instances
                    if instance not in skip]
    return list(zip(instance_ids, parallel_map(
        lambda instance: verify_instance(source, target, instance, pixels), instance_ids,
        threads)))


def verify_all(context: Context, progress: Progress, studies: list[str],
               statistics: Optional[dict], differences: Optional[Differences]) -> None:
    """--verify: every instance of every study, on both servers (see verify_instance)."""
    outcome, config = context.outcome, context.config
    outcome.verified = 0
    known = {instance for instance, *_ in outcome.unreadable}  # named by the copy already
    progress.start(None if statistics is None else int(statistics["CountInstances"]),
                   "verifying")
    try:
        for study in studies:
            verdicts = verify_study(context.source, context.target, study, config.threads,
                                    in_sample(study, config.verify_sample), known)
            different, unreadable, reasons = [], [], {}
            for instance, verdict in verdicts:
                if verdict.vanished:
                    outcome.vanished += 1
                    continue
                outcome.verified += 1
                if verdict.how is not None:
                    outcome.verified_by[verdict.how] += 1
                if verdict.fault is not None:
                    outcome.found_unreadable(instance, study, verdict.fault, config.accept)
                    unreadable.append(instance)
                    reasons[instance] = verdict.fault
                elif verdict.problem is not None:
                    outcome.verify_problems.append((instance, verdict.problem))
                    if verdict.how is not None:
                        different.append(instance)
                        reasons[instance] = verdict.problem
            if differences is not None and (different or unreadable):
                differences.add(study, study_tags(context.source, study),
                                {"different": different, "unreadable": unreadable}, {},
                                reasons=reasons)
            progress.advance(len(verdicts))
    finally:
        progress.finish()


# ---- metadata and labels --------------------------------------------------------------------
def metadata_values(server: OrthancClient, path: str) -> dict[str, str]:
    """A resource's metadata, name -> value. Orthanc before 1.4 ignores ?expand and lists
    the names only: their values are then read one by one (system metadata are not)."""
    found = server.get(path + "/metadata?expand")
    if isinstance(found, dict):
        return found
    return {name: server.request("GET", f"{path}/metadata/{name}", read="text")
            for name in found if name not in SYSTEM_METADATA}


def user_attachments(source: OrthancClient, path: str) -> dict[str, str]:
    """A resource's user attachments: their name on the source -> the name to write on the
    target, which is their number when the source tells it (?full, Orthanc 1.10+). Older
    sources list names only: a user attachment is then its number or its UserContentType
    name, which the target must declare too."""
    listed = source.get(path + "/attachments?full")
    if isinstance(listed, dict):
        return {name: str(number) for name, number in listed.items() if int(number) >= USER_MIN}
    return {name: name for name in listed if name not in SYSTEM_ATTACHMENTS
            and not (name.isdigit() and int(name) < USER_MIN)}


def sync_metadata(source: OrthancClient, target: OrthancClient, level: str,
                  resource: str) -> tuple[int, list[str]]:
    """Copy a resource's user metadata and user attachments (index 1024-65535) where the
    target's differ. Returns (items written, problems). A resource missing on either side
    (a missing instance is a failed copy already), or an attachment deleted once listed, is
    skipped; a write refused for good, or through every retry, is that item's problem."""
    path = f"/{LEVEL_PATHS[level]}/{resource}"
    found = unless_missing(lambda: (metadata_values(source, path), metadata_values(
        target, path), user_attachments(source, path)))
    if found is None:
        return 0, []
    (wanted, present, attachments), written, problems = found, 0, []

    def put(item: str, item_path: str, data: bytes, hint: str) -> None:
        nonlocal written
        try:
            target.request("PUT", item_path, data=data, read="bytes")
            written += 1
        except (HttpStatusError, GaveUp) as error:
            problems.append(f"{item} of {level.lower()} {resource}: {error}"
                            + (f" ({hint})" if hint and isinstance(error, HttpStatusError)
                               else ""))
    for name, value in wanted.items():
        if name not in SYSTEM_METADATA and present.get(name) != value:
            put(f"metadata {name!r}", f"{path}/metadata/{name}", value.encode("utf-8"),
                "does the target declare it in UserMetadata?")
    for name, target_name in attachments.items():
        expected = unless_missing(lambda: source.request(
            "GET", f"{path}/attachments/{name}/md5", read="text"))
        found = unless_missing(lambda: target.request(
            "GET", f"{path}/attachments/{target_name}/md5", read="text"))
        data = None if expected is None or found == expected else unless_missing(
            lambda: source.request("GET", f"{path}/attachments/{name}/data", read="bytes"))
        if data is not None:
            put(f"attachment {name!r}", f"{path}/attachments/{target_name}", data,
                "" if target_name.isdigit() else "does the target declare it in "
                "UserContentType?")
    return written, problems


def labelled_resources(source: OrthancClient) -> list[tuple[str, str]]:
    """(level, ID) of every resource that carries a label on the source: none before Orthanc
    1.12 or on an index without labels."""
    if not source.system.get("HasLabels"):
        return []
    labels = source.get("/tools/labels")
    if not labels:
        return []
    found = []
    for level in LEVEL_PATHS:
        ids = find_all(source, {"Level": level, "Query": {}, "Labels": labels,
                                "LabelsConstraint": "Any"})
        found.extend((level, resource) for resource in ids)
    return found


def sync_labels(source: OrthancClient, target: OrthancClient, level: str,
                resource: str) -> tuple[int, list[str]]:
    """Add on the target the labels the source gives a resource; those only the target has
    stay. A resource missing on either side is skipped, as by sync_metadata."""
    path = f"/{LEVEL_PATHS[level]}/{resource}"
    wanted = unless_missing(lambda: source.get(path + "/labels"))
    present = unless_missing(lambda: target.get(path + "/labels"))
    if wanted is None or present is None:
        return 0, []
    written, problems = 0, []
    for label in sorted(set(wanted) - set(present)):
        try:
            target.request("PUT", f"{path}/labels/{label}", read="bytes")
            written += 1
        except (HttpStatusError, GaveUp) as error:
            problems.append(f"label {label!r} of {level.lower()} {resource}: {error}")
    return written, problems


class MetadataPass:
    """After the instances: user metadata and attachments of every resource the change log
    named (each run reads on from where the last one stopped), and labels (Orthanc 1.12+)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def in_selection(self, level: str, resource: str) -> bool:
        selected, source = self.context.selected, self.context.source
        if selected is None or level == "Study":
            return selected is None or resource in selected
        record = unless_missing(lambda: source.get(f"/patients/{resource}" if level == "Patient"
                                                   else f"/{LEVEL_PATHS[level]}/{resource}/study"))
        studies = [] if record is None else record["Studies"] if level == "Patient" else \
            [record["ID"]]
        return not set(studies).isdisjoint(selected)

    def copy_metadata(self, changes: ChangeLog, every_known: bool = True) -> None:
        """Record the changes read, then sync every resource known to carry user metadata or
        attachments, or (`every_known` False, a --follow look) only those the changes name:
        the others were synced by the first pass. The candidates are saved with the position,
        so a crash before the sync costs nothing: the next run syncs them."""
        journal = self.context.journal
        fresh = metadata_candidates(changes.changes)
        journal.changes_read(changes.last, fresh)
        candidates = sorted(candidate for candidate in
                            (journal.candidates if every_known else fresh)
                            if self.in_selection(*candidate))
        self.sync_each(candidates, sync_metadata, "metadata")

    def copy_labels(self) -> None:
        """Add on the target the labels (Orthanc 1.12+) of every labelled resource. Orthanc
        logs no change for labels: each run asks for all of them, 5 requests, then 2 for each
        labelled resource."""
        source, target = self.context.source, self.context.target
        labelled = [candidate for candidate in labelled_resources(source)
                    if self.in_selection(*candidate)]
        if labelled and not target.system.get("HasLabels"):
            problem = (f"{len(labelled)} resources carry labels on the source, but the target "
                       f"(Orthanc {target.version}) cannot store labels (Orthanc 1.12 or "
                       "newer can, on an index that supports them); they were not copied")
            self.context.outcome.metadata_problems.append(("labels", problem))
            log.error("metadata failed: %s", problem)
            return
        self.sync_each(labelled, sync_labels, "labels")

    def sync_each(self, resources: list[tuple[str, str]],
                  sync: Callable[[OrthancClient, OrthancClient, str, str], tuple[int, list[str]]],
                  what: str) -> None:
        """Run `sync` on every (level, ID), with retries. Each worker counts what it wrote
        as soon as it is written, so that a Ctrl-C at any moment leaves the count true."""
        context, outcome = self.context, self.context.outcome
        lock = threading.Lock()

        def one(resource: tuple[str, str]) -> None:
            written, problems = call_with_retries(
                lambda: sync(context.source, context.target, *resource),
                f"{what} of {resource[0].lower()} {resource[1]}", context.config.policy,
                context.stop)
            with lock:
                outcome.metadata_written += written
                outcome.metadata_problems.extend((resource[1], problem) for problem in problems)
            for problem in problems:
                log.error("metadata failed: %s", problem)
        for _ in parallel_map(one, resources, context.config.threads):
            pass


# ---- resuming: what the save file lets a run skip -------------------------------------------
def log_position(source: OrthancClient) -> tuple[int, str]:
    """Where the source's change log stands, and the resource its last change names."""
    last = source.get("/changes?last")
    position = int(last.get("Last", 0))
    return position, next((str(change.get("ID", "")) for change in last.get("Changes", [])
                           if int(change.get("Seq", -1)) == position), "")


def resume(context: Context, position: int,
           anchor: str) -> Optional[Callable[[], ChangeLog]]:
    """Decide which studies the save file lets this run skip; return the reading of the
    change log for metadata that is left (None with --no-metadata). The studies recorded
    complete since the last mark are skipped unless the log says instances arrived in them
    after it, which holds only while the change at the mark is there, naming the same
    resource. A log cleared (DELETE /changes) or of another database: every study is looked
    at again, and the log read for metadata from its start; --recheck: every study."""
    config, journal, source = context.config, context.journal, context.source
    mark = journal.mark
    # A mark at 0 (the log was empty) cannot be checked: it holds while the log is empty.
    same_log = mark is not None and mark[0] <= position and (
        position == 0 if mark[0] == 0 else change_at(source, mark[0]) == mark[1])
    intact = same_log and not config.recheck
    since = journal.position or 0
    metadata = METADATA_CHANGES if config.metadata else frozenset()
    if not intact:
        if mark is not None and not same_log:
            if mark[0] > 0:
                log.warning("the source's change log is not the one the save file's mark was "
                            "taken from (cleared or restarted?): looking at every study again, "
                            "and reading its log from the start")
            since = 0
        journal.begin(position, anchor, (), reset=True)
    else:
        assert mark is not None
        changes = read_changes(source, mark[0], ARRIVALS | metadata, until=position)
        touched = touched_studies(source, [change for change in changes.changes
                                           if is_arrival(change)],
                                  config.threads) if journal.studies else set()
        journal.begin(position, anchor, touched, reset=False)
        if since >= mark[0] and config.metadata:
            read = ChangeLog([change for change in changes.changes
                              if is_metadata_change(change)], position)
            return lambda: read
    if not config.metadata:
        return None
    # From an older position, the log is read while the instances travel: on a first run it
    # is several records per instance, all to be read before metadata is synced.
    return lambda: read_changes(source, since, metadata, position)


# ---- following the source: --follow ---------------------------------------------------------
class Follow:
    """After the first pass, copy what arrives on the source until Ctrl-C, polling its change
    log; with --delete, also remove what it deletes. A server that stays out of reach through
    all the retries of a look is waited for, from the same position: a follow left running
    for days outlives a restart of either server."""

    def __init__(self, context: Context, confirmation: Confirmation, metadata: MetadataPass,
                 mirror: Optional[Mirror]) -> None:
        self.context, self.confirmation = context, confirmation
        self.metadata, self.mirror = metadata, mirror

    def run(self, position: int) -> None:
        config, stop = self.context.config, self.context.stop
        log.info("following the source's changes from position %d (Ctrl-C stops)", position)
        if self.mirror is not None:
            self.mirror.deletions_at = time.monotonic()
        while not stop.wait(config.poll):
            try:
                next_position = self.look(position)
                if next_position is None:
                    return
                position = next_position
                if self.mirror is not None and not self.mirror.follow_look():
                    return
                if self.context.journal.compact_due():
                    self.context.journal.compact()
            except GaveUp as error:
                log.warning("%s: %s: %s; looking again in %g s", time.strftime("%H:%M:%S"),
                            error.what, error, config.poll)

    def look(self, position: int) -> Optional[int]:
        """One look at the change log: check again the studies that instances arrived in
        since `position`, copy what they lack, and sync the metadata the changes name. The
        new position, or None when following must stop."""
        context, config, outcome = self.context, self.context.config, self.context.outcome
        changes = read_changes(context.source, position, ARRIVALS | (
            METADATA_CHANGES if config.metadata else frozenset()))
        if changes.last == position:
            if context.watch is not None:
                context.watch.looked(False)
            return position
        touched = touched_studies(context.source, [change for change in changes.changes
                                                   if is_arrival(change)], config.threads)
        if touched and context.selected is not None:
            if config.query:
                context.selected = select_studies(context.source, config.query, config.studies,
                                                  [])
            touched &= set(context.selected)
        # The studies the arrivals went into are taken back before they are looked at: a
        # look cut short leaves them to the next run.
        context.journal.begin(changes.last, changes.last_id, touched, reset=False)
        if context.watch is not None:
            context.watch.changes_seen(changes.last - position)
        copied = 0
        if touched:
            context.target.get("/system")  # a target out of reach fails the look, not the copies
            before = outcome.copied, outcome.copied_bytes, len(outcome.failed) + \
                outcome.unaccepted
            Walk(context, Progress(False), self.mirror and self.mirror.observe,
                 again=True).run(sorted(touched), lambda study: True)
            copied = outcome.copied - before[0]
            failed = len(outcome.failed) + outcome.unaccepted - before[2]
            if copied or failed:
                log.info("%s: copied %s (%s), %d failed", time.strftime("%H:%M:%S"),
                         instance_count(copied), format_bytes(outcome.copied_bytes - before[1]),
                         failed)
            if outcome.interrupted or outcome.target_full or (failed and not config.ignore_errors):
                return None
        self.confirmation.after_copies(bool(copied))
        if outcome.lost:
            return None
        if config.metadata:
            self.metadata.copy_metadata(changes, every_known=False)
        else:
            context.journal.changes_read(changes.last, ())
        if context.watch is not None:
            context.watch.looked(True)
        return changes.last


# ---- watching a run: --status, and --report while it runs -----------------------------------
STATUS_SAMPLE = 10.0  # seconds between two points of the rate chart, at first
STATUS_POINTS = 360  # points kept; when full, every other one goes: the chart spans the run
REPORT_EVERY = 60.0  # seconds between two writes of --report while a run goes on
STATUS_FAILURES = 10  # the last failures the page shows
STATUS_TIMEOUT = 10.0  # seconds a client of the status server has to send its request
LOOPBACK_NAMES = frozenset(["127.0.0.1", "localhost", "::1", ""])  # "": no Host (HTTP/1.0)


def parse_status(text: str) -> tuple[str, int]:
    """--status [ADDR:]PORT: the address to serve on, 127.0.0.1 unless given."""
    address, _, port = text.rpartition(":")
    address = address.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--status {text}: give PORT or ADDR:PORT (a port of 0 to 65535)")
    return address, int(port)


def failure_reason(error: BaseException) -> str:
    """A failure's kind, as the metrics count it."""
    if isinstance(error, Unreadable):
        return "unreadable_on_source"
    if isinstance(error, Rejected):
        return "refused_by_target"
    if isinstance(error, GaveUp):
        return "retries_exhausted"
    if isinstance(error, HttpStatusError):
        return f"http_{error.status}"
    return "transport" if isinstance(error, TransportError) else "other"


class Tally:
    """A count that threads add to."""

    def __init__(self) -> None:
        self.value, self.lock = 0, threading.Lock()

    def add(self, count: int = 1) -> None:
        with self.lock:
            self.value += count


RETRIED = Tally()  # requests and operations tried again, in this process


class Watch:
    """What can be seen of a run while it goes on: points of its rate over the whole run, the
    year of each study (read beside the walk when --status is asked for), a live mirror's
    lag, and --report rewritten every REPORT_EVERY seconds and after each look of --follow
    that found changes. Its thread samples and writes; StatusServer reads."""

    def __init__(self, run: "Run") -> None:
        self.run, self.config = run, run.config
        self.started = time.time()
        self.points: list[tuple[float, int, int]] = []  # (time, instances, bytes copied)
        self.every = STATUS_SAMPLE
        self.total: Optional[int] = None  # instances on the source, when all of it is copied
        self.years: Optional[Future[dict[str, str]]] = None  # study -> year of its StudyDate
        self.pending_since: Optional[float] = None  # --follow: the oldest change not copied
        self.pending_changes = 0  # and how many changes that look has to process
        self.last_look: Optional[float] = None  # when the last look ended well
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="watch-years")
        self.report_lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.tick, name="watch", daemon=True)

    def start(self) -> None:
        self.point()
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        self.reader.shutdown(wait=False, cancel_futures=True)

    def tick(self) -> None:
        point_at, report_at = time.monotonic(), time.monotonic() + REPORT_EVERY
        while not self.stopped.wait(1.0):
            now = time.monotonic()
            if now >= point_at:
                self.point()
                point_at = now + self.every
            if self.config.report is not None and now >= report_at:
                self.write_report()
                report_at = now + REPORT_EVERY

    def point(self) -> None:
        outcome = self.run.outcome
        self.points.append((time.time(), outcome.copied, outcome.copied_bytes))
        if len(self.points) > STATUS_POINTS:
            self.points = self.points[::2]
            self.every *= 2

    def walking(self, source: OrthancClient, studies: list[str], total: Optional[int],
                archive: Optional[int]) -> None:
        """The walk begins: with --status, the studies' years are read beside it."""
        self.total = total
        if self.config.status:
            self.years = self.reader.submit(study_years, source, studies, archive,
                                            self.config.threads)

    def write_report(self) -> None:
        """--report as the run stands (its --check differences are listed at the end)."""
        try:
            with self.report_lock:
                write_report(self.config.report, self.config, self.run,
                             time.time() - self.started, spool=False)
        except OSError as problem:
            log.warning("warning: cannot write report %s: %s", self.config.report,
                        problem.strerror)

    # --follow
    def changes_seen(self, count: int) -> None:
        if self.pending_since is None:
            self.pending_since = time.time()
        self.pending_changes = count

    def looked(self, found: bool) -> None:
        """A look ended well: what it saw is on the target."""
        self.last_look, self.pending_since, self.pending_changes = time.time(), None, 0
        if found and self.config.report is not None:
            self.write_report()

    @property
    def lag(self) -> float:
        since = self.pending_since
        return 0.0 if since is None else max(0.0, time.time() - since)

    def state(self) -> dict:
        """Everything the page and the metrics show, read from the run as it stands."""
        run, outcome, context = self.run, self.run.outcome, self.run.context
        copier = context.copier if context is not None else None
        limiter = copier.limiter if copier is not None else None
        done = outcome.already_there + outcome.copied + len(outcome.failed) \
            + outcome.vanished + len(outcome.unreadable)
        now = time.time()
        points = self.points + [(now, outcome.copied, outcome.copied_bytes)]
        recent = [point for point in points if point[0] >= now - 60] or points[-1:]
        first, last = (recent[0], recent[-1]) if len(recent) > 1 else (points[0], points[-1])
        span = max(last[0] - first[0], 1e-9)
        rate, instance_rate = (last[2] - first[2]) / span, (last[1] - first[1]) / span
        left = None if self.total is None else max(0, self.total - done)
        pause = limiter.pause_until if limiter is not None and limiter.pause_began is not None \
            else None
        following = self.config.follow and self.last_look is not None
        return {
            "state": "stopped" if self.stopped.is_set() else "paused" if pause else
            "following" if following else "checking" if self.config.dry_run else "copying",
            "started": self.started, "now": now,
            "studies": outcome.studies, "studies_complete": len(context.journal.studies)
            if context is not None else 0,
            "instances": self.total, "instances_done": done, "instances_left": left,
            "copied": outcome.copied, "bytes": outcome.copied_bytes,
            "already_there": outcome.already_there, "failed": len(outcome.failed),
            "unreadable": len(outcome.unreadable), "deleted": sum(
                ours for _, ours, _ in outcome.deleted), "metadata": outcome.metadata_written,
            "retried": RETRIED.value, "failed_by": dict(outcome.failed_by),
            "rate_bytes": rate, "rate_instances": instance_rate,
            "seconds_left": left / instance_rate if left and instance_rate > 0 else None,
            "reached": run.reached(),
            "uploads": copier.uploads.limit if copier is not None else 0,
            "uploads_why": copier.uploads.why if copier is not None else "",
            "paused_until": pause,
            "next_pause": self.next_pause(limiter),
            "bwlimit": limiter.timetable.text if limiter is not None else None,
            "points": [[round(point[0], 1), point[1], point[2]] for point in points],
            "years": self.year_rows(context),
            "last_failures": [{"id": resource, "reason": reason} for resource, reason in
                              outcome.failed[-STATUS_FAILURES:]]
            + [{"id": instance, "reason": f"unreadable on the source: {reason}"}
               for instance, _, reason, _ in outcome.unreadable[-STATUS_FAILURES:]],
            "follow": {"lag_seconds": self.lag, "changes_pending": self.pending_changes,
                       "last_look": self.last_look} if self.config.follow else None,
        }

    @staticmethod
    def next_pause(limiter: Optional[RateLimiter]) -> Optional[str]:
        if limiter is None:
            return None
        start = limiter.timetable.next_pause(limiter.minute())
        return None if start is None else describe_minute(start)

    def year_rows(self, context: Optional[Context]) -> list[dict]:
        """Studies complete and left, by year of StudyDate, once the years are read."""
        if context is None or self.years is None or not self.years.done() \
                or self.years.exception() is not None:
            return []
        years = self.years.result()
        complete = Counter(years.get(study, NO_DATE) for study in list(context.journal.studies)
                           if study in years)
        total = Counter(years.values())
        return [{"year": year, "complete": complete[year], "left": total[year] - complete[year]}
                for year in sorted(total, key=year_place)]


def metric_lines(state: dict, config: Config) -> list[str]:
    """/metrics: Prometheus' text format (version 0.0.4)."""
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")

    lines: list[str] = []
    named: set[str] = set()

    def metric(name: str, kind: str, text: str, value: Any,
               labels: Optional[dict[str, str]] = None) -> None:
        if value is None:
            return
        if name not in named:  # once a metric, whatever its labels
            named.add(name)
            lines.extend([f"# HELP replicate_{name} {text}", f"# TYPE replicate_{name} {kind}"])
        shown = "" if not labels else "{" + ",".join(
            f'{key}="{escape(str(item))}"' for key, item in labels.items()) + "}"
        lines.append(f"replicate_{name}{shown} {float(value):.17g}")

    metric("info", "gauge", "The run: version, servers (without credentials), order.", 1,
           {"version": __version__, "source": redact_url(config.source.url),
            "target": redact_url(config.target.url), "order": config.order,
            "follow": str(config.follow).lower()})
    metric("start_time_seconds", "gauge", "When the run started (Unix time).", state["started"])
    metric("instances_copied_total", "counter", "Instances stored on the target.",
           state["copied"])
    metric("bytes_copied_total", "counter", "Bytes of the instances stored on the target.",
           state["bytes"])
    metric("instances_already_there_total", "counter", "Instances the target had already.",
           state["already_there"])
    for reason, count in sorted(state["failed_by"].items()) or [("none", 0)]:
        metric("instances_failed_total", "counter", "Instances that could not be copied, by "
               "reason.", count, {"reason": reason})
    metric("retries_total", "counter", "Requests and operations tried again.", state["retried"])
    metric("instances_deleted_total", "counter", "Instances --delete removed from the target.",
           state["deleted"])
    metric("metadata_items_total", "counter", "User metadata, attachments and labels written.",
           state["metadata"])
    metric("studies", "gauge", "Studies on the source (or selected).", state["studies"])
    metric("studies_complete", "gauge", "Studies complete on the target (the save file).",
           state["studies_complete"])
    metric("instances_left", "gauge", "Instances not yet looked at or copied (the whole "
           "source only).", state["instances_left"])
    metric("rate_bytes_per_second", "gauge", "Bytes copied a second over the last minute.",
           state["rate_bytes"])
    metric("uploads_at_once", "gauge", "Uploads to the target at once.", state["uploads"])
    metric("paused", "gauge", "1 while --bwlimit's timetable pauses the run.",
           1 if state["paused_until"] else 0)
    date = state["reached"]
    if len(date) == 8 and date.isdigit():
        metric("study_date_reached_seconds", "gauge", "The StudyDate the walk reached "
               "(--order; Unix time of its midnight, UTC).",
               calendar.timegm(time.strptime(date, "%Y%m%d")))
    follow = state["follow"]
    if follow is not None:
        metric("follow_lag_seconds", "gauge", "Seconds since the oldest change the source "
               "logged and the target does not hold yet was seen (0: in step).",
               follow["lag_seconds"])
        metric("follow_changes_pending", "gauge", "Changes seen and not yet processed.",
               follow["changes_pending"])
        metric("follow_last_look_seconds", "gauge", "When the last look at the source's "
               "changes ended well (Unix time).", follow["last_look"])
    return lines


PAGE_STYLE = """body{font:15px system-ui,sans-serif;margin:1.5em;color:#222;max-width:60em}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}table{border-collapse:collapse}
td,th{padding:.15em .8em .15em 0;text-align:left}td.n{text-align:right}
.bar{height:.9em;background:#ddd;width:20em;display:inline-block;vertical-align:middle}
.bar span{display:block;height:100%;background:#2a7}.warn{color:#b50}
svg{border:1px solid #ccc;background:#fafafa}"""


def status_page(state: dict, config: Config) -> str:
    """/: one page, nothing from elsewhere, refreshing itself every 10 s. Escaped, and
    showing no patient's name (none is read) and no credential."""
    esc = html.escape

    def count(value: Optional[float]) -> str:
        return "?" if value is None else format_count(int(value))

    done, total = state["instances_done"], state["instances"]
    share = done / total if total else None
    rows = [("State", state["state"]),
            ("Studies", f"{count(state['studies_complete'])} complete of "
                        f"{count(state['studies'])}"),
            ("Instances", f"{count(done)} done of {count(total)}"
                          + (f" ({share:.1%})" if share is not None else "")),
            ("Copied", f"{count(state['copied'])} instances, {format_bytes(state['bytes'])}"),
            ("Already there", count(state["already_there"])),
            ("Failed", count(state["failed"])),
            ("Unreadable on the source", count(state["unreadable"])),
            ("Rate", f"{format_bytes(state['rate_bytes'])}/s, "
                     f"{state['rate_instances']:.1f} instances/s (last minute)"),
            ("Time left", format_duration(state["seconds_left"])
             if state["seconds_left"] is not None else "?"),
            ("Study date reached", "-" if not state["reached"] else state["reached"]
             if not state["reached"].isdigit() else
             f"{state['reached'][:4]}-{state['reached'][4:6]}-{state['reached'][6:]}"),
            ("Uploads at once", f"{state['uploads']}"
                                + (f" ({state['uploads_why']})" if state["uploads_why"] else "")),
            ("Pause", f"paused {state['paused_until']}" if state["paused_until"] else
             "running" + (f"; next pause {state['next_pause']}" if state["next_pause"] else "")
             + (f" (--bwlimit {state['bwlimit']})" if state["bwlimit"] else ""))]
    follow = state["follow"]
    if follow is not None:
        rows += [("Lag", f"{follow['lag_seconds']:.0f} s, {follow['changes_pending']} changes "
                         "pending"),
                 ("Last look", time.strftime("%Y-%m-%d %H:%M:%S",
                                             time.localtime(follow["last_look"]))
                  if follow["last_look"] else "not yet")]
    table = "".join(f"<tr><th>{esc(name)}</th><td>{esc(value)}</td></tr>"
                    for name, value in rows)
    years = "".join(
        f"<tr><td>{esc(row['year'])}</td><td class=n>{row['complete']:,}</td>"
        f"<td class=n>{row['left']:,}</td><td><span class=bar><span style=\"width:"
        f"{100 * row['complete'] / max(1, row['complete'] + row['left']):.1f}%\"></span>"
        "</span></td></tr>" for row in state["years"])
    failures = "".join(f"<li><code>{esc(item['id'])}</code>: {esc(item['reason'])}</li>"
                       for item in state["last_failures"]) or "<li>none</li>"
    return (
        "<!DOCTYPE html><html><head><meta charset=utf-8><meta http-equiv=refresh content=10>"
        f"<title>replicate.py: {esc(state['state'])}</title><style>{PAGE_STYLE}</style>"
        f"</head><body><h1>replicate.py {esc(__version__)}: {esc(config.source.url)} to "
        f"{esc(config.target.url)}</h1><table id=where>{table}</table>"
        f"<h2>Rate over the run</h2>{rate_chart(state['points'])}"
        "<h2>Studies by year of StudyDate</h2>"
        + (f"<table id=years><tr><th>year</th><th>complete</th><th>left</th><th></th></tr>"
           f"{years}</table>" if years else "<p id=years>not read yet</p>")
        + f"<h2>Last failures</h2><ul id=failures>{failures}</ul>"
        f"<p>Refreshed every 10 s; also <a href=\"/status.json\">status.json</a> and "
        f"<a href=\"/metrics\">metrics</a>.</p></body></html>")


def rate_chart(points: list[list]) -> str:
    """An inline SVG of the bytes a second between the points of the run."""
    rates = [((later[0] - points[0][0]), (later[2] - earlier[2]) / max(later[0] - earlier[0],
                                                                       1e-9))
             for earlier, later in zip(points, points[1:])]
    if not rates:
        return "<p id=chart>not enough points yet</p>"
    width, height = 600, 120
    span, top = max(rates[-1][0], 1e-9), max(rate for _, rate in rates) or 1.0
    line = " ".join(f"{x / span * width:.1f},{height - rate / top * height:.1f}"
                    for x, rate in rates)
    return (f"<svg id=chart width={width} height={height} viewBox=\"0 0 {width} {height}\">"
            f"<polyline fill=none stroke=#2a7 stroke-width=2 points=\"{line}\"/></svg>"
            f"<div>top: {html.escape(format_bytes(top))}/s, over "
            f"{html.escape(format_duration(span))}</div>")


class StatusHandler(http.server.BaseHTTPRequestHandler):
    """GET of /, /metrics and /status.json; anything else a 4xx. One request a connection,
    a client that does not send its request within STATUS_TIMEOUT is dropped."""

    server: "StatusServer"
    protocol_version = default_request_version = "HTTP/1.0"  # a status line, even to garbage
    server_version, sys_version = "replicate.py", ""
    timeout = STATUS_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0].strip("[]") if not host.endswith("]") else \
            host.strip("[]")
        if self.server.loopback and name not in LOOPBACK_NAMES:
            # a page elsewhere that names this address under its own host name (DNS
            # rebinding) reads nothing
            self.answer(400, "text/plain", b"this server answers to 127.0.0.1 only\n")
            return
        path = urllib.parse.urlsplit(self.path).path
        pages = {"/": "text/html; charset=utf-8", "/metrics": "text/plain; version=0.0.4",
                 "/status.json": "application/json"}
        if path not in pages:
            self.answer(404, "text/plain", b"not found: try /, /metrics or /status.json\n")
            return
        try:
            body = self.server.render(path)
        except Exception:  # the run changed under it: the next scrape reads it again
            log.debug("status page:", exc_info=True)
            self.answer(503, "text/plain", b"try again\n")
            return
        self.answer(200, pages[path], body.encode("utf-8"))

    def answer(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src "
                         "'unsafe-inline'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every other method: 405, not http.server's 501
            return lambda: self.answer(405, "text/plain", b"GET only\n")
        raise AttributeError(name)

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        # a malformed request (http.server answers an unknown version 505): always a 4xx
        super().send_error(code if code < 500 else 400, message, explain)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("status: %s %s", self.address_string(), format % args)


class StatusServer(http.server.ThreadingHTTPServer):
    """--status: the run's page, metrics and state, read-only, stopped with the run."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], watch: Watch) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, StatusHandler)
        self.watch = watch
        self.loopback = ipaddress.ip_address(address[0]).is_loopback \
            if address[0][0].isdigit() or ":" in address[0] else address[0] == "localhost"
        # its loop looks for the end of the run 10 times a second (0.5 s by default: the
        # run's end would wait that long)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.1,), name="status",
                                       daemon=True)

    def render(self, path: str) -> str:
        watch, config = self.watch, self.watch.config
        if path == "/status.json":
            return json.dumps({**report_record(config, watch.run, time.time() - watch.started),
                               "differences": None, "live": watch.state()}, indent=1)
        state = watch.state()
        if path == "/metrics":
            return "\n".join(metric_lines(state, config)) + "\n"
        return status_page(state, config)

    def start(self) -> "StatusServer":
        self.thread.start()
        host, port = self.server_address[:2]
        log.info("status: http://%s:%d/ (and /metrics, /status.json)",
                 f"[{host}]" if ":" in host else host, port)
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# ---- the run: opening, the stages in order, closing -----------------------------------------
def connect(endpoint: Endpoint, config: Config, stop: threading.Event) -> OrthancClient:
    """A checked client; asks for the password on a terminal if the server refuses the default."""
    client = OrthancClient(endpoint, config.policy, stop, config.tls_verify)
    try:
        client.check()
    except CredentialsRefused:
        if not (config.prompt and not endpoint.password_given and sys.stdin.isatty()):
            raise
        client.close()
        password = getpass.getpass(f"password for {endpoint.username} on {endpoint.url}: ")
        client = OrthancClient(endpoint.with_password(password), config.policy, stop,
                               config.tls_verify)
        client.check()
    return client


def not_found_warning(unknown: list[str], studies: list[str], query: bool) -> None:
    """Say which --study values name no study on the source: an error when all do (and no
    --query selects others), else a warning; the others are copied."""
    named = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    if len(unknown) == len(studies) and not query:
        raise UsageError(f"--study {named}: no such study on the source (give an Orthanc "
                         "study ID or a StudyInstanceUID)")
    log.warning("warning: --study: %s of %s name no study on the source and %s left out: %s",
                format_count(len(unknown)), plural(len(studies), "value"),
                "is" if len(unknown) == 1 else "are", named)


class Run:
    """One invocation: opens the two servers and the save file, runs the stages in order, and
    leaves what happened in `outcome` for the summary and the report (see the module's map)."""

    def __init__(self, config: Config, stop: threading.Event) -> None:
        self.config, self.stop = config, stop
        self.say: Callable[[str], None] = (lambda text: None) if config.quiet else \
            (lambda text: print(text, flush=True))
        terminal = sys.stderr.isatty()
        self.progress = Progress(not config.quiet and terminal,
                                 None if config.quiet or terminal else PROGRESS_LOG_SECONDS)
        self.outcome = Outcome()
        self.context: Optional[Context] = None  # once both servers answered
        self.mirror: Optional[Mirror] = None  # --delete, --check
        self.order: Optional[StudyOrder] = None  # --order, once the walk has begun
        self.started = False  # whether the walk began: the summary then says what it did
        self.watch = Watch(self) if config.status or config.report else None
        self.status: Optional[StatusServer] = None
        if config.follow:
            self.outcome.counted = set()

    def reached(self) -> str:
        """The StudyDate the walk has reached (--order), as it stands."""
        return self.order.reached if self.order is not None else self.outcome.reached

    def execute(self) -> None:
        config = self.config
        if config.status is not None and self.watch is not None:
            try:
                self.status = StatusServer(config.status, self.watch).start()
            except (OSError, ValueError) as error:
                raise UsageError(f"--status {config.status[0]}:{config.status[1]}: cannot serve "
                                 f"there ({getattr(error, 'strerror', None) or error}); choose "
                                 "another port") from None
        try:
            self.connected()
        finally:
            if self.status is not None:
                self.status.stop()
            if self.watch is not None:
                self.watch.stop()

    def connected(self) -> None:
        config = self.config
        source = connect(config.source, config, self.stop)
        target = connect(config.target, config, self.stop)
        # before the save file is made
        warnings = preflight(source, target, config.metadata, writes=not config.check)
        journal = Journal(config.save, config.source.url, config.target.url,
                          dates=config.check).open(read_only=config.dry_run)
        limiter = RateLimiter(config.bwlimit) if config.bwlimit else None
        if limiter is not None:
            source.hold = target.hold = limiter.hold
        copier = Copier(source, target, config.policy, self.stop, limiter, config.threads,
                        FAR_REQUESTS_MAX if config.pace else config.threads, config.pace)
        if config.accept is not None and config.accept.uids:
            config.accept.resolve(source, config.threads)
        self.context = Context(config, self.stop, source, target, journal, copier, self.outcome,
                               watch=self.watch)
        if self.watch is not None:
            self.watch.start()
        background = ThreadPoolExecutor(1, thread_name_prefix="changes")
        try:
            self.introduce(warnings)
            self.stages(self.context, background)
        except KeyboardInterrupt:
            self.outcome.interrupted = True
            self.stop.set()
        finally:
            self.outcome.paused = limiter.paused_seconds if limiter is not None else 0.0
            background.shutdown(wait=False, cancel_futures=True)
            if self.mirror is not None:
                self.mirror.close()
            journal.close()
            copier.close()
            source.close()
            target.close()

    def introduce(self, warnings: list[str]) -> None:
        """The servers, the bandwidth in force, the warnings and the save file, first."""
        config, context = self.config, self.context
        assert context is not None
        self.say(f"Source:        {config.source.url} (Orthanc {context.source.version})")
        self.say(f"Target:        {config.target.url} (Orthanc {context.target.version})")
        limiter = context.copier.limiter
        if limiter is not None:
            self.say(f"Bandwidth:     {describe_rate(limiter.rate)} now (--bwlimit "
                     f"{limiter.timetable.text})")
        for warning in warnings:
            log.warning("warning: %s", warning)
        if context.journal.studies:
            self.say(f"Save file:     {config.save}: "
                     f"{study_count(len(context.journal.studies))} completed by "
                     "earlier runs")

    def stages(self, context: Context, background: ThreadPoolExecutor) -> None:
        config, outcome = self.config, self.outcome
        if config.query or config.studies:
            context.selected = select_studies(context.source, config.query, config.studies,
                                              outcome.not_found)
            if outcome.not_found:
                not_found_warning(outcome.not_found, config.studies, bool(config.query))
        # Where the change log stands before anything is listed: whatever arrives later is
        # after it, for the next run and for --follow.
        position, anchor = log_position(context.source)
        studies, statistics, on_target = self.list_studies(context)
        read_log = resume(context, position, anchor)
        metadata: list[Future[ChangeLog]] = []

        def landed() -> None:
            """The first batch has landed: the log is read beside the transfers, not beside
            the order's listing of the studies, which it slowed threefold, nor beside the
            first study's requests. A dry run or a check syncs no metadata: it is not read."""
            if read_log is not None and not metadata and not config.dry_run:
                metadata.append(background.submit(read_log))
        self.walk(context, studies, statistics, on_target, landed)
        landed()
        if outcome.interrupted:
            return
        if self.mirror is not None:
            self.mirror.finish()
        if config.dry_run:
            if config.check and config.verify:
                verify_all(context, self.progress, studies, statistics,
                           self.mirror and self.mirror.differences)
            self.say(f"{'Check:' if config.check else 'Dry run:':<15}nothing was written "
                     "to the target or the save file")
            return
        passes = MetadataPass(context)
        if metadata:
            passes.copy_metadata(metadata[0].result())
            passes.copy_labels()
        confirmation = Confirmation(context)
        confirmation.confirm()
        if config.verify:
            verify_all(context, self.progress, studies, statistics, None)
        if config.follow and not outcome.target_full and not outcome.lost and not (
                (outcome.failed or outcome.unaccepted) and not config.ignore_errors) \
                and not outcome.delete_refused:
            Follow(context, confirmation, passes, self.mirror).run(position)

    def list_studies(self, context: Context) -> tuple[list[str], Optional[dict], set[str]]:
        """The studies to copy, the source's statistics when all of it is copied, and which of
        the studies the target has at all; the mirror's plan from the same two listings."""
        config, source = self.config, context.source
        statistics = source.get("/statistics") if context.selected is None else None
        studies = context.selected if context.selected is not None else \
            source.request("GET", "/studies", timeout=LISTING_TIMEOUT)
        # What is known of each study is keyed by the source's own strings: a few tens of
        # bytes a study, not another copy of its ID for every set that names it.
        context.journal.share_keys(studies)
        listed = set(context.target.request("GET", "/studies", timeout=LISTING_TIMEOUT))
        if config.delete or config.check:
            self.mirror = Mirror(context)
            self.mirror.plan(studies, listed)
        return studies, statistics, {study for study in studies if study in listed}

    def walk(self, context: Context, studies: list[str], statistics: Optional[dict],
             on_target: set[str], landed: Callable[[], None]) -> None:
        """Skip the studies the save file records complete and the target has; check the
        others and copy what they lack. `landed` is called once the first batch landed."""
        journal, outcome = context.journal, self.outcome
        outcome.studies = len(studies)
        work = []  # the studies to look at, in the source's order
        for study in studies:
            if study not in journal.studies or study not in on_target:
                work.append(study)
                continue
            outcome.studies_skipped += 1
            outcome.skipped_instances += journal.studies[study]
            if self.mirror is not None:
                self.mirror.trusted(study, journal.studies[study])
        for line in plan_lines(outcome, statistics):
            self.say(line)
        if self.mirror is not None:
            self.mirror.walking(studies, None if statistics is None else
                                int(statistics["CountStudies"]))
        total = None if statistics is None else max(
            0, int(statistics["CountInstances"]) - outcome.skipped_instances)
        order = self.order = StudyOrder(context.source, self.config.order, self.config.threads) \
            if work and self.config.order != "source" and not self.config.dry_run else None
        if self.watch is not None:
            archive = None if statistics is None else int(statistics["CountStudies"])
            self.watch.walking(context.source, studies, None if statistics is None else
                               int(statistics["CountInstances"]), archive)
        if order is not None:
            self.say(f"Order:         {self.config.order} StudyDate first, studies without one "
                     "last")
        self.started = True
        self.progress.start(total, "checking" if self.config.dry_run else "copying")
        try:
            Walk(context, self.progress, self.mirror and self.mirror.observe, order,
                 landed).run(work if order is None else order.arrange(
                     work, None if statistics is None else int(statistics["CountStudies"])),
                             on_target.__contains__)
        finally:
            self.progress.finish()
            outcome.reached = order.reached if order is not None else ""


# ---- the summary and the report -------------------------------------------------------------
def summary_lines(outcome: Outcome, elapsed: float) -> list[str]:
    rate = outcome.copied_bytes / elapsed if elapsed > 0 else 0
    failed, named = len(outcome.failed), len(outcome.failed_studies)
    lines = [
        f"To transfer:   {instance_count(outcome.missing)} in "
        f"{study_count(outcome.studies_missing)}, {format_bytes(outcome.missing_bytes)}",
        f"Copied:        {instance_count(outcome.copied)}, {format_bytes(outcome.copied_bytes)} "
        f"({format_bytes(rate)}/s)",
        f"Already there: {instance_count(outcome.already_there)}",
        "Failed:        " + (instance_count(failed) if not named else
                              f"{format_count(failed)} ({format_count(named)} of them "
                              f"{'a study' if named == 1 else 'studies'})"),
    ]
    if outcome.unreadable:
        accepted = len(outcome.unreadable) - outcome.unaccepted
        lines.append(f"Unreadable:    {instance_count(len(outcome.unreadable))} the source "
                     "cannot serve as it received them" + (f" ({format_count(accepted)} "
                                                         "accepted by --accept)"
                                                         if accepted else ""))
    if outcome.metadata_written or outcome.metadata_problems:
        lines.append(f"Metadata:      {plural(outcome.metadata_written, 'item')} copied, "
                     f"{plural(len(outcome.metadata_problems), 'problem')}")
    if outcome.verified is not None:
        lines.append(f"Verified:      {instance_count(outcome.verified)}"
                     + "".join(f", {format_count(outcome.verified_by[how])} {words}"
                               for how, words in COMPARED.items() if outcome.verified_by[how])
                     + f"; {format_count(len(outcome.verify_problems))} missing or different")
    if outcome.lost:
        lines.append(f"Lost:          {study_count(len(outcome.lost))} the target deleted after "
                     "storing them")
    for label, removals in (("Deleted:", outcome.deleted), ("Would delete:", outcome.would_delete)):
        if removals:
            lines.append(f"{label:<15}{instance_count(sum(ours for _, ours, _ in removals))} in "
                         f"{study_count(len(removals))} the source no longer has "
                         f"({format_count(sum(kept for _, _, kept in removals))} kept there: "
                         "not copied by this tool)")
    if outcome.vanished:
        lines.append(f"Vanished:      {instance_count(outcome.vanished)} deleted from the source "
                     "during the run")
    if outcome.not_found:
        lines.append(f"Not found:     {plural(len(outcome.not_found), '--study value')} naming "
                     "no study on the source (named above)")
    if outcome.paused >= 1:
        lines.append(f"Paused:        {format_duration(outcome.paused)} (--bwlimit's timetable)")
    lines.append(f"Elapsed:       {elapsed:.1f} s")
    return lines


def check_lines(outcome: Outcome, differences: "Differences", verify: bool,
                delete: bool) -> tuple[list[str], bool]:
    """--check's summary, and whether the target differs (what fails the check)."""
    counts, found = differences.counts, differences.studies
    pending = sum(ours for _, ours, _ in outcome.would_delete)
    differs = bool(outcome.missing or counts["different"] or outcome.failed
                   or outcome.verify_problems or outcome.unaccepted or (delete and pending))
    accepted = len(outcome.unreadable) - outcome.unaccepted
    lines = [f"Compared:      {study_count(outcome.studies_checked)} instance by instance, "
             f"{format_count(outcome.studies_skipped)} taken on trust (complete in an earlier "
             "run and untouched since; --recheck looks at them)",
             f"Missing:       {instance_count(outcome.missing)} the target lacks, in "
             f"{study_count(outcome.studies_missing)}"]
    lines.append(f"Unreadable:    {instance_count(len(outcome.unreadable))} the source "
                 "cannot serve as it received them, in "
                 f"{study_count(len({study for _, study, _, _ in outcome.unreadable}))}"
                 + (f" ({format_count(accepted)} accepted by --accept)" if accepted else ""))
    if verify:
        lines.append(f"Different:     {instance_count(counts['different'])} (compared as "
                     "Verified says)")
    lines.append(f"Only target:   {study_count(found['extra-study'])} and "
                 f"{instance_count(counts['extra'])} of studies both have"
                 + (f"; --delete would remove {instance_count(pending)}" if delete else ""))
    lines.append("Result:        " + ("the target differs from the source" if differs else
                                      (all_but_accepted(accepted) if accepted else
                                       "the target holds every instance of the source")
                                      + (" and nothing to delete" if delete else "")))
    return lines, differs


def plan_lines(outcome: Outcome, statistics: Optional[dict]) -> list[str]:
    """What the run starts from. `statistics`: the source's, when the whole of it is copied."""
    lines = [f"Studies {'found' if statistics else 'selected'} on the source: "
             f"{format_count(outcome.studies)}"]
    if statistics:
        # The source's statistics count every attachment, not only the DICOM files (older
        # Orthanc kept a JSON copy of each): a size of what the target holds would be a guess.
        lines.append(f"Source holds:  {instance_count(int(statistics['CountInstances']))}, "
                     f"{format_bytes(int(statistics['TotalUncompressedSize']))} stored")
    if outcome.studies_skipped:
        lines.append(f"Skipped:       {study_count(outcome.studies_skipped)} complete on the "
                     f"target ({instance_count(outcome.skipped_instances)}), untouched since an "
                     "earlier run (--recheck looks at them)")
    return lines


def link_report(copier: Copier, outcome: Outcome) -> dict:
    """What the run measured of the way to each server and chose from it."""
    def milliseconds(seconds: float) -> Optional[float]:
        return round(seconds * 1000, 2) if seconds != float("inf") else None
    return {"source_latency_ms": milliseconds(copier.source.latency),
            "target_latency_ms": milliseconds(copier.target.latency),
            "downloads_in_flight_max": copier.downloads_max,
            "uploads_now": copier.uploads.limit,
            "uploads_in_flight_max": copier.uploads.held_max,
            "uploads_why": copier.uploads.why,
            "checks_in_flight_max": outcome.checks_max,
            "studies_in_flight_max": outcome.studies_max,
            "archive_ratio": (round(copier.archive_ratio, 3)
                              if copier.archive_ratio is not None else None),
            "bundles": copier.bundles, "bundles_as_archives": copier.bundles_archived,
            "bytes_sent_again": copier.target.sent_again + copier.source.sent_again,
            "uploads_deflated": copier.uploads_deflated,
            "upload_ratio": (round(copier.upload_ratio, 3)
                             if copier.upload_ratio is not None else None)}


DIFFERENCES_HERE = "differences: copied from the spool"  # where the report's list goes


def report_record(config: Config, run: Run, elapsed: float) -> dict:
    """The JSON record of a run (but its options), as --report writes it."""
    outcome, context = run.outcome, run.context
    differences = run.mirror.differences if run.mirror is not None else None
    return {
        "tool": f"replicate.py {__version__}",
        "source": config.source.url,
        "target": config.target.url,
        "exit_status": outcome.exit_status,
        "error": outcome.error,
        "copied": outcome.copied,
        "skipped": outcome.already_there,
        "failed": [{"id": instance, "reason": reason} for instance, reason in outcome.failed],
        "bytes": outcome.copied_bytes,
        "seconds": round(elapsed, 3),
        "planned": {"studies": outcome.studies,
                    "selected": context is not None and context.selected is not None,
                    "studies_skipped": outcome.studies_skipped,
                    "studies_checked": outcome.studies_checked,
                    "instances": outcome.missing, "bytes": outcome.missing_bytes}
        if run.started else None,
        "vanished": outcome.vanished,
        "lost_studies": outcome.lost,
        "deleted": [{"study": study, "instances": ours, "kept": kept}
                    for study, ours, kept in outcome.deleted],
        "would_delete": [{"study": study, "instances": ours, "kept": kept}
                         for study, ours, kept in outcome.would_delete],
        "delete_refused": outcome.delete_refused,
        "check": None if differences is None else {
            "studies_compared": outcome.studies_checked,
            "studies_taken_on_trust": outcome.studies_skipped,
            "missing": outcome.missing, "different": differences.counts["different"],
            "unreadable": len(outcome.unreadable),
            "extra_instances": differences.counts["extra"],
            "extra_studies": differences.studies["extra-study"],
            "by_year": run.mirror.years.records() if run.mirror and run.mirror.years else None,
            "differences": DIFFERENCES_HERE},
        "unconfirmed": outcome.unconfirmed,
        "interrupted": outcome.interrupted,
        "metadata": {"written": outcome.metadata_written,
                     "problems": [{"id": resource, "reason": reason}
                                  for resource, reason in outcome.metadata_problems]},
        "verified": outcome.verified,
        "verified_by": {how: outcome.verified_by[how] for how in COMPARED},
        "unreadable": [{"id": instance, "study": study, "reason": reason, "accepted": accepted}
                       for instance, study, reason, accepted in outcome.unreadable],
        "reached": outcome.reached,  # --order: the StudyDate of the last study looked at
        "studies_not_found": outcome.not_found,
        "paused_seconds": round(outcome.paused, 1),
        # bytes per second in force at the end (null: no limit), with --bwlimit
        "bwlimit_in_force": context.copier.limiter.rate if context is not None
        and context.copier.limiter else None,
        "link": link_report(context.copier, outcome) if context is not None else None,
        "verify_problems": [{"id": instance, "reason": reason}
                            for instance, reason in outcome.verify_problems],
    }


def options_record(config: Config) -> dict:
    """The options of a run, as --report writes them: never a password or a header's value."""
    return {
        "threads": config.threads, "retries": config.policy.retries,
        "timeout": config.policy.timeout,
        "bwlimit": config.bwlimit.text if config.bwlimit else None,
        "ignore_errors": config.ignore_errors, "dry_run": config.dry_run,
        "verify": config.verify, "follow": config.follow, "metadata": config.metadata,
        "delete": config.delete, "max_delete": config.max_delete, "check": config.check,
        "query": config.query, "studies": config.studies, "order": config.order,
        "save": str(config.save),
        "status": None if config.status is None else f"{config.status[0]}:{config.status[1]}",
        "tls_verify": config.tls_verify if config.tls_verify is not True else True,
        # names only: a header's value may be a token
        "headers": {endpoint.role: [name for name, _ in endpoint.headers]
                    for endpoint in (config.source, config.target)},
        "client_certificates": {endpoint.role: endpoint.cert is not None
                                for endpoint in (config.source, config.target)},
    }


def write_report(path: Path, config: Config, run: Run, elapsed: float,
                 spool: bool = True) -> None:
    """The JSON record of a run, written whole through a temporary file renamed over it (a
    reader never sees half of one); --check's differences are copied from their spool, a
    study a line, at the end (not `spool`: while the run goes on, they are not listed)."""
    report = {**report_record(config, run, elapsed), "options": options_record(config)}
    differences = run.mirror.differences if run.mirror is not None and spool else None
    temporary = path.with_name(path.name + ".tmp")
    head, _, tail = (json.dumps(report, indent=2) + "\n").partition(
        json.dumps(DIFFERENCES_HERE))
    if not spool and tail:
        head, tail = head + json.dumps("listed when the run ends"), tail
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(head)
        if differences is not None:
            file.write("[" + ",".join("\n    " + record
                                      for record in differences.records()) + "\n  ]")
        file.write(tail)
    os.replace(temporary, path)


# ---- argument parsing -----------------------------------------------------------------------
def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type for whole numbers of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
        return value
    return parse


def percentage(text: str) -> float:
    """An argparse type for a share of 0 (excluded) to 100, with or without a % sign."""
    value = positive_float(text.rstrip("%"))
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text} is more than 100")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting,
    and never repeats a password or a header value in it (`secrets`, see secret_arguments)."""

    secrets: list[str] = []

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):  # name the options, not the values
            words = [word for word in message.split(":", 1)[1].split() if word.startswith("-")]
            message = ("unrecognized arguments: " + " ".join(words) + " (values not shown)"
                       if words else "unrecognized arguments (not shown)")
        for secret in sorted(self.secrets, key=len, reverse=True):
            message = message.replace(secret, "***")
        raise UsageError(f"{message} (see --help)")


EPILOG = """\
passwords, first found wins:
  --source-password / --target-password, then the environment variables
  REPLICATE_SOURCE_PASSWORD / REPLICATE_TARGET_PASSWORD, then the URL, then
  --password, then a prompt on the terminal if the server refuses "orthanc".

exit statuses:
  0    everything selected is on the target
  1    failures remain (instances named on stderr), the target deleted studies
       it had stored, --max-delete stopped the deletions, --check found a
       difference, or an unexpected error
  2    usage error: bad option value, malformed URL, the same server twice,
       unusable save file; or a target set to store nothing (ReadOnly) or to
       delete what it receives (a storage limit in "Recycle" mode)
  3    a server cannot be reached, refuses the credentials, or is not an Orthanc
  130  interrupted; the save file is consistent, run again to resume

examples:
  copy everything; the same command again resumes, or copies what arrived since:
    replicate.py http://old:8042 http://new:8042
  a password from the environment rather than the command line:
    REPLICATE_TARGET_PASSWORD=... replicate.py http://old:8042 http://admin@new:8042
  the cut-over: keep the new server a mirror, then prove it before the switch:
    replicate.py http://old:8042 http://new:8042 --follow --delete --max-delete 1000
    replicate.py http://old:8042 http://new:8042 --check --recheck --delete --csv diff.csv
  between sites: a proxy's API key, a client certificate, 2 MB/s by day only:
    replicate.py http://old:8042 https://pacs.site-b --target-header "api-key: env:KEY" \\
        --client-cert me.pem --client-key me.key --bwlimit "07:00,2M 20:00,off"
"""


def _setup_argparser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="replicate.py",
        description="Copy every instance of one Orthanc server to another through their REST "
                    "APIs, resumably. Run it again to resume or to pick up what arrived since.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source",
                        help="source Orthanc, http(s)://[user:password@]host:port[/prefix]")
    parser.add_argument("target", help="target Orthanc, same form")
    run = parser.add_argument_group("run")
    run.add_argument("--save", default="studies.list", metavar="FILE",
                     help="save file that records progress (default: studies.list)")
    run.add_argument("--threads", type=whole_number(1), default=None, metavar="N",
                     help="uploads at once, fixed, and the most file downloads in flight; "
                          f"without it, {Config.threads} uploads at first, then as many as the "
                          f"target's measured rate rewards (up to {UPLOADS_MAX}), and up to "
                          f"{FAR_REQUESTS_MAX} downloads and {CHECKS_MAX} study checks in "
                          f"flight as a distant link needs (default: {Config.threads})")
    run.add_argument("--ignore-errors", action="store_true",
                     help="go on after a failed instance and list failures at the end "
                          "(default: stop at the first); a target that cannot write files "
                          "stops the run anyway")
    run.add_argument("--retries", type=whole_number(0), default=8, metavar="N",
                     help="retries of a request after a connection error, timeout, 429 or 5xx, "
                          "with backoff up to 15 s (default: 8: 48 to 60 s of waiting)")
    run.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS",
                     help="seconds to wait for a server's answer (default: 60; listings "
                          "of a whole server may take up to 600)")
    run.add_argument("--verify", action="store_true",
                     help="after copying, compare every instance on both servers and name "
                          "each one missing or different: by the stored MD5s, or for one the "
                          "target re-encoded, by its tags and decoded pixels (default: off)")
    run.add_argument("--verify-sample", metavar="PERCENT", type=percentage, default=100.0,
                     help="with --verify, compare the decoded pixels of re-encoded instances "
                          "in this share of the studies only, the same ones on every run; "
                          "the others by their tags (default: 100)")
    run.add_argument("--accept", metavar="FILE", default=None,
                     help="accept as lost the instances FILE names, while the source cannot "
                          "serve them: a --report or --check --csv file (its unreadable "
                          "ones), or one instance ID or SOPInstanceUID a line (default: none)")
    run.add_argument("--recheck", action="store_true",
                     help="look at every study instance by instance, also those the save file "
                          "records complete and the source's change log shows untouched: "
                          "finds instances deleted from the target (default: off)")
    run.add_argument("--delete", action="store_true",
                     help="also remove from the target what this tool copied there and the "
                          "source no longer has: studies on every run, series and instances "
                          "with --recheck; never what reached the target otherwise (default: "
                          "off)")
    run.add_argument("--max-delete", type=whole_number(0), default=None, metavar="N",
                     help="with --delete, delete nothing and exit 1 when more than N "
                          "instances are to be deleted (default: no limit)")
    run.add_argument("--check", action="store_true",
                     help="compare only, writing nothing to the target or the save file: what "
                          "the target lacks, what differs (with --verify) and what it holds "
                          "beyond the source; exit 1 if anything is missing or different (with "
                          "--delete: or would be deleted) (default: off)")
    run.add_argument("-n", "--dry-run", action="store_true",
                     help="plan and print what would be copied; write nothing to the target or "
                          "the save file (default: off)")
    run.add_argument("--bwlimit", metavar="RATE", default=None,
                     help="total bytes per second sent to the target across all threads, like "
                          "512K, 10M, 1G (binary units), or a timetable by this machine's "
                          "clock, as rclone writes it: \"08:00,512K 19:00,off\" (512 KB/s by "
                          "day, no limit from 19:00 until 08:00); an entry may name a day "
                          "(Mon-07:00,...), and a RATE of pause sends no request at all to "
                          "either server until the next entry (default: no limit)")
    run.add_argument("--no-metadata", action="store_true",
                     help="do not copy user metadata, user attachments (index 1024-65535) "
                          "and labels (default: copy them)")
    run.add_argument("--follow", action="store_true",
                     help="after the copy, keep copying what arrives on the source, until "
                          "Ctrl-C (default: off)")
    run.add_argument("--poll", type=positive_float, default=2.0, metavar="SECONDS",
                     help="with --follow, seconds between looks at the source's change log "
                          "(default: 2)")
    select = parser.add_argument_group("selection (default: everything)")
    select.add_argument("--query", action="append", default=[], metavar="TAG=VALUE",
                        help="only studies matching this study-level tag, in Orthanc's find "
                             "syntax (StudyDate=20200101-20201231, ModalitiesInStudy=CT, "
                             "PatientName=DOE*); repeat to require several")
    select.add_argument("--study", action="append", default=[], metavar="ID",
                        help="this study too (Orthanc study ID or StudyInstanceUID), or @FILE: "
                             "the studies a file names, one a line (blank lines and # comments "
                             "ignored); repeatable. Studies the source lacks are named and "
                             "left out")
    select.add_argument("--order", choices=("newest", "oldest", "source"), default=None,
                        help="which studies go first: newest or oldest StudyDate (then "
                             "StudyTime) first, studies without a date last; or source: as "
                             "the source lists them (default: newest; with --study, the "
                             "order given)")
    output_report = parser.add_argument_group("report")
    output_report.add_argument("--report", metavar="FILE", default=None,
                               help="write a JSON summary of the run to FILE, every minute "
                                    "while it runs and at its end (default: none)")
    output_report.add_argument("--status", metavar="[ADDR:]PORT", default=None,
                               help="serve the run's page (/), Prometheus metrics (/metrics) "
                                    "and state (/status.json) on PORT of ADDR, read-only "
                                    "(default: off; ADDR 127.0.0.1)")
    output_report.add_argument("--csv", metavar="FILE", default=None,
                               help="with --check, every difference, one a line, to FILE for a "
                                    "spreadsheet (default: none)")
    tls = parser.add_argument_group("https")
    tls.add_argument("--ca-bundle", metavar="FILE", default=None,
                     help="PEM file of the certificate authorities to trust (default: the "
                          "system's)")
    tls.add_argument("--insecure", action="store_true",
                     help="do not check TLS certificates at all (default: check them)")
    tls.add_argument("--client-cert", metavar="FILE", default=None,
                     help="PEM client certificate for both servers, for a proxy or server that "
                          "asks for one; with the key in it, or in --client-key (default: none)")
    tls.add_argument("--client-key", metavar="FILE", default=None,
                     help="PEM private key of --client-cert, unencrypted (default: in the "
                          "certificate's file)")
    for role in ("source", "target"):
        tls.add_argument(f"--{role}-client-cert", metavar="FILE", default=None,
                         help=f"client certificate for the {role} only (default: --client-cert)")
        tls.add_argument(f"--{role}-client-key", metavar="FILE", default=None,
                         help="its key (default: --client-key)")
    auth = parser.add_argument_group("credentials")
    auth.add_argument("--username", default="orthanc",
                      help="user name for both servers (default: orthanc)")
    auth.add_argument("--password", default=None,
                      help="password for both servers (default: orthanc); prefer the "
                           "environment variables below")
    for role in ("source", "target"):
        auth.add_argument(f"--{role}-username", default=None, metavar="NAME",
                          help=f"user name for the {role} (default: --username)")
        auth.add_argument(f"--{role}-password", default=None, metavar="PASSWORD",
                          help=f"password for the {role} (default: REPLICATE_{role.upper()}"
                               "_PASSWORD, the URL, --password)")
    auth.add_argument("--header", action="append", default=[], metavar='"NAME: VALUE"',
                      help="an HTTP header for both servers, such as a proxy's API key or "
                           "token; the value may be env:VARIABLE (read from the environment) "
                           "or @FILE (read from a file), so that it is never on the command "
                           "line; repeatable; values are never printed or saved")
    for role in ("source", "target"):
        auth.add_argument(f"--{role}-header", action="append", default=[],
                          metavar='"NAME: VALUE"',
                          help=f"a header for the {role} only, same forms; repeatable")
    auth.add_argument("--no-prompt", action="store_true",
                      help="never ask for a password on the terminal (default: ask when a "
                           "server refuses and no password was given)")
    output = parser.add_argument_group("output")
    output.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or messages on stderr but errors; stdout keeps "
                             "the final summary (default: off)")
    output.add_argument("-v", "--verbose", action="store_true",
                        help="retries, decisions and tracebacks on stderr (default: off)")
    output.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def pick_cert(args: argparse.Namespace, role: str) -> Any:
    """The client certificate for one server, as requests takes it: a file, (file, key), or
    None."""
    cert = getattr(args, f"{role}_client_cert") or args.client_cert
    key = getattr(args, f"{role}_client_key") or args.client_key
    if key and not cert:
        raise UsageError(f"--{role}-client-key or --client-key without a certificate; add "
                         "--client-cert")
    for option, path in (("certificate", cert), ("key", key)):
        if path and not os.path.isfile(path):
            raise UsageError(f"client {option} {path}: no such file")
    return (cert, key) if key else cert


def parse_config(argv: Optional[list[str]], environ: dict) -> Config:
    parser = _setup_argparser()
    parser.secrets = secret_arguments(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    source, target = (
        replace(pick_credentials(role, getattr(args, role), getattr(args, f"{role}_username"),
                                 getattr(args, f"{role}_password"), args.username,
                                 args.password, environ),
                headers=pick_headers(args.header, getattr(args, f"{role}_header"), role,
                                     environ),
                cert=pick_cert(args, role))
        for role in ("source", "target"))
    if same_server(source.url, target.url):
        raise UsageError(f"source and target are the same server ({source.url}); "
                         "name two different servers")
    tls_verify: Any = True
    if args.ca_bundle:
        if not os.path.isfile(args.ca_bundle):
            raise UsageError(f"--ca-bundle {args.ca_bundle}: no such file")
        tls_verify = args.ca_bundle
    if args.insecure:
        if args.ca_bundle:
            raise UsageError("--insecure and --ca-bundle contradict each other; choose one")
        tls_verify = False
    report = Path(args.report) if args.report else None
    for option, path in (("--report", report), ("--csv", args.csv and Path(args.csv))):
        if path and not os.access(path.parent if str(path.parent) else ".", os.W_OK):
            raise UsageError(f"{option} {path}: cannot write in that folder")
    if args.csv and not args.check:
        raise UsageError("--csv goes with --check; add --check, or leave --csv out")
    if args.check and args.follow:
        raise UsageError("--check compares once and --follow copies on; choose one")
    if args.verify_sample != 100.0 and not args.verify:
        raise UsageError("--verify-sample goes with --verify; add --verify, or leave it out")
    if args.max_delete is not None and not args.delete:
        raise UsageError("--max-delete goes with --delete; add --delete, or leave it out")
    return Config(source=source, target=target, save=Path(args.save),
                  threads=args.threads or Config.threads, pace=args.threads is None,
                  dry_run=args.dry_run or args.check, query=parse_query(args.query),
                  studies=study_values(args.study),
                  order=args.order or ("source" if args.study else "newest"),
                  delete=args.delete, max_delete=args.max_delete,
                  check=args.check, csv=Path(args.csv) if args.csv else None,
                  bwlimit=parse_bwlimit(args.bwlimit) if args.bwlimit else None,
                  metadata=not args.no_metadata, report=report, follow=args.follow,
                  poll=args.poll, recheck=args.recheck,
                  ignore_errors=args.ignore_errors,
                  policy=RetryPolicy(retries=args.retries, timeout=args.timeout),
                  quiet=args.quiet, verbose=args.verbose, prompt=not args.no_prompt,
                  tls_verify=tls_verify, verify=args.verify,
                  verify_sample=args.verify_sample,
                  status=parse_status(args.status) if args.status else None,
                  accept=Accepted.read(Path(args.accept)) if args.accept else None)


def setup_logging(quiet: bool, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)


# ---- main -----------------------------------------------------------------------------------
def replicate(config: Config, stop: Optional[threading.Event] = None) -> Outcome:
    """Run one replication as `python replicate.py ...` would: the summary on stdout, errors
    on stderr, --report written. The outcome counts what happened; `exit_status` is the
    command's. `stop`, once set, interrupts it (main sets it on Ctrl-C and SIGTERM)."""
    started = time.monotonic()
    run = Run(config, stop or threading.Event())
    outcome = run.outcome
    try:
        run.execute()
    except Exception as error:
        if run.started:  # the copy may have begun: say what it did
            for line in summary_lines(outcome, time.monotonic() - started):
                print(line, flush=True)
        outcome.exit_status, outcome.error = error_status(error)
        return finish_report(config, run, time.monotonic() - started)
    elapsed = time.monotonic() - started
    differs = False
    lines = summary_lines(outcome, elapsed)
    differences = run.mirror.differences if run.mirror is not None else None
    if differences is not None:
        check, differs = check_lines(outcome, differences, config.verify, config.delete)
        years = run.mirror.years.lines() if run.mirror and run.mirror.years else []
        lines = check + years + [line for line in lines if line.startswith(
            ("Verified:", "Would delete:", "Elapsed:")
            + (("Failed:",) if outcome.failed else ()))]
    for line in lines:
        print(line, flush=True)
    for instance_id, problem in outcome.verify_problems:
        log.error("verify failed: instance %s: %s", instance_id, problem)
    if outcome.interrupted:
        log.error("%s: %s copied; run the same command again to %s",
                  "stopped following" if config.follow else "interrupted",
                  instance_count(outcome.copied),
                  "follow on" if config.follow else "resume")
        outcome.exit_status = EXIT_INTERRUPTED
    elif (outcome.failed or outcome.verify_problems or outcome.metadata_problems
          or outcome.lost or outcome.unconfirmed or outcome.delete_refused or differs
          or outcome.unaccepted):
        assert run.context is not None
        for line in failure_lines(outcome, run.context.target.system, config.ignore_errors):
            log.error("%s", line)
        outcome.exit_status = EXIT_FAILURES
    elif outcome.unreadable and differences is None:
        print(f"Result:        {all_but_accepted(len(outcome.unreadable))}", flush=True)
    return finish_report(config, run, elapsed)


def all_but_accepted(count: int) -> str:
    return (f"the target holds every instance of the source but {format_count(count)} "
            "accepted as unreadable on the source")


def failure_lines(outcome: Outcome, system: dict, ignore_errors: bool) -> list[str]:
    """What stderr says, at the end, of every kind of failure that remains."""
    lines = [outcome.delete_refused] if outcome.delete_refused else []
    if outcome.lost:
        lines.append(lost_line(outcome.lost, system))
    if outcome.too_large:
        lines.append(too_large_line(outcome.too_large))
    if outcome.unconfirmed:
        lines.append(f"could not confirm that the target kept what it stored "
                     f"({outcome.unconfirmed}); run the same command again")
    if outcome.target_full:
        lines.append(cannot_store_line(outcome.target_full, system))
    elif outcome.stopped_on_failure and not ignore_errors and outcome.failed:
        instance_id, reason = outcome.failed[0]
        lines.append(f"stopped at the first failure: {outcome.kind(instance_id)} {instance_id}: "
                     f"{reason} (--ignore-errors goes on)")
    elif outcome.stopped_on_failure and not ignore_errors:
        lines.append("stopped at the first instance the source cannot serve (--ignore-errors "
                     "goes on; --accept FILE accepts those the source has lost for good):")
    elif len(outcome.failed) > 1:
        lines.append(f"{instance_count(len(outcome.failed))} failed:")
        lines.extend(f"  {outcome.kind(instance_id)} {instance_id}: {reason}"
                     for instance_id, reason in outcome.failed)
    if outcome.unaccepted:
        if not (outcome.stopped_on_failure and not ignore_errors and not outcome.failed):
            lines.append(f"{instance_count(len(outcome.unreadable))} unreadable on the "
                         "source (--accept FILE accepts those it has lost for good):")
        lines.extend(unreadable_lines(outcome))
    return lines


def finish_report(config: Config, run: Run, elapsed: float) -> Outcome:
    """Write --report, if asked (exit status 1 if it cannot be written); then close --check's
    list of differences."""
    try:
        if config.report:
            write_report(config.report, config, run, elapsed)
    except OSError as problem:
        log.error("replicate.py: cannot write report %s: %s", config.report, problem.strerror)
        run.outcome.exit_status = run.outcome.exit_status or EXIT_FAILURES
    finally:
        if run.mirror is not None and run.mirror.differences is not None:
            run.mirror.differences.close()
    return run.outcome


def error_status(error: BaseException) -> tuple[int, str]:
    """Log the one line that says why an error ended the run (its traceback only with -v);
    return the exit status and that line."""
    code = EXIT_FAILURES
    if isinstance(error, (KeyboardInterrupt, Interrupted)):
        code, message = EXIT_INTERRUPTED, "interrupted; run the same command again to resume"
    elif isinstance(error, ReplicateError):
        code, message = error.exit_code, f"replicate.py: {error}"
    elif isinstance(error, Rejected):  # a target that renames what it stores
        message = f"replicate.py: stopped: {describe_error(error)}"
    elif not stops_run(error) or classify(error) == UNREACHABLE:  # a request's, at last
        code, message = EXIT_SERVER, f"replicate.py: {describe_error(error)}"
    else:  # an answer no Orthanc gives, or a bug
        stopped = isinstance(error, (Defect, UnexpectedAnswer))
        message = (f"replicate.py: {'stopped' if stopped else 'unexpected error'}: "
                   f"{describe_error(error)} (-v shows where; the save file is consistent, a "
                   "re-run resumes)")
    if code != EXIT_INTERRUPTED:
        log.debug("traceback:", exc_info=error)
    log.error("%s", message)
    return code, message


def fewer_malloc_arenas() -> None:
    """glibc gives each thread that allocates an arena of its own (up to 8 a core), each
    keeping what was freed in it: two hold the peak of many threads sending batches lower,
    at the same CPU. Only the command does this, and only where the C library has mallopt."""
    try:
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError, TypeError):
        pass


def main(argv: Optional[list[str]] = None) -> int:
    fewer_malloc_arenas()
    verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or \
        "--verbose" in (argv if argv is not None else sys.argv[1:])
    setup_logging(False, verbose)
    stop = threading.Event()
    replaced = interrupt_handlers(stop)
    try:
        config = parse_config(argv, dict(os.environ))
        setup_logging(config.quiet, config.verbose)
        if config.tls_verify is False:
            warnings.filterwarnings("ignore", message="Unverified HTTPS request")
            print("replicate.py: warning: --insecure: TLS certificates are not checked; anyone "
                  "on the path can read and change what is copied", file=sys.stderr)
        return replicate(config, stop).exit_status
    except (Exception, KeyboardInterrupt) as error:
        return error_status(error)[0]
    finally:
        stop.set()
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


def interrupt_handlers(stop: threading.Event) -> dict:
    """Make Ctrl-C (SIGINT) and SIGTERM set `stop` first, which every worker watches between
    blocks, requests and retries, then raise KeyboardInterrupt in the main thread. Returns
    the handlers replaced, to put back."""
    def interrupt(signum: int, frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt()
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Workers still blocked in a request must not hold the exit after an interruption; the
    # save file is already flushed line by line.
    os._exit(code) if code == EXIT_INTERRUPTED else sys.exit(code)
