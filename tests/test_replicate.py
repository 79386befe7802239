"""replicate.py against real Orthanc servers: in-process main() and a few subprocess runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import replicate
from dicomgen import make_instance, write_corpus, write_dicom
from orthanc import PASSWORD, USER, OrthancServer, PostgresCluster, free_port

SCRIPT = str(Path(replicate.__file__).resolve())
CORPUS_SIZE = 29

COUNT_POSTS_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if method == "POST" and uri == "/instances" then print("POST-INSTANCES") end
  return true
end
"""


def lua(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.lua"
    path.write_text(text)
    return str(path)


def slow_request_lua(tmp_path: Path, method: str, uri: str, marker: str,
                     seconds: float) -> str:
    """A server that prints `marker` in its log and takes `seconds` for each METHOD URI."""
    return lua(tmp_path, f"slow-{marker.lower()}", f"""
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if method == "{method}" and uri == "{uri}" then
    print("{marker}")
    os.execute("sleep {seconds}")
  end
  return true
end
""")


def slow_lua(tmp_path: Path, seconds: float) -> str:
    """A target that takes `seconds` to accept each instance, so a run can be caught mid-way."""
    return lua(tmp_path, "slow", f"""
function ReceivedInstanceFilter(dicom, origin, info)
  os.execute("sleep {seconds}")
  return true
end
""")


def args(source: OrthancServer, target: OrthancServer, save: Path, *extra: str) -> list[str]:
    return [source.url, target.url, "--username", USER, "--password", PASSWORD,
            "--save", str(save), *extra]


def run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    code = replicate.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_process(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                          timeout=120, **kwargs)


def start_process(argv: list[str]) -> subprocess.Popen:
    """The tool in a child process, its stdout and stderr kept for communicate()."""
    return subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def summary_value(out: str, label: str) -> int:
    for line in out.splitlines():
        if line.startswith(label):
            return int(line[len(label):].split()[0].replace(",", ""))
    raise AssertionError(f"no {label!r} line in:\n{out}")


def posts_seen(server: OrthancServer) -> int:
    return (server.folder / "orthanc.log").read_text().count("POST-INSTANCES")


def journal_studies(path: Path) -> list[str]:
    return [line.split("\t")[1] for line in path.read_text().splitlines()[1:]
            if line.startswith("study\t")]


def instances_of_patient(server: OrthancServer, patient_id: str) -> set[str]:
    answer = server.session.post(server.url + "/tools/find", timeout=60, json={
        "Level": "Instance", "Query": {"PatientID": patient_id}})
    answer.raise_for_status()
    return set(answer.json())


def settled_count(server: OrthancServer, quiet: float = 1.5) -> int:
    """The instance count once it stopped changing for `quiet` seconds."""
    count, since = len(server.instances()), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = len(server.instances())
        if now != count:
            count, since = now, time.monotonic()
    return count


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# ---- copying --------------------------------------------------------------------------------
def test_exact_copy_then_rerun_sends_nothing(make_server, source, tmp_path, capsys) -> None:
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "count", COUNT_POSTS_LUA)])
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert target.md5s() == source.md5s()
    assert len(source.md5s()) == CORPUS_SIZE
    assert summary_value(out, "Studies found on the source:") == 5
    assert summary_value(out, "To transfer:") == CORPUS_SIZE
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    assert summary_value(out, "Failed:") == 0
    assert sorted(journal_studies(save)) == sorted(source.get("/studies"))
    first_posts = posts_seen(target)
    # archives, bundles and one streamed instance: fewer POSTs than instances, but some of each
    assert 3 <= first_posts < CORPUS_SIZE

    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "To transfer:") == 0
    assert summary_value(out, "Already there:") == CORPUS_SIZE
    assert posts_seen(target) == first_posts  # the re-run sent nothing


def test_source_with_one_study(make_server, corpus, target, tmp_path, capsys) -> None:
    source = make_server("SOURCE")
    source.upload([path for path in corpus if path.name.startswith("S-0-")])
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 0, err
    assert summary_value(out, "Studies found on the source:") == 1
    assert target.md5s() == source.md5s() and len(target.instances()) == 8


