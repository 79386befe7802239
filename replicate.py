#!/usr/bin/env python3
"""replicate.py: copy the whole content of one Orthanc server to another through their REST APIs.

usage: python replicate.py SOURCE TARGET [options]

SOURCE and TARGET are http(s)://[user:password@]host:port[/prefix]. Both servers keep running.
The tool lists what each server holds, plans the difference by Orthanc instance ID and copies
every instance the target lacks; nothing the target already has is sent again and nothing on the
target is touched. Interrupt it at any time and run the same command again to resume.

Exit statuses:
  0    everything selected is on the target
  1    failures remain (instances named on stderr), or an unexpected error
  2    usage error: bad option value, malformed URL, the same server twice, unusable save file
  3    a server cannot be reached, refuses the credentials, or is not an Orthanc
  130  interrupted (Ctrl-C); the save file is consistent, run again to resume
"""

from __future__ import annotations

import argparse
import getpass
import io
import json
import logging
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
import warnings
import zipfile
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Optional, TypeVar

import requests
import requests.adapters

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
PACED_BLOCK = 64 * 1024
LISTING_PAGE = 2000
LISTING_TIMEOUT = 600.0  # seconds to the first byte of an answer over the whole server
PROGRESS_LOG_SECONDS = 60.0  # without a terminal, a progress line in the log this often
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
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
# Orthanc's error codes about a stored file, which no retry mends: InexistentFile,
# FullStorage, CorruptedFile, FileStorageCannotWrite, RegularFileExpected (a missing file).
LASTING_ORTHANC_ERRORS = frozenset([13, 19, 20, 2001, 2006])
# The target's codes for "cannot write a file" (a full disk, most often): CannotWriteFile,
# FullStorage, FileStorageCannotWrite. Every instance after would fail the same way.
TARGET_CANNOT_STORE = frozenset([14, 19, 2001])

log = logging.getLogger("replicate")
T = TypeVar("T")


# ---- errors ---------------------------------------------------------------------------------
class ReplicateError(Exception):
    """An error that ends the run with a one-line message and the given exit status."""

    exit_code = EXIT_FAILURES


class UsageError(ReplicateError):
    exit_code = EXIT_USAGE


class ServerError(ReplicateError):
    exit_code = EXIT_SERVER


class Interrupted(Exception):
    """Raised inside workers and waits once a stop was asked for."""


class HttpStatusError(Exception):
    """A server answered with an HTTP error status."""

    def __init__(self, role: str, method: str, path: str, status: int, body: str) -> None:
        self.role, self.method, self.path, self.status = role, method, path, status
        self.orthanc_status: Optional[int] = None  # Orthanc's own error code, when it says
        detail = body
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and "OrthancStatus" in answer:
            self.orthanc_status = answer["OrthancStatus"]
            detail = str(answer.get("Details") or answer.get("Message") or "")
        detail = " ".join(detail.split())[:200]
        super().__init__(f"{role} answered HTTP {status} to {method} {path}"
                         + (f" ({detail})" if detail else ""))


class GaveUp(Exception):
    """A retryable operation that kept failing; the last cause is chained."""

    def __init__(self, cause: BaseException, attempts: int, what: str = "") -> None:
        self.cause, self.attempts, self.what = cause, attempts, what
        super().__init__(f"{describe_error(cause)} after {attempts} attempts")


# ---- small data classes ---------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """Where a server is and how to log in; `url` never holds credentials."""

    role: str
    url: str
    username: str
    password: str
    password_given: bool = True

    def with_password(self, password: str) -> "Endpoint":
        return Endpoint(self.role, self.url, self.username, password, True)


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
    bwlimit: Optional[float] = None  # bytes per second
    metadata: bool = True
    report: Optional[Path] = None
    follow: bool = False
    poll: float = 2.0


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
class Plan:
    source_instances: int
    source_bytes: int
    source_studies: int
    studies: dict[str, list[Instance]]  # study ID -> its missing instances, in source order
    vanished: int = 0
    # Studies listed before the instances: each one not in `studies` was complete on the target.
    listed_studies: list[str] = field(default_factory=list)
    source_ids: list[str] = field(default_factory=list)  # what --verify checks

    @property
    def missing(self) -> int:
        return sum(len(instances) for instances in self.studies.values())

    @property
    def present(self) -> int:
        """Source instances the target already had when the scan looked."""
        return self.source_instances - self.missing - self.vanished

    @property
    def missing_bytes(self) -> int:
        return sum(i.size for instances in self.studies.values() for i in instances)


@dataclass
class BatchResult:
    batch: Batch
    stored: list[Instance] = field(default_factory=list)
    already: list[Instance] = field(default_factory=list)
    failed: list[tuple[Instance, str]] = field(default_factory=list)
    vanished: list[Instance] = field(default_factory=list)
    target_full: Optional[str] = None  # why the target could not store a file, if it said so

    def fail(self, instance: Instance, error: BaseException) -> None:
        self.failed.append((instance, str(error)))
        if self.target_full is None and target_cannot_store(error):
            self.target_full = str(error)


@dataclass
class Outcome:
    copied: int = 0
    copied_bytes: int = 0
    already: int = 0
    vanished: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    stopped_on_failure: bool = False
    target_full: Optional[str] = None  # why the run stopped for the target's storage
    verified: Optional[int] = None  # instances --verify compared, None without --verify
    verify_problems: list[tuple[str, str]] = field(default_factory=list)
    metadata_written: int = 0
    metadata_problems: list[tuple[str, str]] = field(default_factory=list)


# ---- pure helpers ---------------------------------------------------------------------------
def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_count(count: int) -> str:
    return f"{count:,}"


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
        raise UsageError(f"--bwlimit {text!r} must be more than 0")
    return value * RATE_UNITS[unit]


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


def plan_copy(source_ids: Iterable[str], target_ids: set, details: dict[str, tuple[int, str]],
              series_study: dict[str, str], source_bytes: int, source_studies: int) -> Plan:
    """The difference by instance ID, grouped by study in source order.

    `details` maps each missing instance ID to (size, series); a missing ID without details
    vanished from the source during the scan and is counted, not copied.
    """
    studies: dict[str, list[Instance]] = {}
    count = vanished = 0
    for instance_id in source_ids:
        count += 1
        if instance_id in target_ids:
            continue
        detail = details.get(instance_id)
        study = series_study.get(detail[1]) if detail else None
        if detail is None or study is None:
            vanished += 1
            continue
        studies.setdefault(study, []).append(Instance(instance_id, study, detail[0]))
    return Plan(count, source_bytes, source_studies, studies, vanished)


def make_batches(instances: list[Instance], zip_upload: bool, archive_download: bool,
                 max_instances: int = BATCH_MAX_INSTANCES,
                 max_bytes: int = BATCH_MAX_BYTES) -> list[Batch]:
    """Cut instances (in study order) into batches: small ones into source-built archives, middle
    ones into bundles this tool zips, large ones (and everything when the target takes no
    ZIP uploads) one by one."""
    batches: list[Batch] = []
    open_batches: dict[str, Batch] = {}
    for instance in instances:
        if not zip_upload or instance.size >= STREAM_MIN_INSTANCE:
            batches.append(Batch("single", [instance]))
            continue
        mode = "archive" if archive_download and instance.size <= ARCHIVE_MAX_INSTANCE else "bundle"
        batch = open_batches.get(mode)
        if batch and (len(batch.instances) >= max_instances
                      or batch.size + instance.size > max_bytes):
            batch = None
        if batch is None:
            batch = open_batches[mode] = Batch(mode, [])
            batches.append(batch)
        batch.instances.append(instance)
    for batch in batches:
        if len(batch.instances) == 1:
            batch.mode = "single"
    return batches


