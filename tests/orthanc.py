"""Real Orthanc servers (Debian's `orthanc` package) for the tests and the benchmark.

Each server runs in its own temporary folder on free ports. PostgreSQL clusters for an index
on PostgreSQL are started the same way, as the `postgres` user, since PostgreSQL refuses root.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import requests

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
# Debian 11's and Debian 13's, installed by .ci/other-orthancs
OLD_ORTHANC_BINARY = "/opt/orthanc-1.9.1/Orthanc"
NEW_ORTHANC_BINARY = "/opt/orthanc-1.12.7/Orthanc"
POSTGRESQL_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRESQL_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"
MYSQL_PLUGIN = "/usr/share/orthanc/plugins/libOrthancMySQLIndex.so"
MARIADB_SERVER = "/usr/sbin/mariadbd"
USER, PASSWORD = "user", "password"


def ephemeral_ports() -> tuple[int, int]:
    """The range the system takes the local ports of outgoing connections from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


PORTS_FROM = 10000
_handed: set[int] = set()
_next = [0]
_ports_lock = threading.Lock()


def free_port() -> int:
    """A port for a server of the tests: never one handed out before in this test run, free
    when asked, and below the range of ephemeral ports, so that no outgoing connection (the
    tool's, a server's) takes it between now and the server's start. Runs side by side begin
    at places drawn from their process IDs."""
    low, _ = ephemeral_ports()
    span = max(1000, low - PORTS_FROM)
    with _ports_lock:
        if not _next[0]:
            _next[0] = random.Random(os.getpid()).randrange(span)
        for _ in range(span):
            port = PORTS_FROM + _next[0] % span
            _next[0] += 1
            if port in _handed:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed.add(port)
            return port
    raise RuntimeError("no free port left below the ephemeral range")


def listens(port: int) -> bool:
    """Whether something accepts connections on that port of 127.0.0.1."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_until_ready(process: subprocess.Popen, ready: Callable[[], bool], what: str,
                     seconds: float, log: Callable[[], str]) -> None:
    """Poll `ready` until it holds; a process that exits first, or one not ready in time,
    raises with the end of its log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited at start: {log()}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready in {seconds:.0f} s: {log()}")