def test_the_library_api(source, target, tmp_path) -> None:
    """Config.from_argv and replicate(), for a program built on the file: the counts and the
    exit status without reading the summary."""
    config = replicate.Config.from_argv(args(source, target, tmp_path / "save"))
    outcome = replicate.replicate(config)
    assert (outcome.exit_status, outcome.copied, outcome.failed) == (0, CORPUS_SIZE, [])
    assert target.md5s() == source.md5s()
    again = replicate.replicate(config)
    assert (again.exit_status, again.copied, again.already_there) == (0, 0, CORPUS_SIZE)
    with pytest.raises(replicate.UsageError, match="--threads"):
        replicate.Config.from_argv(args(source, target, tmp_path / "save", "--threads", "0"))


def test_empty_source(make_server, target, tmp_path, capsys) -> None:
    source = make_server("SOURCE")
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 0 and target.instances() == set()


def test_target_studies_the_source_lacks_are_left_alone(source, target, tmp_path,
                                                        capsys) -> None:
    extra = target.upload(write_corpus(tmp_path / "extra", 2, 1, 3, prefix="E"))
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 0, err
    assert target.instances() == source.instances() | set(extra)
    assert summary_value(out, "Copied:") == CORPUS_SIZE


def test_instances_added_later_to_a_copied_study(source, target, tmp_path, capsys) -> None:
    save = tmp_path / "save"
    assert run(capsys, args(source, target, save))[0] == 0
    study = source.get(f"/studies/{sorted(source.get('/studies'))[0]}")
    late = make_instance(study["PatientMainDicomTags"]["PatientID"],
                         study["MainDicomTags"]["StudyInstanceUID"], "1.2.3.4.5.6.7", 1)
    write_dicom(late, tmp_path / "late.dcm")
    late_id = source.upload([tmp_path / "late.dcm"])[0]
    assert study["ID"] in journal_studies(save)  # the earlier run completed that study

    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 1
    assert late_id in target.instances() and target.md5s() == source.md5s()


def test_postgresql_target_with_8_threads(make_server, postgres: PostgresCluster, tmp_path,
                                          capsys) -> None:
    source = make_server("SOURCE")
    source.upload(write_corpus(tmp_path / "many", 12, 2, 10, prefix="G"))
    postgres.create_database("target8")
    target = make_server("PGTARGET", **postgres.orthanc_config("target8"))
    assert target.get("/system")["DatabaseBackendPlugin"]
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--threads", "8"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == 240
    assert target.md5s() == source.md5s()


# ---- credentials ----------------------------------------------------------------------------
def test_per_server_credentials_and_environment(make_server, corpus, tmp_path, capsys,
                                                monkeypatch) -> None:
    source = make_server("SOURCE", users={"alice": "source-secret"})
    source.upload(corpus[:5])
    target = make_server("TARGET", users={"bob": "target-secret"})
    monkeypatch.setenv("REPLICATE_SOURCE_PASSWORD", "source-secret")
    save = tmp_path / "save"
    argv = [source.url, f"http://bob:wrong@127.0.0.1:{target.port}", "--source-username",
            "alice", "--target-password", "target-secret", "--save", str(save)]
    code, out, err = run(capsys, argv)
    assert code == 0, err
    assert target.instances() == source.instances()
    for secret in ("source-secret", "target-secret"):
        assert secret not in out + err + save.read_text()

    # the flag wins over the environment: a wrong flag is refused, and the side is named
    code, out, err = run(capsys, argv + ["--source-password", "nope"])
    assert code == 3
    assert "source" in err and "HTTP 401" in err and "alice" in err and "nope" not in err


def test_password_from_the_url(make_server, corpus, tmp_path, capsys) -> None:
    source = make_server("SOURCE")
    source.upload(corpus[:3])
    target = make_server("TARGET", users={"bob": "p@ss:word"})
    code, out, err = run(capsys, [source.url_with(), "http://bob:p%40ss%3Aword@127.0.0.1:"
                                  f"{target.port}", "--save", str(tmp_path / "save")])
    assert code == 0, err
    assert len(target.instances()) == 3
    assert "p@ss" not in out + err + (tmp_path / "save").read_text()


# ---- failures -------------------------------------------------------------------------------
REFUSE_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.PatientID == "S00001" then return false end
  return true
end
"""


REFUSE_FIRST_LUA = COUNT_POSTS_LUA + """
received = 0
function ReceivedInstanceFilter(dicom, origin, info)
  received = received + 1
  if received == 1 then print("REFUSED " .. dicom.SOPInstanceUID) return false end
  return true
