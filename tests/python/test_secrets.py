"""Credentials end to end: checks use them, and no secret ever shows.

A loopback HTTPS server (its certificate from a CA made for the test, given
with each credential) stands in for a Prometheus that wants a bearer token:
401 unless the Authorization header is the right one. Tether runs with the
monitor on and debug logging; afterwards the test looks for the tokens in
every RPC answer it got, in the server's log, and in the SQLite files read
as bytes. A copy of the database without its key does not start, so yields no secret.
"""

import base64
import os
import secrets
import shutil
import ssl
import subprocess
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from conftest import CALL_TIMEOUT, FAST_MONITOR, WAIT_TIMEOUT, Watch, tether_bin


def make_pki(folder) -> tuple[str, str, str]:
    """A CA and a certificate for 127.0.0.1 it issued, made with the openssl
    command: (CA PEM, certificate file, key file)."""
    folder.mkdir(exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (
        str(folder / n) for n in ("ca.key", "ca.pem", "tls.key", "tls.csr", "tls.pem", "ext")
    )
    (folder / "ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=tether-test-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    return (folder / "ca.pem").read_text(), cert, key


class TokenServer:
    """Over TLS, answers every GET with 200 when `Authorization: Bearer
    <token>`, 401 otherwise (echoing what it got, as a careless server
    might); records (path, Authorization) of every request. `ca` is the PEM
    of the CA behind its certificate."""

    def __init__(self, token: str, folder):
        self.token = token
        self.requests: list[tuple[str, str | None]] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                auth = self.headers.get("Authorization")
                with lock:
                    outer.requests.append((self.path, auth))
                ok = auth == f"Bearer {outer.token}"
                body = b"ok\n" if ok else f"rejected {auth!r}\n".encode()
                self.send_response(200 if ok else 401)
                if not ok:
                    self.send_header("WWW-Authenticate", f'Bearer error="{auth}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.ca, cert, key = make_pki(folder)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=CALL_TIMEOUT)


def state(pb, name):
    return pb.connection.ConnectionState.Value(f"CONNECTION_STATE_{name}")


def status_text(err: grpc.RpcError) -> str:
    """Everything an error carries: code, message and trailers."""
    return f"{err.code()} {err.details()} {err.trailing_metadata()!r}"


def test_secrets_are_used_by_checks_and_never_shown(pb, start_server, tmp_path):
    good = "good-" + secrets.token_urlsafe(24)
    wrong = "wrong-" + secrets.token_urlsafe(24)
    tokens = [good, wrong]
    # Also their forms on the wire, should one be echoed back encoded.
    needles = tokens + [base64.b64encode(t.encode()).decode() for t in tokens]
    target = TokenServer(good, tmp_path / "pki")
    answers: list[str] = []  # str() of every RPC response and error the test sees

    def call(method, request):
        try:
            response = method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            answers.append(status_text(e))
            raise
        answers.append(str(response))
        return response

    system = pb.connection.TRIGGER_SYSTEM
    server = start_server(*FAST_MONITOR, env={"RUST_LOG": "debug", "TETHER_SECRET_KEY": None})
    try:
        with grpc.insecure_channel(server.addr) as channel:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
            stub = pb.grpc.ConnectionServiceStub(channel)
            creds = pb.credential_grpc.CredentialServiceStub(channel)

            def credential(name, token):
                request = pb.credential.CreateCredentialRequest(name=name, type="prometheus")
                request.secret.update({"token": token, "ca_certificate": target.ca})
                return call(creds.CreateCredential, request)

            def connection(name, path, credential_id):
                return call(
                    stub.CreateConnection,
                    pb.service.CreateConnectionRequest(
                        connection=pb.connection.Connection(
                            kind="prometheus",
                            name=name,
                            url=f"{target.url}/{path}",
                            credential_id=credential_id,
                        )
                    ),
                )

            good_cred = credential("good", good)
            assert good_cred.id and good_cred.name == "good" and good_cred.type == "prometheus"
            ok = connection("ok", "ok", good_cred.id)
            assert ok.credential_id == good_cred.id

            watch = Watch(
                stub,
                pb.service.WatchConnectionsRequest(after_revision=ok.revision),
            )
            try:
                # REGISTERED only if the check sent the right token.
                registered = watch.wait_for(
                    lambda m: m.connection.id == ok.id
                    and m.event.to_state == state(pb, "REGISTERED"),
                    what="REGISTERED by the monitor",
                )
                assert registered.event.trigger == system
                assert ("/ok/-/ready", f"Bearer {good}") in target.requests

                wrong_cred = credential("wrong", wrong)
                rejected = connection("rejected", "rejected", wrong_cred.id)
                down = watch.wait_for(
                    lambda m: m.connection.id == rejected.id
                    and m.event.to_state == state(pb, "DISCONNECTED"),
                    what="DISCONNECTED (credentials rejected) by the monitor",
                )
                assert down.event.trigger == system
                assert "credentials rejected" in down.event.reason, down
                assert "401" in down.event.reason, down
                probe = down.connection.last_probe
                assert probe.outcome == pb.connection.PROBE_OUTCOME_CREDENTIALS_REJECTED, probe
                assert ("/rejected/-/ready", f"Bearer {wrong}") in target.requests
            finally:
                watch.cancel()
            answers.extend(str(m) for m in watch.seen)

            # A user's verified move fails the same way, and says so without the token.
            with pytest.raises(grpc.RpcError) as e:
                call(
                    stub.TransitionConnection,
                    pb.service.TransitionConnectionRequest(
                        id=rejected.id, target_state=state(pb, "CONNECTED")
                    ),
                )
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "CREDENTIALS_REJECTED" in status_text(e.value)

            for id_ in (ok.id, rejected.id):
                call(stub.GetConnection, pb.service.GetConnectionRequest(id=id_))
            call(stub.ListConnections, pb.service.ListConnectionsRequest())
            call(stub.ListConnectionEvents, pb.service.ListConnectionEventsRequest())
            listed = call(creds.ListCredentials, pb.credential.ListCredentialsRequest())
            assert {(c.id, c.name, c.type) for c in listed.credentials} == {
                (good_cred.id, "good", "prometheus"),
                (wrong_cred.id, "wrong", "prometheus"),
            }
            for c in listed.credentials:
                assert [f.name for f, _ in c.ListFields()] == [
                    "id",
                    "name",
                    "type",
                    "create_time",
                ], c
            call(
                pb.definition_grpc.DefinitionServiceStub(channel).GetDefinition,
                pb.definition.GetDefinitionRequest(kind="prometheus"),
            )

        db_files = [server.db_path.with_name(server.db_path.name + s) for s in ("", "-wal", "-shm")]
        running_bytes = {p.name: p.read_bytes() for p in db_files if p.exists()}
        assert server.stop() == 0, server.log()
    finally:
        target.close()

    log = server.log()
    assert "credential created" in log, log  # the log was captured, at debug level
    for needle in needles:
        for text in answers:
            assert needle not in text, f"a response holds a secret: {text}"
        assert needle not in log, "the server log holds a secret"
        for p in db_files:
            if p.exists():
                assert needle.encode() not in p.read_bytes(), f"{p.name} holds a secret"
        for name, data in running_bytes.items():
            assert needle.encode() not in data, f"{name} (while running) holds a secret"
    assert running_bytes, "no database file found"

    # The key file is beside the database, readable by its owner only.
    key = server.db_path.parent / "tether.key"
    assert key.exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, oct(key.stat().st_mode)

    # A copy of the database without its key: the server refuses to start
    # rather than make up a new key, and refuses another key too. Either way
    # it says why, and nothing it prints holds a secret.
    copy_dir = tmp_path / "copy-data"
    copy_dir.mkdir()
    for p in db_files:
        if p.exists():
            shutil.copy(p, copy_dir / p.name)
    env = {k: v for k, v in os.environ.items() if k != "TETHER_SECRET_KEY"}

    def refused(*args: str) -> str:
        run = subprocess.run(
            [str(tether_bin()), "serve", "--listen", "127.0.0.1:0",
             "--db", str(copy_dir / server.db_path.name), *args],
            capture_output=True, text=True, timeout=30, env=env,
        )
        assert run.returncode != 0, run
        assert "tether listening" not in run.stdout
        return run.stderr

    missing = refused()
    assert "restore the key" in missing, missing
    assert not (copy_dir / "tether.key").exists(), "no key was made up for it"
    other_key = tmp_path / "other.key"
    other_key.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    other_key.chmod(0o600)
    wrong = refused("--secret-key-file", str(other_key))
    assert "does not open" in wrong, wrong
    for needle in needles:
        for text in answers + [missing, wrong]:
            assert needle not in text, f"output holds a secret: {text}"
