"""Faults, verification, HTTPS and secrets, against real Orthanc servers."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import resource
import signal
import ssl
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pydicom
import pytest

import replicate
from dicomgen import orthanc_id, write_corpus
from faultproxy import Fault, FaultProxy, cycling
from orthanc import PASSWORD, USER, OrthancServer
from test_replicate import (CORPUS_SIZE, REFUSE_LUA, SCRIPT, args, journal_studies, lua, run,
                            slow_lua, slow_request_lua, start_process, summary_value,
                            wait_for)


def proxied(source: OrthancServer, proxy: FaultProxy, save: Path, *extra: str) -> list[str]:
    return [source.url, proxy.url, "--username", USER, "--password", PASSWORD, "--save",
            str(save), *extra]


# ---- transient faults -----------------------------------------------------------------------
def test_resets_cuts_and_stalls_on_the_way_to_the_target(source, target, tmp_path,
                                                         capsys) -> None:
    faults = (Fault("reset"), Fault("cut_answer", after=100), Fault("cut_request", after=3000),
              Fault("stall", seconds=4))
    proxy = FaultProxy(target.port, cycling(*faults, count=12))
    try:
        code, out, err = run(capsys, proxied(source, proxy, tmp_path / "save", "--threads", "2",
                                             "--timeout", "1.5", "-v"))
    finally:
        proxy.close()
    assert code == 0, err
    assert set(proxy.injected) == {"reset", "cut_answer", "cut_request", "stall"}, proxy.injected
    assert "(attempt 1/9)" in err
    assert target.md5s() == source.md5s()


def test_answers_cut_and_resets_on_the_way_from_the_source(source, target, tmp_path,
                                                           capsys) -> None:
    """Files are read whole from the source (bundles) or streamed (large ones): an answer
    cut in its body, or a reset, is retried, and the copy is exact."""
    faults = (Fault("cut_answer", after=3_000), Fault("reset"),
              Fault("cut_answer", after=30_000))
    proxy = FaultProxy(source.port, cycling(*faults, count=9))
    try:
        code, out, err = run(capsys, [proxy.url, target.url, "--username", USER, "--password",
                                      PASSWORD, "--save", str(tmp_path / "save"),
                                      "--threads", "2", "-v"])
    finally:
        proxy.close()
    assert code == 0, err
    assert set(proxy.injected) == {"reset", "cut_answer"}, proxy.injected
    assert "(attempt 1/9)" in err
    assert target.md5s() == source.md5s()


def test_target_killed_and_restarted_mid_run(make_server, source, tmp_path) -> None:
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.1)])
    save = tmp_path / "save"
    process = start_process(args(source, target, save, "-v", "--threads", "2"))
    wait_for(lambda: save.exists() and len(journal_studies(save)) >= 1)
    target.kill()
    time.sleep(2)
    assert process.poll() is None, "the run ended while the target was down"
    target.start()
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "retrying" in err
    assert target.md5s() == source.md5s()


def test_a_listing_slower_than_timeout_is_waited_for(make_server, source, tmp_path,
                                                      capsys) -> None:
    # Orthanc answers GET /studies only once it has every ID: on a big archive, longer than
    # a request's --timeout
    target = make_server("TARGET", LuaScripts=[
        slow_request_lua(tmp_path, "GET", "/studies", "SLOW-LISTING", 2.5)])
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--timeout", "1",
                                      "--retries", "0"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert "SLOW-LISTING" in target.log_tail()  # the listing was asked for, and slow


def test_a_server_down_for_good_fails_with_the_cause_and_attempts(source, target, tmp_path,
                                                                  capsys) -> None:
    proxy = FaultProxy(target.port, cycling(Fault(), then=Fault("reset"), count=2))
    try:
        code, out, err = run(capsys, proxied(source, proxy, tmp_path / "save", "--retries", "2",
                                             "--ignore-errors"))
    finally:
        proxy.close()
    assert code == 1
    # a reset seen before or after the request was written reads as either of these
    assert re.search(r"(connection reset|remote end closed connection) after 3 attempts", err)
    assert summary_value(out, "Failed:") > 0


# ---- verification ---------------------------------------------------------------------------
def test_files_lost_from_the_source_storage_are_named_at_once_with_the_reason(
        make_server, corpus, target, tmp_path, capsys) -> None:
    # no storage cache: the server must read its files from disk
    source = make_server("SOURCE", MaximumStorageCacheSize=0)
    ids = source.upload(corpus)
    lost = {ids[0], ids[24], ids[28]}  # one of each path: archive, bundle, streamed
    for instance in lost:
        uuid = source.get(f"/instances/{instance}/attachments/dicom/info")["Uuid"]
        (source.folder / "storage" / uuid[:2] / uuid[2:4] / uuid).unlink()
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--ignore-errors",
                                      "-v"))
    assert code == 1
    assert summary_value(out, "Unreadable:") == 3 and summary_value(out, "Copied:") == 26
    assert summary_value(out, "Failed:") == 0 and "Vanished" not in out
    failures = [line for line in err.splitlines()
                if line.startswith("unreadable on the source:")]
    assert {line.split()[5] for line in failures} == lost
    assert all("does not point to a regular file" in line for line in failures)
    assert "retrying" not in err and "attempts" not in err  # waiting brings no file back
    assert target.instances() == set(ids) - lost


def test_a_target_that_cannot_write_stops_the_run_even_with_ignore_errors(
        make_server, tmp_path, capsys) -> None:
    more = write_corpus(tmp_path / "more", 3, 1, 1, rows=512, columns=512, frames=6,
                        prefix="M")  # 3 MB each, each sent on its own
    # 10 MB, first in the plan: uploaded first (Orthanc 1.10 lists in that order) and with
    # the lowest ID (1.12 lists by ID)
    first = min(orthanc_id(path) for path in more)
    while True:
        big_file = write_corpus(tmp_path / "big", 1, 1, 1, rows=512, columns=512, frames=20,
                                prefix="B")
        if orthanc_id(big_file[0]) < first:
            break
    source = make_server("SOURCE")
    big = source.upload(big_file)
    source.upload(more)
    # files over 8 MB cannot be written: to Orthanc, the same as a full disk
    target = make_server("TARGET", file_size_limit=8 * 1024 * 1024)
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--ignore-errors",
                                      "--threads", "1", "--retries", "1", "--order", "source"))
    assert code == 1
    assert "stopped: the target cannot store files" in err and "Cannot write to file" in err
    assert summary_value(out, "Failed:") == 1 and big[0] in err
    # the big one goes first; of the others, one may have begun beside it, and has landed
    # if so; the last ones were not sent
    copied = summary_value(out, "Copied:")
    assert copied <= 1 and len(target.instances()) == copied


def test_a_save_file_that_cannot_grow_stops_the_run_without_a_traceback(source, target,
                                                                          tmp_path,
                                                                          capsys) -> None:
    def small_files() -> None:  # the header and one study line fit, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
    save = tmp_path / "save"
    answer = subprocess.run([sys.executable, SCRIPT, *args(source, target, save, "--threads",
                                                           "1")],
                            capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert answer.returncode == 2, answer.stderr
    assert f"cannot write save file {save}: File too large; make room" in answer.stderr
    assert "Traceback" not in answer.stderr
    assert summary_value(answer.stdout, "Copied:") > 0

    code, out, err = run(capsys, args(source, target, save))  # room again: it resumes
    assert code == 0, err
    assert target.md5s() == source.md5s()


def test_instances_deleted_after_their_study_was_checked_count_as_vanished(
        make_server, source, target, tmp_path) -> None:
    """Between a study's check and its transfer, instances may be deleted from the source:
    they are counted as vanished, not as failures, whichever way they travel (a source-built
    archive, then one by one; or streamed alone)."""
    stop = threading.Event()
    policy = replicate.RetryPolicy(retries=1)
    clients = [replicate.OrthancClient(replicate.Endpoint(role, server.url, USER, PASSWORD),
                                       policy, stop) for role, server in
               (("source", source), ("target", target))]
    for client in clients:
        client.check()
    large = next(record for record in source.get("/instances?expand")
                 if record["FileSize"] >= replicate.STREAM_MIN_INSTANCE)
    study = source.get(f"/instances/{large['ID']}/study")["ID"]
    small_study = next(other for other in source.get("/studies") if other != study
                       and len(source.get(f"/studies/{other}/instances")) > 2)
    checks = [replicate.check_study(*clients, one, False) for one in (study, small_study)]
    gone = [large["ID"], checks[1].missing[0].id]
    for instance in gone:
        source.session.delete(f"{source.url}/instances/{instance}").raise_for_status()
    copier = replicate.Copier(*clients, policy, stop)
    results = [copier.copy(batch) for batch in replicate.make_batches(
        checks[0].missing + checks[1].missing, True, True)]
    assert sorted(i.id for result in results for i in result.vanished) == sorted(gone)
    assert not any(result.failed for result in results)
    landed = sum(len(result.stored) for result in results)
    assert landed == len(checks[1].missing) - 1 and landed == len(target.instances())


def test_verify_an_exact_copy_from_a_compressed_source(make_server, corpus, target, tmp_path,
                                                       capsys) -> None:
    source = make_server("SOURCE", StorageCompression=True)
    source.upload(corpus)
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--verify"))
    assert code == 0, err
    assert "Verified:      29 instances, 29 by MD5; 0 missing or different" in out
    assert target.md5s() == source.md5s()


def test_verify_names_an_instance_with_other_bytes(source, target, tmp_path, capsys) -> None:
    save = tmp_path / "save"
    assert run(capsys, args(source, target, save))[0] == 0
    victim = sorted(source.instances())[0]
    changed = tmp_path / "changed.dcm"
    changed.write_bytes(source.session.get(f"{source.url}/instances/{victim}/file").content)
    dataset = pydicom.dcmread(changed)
    dataset.PatientName = "Someone^Else"
    dataset.save_as(changed)
    target.session.delete(f"{target.url}/instances/{victim}").raise_for_status()
    assert target.upload([changed]) == [victim]  # same ID, other bytes

    code, out, err = run(capsys, args(source, target, save, "--verify"))
    assert code == 1
    assert summary_value(out, "Copied:") == 0
    assert "Verified:      29 instances, 29 by MD5; 1 missing or different" in out
    assert f"verify failed: instance {victim}: different on the target" in err


def test_verify_names_missing_instances(make_server, source, tmp_path, capsys) -> None:
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "refuse", REFUSE_LUA)])
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--verify",
                                      "--ignore-errors"))
    assert code == 1
    assert err.count("missing on the target") == 8
    assert "Verified:      29 instances, 21 by MD5; 8 missing or different" in out


# ---- bad input ------------------------------------------------------------------------------
def test_unknown_host_and_corrupt_save_file(source, target, tmp_path, capsys) -> None:
    code, out, err = run(capsys, [source.url, "http://no-such-host.invalid:8042", "--username",
                                  USER, "--password", PASSWORD, "--save", str(tmp_path / "save")])
    assert code == 3
    assert "cannot reach target http://no-such-host.invalid:8042: unknown host name" in err
    save = tmp_path / "corrupt"
    save.write_text(f"replicate.py save file 1\tsource={source.url}\ttarget={target.url}\n"
                    "study\tabc\tnot-a-number\n" "study\tdef\t1\t1\tx\n")
    code, out, err = run(capsys, args(source, target, save))
    assert code == 2 and "line 2 is corrupt" in err


@pytest.mark.parametrize("option", ["--threads=-3", "--timeout=0", "--retries=x",
                                    "--ca-bundle=/no/such/file"])
def test_bad_option_values(source, target, tmp_path, capsys, option) -> None:
    code, out, err = run(capsys, [source.url, target.url, option, "--save",
                                  str(tmp_path / "save")])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and option.split("=")[0] in err


# ---- secrets --------------------------------------------------------------------------------
def test_passwords_never_printed_or_saved(make_server, corpus, tmp_path, capsys) -> None:
    secret = "s3cr3t-Pa55"
    source = make_server("SOURCE", users={"alice": secret})
    source.upload(corpus[:4])
    target = make_server("TARGET", users={"alice": secret})
    save = tmp_path / "save"
    proxy = FaultProxy(target.port, cycling(Fault("reset"), count=3))
    try:
        code, out, err = run(capsys, [f"http://alice:{secret}@127.0.0.1:{source.port}",
                                      f"http://alice:{secret}@127.0.0.1:{proxy.port}/",
                                      "-v", "--save", str(save), "--verify"])
        assert code == 0, err
        failed = run(capsys, [f"http://alice:{secret}@127.0.0.1:{source.port}",
                              f"http://alice:wrong-{secret}@127.0.0.1:{target.port}", "-v",
                              "--save", str(tmp_path / "other")])
    finally:
        proxy.close()
    assert failed[0] == 3
    assert "(attempt 1/" in err  # the resets were retried and logged
    for text in (out, err, failed[1], failed[2], save.read_text()):
        assert secret not in text


def test_password_prompt_on_a_terminal(make_server, corpus, tmp_path) -> None:
    source = make_server("SOURCE", users={"orthanc": "orthanc"})
    source.upload(corpus[:3])
    target = make_server("TARGET", users={"orthanc": "typed-secret"})
    controller, terminal = pty.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    process = subprocess.Popen([sys.executable, SCRIPT, source.url, target.url, "--save",
                                str(tmp_path / "save")], stdin=terminal,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=take_terminal)
    os.close(terminal)
    seen = b""
    deadline = time.monotonic() + 30
    while b"password for orthanc on" not in seen and time.monotonic() < deadline:
        seen += os.read(controller, 1024)
    os.write(controller, b"typed-secret\n")
    out, err = process.communicate(timeout=60)
    os.close(controller)
    assert process.returncode == 0, err
    assert len(target.instances()) == 3
    assert b"typed-secret" not in out + err


# ---- HTTPS ----------------------------------------------------------------------------------
@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    (tmp_path / "both.pem").write_text(key.read_text() + cert.read_text())
    return cert


def test_https_target_behind_a_tls_proxy(source, target, certificate, tmp_path,
                                         capsys) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, certificate.parent / "key.pem")
    proxy = FaultProxy(target.port, tls=context)
    try:
        code, out, err = run(capsys, proxied(source, proxy, tmp_path / "save"))
        assert code == 3
        assert "certificate verify failed" in err and "--ca-bundle" in err
        assert len(err.strip().splitlines()) == 1
        code, out, err = run(capsys, proxied(source, proxy, tmp_path / "save", "--ca-bundle",
                                             str(certificate)))
        assert code == 0, err
        assert target.md5s() == source.md5s()
        target.delete_all()
        code, out, err = run(capsys, proxied(source, proxy, tmp_path / "save2", "--insecure"))
        assert code == 0, err
        assert "warning: --insecure" in err
        assert target.md5s() == source.md5s()
    finally:
        proxy.close()