def stop_gently(process: Optional[subprocess.Popen], signum: int, seconds: float) -> None:
    """Ask a process to stop with `signum`; kill it if it has not within `seconds`."""
    if process and process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class OrthancServer:
    """One Orthanc process with its own storage; can be stopped, killed and started again."""

    def __init__(self, folder: Path, name: str = "ORTHANC", users: Optional[dict] = None,
                 file_size_limit: Optional[int] = None, binary: str = ORTHANC_BINARY,
                 **config: Any) -> None:
        self.folder = folder
        self.binary = binary
        # Files larger than this cannot be written, as on a full disk (RLIMIT_FSIZE, SIGXFSZ
        # ignored: a write past the limit fails with EFBIG instead of killing the server).
        self.file_size_limit = file_size_limit
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.users = {USER: PASSWORD} if users is None else users
        self.port = free_port()
        self.config = {
            "Name": name,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.port,
            "DicomPort": free_port(),
            "DicomAet": name[:16],
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": True,
            "RegisteredUsers": self.users,
            "Plugins": [],
            "HttpCompressionEnabled": True,
        }
        self.config.update(config)
        self.process: Optional[subprocess.Popen] = None
        self.session = self.new_session()

    def new_session(self) -> requests.Session:
        """A session with the first user's credentials, asking for uncompressed answers."""
        session = requests.Session()
        if self.users:
            session.auth = next(iter(self.users.items()))
        session.headers["Accept-Encoding"] = "identity"
        return session

    @staticmethod
    def version_of() -> str:
        answer = subprocess.run([ORTHANC_BINARY, "--version"], capture_output=True, text=True)
        words = answer.stdout.split()
        return words[1] if len(words) > 1 else "?"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str = USER, password: str = PASSWORD) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def start(self) -> "OrthancServer":
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([self.binary, str(config_path)], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=self.folder,
                                        preexec_fn=self._limits if self.file_size_limit else None)
        log.close()

        def answers() -> bool:
            try:
                return self.session.get(self.url + "/system", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False
        wait_until_ready(self.process, answers, "Orthanc", 30, self.log_tail)
        return self

    def _limits(self) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit, self.file_size_limit))

    def log_tail(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        stop_gently(self.process, signal.SIGTERM, 30)
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    # ---- helpers the tests use to look at a server -------------------------------------------
    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.session.get(self.url + path, timeout=60, **kwargs)
        response.raise_for_status()
        return response.json()

    def upload(self, paths: Iterable[Path]) -> list[str]:
        ids = []
        for path in paths:
            response = self.session.post(self.url + "/instances", data=Path(path).read_bytes(),
                                         timeout=60)
            response.raise_for_status()
            ids.append(response.json()["ID"])
        return ids

    def instances(self) -> set[str]:
        return set(self.get("/instances"))

    def md5s(self) -> dict[str, str]:
        """Instance ID -> MD5 of the stored DICOM file, for every instance."""
        result = {}
        for instance in self.get("/instances"):
            response = self.session.get(f"{self.url}/instances/{instance}/attachments/dicom/md5",
                                        timeout=60)
            response.raise_for_status()
            result[instance] = response.text.strip()
        return result

    def delete_all(self) -> None:
        for patient in self.get("/patients"):
            self.session.delete(f"{self.url}/patients/{patient}", timeout=60).raise_for_status()


class PostgresCluster:
    """A throwaway PostgreSQL cluster owned by the `postgres` user, listening on loopback."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")

    def start(self) -> "PostgresCluster":
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.folder, "postgres", "postgres")
        os.chmod(self.folder, 0o700)
        self._as_postgres(str(POSTGRESQL_BIN / "initdb"), "-D", str(self.folder), "-A", "trust",
                          "-U", "postgres")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(str(POSTGRESQL_BIN / "pg_ctl"), "-D", str(self.folder), "-o", options,
                          "-l", str(self.folder / "log"), "-w", "start")
        return self

    def create_database(self, name: str) -> None:
        self._as_postgres(str(POSTGRESQL_BIN / "createdb"), "-h", "127.0.0.1", "-p",
                          str(self.port), "-U", "postgres", name)

    def orthanc_config(self, database: str) -> dict:
        return {
            "Plugins": [POSTGRESQL_PLUGIN],
            "PostgreSQL": {"EnableIndex": True, "EnableStorage": False, "Host": "127.0.0.1",
                           "Port": self.port, "Database": database, "Username": "postgres",
                           "Password": "", "Lock": False},
        }

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(POSTGRESQL_BIN / "pg_ctl"), "-D",
                        str(self.folder), "-m", "immediate", "stop"], cwd="/",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class MariaDBServer:
    """A throwaway MariaDB server on loopback, for an Orthanc index on MySQL. It runs as the
    `mysql` user the package creates; grant tables are skipped, as nobody else can reach it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "MariaDBServer":
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.folder, "mysql", "mysql")
        shutil.chown(data, "mysql", "mysql")
        subprocess.run(["mariadb-install-db", "--user=mysql", f"--datadir={data}",
                        "--skip-test-db", "--auth-root-authentication-method=normal"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
        log = open(self.folder / "log", "ab")
        self.process = subprocess.Popen(
            [MARIADB_SERVER, "--no-defaults", "--user=mysql", f"--datadir={data}",
             f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--socket={self.folder / 'socket'}", f"--pid-file={self.folder / 'pid'}",
             "--skip-grant-tables", "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0"],
            stdout=log, stderr=subprocess.STDOUT, cwd="/")
        log.close()
        wait_until_ready(self.process, lambda: listens(self.port), "MariaDB", 60,
                         lambda: (self.folder / "log").read_text(errors="replace")[-2000:])
        return self

    def create_database(self, name: str) -> None:
        subprocess.run(["mariadb", "--protocol=tcp", "-h", "127.0.0.1", "-P", str(self.port),
                        "-u", "root", "-e", f"CREATE DATABASE {name}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def orthanc_config(self, database: str) -> dict:
        return {
            "Plugins": [MYSQL_PLUGIN],
            "MySQL": {"EnableIndex": True, "EnableStorage": False, "Host": "127.0.0.1",
                      "Port": self.port, "UnixSocket": "", "Database": database,
                      "Username": "root", "Password": "", "Lock": False},
        }

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
