"""Targets larger than this machine: uploads at once found by measurement (a target that gives
each connection a fraction of what it takes in all, one that answers 503 above a number of
uploads at once), and a real cluster of two Orthanc nodes on one PostgreSQL and one storage
folder behind Debian's nginx, one of them killed in the middle of a copy."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dicomgen import write_corpus
from linkproxy import CappedProxy
from nginx import Nginx
from orthanc import PASSWORD, USER, OrthancServer, PostgresCluster
from test_replicate import (COUNT_POSTS_LUA, args, lua, posts_seen, run, start_process,
                            summary_value)


def link_of(report: Path) -> dict:
    return json.loads(report.read_text())["link"]


def copy_into(url: str, source: OrthancServer, tmp_path: Path,
              capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The tool in-process from `source` to `url`, with a report (report.json)."""
    return run(capsys, [source.url, url, "--username", USER, "--password", PASSWORD,
                        "--save", str(tmp_path / "save"), "--report",
                        str(tmp_path / "report.json")])


@pytest.fixture
def big_source(make_server: Callable[..., OrthancServer], tmp_path: Path) -> OrthancServer:
    """480 instances of 131 KB (63 MB) in 12 studies: batches of 4 MB."""
    source = make_server("SOURCE")
    source.upload(write_corpus(tmp_path / "big", 12, 2, 20, rows=256, columns=256, prefix="B"))
    return source


def test_uploads_grow_while_the_target_takes_more(big_source, target, tmp_path,
                                                  capsys) -> None:
    """A target that serves each connection at 2 MB/s and all of them at 100 MB/s: the
    number of uploads at once grows past the start (4) since the rate grows with it."""
    proxy = CappedProxy(target.port, 2e6, 100e6)
    try:
        code, out, err = copy_into(proxy.url, big_source, tmp_path, capsys)
    finally:
        proxy.close()
    assert code == 0, err
    assert target.instances() == big_source.instances()
    link = link_of(tmp_path / "report.json")
    assert link["uploads_in_flight_max"] >= 8, link
    assert link["uploads_now"] >= 8, link


def test_threads_fixes_the_uploads_at_once(source, target, tmp_path, capsys) -> None:
    report = tmp_path / "report.json"
    code, out, err = run(capsys, args(source, target, tmp_path / "save", "--threads", "3",
                                      "--report", str(report)))
    assert code == 0, err
    link = link_of(report)
    assert link["uploads_in_flight_max"] <= 3
    assert link["uploads_now"] == 3
    assert link["uploads_why"] == "fixed by --threads 3"


# nginx answers 503 to a POST beyond this many at once, as a site's proxy or an Orthanc
# cluster whose database retries ran out would
UPLOADS_ALLOWED = 5
LIMIT_POSTS = """
    map $request_method $upload {{ POST $server_port; default ""; }}
    limit_conn_zone $upload zone=uploads:1m;
    limit_conn_status 503;
"""


def test_a_target_that_refuses_above_a_number_gets_fewer(big_source, target, tmp_path,
                                                         capsys) -> None:
    """Behind nginx's limit_conn (503 beyond 5 uploads at once) and a capacity that rewards
    more connections (2 MB/s each), the copy completes, and the number of uploads at once
    settles at 5 or fewer, saying why."""
    proxy = CappedProxy(target.port, 2e6, 100e6)
    limiter = Nginx(tmp_path / "nginx", proxy.port, http=LIMIT_POSTS.format(),
                    server=f"limit_conn uploads {UPLOADS_ALLOWED};").start()
    try:
        code, out, err = copy_into(limiter.url, big_source, tmp_path, capsys)
    finally:
        limiter.stop()
        proxy.close()
    assert code == 0, err
    assert target.md5s() == big_source.md5s()
    refusals = (tmp_path / "nginx" / "error.log").read_text().count("limiting connections")
    assert refusals > 0  # the number did go past the limit, and the target said so
    link = link_of(tmp_path / "report.json")
    assert link["uploads_now"] <= UPLOADS_ALLOWED, link
    assert "503" in link["uploads_why"], link


# ---- a cluster: two Orthanc nodes, one PostgreSQL, one storage folder, nginx in front --------
class Cluster:
    def __init__(self, nodes: list[OrthancServer], balancer: Nginx) -> None:
        self.nodes, self.balancer = nodes, balancer

    @property
    def url(self) -> str:
        return self.balancer.url


@pytest.fixture
def cluster(make_server: Callable[..., OrthancServer], postgres: PostgresCluster,
            tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Orthanc 1.10.1 twice on one database (plugin 4.0, "Lock": false) and one storage
    folder, round robin behind nginx, as the README's cluster recipe says."""
    database = f"cluster_{request.node.name[5:30].lower()}"
    postgres.create_database(database)
    storage = tmp_path / "shared-storage"
    nodes = []
    for name in ("NODEA", "NODEB"):  # one after the other: the first creates the tables
        config = postgres.orthanc_config(database)
        config["PostgreSQL"]["IndexConnectionsCount"] = 4
        nodes.append(make_server(name, StorageDirectory=str(storage), SaveJobs=False,
                                 DatabaseServerIdentifier=name.lower(),
                                 LuaScripts=[lua(tmp_path, "posts", COUNT_POSTS_LUA)], **config))
    balancer = Nginx(tmp_path / "balancer", [node.port for node in nodes]).start()
    yield Cluster(nodes, balancer)
    balancer.stop()


def assert_mirrors(source: OrthancServer, node: OrthancServer) -> None:
    """Every instance there with the same bytes, and no patient or study twice."""
    assert node.md5s() == source.md5s()
    for level in ("patients", "studies", "series"):
        listed = node.get(f"/{level}")
        assert len(listed) == len(set(listed)), level
        assert set(listed) == set(source.get(f"/{level}")), level


def test_a_copy_into_a_cluster_is_complete(big_source, cluster, tmp_path, capsys) -> None:
    code, out, err = copy_into(cluster.url, big_source, tmp_path, capsys)
    assert code == 0, err
    assert summary_value(out, "Copied:") == 480
    for node in cluster.nodes:
        assert_mirrors(big_source, node)
        assert posts_seen(node) > 0  # the balancer gave each node uploads


def test_a_node_killed_in_the_middle_costs_nothing(big_source, cluster, tmp_path) -> None:
    """The copy is slowed (--bwlimit) so that node B dies with a third of it done."""
    process = start_process([big_source.url, cluster.url, "--username", USER, "--password",
                             PASSWORD, "--save", str(tmp_path / "save"), "--bwlimit", "10M"])
    survivor, victim = cluster.nodes
    deadline = time.monotonic() + 60
    while survivor.get("/statistics")["CountInstances"] < 160:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    victim.kill()
    assert survivor.get("/statistics")["CountInstances"] < 480  # it was in the middle
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert summary_value(out, "Failed:") == 0
    assert_mirrors(big_source, survivor)