def version_at_least(version: str, wanted: tuple[int, int, int]) -> bool:
    """Orthanc versions are like 1.10.1; 'mainline' and unknown forms count as recent."""
    try:
        numbers = tuple(int(part) for part in version.split(".")[:3])
    except ValueError:
        return True
    return numbers >= wanted


def is_retryable(error: BaseException) -> bool:
    """The one place that decides: connection trouble, timeouts, 408, 429 and 5xx are retried;
    TLS failures (a certificate is not trusted) and Orthanc's errors about a stored file
    (missing, corrupted, storage full) are not: waiting does not bring a file back."""
    if isinstance(error, HttpStatusError):
        if error.orthanc_status in LASTING_ORTHANC_ERRORS:
            return False
        return error.status in (408, 429) or error.status >= 500
    if isinstance(error, requests.exceptions.SSLError):
        return False
    return isinstance(error, (requests.ConnectionError, requests.Timeout,
                              requests.exceptions.ChunkedEncodingError,
                              requests.exceptions.ContentDecodingError, ConnectionError,
                              TimeoutError, TruncatedDownload))


def target_cannot_store(error: BaseException) -> bool:
    """Whether the target answered that it cannot write files, itself or after retries."""
    cause = error.cause if isinstance(error, GaveUp) else error
    return (isinstance(cause, HttpStatusError) and cause.role == "target"
            and cause.orthanc_status in TARGET_CANNOT_STORE)


def describe_error(error: BaseException) -> str:
    """A short reason without URLs (which could carry credentials) or tracebacks."""
    if isinstance(error, (HttpStatusError, GaveUp, TruncatedDownload, ReplicateError)):
        return str(error)
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, requests.ConnectionError):
        text = str(error)
        if "NameResolutionError" in text or "Failed to resolve" in text:
            return "unknown host name"
        for known in ("Connection refused", "Connection reset", "Name or service not known",
                      "Remote end closed connection", "certificate verify failed",
                      "No route to host", "Temporary failure in name resolution"):
            if known in text:
                return known.lower()
        return "connection failed"
    return f"{type(error).__name__}: {error}"


class TruncatedDownload(Exception):
    """An answer ended before its announced length, or was cut inside its headers."""


def require_framing(response: requests.Response) -> None:
    """Orthanc frames its answers with Content-Length, chunks, or `Connection: close` (its
    archives); one with none of them was cut inside its headers, and http.client would take
    an empty body for it."""
    headers = response.headers
    if "Content-Length" not in headers and \
            "chunked" not in headers.get("Transfer-Encoding", "").lower() and \
            headers.get("Connection", "").lower() != "close":
        response.close()
        raise TruncatedDownload("an answer was cut inside its headers")


def unless_missing(action: Callable[[], T]) -> Optional[T]:
    """The action's result, or None when the server answered 404 (the resource is not there)."""
    try:
        return action()
    except HttpStatusError as error:
        if error.status == 404:
            return None
        raise


def call_with_retries(action: Callable[[], T], what: str, policy: RetryPolicy,
                      stop: threading.Event) -> T:
    """Run `action`, retrying retryable errors with backoff; GaveUp chains the last cause."""
    attempt = 1
    while True:
        if stop.is_set():
            raise Interrupted()
        try:
            return action()
        except Interrupted:
            raise
        except Exception as error:
            if not is_retryable(error):
                raise
            if attempt > policy.retries:
                raise GaveUp(error, attempt, what) from error
            delay = policy.delay(attempt)
            log.debug("%s: %s (attempt %d/%d), retrying in %.1f s", what,
                      describe_error(error), attempt, policy.retries + 1, delay)
            if stop.wait(delay):
                raise Interrupted() from None
            attempt += 1


# ---- the Orthanc client ---------------------------------------------------------------------
class BlockAdapter(requests.adapters.HTTPAdapter):
    """Sends request bodies in blocks of CHUNK_SIZE rather than http.client's 16 KiB default:
    a 200 MB upload then takes 200 reads and writes instead of 12,800."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["blocksize"] = CHUNK_SIZE
        super().init_poolmanager(*args, **kwargs)


class OrthancClient:
    """One server. Each thread gets its own keep-alive requests session."""

    def __init__(self, endpoint: Endpoint, policy: RetryPolicy, stop: threading.Event,
                 tls_verify: Any = True) -> None:
        self.endpoint = endpoint
        self.tls_verify = tls_verify
        self.role = endpoint.role
        self.policy = policy
        self.stop = stop
        self.system: dict = {}
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = (self.endpoint.username, self.endpoint.password)
            # Orthanc 1.10 deflates every answer when asked to, which is slower than the network.
            session.headers["Accept-Encoding"] = "identity"
            session.headers["User-Agent"] = f"replicate.py/{__version__}"
            session.trust_env = False
            session.verify = self.tls_verify
            adapter = BlockAdapter(pool_maxsize=2)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def send(self, method: str, path: str, stream: bool = False,
             read_timeout: Optional[float] = None, **kwargs: Any) -> requests.Response:
        """One request, no retry; raises HttpStatusError on an error status."""
        timeout = (min(10.0, self.policy.timeout), read_timeout or self.policy.timeout)
        response = self.session().request(method, self.endpoint.url + path, timeout=timeout,
                                          stream=stream, allow_redirects=False, **kwargs)
        if response.status_code >= 300:
            # An error answer is short (Orthanc's is a small JSON); read at most 64 KiB of it.
            body = response.text if not stream else response.raw.read(
                65536, decode_content=True).decode("utf-8", "replace")
            response.close()
            raise HttpStatusError(self.role, method, path.split("?")[0], response.status_code,
                                  body)
        require_framing(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """A JSON request with retries."""
        def action() -> Any:
            response = self.send(method, path, **kwargs)
            try:
                return response.json()
            except ValueError:
                raise ServerError(f"{self.role} {self.endpoint.url} answered {method} {path} "
                                  "with something that is not JSON") from None
        return call_with_retries(action, f"{self.role} {method} {path.split('?')[0]}",
                                 self.policy, self.stop)

    def get(self, path: str) -> Any:
        return self.json("GET", path)

    def whole(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request over the whole server (every instance ID, a search), which Orthanc answers
        only once it has all of it: minutes for tens of millions of instances. It may wait
        LISTING_TIMEOUT for the first byte, if that is longer than --timeout."""
        return self.json(method, path, read_timeout=max(self.policy.timeout, LISTING_TIMEOUT),
                         **kwargs)

    def text(self, path: str) -> str:
        """A GET of a plain text answer, with retries."""
        return call_with_retries(lambda: self.send("GET", path).text.strip(),
                                 f"{self.role} GET {path}", self.policy, self.stop)

    def md5(self, instance_id: str) -> Optional[str]:
        """The MD5 Orthanc stored for the instance's DICOM file (of the uncompressed file,
        whatever StorageCompression says), or None when the instance is not there."""
        path = f"/instances/{instance_id}/attachments/dicom/md5"
        return unless_missing(lambda: self.text(path))

    def check(self) -> dict:
        """GET /system, turning every way it can fail into a one-line ServerError. Resets,
        timeouts and 5xx are retried like any request; a refused connection, an unknown host
        or a TLS failure are most likely a wrong URL and fail at once."""
        url = self.endpoint.url

        def ask() -> requests.Response:
            try:
                response = self.session().get(url + "/system", allow_redirects=False,
                                              timeout=(10, self.policy.timeout))
            except requests.exceptions.SSLError:
                raise
            except requests.ConnectionError as error:
                reason = describe_error(error)
                if reason in ("connection refused", "unknown host name",
                              "name or service not known"):
                    raise ServerError(f"cannot reach {self.role} {url}: {reason}") from error
                raise
            if response.status_code == 429 or response.status_code >= 500:
                raise HttpStatusError(self.role, "GET", "/system", response.status_code, "")
            if response.status_code == 200:
                require_framing(response)
            return response
        try:
            response = call_with_retries(ask, f"{self.role} GET /system", self.policy, self.stop)
        except requests.exceptions.SSLError as error:
            raise ServerError(f"cannot reach {self.role} {url}: TLS failed "
                              f"({describe_tls_error(error)}); see --ca-bundle and --insecure"
                              ) from error
        except (requests.RequestException, GaveUp, HttpStatusError) as error:
            raise ServerError(f"cannot reach {self.role} {url}: {describe_error(error)}"
                              ) from error
        if response.status_code in (401, 403):
            raise ServerError(f"{self.role} {url} refused the credentials of user "
                              f"{self.endpoint.username!r} (HTTP {response.status_code}); "
                              f"check --{self.role}-username/--{self.role}-password")
        try:
            system = response.json() if response.status_code == 200 else None
        except ValueError:
            system = None
        if not isinstance(system, dict) or "Version" not in system or "ApiVersion" not in system:
            raise ServerError(f"{self.role} {url} answers but is not an Orthanc server "
                              f"(GET /system gave HTTP {response.status_code}); check the URL")
        self.system = system
        return system

    @property
    def version(self) -> str:
        return str(self.system.get("Version", "?"))


