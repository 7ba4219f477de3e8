"""Background monitoring end to end, against a real Prometheus (Debian's
`prometheus` package, which scripts/test installs).

The test starts Prometheus itself on a loopback port with a temporary storage
folder, and Tether with the monitor on and short intervals. Every wait on
Tether goes through the watch stream or a bounded poll with a deadline; the
only polling of an outside process is Prometheus's own readiness.
"""

import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import CALL_TIMEOUT, FAST_MONITOR, WAIT_TIMEOUT, Watch

# Longest Prometheus may take to answer /-/ready, and to exit on SIGTERM.
PROMETHEUS_START_TIMEOUT = 60
PROMETHEUS_STOP_TIMEOUT = 30

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1m
  evaluation_interval: 1m
scrape_configs: []
"""


def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(
            "prometheus is not installed: scripts/test installs it "
            "(apt-get install prometheus); this test does not skip without it"
        )
    return path


def free_port() -> int:
    """A port nothing listens on now (bound, then closed, just before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus on 127.0.0.1:port, storage under `workdir`."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(PROMETHEUS_CONFIG)
        self.log_path = workdir / "prometheus.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None):
        """Starts it on `port`, or on a free port (retrying with another one
        when that was taken in between); returns once /-/ready answers 200."""
        if port is not None:
            problem = self._try_start(port)
            if problem:
                pytest.fail(f"prometheus did not start again on port {port}: {problem}")
            return
        problems = []
        for _ in range(5):
            problem = self._try_start(free_port())
            if not problem:
                return
            problems.append(problem)
        pytest.fail("prometheus did not start:\n" + "\n".join(problems))

    def _try_start(self, port: int) -> str | None:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} on port {port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    prometheus_bin(),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.port = port
        deadline = time.monotonic() + PROMETHEUS_START_TIMEOUT
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                return f"exited with {code} on port {port}\n{self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return None
                    last = f"HTTP {answer.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"  # 503 while it starts
            except OSError as e:
                last = repr(e)
            # Polling an outside process we started, not synchronising with Tether.
            time.sleep(0.05)
        self.stop()
        return f"not ready within {PROMETHEUS_START_TIMEOUT}s (last: {last})\n{self.log()}"

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=PROMETHEUS_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def prometheus(tmp_path):
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    p = Prometheus(workdir)
    p.start()
    yield p
    p.stop()


def state(pb, name):
    return pb.connection.ConnectionState.Value(f"CONNECTION_STATE_{name}")


def get(pb, stub, id_):
    return stub.GetConnection(pb.service.GetConnectionRequest(id=id_), timeout=CALL_TIMEOUT)


def transitioned_to(pb, target, trigger=None):
    """A predicate for a watch message: this connection's transition to target."""

    def match(m):
        return (
            m.event.type == pb.connection.EVENT_TYPE_TRANSITIONED
            and m.event.to_state == state(pb, target)
            and (trigger is None or m.event.trigger == trigger)
        )

    return match


def test_prometheus_is_monitored_through_its_lifecycle(pb, start_server, prometheus):
    server = start_server(*FAST_MONITOR)
    with grpc.insecure_channel(server.addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
        stub = pb.grpc.ConnectionServiceStub(channel)
        system, user = pb.connection.TRIGGER_SYSTEM, pb.connection.TRIGGER_USER

        created = stub.CreateConnection(
            pb.service.CreateConnectionRequest(
                connection=pb.connection.Connection(
                    kind="prometheus", name="prom", url=prometheus.url
                )
            ),
            timeout=CALL_TIMEOUT,
        )
        assert created.state == state(pb, "DISCOVERED")
        assert created.managed is True
        # Every change after the creation, so nothing the monitor did before
        # the watch opened is missed.
        watch = Watch(
            stub,
            pb.service.WatchConnectionsRequest(
                after_revision=created.revision, ids=[created.id]
            ),
        )
        try:
            # The monitor verifies a new DISCOVERED connection by itself.
            registered = watch.wait_for(
                transitioned_to(pb, "REGISTERED", system),
                what="DISCOVERED -> REGISTERED by the monitor",
            )
            assert registered.event.from_state == state(pb, "DISCOVERED")
            assert registered.event.reason, registered
            assert registered.connection.state_trigger == system

            # Prometheus does not auto-connect: a user takes it into use.
            connected = stub.TransitionConnection(
                pb.service.TransitionConnectionRequest(
                    id=created.id, target_state=state(pb, "CONNECTED"), reason="in use"
                ),
                timeout=CALL_TIMEOUT,
            )
            assert connected.state == state(pb, "CONNECTED")
            seen = watch.wait_for(transitioned_to(pb, "CONNECTED"), what="CONNECTED")
            assert seen.event.trigger == user
            assert seen.revision == connected.revision

            # Prometheus goes away: after the failure threshold, DISCONNECTED.
            prometheus.stop()
            down = watch.wait_for(
                transitioned_to(pb, "DISCONNECTED"), what="CONNECTED -> DISCONNECTED"
            )
            assert down.event.from_state == state(pb, "CONNECTED")
            assert down.event.trigger == system, down
            assert down.event.actor == "tether", down
            reason = down.event.reason
            assert reason, down
            # What the probe saw: the request it made, and that it failed twice.
            assert f"127.0.0.1:{prometheus.port}/-/ready" in reason, reason
            assert "2 failed probes" in reason, reason
            assert down.connection.state_reason == reason
            probe = down.connection.last_probe
            assert probe.outcome == pb.connection.PROBE_OUTCOME_UNREACHABLE, probe
            assert probe.consecutive_failures >= 2, probe
            assert probe.message, probe

            # Back on the same port: CONNECTED returns by itself.
            prometheus.start(port=prometheus.port)
            back = watch.wait_for(
                transitioned_to(pb, "CONNECTED"), what="DISCONNECTED -> CONNECTED"
            )
            assert back.event.from_state == state(pb, "DISCONNECTED")
            assert back.event.trigger == system, back
            assert "HTTP 200" in back.event.reason, back
            assert back.connection.last_probe.outcome == pb.connection.PROBE_OUTCOME_REACHABLE
            assert back.connection.last_probe.consecutive_failures == 0

            # A second connection to the same server, still monitored, shows
            # that probing goes on while the first is in MAINTENANCE.
            control = stub.CreateConnection(
                pb.service.CreateConnectionRequest(
                    connection=pb.connection.Connection(
                        kind="prometheus",
                        name="prom-control",
                        url=prometheus.url,
                        identity="prometheus-control",
                    ),
                    initial_state=state(pb, "CONNECTED"),
                ),
                timeout=CALL_TIMEOUT,
            )
            assert control.state == state(pb, "CONNECTED")

            maintenance = stub.TransitionConnection(
                pb.service.TransitionConnectionRequest(
                    id=created.id,
                    target_state=state(pb, "MAINTENANCE"),
                    reason="upgrade",
                ),
                timeout=CALL_TIMEOUT,
            )
            assert maintenance.state == state(pb, "MAINTENANCE")
            watch.wait_for(transitioned_to(pb, "MAINTENANCE", user), what="MAINTENANCE")
            frozen = get(pb, stub, created.id).last_probe
            assert frozen == maintenance.last_probe

            # Bounded poll of the control's latest probe (a new result alone
            # makes no event, so the watch cannot show it).
            times = []
            deadline = time.monotonic() + WAIT_TIMEOUT
            while len(times) < 4:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the control connection was probed {len(times)} times "
                        f"in {WAIT_TIMEOUT}s: {times}"
                    )
                probe = get(pb, stub, control.id).last_probe
                if probe.HasField("time"):
                    t = probe.time.ToNanoseconds()
                    if not times or t != times[-1]:
                        assert not times or t > times[-1], (times, t)
                        times.append(t)
                time.sleep(0.05)
            # Four distinct probe times: it advanced at least three times.

            still = get(pb, stub, created.id)
            assert still.state == state(pb, "MAINTENANCE")
            assert still.last_probe == frozen, (frozen, still.last_probe)
            assert still.revision == maintenance.revision
            control_now = get(pb, stub, control.id)
            assert control_now.state == state(pb, "CONNECTED")
            assert control_now.last_probe.outcome == pb.connection.PROBE_OUTCOME_REACHABLE
        finally:
            watch.cancel()

        events = stub.ListConnectionEvents(
            pb.service.ListConnectionEventsRequest(connection_id=created.id),
            timeout=CALL_TIMEOUT,
        ).events
        assert [(e.to_state, e.trigger) for e in events] == [
            (state(pb, "DISCOVERED"), user),
            (state(pb, "REGISTERED"), system),
            (state(pb, "CONNECTED"), user),
            (state(pb, "DISCONNECTED"), system),
            (state(pb, "CONNECTED"), system),
            (state(pb, "MAINTENANCE"), user),
        ]
