"""A demo of replicate.py in one command: two throwaway Orthanc servers, a copy with its progress
bar, an interruption, a resume, a deletion mirrored, and a check; every step says what it did,
and everything is removed at the end.

usage: python tests/demo.py [--studies N] [--serve]

--serve keeps both servers running afterwards (Ctrl-C stops them), to try commands by hand.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "replicate.py"
sys.path.insert(0, str(HERE))


def missing() -> str:
    """What this machine lacks for the demo, or ''."""
    from orthanc import ORTHANC_BINARY
    lacking = []
    if not Path(ORTHANC_BINARY).exists():
        lacking.append("Orthanc (apt-get install orthanc)")
    for module, package in (("pydicom", "pydicom"), ("requests", "requests"),
                            ("alive_progress", "alive-progress")):
        try:
            __import__(module)
        except ImportError:
            lacking.append(f"the Python package {package} (pip install -r requirements.txt -r "
                           "tests/requirements.txt)")
    return "; ".join(lacking)


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def replicate(arguments: list[str], interrupt_after: float = 0.0) -> int:
    """Run the tool in view (its bar and summary on this terminal); with `interrupt_after`,
    press Ctrl-C for it that many seconds in."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), *arguments])
    if interrupt_after:
        try:
            process.wait(timeout=interrupt_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
    code = process.wait()
    print(f"--- exit status {code}", flush=True)
    return code


def _setup_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30,
                        help="studies on the source, 20 instances each (default: 30)")
    parser.add_argument("--serve", action="store_true",
                        help="keep the servers running at the end, until Ctrl-C")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _setup_argparser().parse_args(argv)
    lacking = missing()
    if lacking:
        print(f"demo: this machine lacks {lacking}; bash .ci/run installs everything",
              file=sys.stderr)
        return 2
    from dicomgen import write_corpus
    from orthanc import OrthancServer

    folder = Path(tempfile.mkdtemp(prefix="replicate-demo-"))
    users = {"orthanc": "orthanc"}  # the tool's default credentials
    servers: list[OrthancServer] = []
    expected, seen = [130, 0, 0, 0], []  # the exit status of each step
    try:
        say("starting two throwaway Orthanc servers, and loading the old one")
        for name in ("old", "new"):
            servers.append(OrthancServer(folder / name, name.upper(), users=users).start())
        source, target = servers
        files = write_corpus(folder / "dicom", args.studies, 2, 10, rows=64, columns=64)
        source.upload(files)
        size = sum(path.stat().st_size for path in files)
        print(f"old server {source.url}: {len(files)} instances in {args.studies} studies, "
              f"{size / 1e6:.1f} MB; new server {target.url}: empty; user orthanc, password "
              f"orthanc; save file {folder / 'demo.save'}")
        common = [source.url, target.url, "--save", str(folder / "demo.save")]

        rate = max(size / 6, 16 * 1024)  # the copy would take 6 s
        say(f"1. the copy, held to {rate / 1024:.0f} KB/s (--bwlimit) so that it can be "
            "watched, and interrupted after 3 s as Ctrl-C would")
        seen.append(replicate(common + ["--bwlimit", str(int(rate))], interrupt_after=3))
        print(f"the new server holds {len(target.instances())} of {len(files)} instances")

        say("2. the same command again, at full speed: it resumes where it stopped")
        seen.append(replicate(common))

        say("3. a study deleted on the old server; --delete removes it from the new one")
        gone = sorted(source.get("/studies"))[0]
        source.session.delete(f"{source.url}/studies/{gone}", timeout=60).raise_for_status()
        seen.append(replicate(common + ["--delete"]))

        say("4. --check --recheck: compares every instance, writes nothing")
        seen.append(replicate(common + ["--check", "--recheck", "--delete"]))

        ok = seen == expected and target.instances() == source.instances()
        say("the new server holds every instance of the old one, and nothing it deleted"
            if ok else f"something went wrong: exit statuses {seen}, expected {expected}")
        if args.serve:
            print(f"the servers keep running: try replicate.py {source.url} {target.url} "
                  "--help; Ctrl-C stops them and removes their folder", flush=True)
            while True:
                time.sleep(1)
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 0
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        print(f"\nremoved both servers and {folder}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