def describe_tls_error(error: BaseException) -> str:
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return "certificate verify failed"
    if "WRONG_VERSION_NUMBER" in text:
        return "the server does not speak TLS on that port"
    return "handshake failed"


# ---- scanning -------------------------------------------------------------------------------
def parallel_map(function: Callable[[str], T], items: list[str], threads: int) -> Iterator[T]:
    """`function` over `items` on `threads` threads, results in order. Stopped early (Ctrl-C),
    it drops what has not started and waits for what has."""
    pool = ThreadPoolExecutor(max(1, threads))
    try:
        yield from pool.map(function, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def fetch_details(source: OrthancClient, wanted: Collection[str], total: Optional[int],
                  level: str, threads: int, read: Callable[[dict], T],
                  advance: Callable[[int], None] = lambda count: None) -> dict[str, T]:
    """Details of the `wanted` resources of a level: one paged expanded listing when they are
    many, one request each when they are few. Paging on SQLite is unstable while the server
    receives data, so whatever the pages missed is asked for one by one afterwards; a resource
    gone by then (404) is left out. `total` None: always one by one. `wanted` may map each ID
    to itself: the answer is then keyed by those strings rather than by a copy of each."""
    found: dict[str, T] = {}
    if total is not None and len(wanted) * DETAIL_ONE_BY_ONE_RATIO > total:
        since = 0
        while True:
            page = source.get(f"/{level}?expand&since={since}&limit={LISTING_PAGE}")
            before = len(found)
            for record in page:
                if record["ID"] in wanted:
                    key = wanted[record["ID"]] if isinstance(wanted, dict) else record["ID"]
                    found[key] = read(record)
            advance(len(found) - before)
            if len(page) < LISTING_PAGE:
                break
            since += LISTING_PAGE
    rest = [resource for resource in wanted if resource not in found]

    def one(resource: str) -> Optional[dict]:
        return unless_missing(lambda: source.get(f"/{level}/{resource}"))
    for resource, record in zip(rest, parallel_map(one, rest, threads)):
        if record is not None:
            found[resource] = read(record)
        advance(1)
    return found


def describe_instances(source: OrthancClient, wanted: Collection[str], total: Optional[int],
                       series_total: Optional[int], threads: int,
                       advance: Callable[[int], None] = lambda count: None
                       ) -> tuple[dict[str, tuple[int, str]], dict[str, str]]:
    """What the plan needs of the `wanted` instances: ID -> (size, series), and series ->
    study. `total` and `series_total` are the source's counts (None: one request each)."""
    series_ids: dict[str, str] = {}  # one string per series, not one copy per instance

    def size_and_series(record: dict) -> tuple[int, str]:
        series = record["ParentSeries"]
        return int(record["FileSize"]), series_ids.setdefault(series, series)
    details = fetch_details(source, wanted, total, "instances", threads, size_and_series,
                            advance)
    series_study = fetch_details(source, set(series_ids), series_total, "series", threads,
                                 lambda record: record["ParentStudy"])
    return details, series_study


def scan(source: OrthancClient, target: OrthancClient, threads: int,
         progress: Optional["Progress"] = None) -> Plan:
    """List both servers (one request each) and describe only what the target lacks."""
    progress = progress or Progress(False)
    statistics = source.get("/statistics")
    # the studies before the instances: see Plan.listed_studies
    listed_studies = source.whole("GET", "/studies")
    source_ids = source.whole("GET", "/instances")
    target_ids = set(target.whole("GET", "/instances"))
    # ID -> the same ID: the details are then keyed by these strings, not by copies of them
    missing = {instance: instance for instance in source_ids if instance not in target_ids}
    details: dict[str, tuple[int, str]] = {}
    series_study: dict[str, str] = {}
    if missing:
        log.debug("scan: %d instances missing on the target, asking for their details",
                  len(missing))
        progress.start(len(missing), "scanning")
        try:
            details, series_study = describe_instances(
                source, missing, len(source_ids), int(statistics.get("CountSeries", 0)),
                threads, progress.advance)
        finally:
            progress.finish()
    plan = plan_copy(source_ids, target_ids, details, series_study,
                     int(statistics.get("TotalUncompressedSize", 0)), len(listed_studies))
    plan.listed_studies = listed_studies
    plan.source_ids = source_ids
    return plan


def select_studies(source: OrthancClient, query: dict[str, str], studies: list[str]) -> list[str]:
    """Study IDs of the selection: those matching every --query tag, plus each --study."""
    selected: list[str] = []
    if query:
        selected = source.whole("POST", "/tools/find", json={
            "Level": "Study", "Query": query, "Expand": False})
    for study in studies:
        for found in find_study(source, study):
            if found not in selected:
                selected.append(found)
    return selected


def find_study(source: OrthancClient, study: str) -> list[str]:
    """The Orthanc IDs a --study value names: itself, or the studies with that StudyInstanceUID
    (one per patient that has it)."""
    if ORTHANC_ID.fullmatch(study):
        if unless_missing(lambda: source.get(f"/studies/{study}")) is not None:
            return [study]
    else:
        found = source.json("POST", "/tools/lookup", data=study.encode())
        ids = [record["ID"] for record in found if record.get("Type") == "Study"]
        if ids:
            return ids
    raise UsageError(f"--study {study}: no such study on the source (give an Orthanc study ID "
                     "or a StudyInstanceUID)")


def scan_selection(source: OrthancClient, target: OrthancClient, studies: list[str],
                   threads: int) -> Plan:
    """Like scan, for selected studies only: one request per study for their instances."""
    target_ids = set(target.whole("GET", "/instances"))

    def instances_of(study: str) -> list[dict]:  # none if deleted since it was selected
        return unless_missing(lambda: source.get(f"/studies/{study}/instances")) or []
    source_ids: list[str] = []
    details: dict[str, tuple[int, str]] = {}
    series_study: dict[str, str] = {}
    for study, records in zip(studies, parallel_map(instances_of, studies, threads)):
        for record in records:
            source_ids.append(record["ID"])
            details[record["ID"]] = (int(record["FileSize"]), record["ParentSeries"])
            series_study[record["ParentSeries"]] = study
    total = sum(size for size, _ in details.values())
    plan = plan_copy(source_ids, target_ids, details, series_study, total, len(studies))
    plan.listed_studies, plan.source_ids = studies, source_ids
    return plan


def read_changes(source: OrthancClient, since: int,
                 wanted: Callable[[dict], bool]) -> tuple[list[dict], int]:
    """The changes after `since` that `wanted` keeps, and the position of the last change.
    Filtered page by page: a first run reads the whole log, several records per instance."""
    changes: list[dict] = []
    position = since
    while True:
        page = source.get(f"/changes?since={position}&limit={CHANGES_PAGE}")
        changes.extend(change for change in page.get("Changes", []) if wanted(change))
        position = max([position, int(page.get("Last", position))] +
                       [int(change["Seq"]) for change in page.get("Changes", [])])
        if page.get("Done", True) or not page.get("Changes"):
            return changes, position


def is_metadata_change(change: dict) -> bool:
    """Metadata or attachments written through the API (Orthanc logs those writes as
    UpdatedMetadata and UpdatedAttachment; system metadata are not logged)."""
    return (change.get("ChangeType") in ("UpdatedMetadata", "UpdatedAttachment")
            and change.get("ResourceType") in LEVEL_PATHS)


def is_new_instance(change: dict) -> bool:
    return change.get("ChangeType") == "NewInstance"


def metadata_candidates(changes: list[dict]) -> set[tuple[str, str]]:
    """The resources whose metadata or attachments the changes say were written."""
    return {(change["ResourceType"], change["ID"]) for change in changes
            if is_metadata_change(change)}


def metadata_values(server: OrthancClient, path: str) -> dict[str, str]:
    """A resource's metadata, name -> value. Orthanc before 1.4 ignores ?expand and lists
    the names only: their values are then read one by one (system metadata are not)."""
    found = server.get(path + "/metadata?expand")
    if isinstance(found, dict):
        return found
    return {name: server.text(f"{path}/metadata/{name}") for name in found
            if name not in SYSTEM_METADATA}


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
    target's differ. Returns (items written, problems). A resource missing on either side is
    skipped: a missing instance is already reported as a failed copy."""
    path = f"/{LEVEL_PATHS[level]}/{resource}"
    try:
        wanted = metadata_values(source, path)
        present = metadata_values(target, path)
        attachments = user_attachments(source, path)
    except HttpStatusError as error:
        if error.status == 404:
            return 0, []
        raise
    written, problems = 0, []
    for name, value in wanted.items():
        if name in SYSTEM_METADATA or present.get(name) == value:
            continue
        try:
            target.send("PUT", f"{path}/metadata/{name}", data=value.encode("utf-8"))
            written += 1
        except HttpStatusError as error:
            problems.append(f"metadata {name!r} of {level.lower()} {resource}: {error} (does "
                            "the target declare it in UserMetadata?)")
    for name, target_name in attachments.items():
        expected = source.text(f"{path}/attachments/{name}/md5")
        found = unless_missing(lambda: target.text(f"{path}/attachments/{target_name}/md5"))
        if found == expected:
            continue
        data = source.send("GET", f"{path}/attachments/{name}/data").content
        try:
            target.send("PUT", f"{path}/attachments/{target_name}", data=data)
            written += 1
        except HttpStatusError as error:
            problems.append(f"attachment {name!r} of {level.lower()} {resource}: {error}"
                            + ("" if target_name.isdigit() else
                               " (does the target declare it in UserContentType?)"))
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
        ids = source.whole("POST", "/tools/find", json={
            "Level": level, "Query": {}, "Labels": labels, "LabelsConstraint": "Any"})
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
            target.send("PUT", f"{path}/labels/{label}")
            written += 1
        except HttpStatusError as error:
            problems.append(f"label {label!r} of {level.lower()} {resource}: {error}")
    return written, problems


def verify_copy(source: OrthancClient, target: OrthancClient, instance_ids: list[str],
                threads: int, progress: "Progress") -> tuple[int, int, list[tuple[str, str]]]:
    """Compare the MD5 that each server stored for every instance (no file is downloaded).
    Returns (instances checked, instances gone from the source, problems)."""
    def one(instance_id: str) -> tuple[Optional[str], Optional[str]]:
        expected = source.md5(instance_id)
        return expected, target.md5(instance_id) if expected is not None else None

    problems: list[tuple[str, str]] = []
    vanished = 0
    progress.start(len(instance_ids), "verifying")
    try:
        for instance_id, (expected, found) in zip(instance_ids,
                                                  parallel_map(one, instance_ids, threads)):
            progress.advance(1)
            if expected is None:
                vanished += 1
            elif found is None:
                problems.append((instance_id, "missing on the target"))
            elif found != expected:
                problems.append((instance_id, f"different on the target (MD5 {found}, "
                                              f"{expected} on the source)"))
    finally:
        progress.finish()
    return len(instance_ids) - vanished, vanished, problems


# ---- the journal (save file) ----------------------------------------------------------------
class Journal:
    """The save file: plain text, one record a line, appended and flushed as studies complete.

    First line: `replicate.py save file 1<TAB>source=URL<TAB>target=URL` (URLs without
    credentials). Then `study<TAB>ID<TAB>instances<TAB>bytes<TAB>time` for each study found
    complete on the target, with what this run sent of it; `meta<TAB>Level<TAB>ID` for each
    resource whose user metadata or attachments changed on the source; `changes<TAB>SEQ`, the
    position in the source's change log up to which those were read. A torn last line (a
    crash while writing) is dropped on open. The journal is a record of progress: the target's
    own listing decides what is copied.
    """

    def __init__(self, path: Path, source_url: str, target_url: str) -> None:
        self.path = path
        self.header = f"{SAVE_MAGIC}\tsource={source_url}\ttarget={target_url}"
        self.studies: dict[str, int] = {}
        self.position: Optional[int] = None  # the source's change log read up to here
        self.candidates: set[tuple[str, str]] = set()  # resources with user metadata changes
        self.file: Optional[io.TextIOWrapper] = None

    def open(self, read_only: bool = False) -> "Journal":
        """Read and check the save file; unless `read_only` (--dry-run), lock it for this run
        (a second run on the same file is refused, not mixed in) and open it to append."""
        if read_only:
            try:
                self._parse(self.path.read_bytes())
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
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UsageError(f"save file {self.path} is in use by another run of "
                                     "replicate.py; let it finish, or choose another --save"
                                     ) from None
            handle.seek(0)
            existing = handle.read()
            keep = self._parse(existing)
            if keep < len(existing):
                handle.truncate(keep)
            self.file = io.TextIOWrapper(handle, encoding="utf-8", newline="\n")
            if not keep:
                self._write([self.header])
        except OSError as error:
            handle.close()
            raise UsageError(f"cannot write save file {self.path}: {error.strerror}; "
                             "choose another --save") from error
        except BaseException:
            handle.close()
            raise
        return self

    def _parse(self, data: bytes) -> int:
        """Check the records and return how many bytes of `data` to keep (a torn tail goes)."""
        if not data.strip():
            return 0
        lines = data.split(b"\n")
        complete, torn = lines[:-1], lines[-1]
        try:
            header = complete[0].decode("utf-8") if complete else ""
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
        for number, raw in enumerate(complete[1:], start=2):
            try:
                kind, *values = raw.decode("utf-8").split("\t")
                if kind == "study" and len(values) >= 2:
                    self.studies[values[0]] = int(values[1])
                elif kind == "changes" and len(values) == 1:
                    self.position = int(values[0])
                elif kind == "meta" and len(values) == 2 and values[0] in LEVEL_PATHS:
                    self.candidates.add((values[0], values[1]))
                else:
                    raise ValueError(kind)
            except (UnicodeDecodeError, ValueError):
                raise UsageError(f"{self.path} line {number} is corrupt; fix or remove that "
                                 "line, or choose another --save") from None
        if torn:
            log.debug("save file: dropping a torn last line of %d bytes", len(torn))
        return len(data) - len(torn)

    def _write(self, lines: list[str]) -> None:
        """Append whole lines, then flush and fsync once for all of them."""
        if self.file is None or not lines:  # read-only (dry run), or nothing to say
            return
        try:
            self.file.write("".join(line + "\n" for line in lines))
            self.file.flush()
            os.fsync(self.file.fileno())
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

    def studies_done(self, records: list[tuple[str, int, int]]) -> None:
        """Record studies complete on the target: (study ID, instances sent, bytes sent)."""
        now = time.strftime('%Y-%m-%dT%H:%M:%S')
        self._write([f"study\t{study}\t{instances}\t{size}\t{now}"
                     for study, instances, size in records])
        self.studies.update((study, instances) for study, instances, _ in records)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---- the transfer engine --------------------------------------------------------------------
class RateLimiter:
    """Paces bytes to `rate` per second across all workers together. Each block is given the
    next free slot of the shared timeline (virtual scheduling), so the flow is smooth rather
    than bursty; at most `burst` seconds of idleness are made up for. The clock and the sleep
    are injected so tests need no real time."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = time.sleep, burst: float = 0.05) -> None:
        self.rate, self.clock, self.sleep, self.burst = rate, clock, sleep, burst
        self.next_free = clock()
        self.lock = threading.Lock()

    def take(self, count: int) -> None:
        with self.lock:
            now = self.clock()
            start = max(self.next_free, now - self.burst)
            self.next_free = start + count / self.rate
        if start > now:
            self.sleep(start - now)


