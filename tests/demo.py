"""Two throwaway Orthanc servers to try replicate.py on: a source filled with generated studies
and an empty target, in a temporary folder, both removed on Ctrl-C.

usage: python tests/demo.py [--studies N] [--source-port 8042] [--target-port 8043]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicomgen import write_corpus  # noqa: E402
from orthanc import OrthancServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="studies on the source (default: 20)")
    parser.add_argument("--source-port", type=int, default=8042, help="(default: 8042)")
    parser.add_argument("--target-port", type=int, default=8043, help="(default: 8043)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="replicate-demo-"))
    users = {"orthanc": "orthanc"}
    servers = []
    try:
        for name, port in (("old", args.source_port), ("new", args.target_port)):
            server = OrthancServer(folder / name, name.upper(), users=users)
            server.port = server.config["HttpPort"] = port
            servers.append(server.start())
        source, target = servers
        files = write_corpus(folder / "dicom", args.studies, 2, 10, rows=64, columns=64)
        source.upload(files)
        print(f"source {source.url} holds {len(files)} instances in {args.studies} studies; "
              f"target {target.url} is empty; user orthanc, password orthanc.")
        print(f"Try: python replicate.py {source.url} {target.url}")
        print("Ctrl-C here stops both servers and removes their folder.")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