end
"""


def test_refused_instance_stops_the_run(make_server, source, tmp_path, capsys) -> None:
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "refuse", REFUSE_FIRST_LUA)])
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save, "--threads", "1"))
    assert code == 1
    assert "stopped at the first failure" in err and "FilteredOut" in err
    named = set(re.findall(r"instance ([0-9a-f-]{44})", err))
    assert len(named) == 1 and named < source.instances() - target.instances()
    assert "Traceback" not in err
    # One thread, two batches in flight at most (the second may have begun beside the first
    # when its failure was read), no batch sent after it: at most two POSTs, and what the
    # third batch holds (the corpus makes at least three: archive, bundle, large) was not sent
    assert posts_seen(target) <= 2
    assert len(target.instances()) <= CORPUS_SIZE - 2


def test_refused_instance_with_ignore_errors(make_server, source, tmp_path, capsys) -> None:
    target = make_server("TARGET", LuaScripts=[lua(tmp_path, "refuse", REFUSE_LUA)])
    save = tmp_path / "save"
    code, out, err = run(capsys, args(source, target, save, "--ignore-errors"))
    assert code == 1
    missing = source.instances() - target.instances()
    assert missing == instances_of_patient(source, "S00001")  # 8 instances, nothing else
    assert summary_value(out, "Failed:") == 8 and summary_value(out, "Copied:") == CORPUS_SIZE - 8
    for instance in missing:
        assert f"instance {instance}" in err
    assert err.count("FilteredOut") >= 8
    assert len(journal_studies(save)) == 4  # the refused study is not recorded as complete


# ---- exit statuses and messages -------------------------------------------------------------
def test_usage_errors_exit_2_with_one_line(source, target, tmp_path) -> None:
    save = str(tmp_path / "save")
    cases = {
        "--threads": [source.url, target.url, "--threads", "0", "--save", save],
        "http://": ["old-server:8042", target.url, "--save", save],
        "same server": [source.url, source.url.replace("127.0.0.1", "localhost"), "--save", save],
        "--retries": [source.url, target.url, "--retries", "-1", "--save", save],
        "unrecognized arguments": [source.url, target.url, "--bogus"],
    }
    for expected, argv in cases.items():
        result = run_process(argv)
        assert result.returncode == 2, (expected, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (expected, result.stderr)
        assert "Traceback" not in result.stderr


def test_unusable_save_file_exits_2(source, target, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    other.write_text(f"replicate.py save file 1\tsource=http://x:1\ttarget={target.url}\n")
    code, out, err = run(capsys, args(source, target, other))
    assert code == 2 and "choose another --save" in err
    code, out, err = run(capsys, args(source, target, tmp_path / "no-such-folder" / "save"))
    assert code == 2 and "cannot write save file" in err


def test_server_problems_exit_3(source, target, not_orthanc, tmp_path) -> None:
    save = str(tmp_path / "save")
    unreachable = f"http://127.0.0.1:{free_port()}"
    cases = {
        "cannot reach target": [source.url, unreachable],
        "refused the credentials": [source.url, target.url, "--target-password", "wrong"],
        "is not an Orthanc": [not_orthanc, target.url],
    }
    report = tmp_path / "report.json"
    for expected, argv in cases.items():
        result = run_process(argv + ["--username", USER, "--password", PASSWORD, "--save", save,
                                     "--retries", "0", "--report", str(report)])
        assert result.returncode == 3, (expected, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        # the report of a run that could not begin says why, in the same words
        data = json.loads(report.read_text())
        assert data["exit_status"] == 3 and data["error"] == result.stderr.strip()
        assert data["copied"] == 0 and data["planned"] is None


def test_an_unexpected_error_is_one_line_and_a_traceback_only_with_v(
        source, target, tmp_path, capsys, monkeypatch) -> None:
    def broken(*arguments: object) -> None:
        raise KeyError("ParentSeries")  # what an answer without the expected field would give
    monkeypatch.setattr(replicate, "check_study", broken)
    code, out, err = run(capsys, args(source, target, tmp_path / "save"))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"replicate\.py: stopped: check of study [0-9a-f-]{44}: KeyError: 'ParentSeries' "
        r"\(-v shows where; the save file is consistent, a re-run resumes\)", lines[0]), lines
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "-v"))
    assert code == 1 and "Traceback" in err and "in broken" in err


def test_help_lists_every_option_with_its_default() -> None:
    result = run_process(["--help"])
    assert result.returncode == 0
    for option in ("--save", "--threads", "--ignore-errors", "--username", "--password",
                   "--source-username", "--source-password", "--target-username",
                   "--target-password", "--retries", "--timeout", "-q", "-v", "--version"):
        assert option in result.stdout
    text = " ".join(result.stdout.split())
    assert "(default: studies.list)" in text and "(default: 4)" in text
    for status in ("0 everything selected is on the target", "1 failures remain", "2 usage error",
                   "3 a server cannot be reached", "130 interrupted"):
        assert status in text
    version = run_process(["--version"])
    assert version.returncode == 0 and replicate.__version__ in version.stdout


def test_kill_mid_run_then_resume(make_server, source, tmp_path, capsys) -> None:
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.1),
                                               lua(tmp_path, "count", COUNT_POSTS_LUA)])
    save = tmp_path / "save"
    process = subprocess.Popen([sys.executable, SCRIPT, *args(source, target, save, "-q",
                                                               "--threads", "1")])
    wait_for(lambda: save.exists() and len(journal_studies(save)) >= 1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    present = settled_count(target)  # the target finishes what it had received
    assert 0 < present < CORPUS_SIZE, "the kill came too late to test a resume"

    code, out, err = run(capsys, args(source, target, save, "--threads", "4"))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE - present
    assert target.md5s() == source.md5s()
    assert sorted(journal_studies(save)) == sorted(source.get("/studies"))


def test_without_a_terminal_progress_goes_to_the_log(make_server, source, tmp_path, capsys,
                                                     monkeypatch) -> None:
    """Under cron, nohup or systemd there is no bar: a line in the log, every minute by
    default (here every 0.3 s), says how far the copy is."""
    monkeypatch.setattr(replicate, "PROGRESS_LOG_SECONDS", 0.3)
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.1)])
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--threads", "1"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if " copying: " in line]
    assert len(lines) >= 2, err  # a line once a batch lands and the interval has passed
    counts = [int(re.search(r"copying: .*, (\d+) of 29 instances \(", line).group(1))
              for line in lines]
    assert counts == sorted(counts) and 0 < counts[-1] <= CORPUS_SIZE
    assert all(re.search(r"\(\d+%\), .*/s, about .* left$", line) for line in lines), lines

    # -q silences them, even when every landed batch would give one
    monkeypatch.setattr(replicate, "PROGRESS_LOG_SECONDS", 0.0)
    code, out, err = run(capsys, args(source, make_server("QUIET"), tmp_path / "quiet", "-q"))
    assert code == 0 and " copying: " not in err


def test_a_second_run_on_the_same_save_file_is_refused(make_server, source, tmp_path,
                                                       capsys) -> None:
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.1)])
    save = tmp_path / "save"
    first = start_process(args(source, target, save, "--threads", "1"))
    wait_for(lambda: save.exists() and save.stat().st_size > 0)
    code, out, err = run(capsys, args(source, target, save))
    assert code == 2
    assert f"save file {save} is in use by another run of replicate.py" in err
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE
    code, out, err = run(capsys, args(source, target, save))  # free again once it ended
    assert code == 0 and summary_value(out, "Copied:") == 0


def test_ctrl_c_exits_130_and_resumes(make_server, source, tmp_path, capsys) -> None:
    target = make_server("TARGET", LuaScripts=[slow_lua(tmp_path, 0.1)])
    save = tmp_path / "save"
    process = start_process(args(source, target, save, "--threads", "1"))
    # interrupted while the first batch lands (the target stores it instance by instance)
    wait_for(lambda: len(target.instances()) >= 1)
    interrupted_at = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert time.monotonic() - interrupted_at < 10
    assert "run the same command again to resume" in err and "Traceback" not in err
    present = settled_count(target)
    assert present < CORPUS_SIZE, "the interrupt came too late to test"
    # The batch in flight at the Ctrl-C lands and is counted: the summary tells the truth.
    assert summary_value(out, "Copied:") == present

    code, out, err = run(capsys, args(source, target, save))
    assert code == 0, err
    assert summary_value(out, "Copied:") == CORPUS_SIZE - present
    assert target.md5s() == source.md5s()


def test_benchmark_smoke(tmp_path) -> None:
    """The benchmark at seconds scale, so that it cannot rot: every copy in it is checked by
    MD5 and it must print its table."""
    import benchmark
    lines = benchmark.run(["mixed", "tiny", "big", "scale20k"], 1, "smoke", tmp_path / "work",
                          tmp_path / "cache")
    table = [line for line in lines if line.startswith("| ")][:6]
    assert [row.split("|")[1].strip() for row in table[1:]] == \
        ["---", "mixed", "tiny", "big", "scale20k"]
    assert any(line.startswith("| tiny | target ingestion alone |") for line in lines)
    reruns = [line for line in lines if " re-run with nothing to copy" in line]
    assert len(reruns) == 2 * 4 and all("0 POSTs" in line for line in reruns), reruns
    # a re-run with nothing to copy, plain or --delete, asks each server a few things,
    # whatever the archive holds; --recheck looks at every study
    for line in reruns:
        asked = re.search(r"(\d+) requests to the source, (\d+) to the target", line)
        assert asked, line
        if ", plain:" in line or ", --delete:" in line:
            assert 0 < int(asked.group(1)) <= 10 and 0 < int(asked.group(2)) <= 10, line
    assert sum("--check --recheck / --recheck:" in line for line in lines) == 2
    order = [line for line in lines
             if "scale20k newest first (default) against --order source" in line]
    assert len(order) == 1 and re.search(r"before and after it, [\d.]+ s, [\d.]+ s\)",
                                         order[0]), order


def test_benchmark_soak_and_save_file_smoke(tmp_path) -> None:
    """The soak part (a --follow under arrivals) and the year-old save file's restart, at
    seconds scale: each prints its row, every arrival landed, and a restart compacts."""
    import benchmark
    lines = benchmark.soak(0.4, tmp_path / "work", tmp_path / "cache", None, "smoke")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines
            if line.startswith("| this")]
    landed, _, kept = rows[0][3].split()
    assert len(rows) == 1 and landed == kept == rows[0][2] and int(landed) > 20, lines
    lines = benchmark.save_file_year(tmp_path, None, "smoke")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines
            if line.startswith("| this")]
    assert [row[1] for row in rows] == ["first", "second"], lines
    assert int(rows[0][5].replace(",", "")) == int(rows[1][2].replace(",", "")) < \
        int(rows[0][2].replace(",", "")) // 10, lines


def test_benchmark_wan_smoke(tmp_path) -> None:
    """The benchmark's part across a distant link, at seconds scale: every case copies (each
    copy is checked by MD5) and is printed with its floor and the push's time."""
    import benchmark
    lines = benchmark.wan("smoke", tmp_path / "work", tmp_path / "cache", push_limit=30)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines
            if line.startswith("| ")][2:]
    assert [(row[0], row[1], row[4]) for row in rows] == \
        [(corpus, side, queue) for corpus, side, _, _, queue, _ in benchmark.WAN_CASES]
    # behind a deep queue too, no upload is sent twice: the link carries the corpus once
    for row in rows:
        if row[4] == "deep":
            assert float(row[9]) <= 1.05, row
    assert any(line.startswith("tiny, source 80 ms away") and "without the link" in line
               for line in lines)