class UploadBody:
    """A request body read in blocks with a known length (so requests sends a Content-Length
    and never holds it whole), paced by the rate limiter, stopping promptly when asked to."""

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
            raise TruncatedDownload(f"the source's answer ended after {self.sent} of "
                                    f"{self.length} bytes")
        if self.limiter is not None and data:
            self.limiter.take(len(data))
        return data


class Copier:
    """Moves batches from source to target. Runs in worker threads and only returns results."""

    def __init__(self, source: OrthancClient, target: OrthancClient, policy: RetryPolicy,
                 stop: threading.Event, limiter: Optional[RateLimiter] = None) -> None:
        self.source, self.target, self.policy, self.stop = source, target, policy, stop
        self.limiter = limiter

    def copy(self, batch: Batch) -> BatchResult:
        if batch.mode == "single":
            return self.copy_singles(batch, batch.instances)
        result = BatchResult(batch)
        what = f"copy of {len(batch.instances)} instances ({batch.instances[0].id} ...)"
        try:
            answers = call_with_retries(lambda: self.upload_zip(batch), what, self.policy,
                                        self.stop)
        except HttpStatusError as error:
            # A refused batch is retried instance by instance, so that the culprit is named.
            log.debug("%s: %s; copying them one by one", what, error)
            return self.copy_singles(batch, batch.instances)
        except GaveUp as error:
            for instance in batch.instances:
                result.fail(instance, error)
            return result
        unconfirmed = []
        for instance in batch.instances:
            status = answers.get(instance.id)
            if status == "Success":
                result.stored.append(instance)
            elif status == "AlreadyStored":
                result.already.append(instance)
            elif status:
                result.failed.append((instance, f"the target answered Status {status}"))
            else:
                unconfirmed.append(instance)
        if unconfirmed:
            # Answers for refused files may carry no ID; only one by one tells which and why.
            single = self.copy_singles(batch, unconfirmed)
            for name in ("stored", "already", "failed", "vanished"):
                getattr(result, name).extend(getattr(single, name))
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
            except HttpStatusError as error:
                if error.role == "source" and error.status == 404 and self.vanished(instance):
                    result.vanished.append(instance)
                else:
                    result.fail(instance, error)
                continue
            except GaveUp as error:
                result.fail(instance, error)
                continue
            status = answer.get("Status") if isinstance(answer, dict) else None
            if status in STORED_STATUSES and answer.get("ID") not in (None, instance.id):
                result.failed.append((instance, f"the target stored it as {answer.get('ID')} "
                                                "(does it transcode what it receives?)"))
            elif status == "Success":
                result.stored.append(instance)
            elif status == "AlreadyStored":
                result.already.append(instance)
            else:
                result.failed.append((instance, f"the target answered Status {status}"))
        return result

    def vanished(self, instance: Instance) -> bool:
        """Whether the source deleted the instance, rather than lost its file (which a storage
        plugin may also answer with 404): the first is no failure, the second is."""
        try:
            return unless_missing(lambda: self.source.get(f"/instances/{instance.id}")) is None
        except (GaveUp, HttpStatusError, requests.RequestException):
            return False  # cannot tell: reported as a failure, the safe side

    def stream_one(self, instance: Instance) -> Any:
        """GET the file and POST it as it arrives; memory stays at a few blocks."""
        download = self.source.send("GET", f"/instances/{instance.id}/file", stream=True)
        try:
            encoding = download.headers.get("Content-Encoding", "identity").lower()
            length = download.headers.get("Content-Length")
            if encoding == "identity" and length is not None:
                body: Any = UploadBody(download.raw.read, int(length), self.stop, self.limiter)
            else:  # a server that compresses anyway: decode, send chunked
                body = self.paced(download.iter_content(CHUNK_SIZE))
            upload = self.target.send("POST", "/instances", data=body,
                                      headers={"Content-Type": "application/dicom"})
            return upload.json()
        finally:
            download.close()

    def paced(self, blocks: Iterable[bytes]) -> Iterator[bytes]:
        for block in blocks:
            if self.limiter is not None:
                self.limiter.take(len(block))
            yield block

    def upload_zip(self, batch: Batch) -> dict[str, str]:
        """Send a batch as one ZIP; return instance ID -> Status from the target's answer."""
        ids = [instance.id for instance in batch.instances]
        if batch.mode == "archive":
            archive = self.source.send("POST", "/tools/create-archive",
                                       json={"Resources": ids}).content
        else:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:
                for instance_id in ids:
                    if self.stop.is_set():
                        raise Interrupted()
                    data = self.source.send("GET", f"/instances/{instance_id}/file").content
                    bundle.writestr(f"{instance_id}.dcm", data)
            archive = buffer.getvalue()
        body: Any = archive
        if self.limiter is not None:
            body = UploadBody(io.BytesIO(archive).read, len(archive), self.stop, self.limiter)
        answer = self.target.send("POST", "/instances", data=body,
                                  headers={"Content-Type": "application/zip"}).json()
        records = answer if isinstance(answer, list) else [answer]
        return {record["ID"]: record.get("Status", "") for record in records
                if isinstance(record, dict) and "ID" in record}


