"""Fixtures: real Orthanc servers on free ports in temp folders, and generated DICOM corpora."""

from __future__ import annotations

import http.server
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomgen import write_corpus  # noqa: E402
from orthanc import (MARIADB_SERVER, MYSQL_PLUGIN, NEW_ORTHANC_BINARY,  # noqa: E402
                     OLD_ORTHANC_BINARY, ORTHANC_BINARY, MariaDBServer, OrthancServer,
                     PostgresCluster)


T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if not os.path.exists(ORTHANC_BINARY):
        raise pytest.UsageError("Orthanc is not installed (apt-get install orthanc); "
                                "bash .ci/run installs everything the tests need")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """29 instances in 5 studies that exercise every transfer path: 24 small ones (archives
    built by the source), 4 of 33 KB (ZIPs built by the tool) and one of 2.6 MB (streamed)."""
    folder = tmp_path_factory.mktemp("corpus")
    return (write_corpus(folder / "small", 3, 2, 4, prefix="S")
            + write_corpus(folder / "medium", 1, 1, 4, rows=128, columns=128, prefix="M")
            + write_corpus(folder / "large", 1, 1, 1, rows=512, columns=512, frames=5,
                           prefix="L"))


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthanc servers on demand; all are stopped at the end of the test."""
    servers: list[OrthancServer] = []

    def make(name: str = "ORTHANC", **config: object) -> OrthancServer:
        server = OrthancServer(tmp_path / f"{name}-{len(servers)}", name, **config)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill() if server.process and server.process.poll() is None else None


@pytest.fixture
def source(make_server: Callable[..., OrthancServer], corpus: list[Path]) -> OrthancServer:
    server = make_server("SOURCE")
    server.upload(corpus)
    return server


@pytest.fixture
def target(make_server: Callable[..., OrthancServer]) -> OrthancServer:
    return make_server("TARGET")


def installed(binary: str) -> str:
    if not os.access(binary, os.X_OK):
        raise pytest.UsageError(f"{binary} is missing; bash .ci/run installs it")
    return binary


@pytest.fixture
def old_orthanc() -> str:
    """The binary of an older Orthanc (1.9.1), the kind of server a migration starts from."""
    return installed(OLD_ORTHANC_BINARY)


@pytest.fixture
def new_orthanc() -> str:
    """The binary of a newer Orthanc (1.12.7), the kind of server a migration goes to."""
    return installed(NEW_ORTHANC_BINARY)


def started_outside_tmp(prefix: str, start: Callable[[Path], T]) -> Iterator[T]:
    """A database server started in a folder outside pytest's root-only temp tree (it runs as
    its own user), stopped and removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(folder, 0o755)
    server = start(folder)
    yield server
    server.stop()  # type: ignore[attr-defined]
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster."""
    if not (shutil.which("runuser") and Path("/usr/lib/postgresql/15/bin/initdb").exists()):
        raise pytest.UsageError("PostgreSQL 15 is not installed; bash .ci/run installs it")
    yield from started_outside_tmp("replicate-pg-",
                                   lambda folder: PostgresCluster(folder / "cluster").start())


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """A throwaway MariaDB server, for an Orthanc index on MySQL."""
    if not (Path(MARIADB_SERVER).exists() and Path(MYSQL_PLUGIN).exists()):
        raise pytest.UsageError("MariaDB or Orthanc's MySQL plugin is not installed; "
                                "bash .ci/run installs them")
    yield from started_outside_tmp("replicate-mariadb-",
                                   lambda folder: MariaDBServer(folder / "server").start())


class _NotOrthanc(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"<html><body>a web server that is not Orthanc</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_orthanc() -> Iterator[str]:
    """A plain web server that answers 200 with HTML to everything."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotOrthanc)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
