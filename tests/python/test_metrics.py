"""Tether's admin listener scraped by a real Prometheus (Debian's
`prometheus` package, which scripts/test installs).

Tether runs with `--admin-listen 127.0.0.1:0` and prints the admin address on
its second stdout line; Prometheus runs on a free loopback port with a
temporary storage folder and scrapes it every second. The test waits for the
target to be up and for the first scrape's values through Prometheus's HTTP
API, each wait a bounded poll of an outside process with a deadline.
"""

import json
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from conftest import CALL_TIMEOUT
from test_monitoring import Prometheus

# Longest Prometheus may take to scrape the target once it runs.
SCRAPE_TIMEOUT = 60

SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1m
scrape_configs:
  - job_name: tether
    static_configs:
      - targets: ["{target}"]
"""


def api(prometheus: Prometheus, path: str, **params) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{prometheus.url}/api/v1/{path}{query}", timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def poll(what: str, prometheus: Prometheus, attempt):
    """attempt() until it returns something other than None, within SCRAPE_TIMEOUT."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        found, last = attempt()
        if found is not None:
            return found
        # Polling an outside process we started, not synchronising with Tether.
        time.sleep(0.1)
    pytest.fail(f"{what} not seen within {SCRAPE_TIMEOUT}s; last: {last}\n{prometheus.log()}")


def test_prometheus_scrapes_the_counts_tether_keeps(pb, start_server, tmp_path):
    tether = start_server("--disable-monitor", "--admin-listen", "127.0.0.1:0")
    admin = tether.admin_address()

    with grpc.insecure_channel(tether.addr) as channel:
        stub = pb.grpc.ConnectionServiceStub(channel)

        def create(kind, url, identity):
            return stub.CreateConnection(
                pb.service.CreateConnectionRequest(
                    connection=pb.connection.Connection(
                        kind=kind, name=identity, url=url, identity=identity
                    )
                ),
                timeout=CALL_TIMEOUT,
            )

        create("tcp", "tcp://127.0.0.1:9", "a")
        ignored = create("tcp", "tcp://127.0.0.1:10", "b")
        create("http", "http://127.0.0.1:9/", "c")
        stub.TransitionConnection(
            pb.service.TransitionConnectionRequest(
                id=ignored.id,
                target_state=pb.connection.ConnectionState.Value("CONNECTION_STATE_IGNORED"),
            ),
            timeout=CALL_TIMEOUT,
        )
        counts = stub.CountConnections(pb.service.CountConnectionsRequest(), timeout=CALL_TIMEOUT)

    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prometheus = Prometheus(workdir)
    prometheus.config.write_text(SCRAPE_CONFIG.format(target=admin))
    prometheus.start()
    try:

        def target_up():
            targets = api(prometheus, "targets")["activeTargets"]
            up = [t for t in targets if t["health"] == "up"]
            return (up[0] if up else None), targets

        target = poll("the tether target up", prometheus, target_up)
        assert target["scrapeUrl"] == f"http://{admin}/metrics", target
        assert target["labels"]["job"] == "tether", target

        def connections():
            result = api(prometheus, "query", query="tether_connections")["result"]
            return (result or None), result

        result = poll("tether_connections", prometheus, connections)
        seen = {
            (r["metric"]["kind"], r["metric"]["state"]): float(r["value"][1]) for r in result
        }
        want = {("tcp", "DISCOVERED"): 1.0, ("tcp", "IGNORED"): 1.0, ("http", "DISCOVERED"): 1.0}
        assert {k: v for k, v in seen.items() if v} == want, seen
        # Every state of each kind is there, the empty ones at 0.
        assert len(seen) == 2 * 8, seen
        # The same numbers CountConnections answers.
        by_state = {}
        for (_, state), n in seen.items():
            by_state[state] = by_state.get(state, 0) + n
        for c in counts.counts:
            name = pb.connection.ConnectionState.Name(c.state).removeprefix("CONNECTION_STATE_")
            assert by_state[name] == c.count, (name, by_state)

        def one(query):
            result = api(prometheus, "query", query=query)["result"]
            assert len(result) == 1, (query, result)
            return result[0]

        moves = one('tether_transitions_total{trigger="user",outcome="accepted"}')
        assert float(moves["value"][1]) == 1.0, moves
        revision = one("tether_revision")
        assert float(revision["value"][1]) == counts.revision, revision
        creates = one(
            "sum(tether_rpc_duration_seconds_count"
            '{method="tether.v1.ConnectionService/CreateConnection",code="OK"})'
        )
        assert float(creates["value"][1]) == 3.0, creates
        build = one("tether_build_info")
        assert build["metric"]["version"], build
    finally:
        prometheus.stop()