# ---- progress and the final report ----------------------------------------------------------
class Progress:
    """An alive-progress bar on stderr when it is a terminal; else, when `log_every` is given
    (a run under cron, nohup or systemd), a progress line in the log that often; else
    nothing."""

    def __init__(self, enabled: bool, log_every: Optional[float] = None) -> None:
        self.enabled, self.log_every = enabled, log_every
        self._context: Any = None
        self._bar: Any = None
        self._logging: Optional[dict] = None

    def start(self, total: int, title: str, unit: str = "", scale: Any = False) -> None:
        if not self.enabled:
            if self.log_every is not None:
                now = time.monotonic()
                self._logging = {"total": total, "title": title, "bytes": unit == "B",
                                 "done": 0, "started": now, "logged": now}
            return
        from alive_progress import alive_bar
        self._context = alive_bar(total, title=title, unit=unit, scale=scale, file=sys.stderr,
                                  enrich_print=False, receipt_text=True, dual_line=False)
        self._bar = self._context.__enter__()

    def advance(self, amount: int, text: str = "") -> None:
        if self._bar is not None:
            self._bar(amount)
            if text:
                self._bar.text(text)
        state = self._logging
        if state is not None and self.log_every is not None:
            state["done"] += amount
            now = time.monotonic()
            if now - state["logged"] >= self.log_every:
                state["logged"] = now
                log.info("%s %s", time.strftime("%H:%M:%S"), progress_line(
                    state["title"], state["done"], state["total"], state["bytes"],
                    now - state["started"], text))

    def finish(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = self._bar = None
        self._logging = None


def progress_line(title: str, done: float, total: float, in_bytes: bool, elapsed: float,
                  text: str = "") -> str:
    """'copying: 120/400 instances, 1.2 MB of 3.6 MB (33%), 1.0 MB/s, about 2 s left'"""
    show = format_bytes if in_bytes else format_count
    parts = [f"{title}:"]
    if text:
        parts.append(f"{text},")
    parts.append(f"{show(done)} of {show(total)}")
    if total > 0:
        parts[-1] += f" ({100 * done / total:.0f}%)"
    if done > 0 and elapsed > 0:
        rate = done / elapsed
        parts[-1] += ","
        parts.append(f"{show(rate)}/s," if in_bytes else f"{rate:,.0f}/s,")
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


def run_transfer(config: Config, plan: Plan, copier: Copier, journal: Journal,
                 progress: Progress, stop: threading.Event, outcome: Outcome) -> None:
    """Feed batches to the workers and count their results into `outcome` in this (the main)
    thread, which alone updates the counters, the progress bar and the journal. Counting into
    the caller's outcome, not a new one, means a Ctrl-C at any point leaves it counting every
    batch that was collected."""
    outcome.vanished += plan.vanished
    zip_upload = version_at_least(copier.target.version, (1, 8, 2))
    archive_download = version_at_least(copier.source.version, (1, 8, 2))
    # Batches may hold several studies (fewer, larger requests); a study is recorded in the
    # journal once every one of its instances landed.
    batches = make_batches([instance for instances in plan.studies.values()
                            for instance in instances], zip_upload, archive_download)
    study_left = {study: len(instances) for study, instances in plan.studies.items()}
    study_failed: set[str] = set()
    total, finished = plan.missing, 0
    pending = iter(batches)
    in_flight: dict[Future, Batch] = {}

    def collect(future: Future, batch: Batch) -> None:
        nonlocal finished
        try:
            result = future.result()
        except Interrupted:
            return
        except Exception as error:  # a bug or an unexpected answer: name the batch
            log.debug("worker error", exc_info=True)
            result = BatchResult(batch, failed=[(instance, describe_error(error))
                                                for instance in batch.instances])
        outcome.copied += len(result.stored)
        outcome.copied_bytes += sum(i.size for i in result.stored)
        outcome.already += len(result.already)
        outcome.vanished += len(result.vanished)
        for instance, reason in result.failed:
            outcome.failed.append((instance.id, reason))
            log.error("copy failed: instance %s (study %s): %s", instance.id,
                      instance.study, reason)
        study_failed.update(instance.study for instance, _ in result.failed)
        outcome.target_full = outcome.target_full or result.target_full
        complete = []
        for instance in (result.stored + result.already + result.vanished
                         + [instance for instance, _ in result.failed]):
            study = instance.study
            study_left[study] -= 1
            if study_left[study] == 0 and study not in study_failed:
                complete.append((study, len(plan.studies[study]),
                                 sum(i.size for i in plan.studies[study])))
        journal.studies_done(complete)
        finished += len(result.stored) + len(result.already) + len(result.failed)
        progress.advance(sum(i.size for i in result.stored + result.already),
                         f"{format_count(finished)}/{format_count(total)} instances")

    progress.start(plan.missing_bytes, "copying", unit="B", scale="SI")
    pool = ThreadPoolExecutor(config.threads, thread_name_prefix="copy")
    try:
        def fill() -> None:
            while len(in_flight) < config.threads * 2 and not stop.is_set():
                batch = next(pending, None)
                if batch is None:
                    return
                in_flight[pool.submit(copier.copy, batch)] = batch

        fill()
        while in_flight:
            done, _ = wait(list(in_flight), timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                collect(future, in_flight.pop(future))
            if outcome.target_full or (outcome.failed and not config.ignore_errors):
                outcome.stopped_on_failure = True  # submit no more; what is in flight lands
            if not outcome.stopped_on_failure:
                fill()
    except KeyboardInterrupt:
        outcome.interrupted = True
        stop.set()
        log.warning("interrupted: finishing the instances in flight (Ctrl-C again to quit now)")
        wait(list(in_flight), timeout=10)
        # What landed after the Ctrl-C is counted and journaled like the rest.
        for future in [future for future in in_flight if future.done()]:
            collect(future, in_flight.pop(future))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        progress.finish()


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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


EPILOG = """\
passwords, first found wins:
  --source-password / --target-password, then the environment variables
  REPLICATE_SOURCE_PASSWORD / REPLICATE_TARGET_PASSWORD, then the URL, then
  --password, then a prompt on the terminal if the server refuses "orthanc".

exit statuses:
  0    everything selected is on the target
  1    failures remain (instances named on stderr), or an unexpected error
  2    usage error: bad option value, malformed URL, the same server twice,
       unusable save file
  3    a server cannot be reached, refuses the credentials, or is not an Orthanc
  130  interrupted; the save file is consistent, run again to resume
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
    run.add_argument("--threads", type=whole_number(1), default=Config.threads, metavar="N",
                     help=f"parallel transfers (default: {Config.threads})")
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
                     help="after copying, compare every instance's stored MD5 on both servers "
                          "and name each one missing or different (default: off)")
    run.add_argument("-n", "--dry-run", action="store_true",
                     help="plan and print what would be copied; write nothing to the target or "
                          "the save file (default: off)")
    run.add_argument("--bwlimit", metavar="RATE", default=None,
                     help="total bytes per second sent to the target across all threads, like "
                          "512K, 10M, 1G (binary units) (default: no limit)")
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
                        help="this study too (Orthanc study ID or StudyInstanceUID); repeatable")
    output_report = parser.add_argument_group("report")
    output_report.add_argument("--report", metavar="FILE", default=None,
                               help="write a JSON summary of the run to FILE (default: none)")
    tls = parser.add_argument_group("https")
    tls.add_argument("--ca-bundle", metavar="FILE", default=None,
                     help="PEM file of the certificate authorities to trust (default: the "
                          "system's)")
    tls.add_argument("--insecure", action="store_true",
                     help="do not check TLS certificates at all (default: check them)")
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


def parse_config(argv: Optional[list[str]], environ: dict) -> Config:
    args = _setup_argparser().parse_args(argv)
    source = pick_credentials("source", args.source, args.source_username, args.source_password,
                              args.username, args.password, environ)
    target = pick_credentials("target", args.target, args.target_username, args.target_password,
                              args.username, args.password, environ)
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
    if report is not None and not os.access(report.parent if str(report.parent) else ".",
                                            os.W_OK):
        raise UsageError(f"--report {report}: cannot write in that folder")
    return Config(source=source, target=target, save=Path(args.save), threads=args.threads,
                  dry_run=args.dry_run, query=parse_query(args.query), studies=args.study,
                  bwlimit=parse_rate(args.bwlimit) if args.bwlimit else None,
                  metadata=not args.no_metadata, report=report, follow=args.follow,
                  poll=args.poll,
                  ignore_errors=args.ignore_errors,
                  policy=RetryPolicy(retries=args.retries, timeout=args.timeout),
                  quiet=args.quiet, verbose=args.verbose, prompt=not args.no_prompt,
                  tls_verify=tls_verify, verify=args.verify)


def setup_logging(quiet: bool, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)


# ---- main -----------------------------------------------------------------------------------
def connect(endpoint: Endpoint, config: Config, stop: threading.Event) -> OrthancClient:
    """A checked client; asks for the password on a terminal if the server refuses the default."""
    client = OrthancClient(endpoint, config.policy, stop, config.tls_verify)
    try:
        client.check()
    except ServerError as error:
        if not ("refused the credentials" in str(error) and config.prompt
                and not endpoint.password_given and sys.stdin.isatty()):
            raise
        client.close()
        password = getpass.getpass(f"password for {endpoint.username} on {endpoint.url}: ")
        client = OrthancClient(endpoint.with_password(password), config.policy, stop,
                               config.tls_verify)
        client.check()
    return client


def summary_lines(plan: Optional[Plan], outcome: Outcome, elapsed: float) -> list[str]:
    rate = outcome.copied_bytes / elapsed if elapsed > 0 else 0
    present = plan.present if plan else 0
    lines = [
        f"Copied:        {format_count(outcome.copied)} instances, "
        f"{format_bytes(outcome.copied_bytes)} ({format_bytes(rate)}/s)",
        f"Already there: {format_count(present + outcome.already)} instances",
        f"Failed:        {format_count(len(outcome.failed))} instances",
    ]
    if outcome.metadata_written or outcome.metadata_problems:
        lines.append(f"Metadata:      {format_count(outcome.metadata_written)} items copied, "
                     f"{format_count(len(outcome.metadata_problems))} problems")
    if outcome.verified is not None:
        lines.append(f"Verified:      {format_count(outcome.verified)} instances, "
                     f"{format_count(len(outcome.verify_problems))} missing or different")
    if outcome.vanished:
        lines.append(f"Vanished:      {format_count(outcome.vanished)} instances deleted from "
                     "the source during the run")
    lines.append(f"Elapsed:       {elapsed:.1f} s")
    return lines


def plan_lines(plan: Plan, selected: bool) -> list[str]:
    studies = len(plan.studies)
    return [
        f"Studies {'selected' if selected else 'found'} on the source: "
        f"{format_count(plan.source_studies)}",
        # The source's statistics count every attachment, not only the DICOM files (older
        # Orthanc kept a JSON copy of each): a size of what the target holds would be a guess.
        f"Source holds:  {format_count(plan.source_instances)} instances, "
        f"{format_bytes(plan.source_bytes)} stored",
        f"On the target: {format_count(plan.present)} of them already",
        f"To transfer:   {format_count(plan.missing)} instances in {format_count(studies)} "
        f"{'study' if studies == 1 else 'studies'}, {format_bytes(plan.missing_bytes)}",
    ]


class Run:
    """One invocation: the two servers, the save file, and what happened so far."""

    def __init__(self, config: Config, stop: threading.Event) -> None:
        self.config, self.stop = config, stop
        self.say: Callable[[str], None] = (lambda text: None) if config.quiet else \
            (lambda text: print(text, flush=True))
        terminal = sys.stderr.isatty()
        self.progress = Progress(not config.quiet and terminal,
                                 None if config.quiet or terminal else PROGRESS_LOG_SECONDS)
        self.outcome = Outcome()
        self.plan: Optional[Plan] = None
        self.selected: Optional[list[str]] = None

    def execute(self) -> None:
        config = self.config
        self.source = source = connect(config.source, config, self.stop)
        self.target = target = connect(config.target, config, self.stop)
        self.journal = journal = Journal(config.save, config.source.url,
                                         config.target.url).open(read_only=config.dry_run)
        limiter = RateLimiter(config.bwlimit) if config.bwlimit else None
        self.copier = Copier(source, target, config.policy, self.stop, limiter)
        background = ThreadPoolExecutor(1, thread_name_prefix="changes")
        try:
            self.say(f"Source:        {config.source.url} (Orthanc {source.version})")
            self.say(f"Target:        {config.target.url} (Orthanc {target.version})")
            if journal.studies:
                self.say(f"Save file:     {config.save}: {format_count(len(journal.studies))} "
                         "studies completed by earlier runs")
            if config.query or config.studies:
                self.selected = select_studies(source, config.query, config.studies)
            # Read before the listings: whatever arrives later is in the change log after it.
            follow_from = int(source.get("/changes?last").get("Last", 0)) if config.follow else 0
            if self.selected is None:
                self.plan = plan = scan(source, target, config.threads, self.progress)
            else:
                self.plan = plan = scan_selection(source, target, self.selected, config.threads)
            for line in plan_lines(plan, self.selected is not None):
                self.say(line)
            if config.dry_run:
                self.say("Dry run:       nothing was written to the target or the save file")
                return
            # The change log is read while the instances travel: on a first run it is several
            # records per instance, all to be read before the metadata can be synced.
            reading = background.submit(read_changes, source, journal.position or 0,
                                        is_metadata_change) if config.metadata else None
            outcome = self.outcome
            run_transfer(config, plan, self.copier, journal, self.progress, self.stop, outcome)
            if outcome.interrupted:
                return
            if not outcome.failed:
                journal.studies_done([(study, 0, 0) for study in plan.listed_studies
                                      if study not in journal.studies
                                      and study not in plan.studies])
            if reading is not None:
                self.copy_metadata(*reading.result())
                self.copy_labels()
            if config.verify:
                checked, gone, outcome.verify_problems = verify_copy(
                    source, target, plan.source_ids, config.threads, self.progress)
                outcome.verified, outcome.vanished = checked, outcome.vanished + gone
            if config.follow and not outcome.target_full and not (
                    outcome.failed and not config.ignore_errors):
                self.follow(follow_from, set(plan.source_ids))
        except KeyboardInterrupt:
            self.outcome.interrupted = True
            self.stop.set()
        finally:
            background.shutdown(wait=False, cancel_futures=True)
            journal.close()
            source.close()
            target.close()

    def in_selection(self, level: str, resource: str) -> bool:
        if self.selected is None:
            return True
        try:
            if level == "Study":
                return resource in self.selected
            if level == "Patient":
                studies = self.source.get(f"/patients/{resource}")["Studies"]
                return bool(set(studies) & set(self.selected))
            record = self.source.get(f"/{LEVEL_PATHS[level]}/{resource}/study")
            return record["ID"] in self.selected
        except HttpStatusError as error:
            if error.status == 404:
                return False
            raise

    def copy_metadata(self, changes: list[dict], position: int, every_known: bool = True) -> None:
        """Record the changes read up to `position`, then sync every resource known to carry
        user metadata or attachments, or (`every_known` False, a --follow look) only those the
        changes name: the others were synced by the first pass. The candidates are saved with
        the position, so a crash before the sync costs nothing: the next run syncs them."""
        fresh = metadata_candidates(changes)
        self.journal.changes_read(position, fresh)
        candidates = sorted(candidate for candidate in
                            (self.journal.candidates if every_known else fresh)
                            if self.in_selection(*candidate))
        self.sync_each(candidates, sync_metadata, "metadata")

    def copy_labels(self) -> None:
        """Add on the target the labels (Orthanc 1.12+) of every labelled resource. Orthanc
        logs no change for labels: each run asks for all of them, 5 requests, then 2 for each
        labelled resource."""
        labelled = [candidate for candidate in labelled_resources(self.source)
                    if self.in_selection(*candidate)]
        if labelled and not self.target.system.get("HasLabels"):
            problem = (f"{len(labelled)} resources carry labels on the source, but the target "
                       f"(Orthanc {self.target.version}) cannot store labels (Orthanc 1.12 or "
                       "newer can, on an index that supports them); they were not copied")
            self.outcome.metadata_problems.append(("labels", problem))
            log.error("metadata failed: %s", problem)
            return
        self.sync_each(labelled, sync_labels, "labels")

    def sync_each(self, resources: list[tuple[str, str]],
                  sync: Callable[[OrthancClient, OrthancClient, str, str], tuple[int, list[str]]],
                  what: str) -> None:
        """Run `sync` on every (level, ID), with retries. Each worker counts what it wrote
        as soon as it is written, so that a Ctrl-C at any moment leaves the count true."""
        lock = threading.Lock()

        def one(resource: tuple[str, str]) -> None:
            written, problems = call_with_retries(
                lambda: sync(self.source, self.target, *resource),
                f"{what} of {resource[0].lower()} {resource[1]}", self.config.policy, self.stop)
            with lock:
                self.outcome.metadata_written += written
                self.outcome.metadata_problems.extend((resource[1], problem)
                                                      for problem in problems)
            for problem in problems:
                log.error("metadata failed: %s", problem)
        for _ in parallel_map(one, resources, self.config.threads):
            pass

    def follow(self, position: int, known: set[str]) -> None:
        """Copy what arrives on the source until Ctrl-C, polling its change log. A server that
        stays out of reach through all the retries of a look is waited for, from the same
        position: a follow left running for days outlives a restart of either server."""
        log.info("following the source's changes from position %d (Ctrl-C stops)", position)
        while not self.stop.wait(self.config.poll):
            try:
                next_position = self.follow_once(position, known)
            except GaveUp as error:
                log.warning("%s: %s: %s; looking again in %g s", time.strftime("%H:%M:%S"),
                            error.what, error, self.config.poll)
                continue
            if next_position is None:
                return
            position = next_position
            known.clear()  # only a look that failed half way leaves anything to skip next time

    def follow_once(self, position: int, known: set[str]) -> Optional[int]:
        """One look at the change log: copy the instances that arrived since `position` and
        sync the metadata. The new position, or None when following must stop."""
        config, outcome = self.config, self.outcome
        changes, last = read_changes(self.source, position, lambda change: (
            is_new_instance(change) or (config.metadata and is_metadata_change(change))))
        arrived = [change["ID"] for change in changes
                   if is_new_instance(change) and change["ID"] not in known]
        if arrived:
            if config.query:
                self.selected = select_studies(self.source, config.query, config.studies)
            details, series_study = describe_instances(self.source, set(arrived), None, None,
                                                       config.threads)
            plan = plan_copy(arrived, set(), details, series_study, 0, 0)
            if self.selected is not None:
                chosen = set(self.selected)
                plan.studies = {study: instances for study, instances in plan.studies.items()
                                if study in chosen}
            self.target.get("/system")  # a target out of reach fails the look, not the copies
            known.update(arrived)  # should the rest of this look fail, they are not sent twice
            before = outcome.copied, outcome.copied_bytes, len(outcome.failed)
            run_transfer(config, plan, self.copier, self.journal, Progress(False), self.stop,
                         outcome)
            copied, copied_bytes, failed = (outcome.copied - before[0],
                                            outcome.copied_bytes - before[1],
                                            len(outcome.failed) - before[2])
            if copied or failed:
                log.info("%s: copied %d new instances (%s), %d failed",
                         time.strftime("%H:%M:%S"), copied, format_bytes(copied_bytes), failed)
            if outcome.interrupted or outcome.target_full or (failed and not config.ignore_errors):
                return None
        if config.metadata:
            self.copy_metadata(changes, last, every_known=False)
        else:
            self.journal.changes_read(last, ())
        return last


def write_report(path: Path, config: Config, run: Run, elapsed: float, code: int,
                 error: Optional[str] = None) -> None:
    """The JSON record of a run, written whole (through a temporary file) at its end.
    `error`: the line that says why an error ended the run, if one did."""
    outcome, plan = run.outcome, run.plan
    report = {
        "tool": f"replicate.py {__version__}",
        "source": config.source.url,
        "target": config.target.url,
        "exit_status": code,
        "error": error,
        "copied": outcome.copied,
        "skipped": (plan.present if plan else 0) + outcome.already,
        "failed": [{"id": instance, "reason": reason} for instance, reason in outcome.failed],
        "bytes": outcome.copied_bytes,
        "seconds": round(elapsed, 3),
        "planned": {"instances": plan.missing, "bytes": plan.missing_bytes,
                    "source_instances": plan.source_instances} if plan else None,
        "vanished": outcome.vanished,
        "interrupted": outcome.interrupted,
        "metadata": {"written": outcome.metadata_written,
                     "problems": [{"id": resource, "reason": reason}
                                  for resource, reason in outcome.metadata_problems]},
        "verified": outcome.verified,
        "verify_problems": [{"id": instance, "reason": reason}
                            for instance, reason in outcome.verify_problems],
        "options": {
            "threads": config.threads, "retries": config.policy.retries,
            "timeout": config.policy.timeout, "bwlimit": config.bwlimit,
            "ignore_errors": config.ignore_errors, "dry_run": config.dry_run,
            "verify": config.verify, "follow": config.follow, "metadata": config.metadata,
            "query": config.query, "studies": config.studies, "save": str(config.save),
            "tls_verify": config.tls_verify if config.tls_verify is not True else True,
        },
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def replicate(config: Config, stop: threading.Event) -> int:
    started = time.monotonic()
    run = Run(config, stop)
    try:
        run.execute()
    except Exception as error:
        elapsed = time.monotonic() - started
        if run.plan is not None:  # the copy may have begun: say what it did
            for line in summary_lines(run.plan, run.outcome, elapsed):
                print(line, flush=True)
        code, message = error_status(error)
        return finish_report(config, run, elapsed, code, message)
    elapsed = time.monotonic() - started
    outcome = run.outcome
    for line in summary_lines(run.plan, outcome, elapsed):
        print(line, flush=True)
    for instance_id, problem in outcome.verify_problems:
        log.error("verify failed: instance %s: %s", instance_id, problem)
    if outcome.interrupted:
        log.error("%s: %d instances copied; run the same command again to %s",
                  "stopped following" if config.follow else "interrupted", outcome.copied,
                  "follow on" if config.follow else "resume")
        code = EXIT_INTERRUPTED
    elif outcome.failed or outcome.verify_problems or outcome.metadata_problems:
        if outcome.target_full:
            log.error("stopped: the target cannot store files (%s); is its disk full? Make room, "
                      "then run the same command again", outcome.target_full)
        elif outcome.stopped_on_failure and not config.ignore_errors:
            instance_id, reason = outcome.failed[0]
            log.error("stopped at the first failure: instance %s: %s (--ignore-errors goes on)",
                      instance_id, reason)
        elif len(outcome.failed) > 1:
            log.error("%d instances failed:", len(outcome.failed))
            for instance_id, reason in outcome.failed:
                log.error("  instance %s: %s", instance_id, reason)
        code = EXIT_FAILURES
    else:
        code = EXIT_OK
    return finish_report(config, run, elapsed, code, None)


def finish_report(config: Config, run: Run, elapsed: float, code: int,
                  error: Optional[str]) -> int:
    """Write --report, if asked; return the exit status (1 if the report cannot be written)."""
    if config.report:
        try:
            write_report(config.report, config, run, elapsed, code, error)
        except OSError as problem:
            log.error("replicate.py: cannot write report %s: %s", config.report,
                      problem.strerror)
            code = code or EXIT_FAILURES
    return code


def error_status(error: BaseException) -> tuple[int, str]:
    """Log the one line that says why an error ended the run (its traceback only with -v);
    return the exit status and that line."""
    code = EXIT_FAILURES
    if isinstance(error, (KeyboardInterrupt, Interrupted)):
        code, message = EXIT_INTERRUPTED, "interrupted; run the same command again to resume"
    elif isinstance(error, ReplicateError):
        code, message = error.exit_code, f"replicate.py: {error}"
    elif isinstance(error, (GaveUp, HttpStatusError, requests.RequestException)):
        code, message = EXIT_SERVER, f"replicate.py: {describe_error(error)}"
    else:  # a bug, or an answer no Orthanc gives
        message = (f"replicate.py: unexpected error: {describe_error(error)} (-v shows where; "
                   "the save file is consistent, a re-run resumes)")
    if code != EXIT_INTERRUPTED:
        log.debug("traceback:", exc_info=error)
    log.error("%s", message)
    return code, message


def main(argv: Optional[list[str]] = None) -> int:
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
        return replicate(config, stop)
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
