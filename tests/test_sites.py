"""Between sites: real Orthanc servers behind a real nginx (Debian's package) that wants an API
key, a client certificate, or limits request bodies; and the bandwidth timetable in a real run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from nginx import NGINX_BINARY, Nginx, make_certificates
from orthanc import PASSWORD, USER, OrthancServer
from test_replicate import CORPUS_SIZE, run, summary_value

TOKEN = "s3cret-token-4f2a"
REQUIRE_KEY = f'if ($http_api_key != "{TOKEN}") {{ return 401; }}'


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Start nginx proxies on demand; all are stopped at the end of the test."""
    if not Path(NGINX_BINARY).exists():
        raise pytest.UsageError("nginx is not installed; bash .ci/run installs it")
    started: list[Nginx] = []

    def make(orthanc: OrthancServer, **options: object) -> Nginx:
        proxy = Nginx(tmp_path / f"nginx-{len(started)}", orthanc.port, **options)  # type: ignore
        started.append(proxy)
        return proxy.start()
    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def urls_args(source_url: str, target_url: str, save: Path, *extra: str) -> list[str]:
    return [source_url, target_url, "--username", USER, "--password", PASSWORD,
            "--save", str(save), *extra]


def nothing_holds(secret: str, *texts: str, files: tuple[Path, ...] = ()) -> None:
    for text in texts + tuple(path.read_text() for path in files if path.exists()):
        assert secret not in text


def test_a_target_behind_a_proxy_that_wants_an_api_key(source, target, proxy, tmp_path, capsys,
                                                       monkeypatch) -> None:
    guarded = proxy(target, server=REQUIRE_KEY)
    save, report = tmp_path / "save", tmp_path / "report.json"
    code, out, err = run(capsys, urls_args(source.url, guarded.url, save))
    assert code == 3, err
    assert f"target {guarded.url} refused the credentials" in err and "--target-header" in err

    monkeypatch.setenv("TARGET_API_KEY", TOKEN)
    code, out, err = run(capsys, urls_args(source.url, guarded.url, save, "--target-header",
                                           "api-key: env:TARGET_API_KEY", "--report",
                                           str(report), "-v"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert target.md5s() == source.md5s()
    assert json.loads(report.read_text())["options"]["headers"] == {"source": [],
                                                                    "target": ["api-key"]}
    nothing_holds(TOKEN, out, err, files=(save, report))


def test_a_source_behind_a_proxy_with_the_key_in_a_file(source, target, proxy, tmp_path,
                                                        capsys) -> None:
    guarded = proxy(source, server=REQUIRE_KEY)
    key = tmp_path / "api-key"
    key.write_text(TOKEN + "\n")
    code, out, err = run(capsys, urls_args(guarded.url, target.url, tmp_path / "save",
                                           "--header", f"api-key: @{key}"))
    assert code == 0, err
    assert target.md5s() == source.md5s()
    nothing_holds(TOKEN, out, err)


def test_a_wrong_key_is_refused_and_never_shown(source, target, proxy, tmp_path,
                                                capsys) -> None:
    guarded = proxy(target, server=REQUIRE_KEY)
    code, out, err = run(capsys, urls_args(source.url, guarded.url, tmp_path / "save",
                                           "--header", "api-key: wrong-key-77", "-v"))
    assert code == 3, err
    assert "and the headers api-key (HTTP 401)" in err
    nothing_holds("wrong-key-77", out, err)


def tls_proxy(proxy: Callable[..., Nginx], orthanc: OrthancServer,
              certificates: dict[str, Path]) -> Nginx:
    return proxy(orthanc, tls=(certificates["server"], certificates["server_key"],
                              certificates["ca"]))


def test_a_target_that_wants_a_client_certificate(source, target, proxy, certificates,
                                                  tmp_path, capsys) -> None:
    guarded = tls_proxy(proxy, target, certificates)
    save = tmp_path / "save"
    trust = ["--ca-bundle", str(certificates["ca"])]
    code, out, err = run(capsys, urls_args(source.url, guarded.url, save, *trust))
    assert code == 3, err
    assert f"target {guarded.url}: a proxy in front of it refused the request (HTTP 400: " \
        "400 No required SSL certificate was sent); if it wants a client certificate (none " \
        "was sent" in err
    assert "--client-cert" in err and "not an Orthanc" not in err

    code, out, err = run(capsys, urls_args(
        source.url, guarded.url, save, *trust, "--target-client-cert",
        str(certificates["stranger"]), "--target-client-key", str(certificates["stranger_key"])))
    assert code == 3, err
    assert "wants a client certificate (it refused the one sent" in err

    code, out, err = run(capsys, urls_args(
        source.url, guarded.url, save, *trust, "--target-client-cert",
        str(certificates["client"]), "--target-client-key", str(certificates["client_key"]),
        "--verify"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert summary_value(out, "Verified:") == CORPUS_SIZE


def test_a_client_certificate_for_both_servers(source, target, proxy, certificates, tmp_path,
                                               capsys) -> None:
    both = (tls_proxy(proxy, source, certificates), tls_proxy(proxy, target, certificates))
    code, out, err = run(capsys, urls_args(
        both[0].url, both[1].url, tmp_path / "save", "--ca-bundle", str(certificates["ca"]),
        "--client-cert", str(certificates["client"]), "--client-key",
        str(certificates["client_key"])))
    assert code == 0, err
    assert target.md5s() == source.md5s()


def test_a_proxys_body_limit_is_said_once_plainly(source, target, proxy, tmp_path,
                                                  capsys) -> None:
    """nginx's default client_max_body_size is 1 MB: the corpus's ZIP batches are split until
    they pass, and its one instance of 2.6 MB cannot go."""
    limited = proxy(target, body_limit="1m")
    code, out, err = run(capsys, urls_args(source.url, limited.url, tmp_path / "save",
                                           "--ignore-errors"))
    assert code == 1, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE - 1
    assert summary_value(out, "Failed:") == 1
    assert "target answered HTTP 413 to POST /instances (413 Request Entity Too Large)" in err
    assert ("refuses requests above a size (HTTP 413): 1 instance of 2.6 MB and more was not "
            "copied") in err
    assert "client_max_body_size" in err
    assert "<" not in err


def test_bwlimit_timetable_in_a_real_run(source, target, tmp_path, capsys) -> None:
    """The entry in force now limits to 1 MB/s; the next, 12 hours away, lifts the limit."""
    now = time.localtime()
    later = time.localtime(time.time() + 12 * 3600)
    timetable = (f"{now.tm_hour:02d}:{now.tm_min:02d},1M "
                 f"{later.tm_hour:02d}:{later.tm_min:02d},off")
    size = int(source.get("/statistics")["TotalUncompressedSize"])
    report = tmp_path / "report.json"
    started = time.monotonic()
    code, out, err = run(capsys, [source.url, target.url, "--username", USER, "--password",
                                  PASSWORD, "--save", str(tmp_path / "save"), "--bwlimit",
                                  timetable, "--report", str(report)])
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert f"Bandwidth:     1 MiB/s now (--bwlimit {timetable})" in out
    # a lower bound only: a busy machine can make it slower, never faster than the limit
    assert elapsed >= size / 1024 ** 2 - 0.1, (elapsed, size)
    written = json.loads(report.read_text())
    assert written["bwlimit_in_force"] == 1024 ** 2
    assert written["options"]["bwlimit"] == timetable