def test_benchmark_check_smoke(tmp_path) -> None:
    """The benchmark's --check part at seconds scale: the four checks run and are printed."""
    import benchmark
    lines = benchmark.checks("smoke", tmp_path / "work", tmp_path / "cache", None)
    rows = [line for line in lines if line.startswith("| ") and " s (CPU: tool" in line]
    assert len(rows) == 4 and "80 ms away" in rows[1] and "trusted" in rows[3], lines


def test_benchmark_verify_smoke(tmp_path) -> None:
    """The benchmark's --verify part at seconds scale: each case compared as it says."""
    import benchmark
    lines = benchmark.verifications("smoke", tmp_path / "work", tmp_path / "cache")
    text = "\n".join(lines)
    assert "17 instances, 17 by MD5;" in text, text
    assert "17 instances, 17 re-encoded: tags and pixels;" in text, text
    assert text.count("17 instances, ") == 3, text  # the sample's case too


def test_benchmark_status_smoke(tmp_path) -> None:
    """The benchmark's --status part at seconds scale: three pairs and their median."""
    import benchmark
    lines = benchmark.watched("smoke", tmp_path / "work", tmp_path / "cache", 1)
    assert sum(line.startswith("| pair ") for line in lines) == 3, lines
    assert lines[-1].startswith("| median |"), lines
