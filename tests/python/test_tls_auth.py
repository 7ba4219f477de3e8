"""TLS, mTLS and the access file, as grpcio and grpcurl clients see them.

Certificates come from trustme (a throwaway CA made in Python). Tokens come
from `tether token`, whose printed entry goes into the access file. Each
server is module-scoped and shared by the tests here; every test works on
its own connections, so none depends on another.
"""

import hashlib
import json
import subprocess
import uuid

import grpc
import pytest
import trustme

from conftest import CALL_TIMEOUT, Server, error_info, tether_bin

SERVICE = "tether.v1.ConnectionService"

# The standard health service, for grpcurl to call without reflection:
# reflection needs a role, a health check needs nothing.
HEALTH_PROTO = """\
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"""


def make_token(principal: str, *roles: str) -> tuple[str, str]:
    """A fresh token from `tether token` and its access-file entry."""
    args = [str(tether_bin()), "token", "--principal", principal]
    for role in roles:
        args += ["--role", role]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    token, entry = lines[0].strip(), lines[1]
    # The file holds only the token's SHA-256, never the token.
    assert hashlib.sha256(token.encode()).hexdigest() in entry
    assert token not in entry
    return token, entry


class Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, and files of both."""

    def __init__(self, workdir):
        self.ca = trustme.CA()
        self.ca_pem = self.ca.cert_pem.bytes()
        self.ca_path = workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_path = workdir / "server.pem"
        self.key_path = workdir / "server.key"
        server_cert.private_key_and_cert_chain_pem.write_to_path(str(self.cert_path))
        server_cert.private_key_pem.write_to_path(str(self.key_path))
        self.key_path.chmod(0o600)

    def tls_args(self) -> list[str]:
        return ["--tls-cert", str(self.cert_path), "--tls-key", str(self.key_path)]


def client_cert(ca: trustme.CA, common_name: str) -> tuple[bytes, bytes]:
    """(private key, certificate chain) PEM of a client certificate whose
    subject CN is common_name."""
    cert = ca.issue_cert(f"{common_name}.clients.test", common_name=common_name)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return cert.private_key_pem.bytes(), chain


def start(workdir, pki: Pki, access: str, *extra: str) -> Server:
    access_path = workdir / "access.yaml"
    access_path.write_text(access)
    access_path.chmod(0o600)
    return Server(
        workdir,
        "--disable-monitor",
        *pki.tls_args(),
        "--auth-file",
        str(access_path),
        *extra,
    )


def stop(server: Server):
    code = server.stop()
    assert code == 0, f"tether exited with {code} after SIGTERM\n{server.log()}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A TLS server with an access file: alice and bob operators, carol a viewer."""
    workdir = tmp_path_factory.mktemp("tls")
    pki = Pki(workdir)
    tokens, entries = {}, []
    for principal, role in [("alice", "operator"), ("bob", "operator"), ("carol", "viewer")]:
        tokens[principal], entry = make_token(principal, role)
        entries.append(entry)
    server = start(workdir, pki, "tokens:\n" + "\n".join(entries) + "\n")
    yield server, pki, tokens
    stop(server)
    log = server.log()
    for principal, token in tokens.items():
        assert token not in log, f"{principal}'s token is in the server log"


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    """A TLS server that verifies client certificates against its CA: the CN
    "reader" is a viewer, "writer" an operator, "stranger" is not listed;
    dave holds an operator token."""
    workdir = tmp_path_factory.mktemp("mtls")
    pki = Pki(workdir)
    token, entry = make_token("dave", "operator")
    access = (
        "tokens:\n"
        + entry
        + "\ncertificates:\n"
        + "  - {principal: reader, roles: [viewer]}\n"
        + "  - {principal: writer, roles: [operator]}\n"
    )
    server = start(workdir, pki, access, "--tls-client-ca", str(pki.ca_path))
    yield server, pki, token
    stop(server)
    assert token not in server.log(), "dave's token is in the server log"


def tls_channel(server: Server, root_pem: bytes, token: str | None = None, cert=None):
    """A grpcio channel over TLS trusting root_pem; with a token on every
    call, and with cert = (key, chain) as the client certificate."""
    key, chain = cert or (None, None)
    creds = grpc.ssl_channel_credentials(
        root_certificates=root_pem, private_key=key, certificate_chain=chain
    )
    if token is not None:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(token)
        )
    return grpc.secure_channel(server.addr, creds)


def refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, (e.value.code(), e.value.details())
    return e.value


def state(pb, name):
    return pb.connection.ConnectionState.Value(f"CONNECTION_STATE_{name}")


def create(pb, stub, name):
    request = pb.service.CreateConnectionRequest(
        connection=pb.connection.Connection(kind="http", name=name)
    )
    return stub.CreateConnection(request, timeout=CALL_TIMEOUT)


def list_request(pb):
    return pb.service.ListConnectionsRequest()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# 1. grpcio over TLS with bearer tokens.


def test_operator_creates_moves_reads_and_lists_with_its_name_as_actor(pb, tls):
    server, pki, tokens = tls
    with tls_channel(server, pki.ca_pem, tokens["alice"]) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        created = create(pb, stub, unique("alice"))
        assert created.owner == "alice"
        assert created.state == state(pb, "DISCOVERED")

        moved = stub.TransitionConnection(
            pb.service.TransitionConnectionRequest(
                id=created.id,
                target_state=state(pb, "REGISTERED"),
                skip_verification=True,
                etag=created.etag,
            ),
            timeout=CALL_TIMEOUT,
        )
        assert moved.state == state(pb, "REGISTERED")
        assert moved.revision > created.revision

        got = stub.GetConnection(
            pb.service.GetConnectionRequest(id=created.id), timeout=CALL_TIMEOUT
        )
        assert got == moved

        listed = stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT).connections
        assert created.id in [c.id for c in listed]
        assert {c.owner for c in listed} == {"alice"}

        events = stub.ListConnectionEvents(
            pb.service.ListConnectionEventsRequest(connection_id=created.id),
            timeout=CALL_TIMEOUT,
        ).events
        assert [(e.type, e.to_state, e.actor) for e in events] == [
            (pb.connection.EVENT_TYPE_CREATED, state(pb, "DISCOVERED"), "alice"),
            (pb.connection.EVENT_TYPE_TRANSITIONED, state(pb, "REGISTERED"), "alice"),
        ]


def test_token_as_per_call_metadata_works_too(pb, tls):
    server, pki, tokens = tls
    with tls_channel(server, pki.ca_pem) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        response = stub.ListConnections(
            list_request(pb),
            timeout=CALL_TIMEOUT,
            metadata=[("authorization", f"Bearer {tokens['alice']}")],
        )
        assert all(c.owner == "alice" for c in response.connections)


def test_viewer_reads_but_may_not_create(pb, tls):
    server, pki, tokens = tls
    with tls_channel(server, pki.ca_pem, tokens["carol"]) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT)
        stub.CountConnections(pb.service.CountConnectionsRequest(), timeout=CALL_TIMEOUT)

        err = refused(lambda: create(pb, stub, unique("carol")), grpc.StatusCode.PERMISSION_DENIED)
        info = error_info(pb, err)
        assert (info.domain, info.reason) == ("tether.dev", "PERMISSION_DENIED")
        assert "carol" in err.details()
        assert "CreateConnection" in err.details()


def test_no_token_is_unauthenticated(pb, tls):
    server, pki, _ = tls
    with tls_channel(server, pki.ca_pem) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        for call in [
            lambda: stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT),
            lambda: create(pb, stub, unique("nobody")),
        ]:
            err = refused(call, grpc.StatusCode.UNAUTHENTICATED)
            info = error_info(pb, err)
            assert (info.domain, info.reason) == ("tether.dev", "UNAUTHENTICATED")


def test_unknown_or_malformed_token_is_unauthenticated(pb, tls):
    server, pki, tokens = tls
    with tls_channel(server, pki.ca_pem) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        for header in [
            "Bearer tether_not-a-token-anyone-holds",
            f"Basic {tokens['alice']}",
            "Bearer ",
        ]:
            err = refused(
                lambda: stub.ListConnections(
                    list_request(pb), timeout=CALL_TIMEOUT, metadata=[("authorization", header)]
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            assert error_info(pb, err).reason == "UNAUTHENTICATED"
            # The refusal never echoes what was presented.
            assert tokens["alice"] not in err.details()


def test_another_operator_does_not_see_the_connection(pb, tls):
    server, pki, tokens = tls
    with (
        tls_channel(server, pki.ca_pem, tokens["alice"]) as alice_ch,
        tls_channel(server, pki.ca_pem, tokens["bob"]) as bob_ch,
    ):
        alice = pb.grpc.ConnectionServiceStub(alice_ch)
        bob = pb.grpc.ConnectionServiceStub(bob_ch)
        created = create(pb, alice, unique("alice-only"))

        err = refused(
            lambda: bob.GetConnection(
                pb.service.GetConnectionRequest(id=created.id), timeout=CALL_TIMEOUT
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        info = error_info(pb, err)
        assert (info.domain, info.reason) == ("tether.dev", "CONNECTION_NOT_FOUND")
        assert info.metadata["id"] == created.id

        # Exactly as for an id that does not exist.
        missing = refused(
            lambda: bob.GetConnection(
                pb.service.GetConnectionRequest(id=str(uuid.uuid4())), timeout=CALL_TIMEOUT
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        assert error_info(pb, missing).reason == info.reason

        refused(
            lambda: bob.TransitionConnection(
                pb.service.TransitionConnectionRequest(
                    id=created.id, target_state=state(pb, "IGNORED")
                ),
                timeout=CALL_TIMEOUT,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        refused(
            lambda: bob.ListConnectionEvents(
                pb.service.ListConnectionEventsRequest(connection_id=created.id),
                timeout=CALL_TIMEOUT,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        listed = bob.ListConnections(list_request(pb), timeout=CALL_TIMEOUT).connections
        assert created.id not in [c.id for c in listed]
        assert all(c.owner == "bob" for c in listed)

        # Alice still sees it, unchanged.
        got = alice.GetConnection(
            pb.service.GetConnectionRequest(id=created.id), timeout=CALL_TIMEOUT
        )
        assert got == created


def test_counts_and_watches_show_only_what_is_in_scope(pb, tls):
    server, pki, tokens = tls
    with (
        tls_channel(server, pki.ca_pem, tokens["alice"]) as alice_ch,
        tls_channel(server, pki.ca_pem, tokens["bob"]) as bob_ch,
    ):
        alice = pb.grpc.ConnectionServiceStub(alice_ch)
        bob = pb.grpc.ConnectionServiceStub(bob_ch)
        create(pb, alice, unique("alice-counted"))
        mine = bob.ListConnections(list_request(pb), timeout=CALL_TIMEOUT).connections
        count = bob.CountConnections(pb.service.CountConnectionsRequest(), timeout=CALL_TIMEOUT)
        assert count.total == len(mine)

        stream = bob.WatchConnections(
            pb.service.WatchConnectionsRequest(after_revision=0), timeout=CALL_TIMEOUT
        )
        try:
            snapshot = []
            while True:
                message = next(stream)
                if message.type == pb.service.WATCH_EVENT_TYPE_SYNCED:
                    break
                snapshot.append(message.connection)
            assert sorted(c.id for c in snapshot) == sorted(c.id for c in mine)

            # Alice's change comes first in revision order, so had it leaked
            # it would arrive before Bob's own.
            create(pb, alice, unique("alice-unseen"))
            own = create(pb, bob, unique("bob-seen"))
            message = next(stream)
            while message.type == pb.service.WATCH_EVENT_TYPE_BOOKMARK:
                message = next(stream)
            assert message.type == pb.service.WATCH_EVENT_TYPE_ADDED
            assert message.connection == own
        finally:
            stream.cancel()


def test_health_needs_no_token_over_tls(tls):
    server, pki, _ = tls
    with tls_channel(server, pki.ca_pem) as ch:
        check = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        # HealthCheckResponse{status: SERVING}: field 1, varint 1.
        assert check(b"", timeout=CALL_TIMEOUT) == b"\x08\x01"


# 2. Not TLS, or TLS the client does not trust.


def test_plaintext_channel_to_the_tls_port_is_unavailable(pb, tls):
    server, pki, tokens = tls
    with grpc.insecure_channel(server.addr) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        refused(
            lambda: stub.ListConnections(
                list_request(pb),
                timeout=CALL_TIMEOUT,
                metadata=[("authorization", f"Bearer {tokens['alice']}")],
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
    # The server shrugs it off and keeps serving TLS.
    with tls_channel(server, pki.ca_pem, tokens["alice"]) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT)


def test_a_client_that_does_not_trust_the_server_ca_is_unavailable(pb, tls):
    server, _, tokens = tls
    other = trustme.CA()
    with tls_channel(server, other.cert_pem.bytes(), tokens["alice"]) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        refused(
            lambda: stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )


# 3. mTLS: a client certificate from the configured CA is a principal.


def test_listed_client_certificate_may_read(pb, mtls):
    server, pki, _ = mtls
    with tls_channel(server, pki.ca_pem, cert=client_cert(pki.ca, "reader")) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT)
        # A viewer, nothing more.
        err = refused(
            lambda: create(pb, stub, unique("reader")), grpc.StatusCode.PERMISSION_DENIED
        )
        assert error_info(pb, err).reason == "PERMISSION_DENIED"
        assert "reader" in err.details()


def test_client_certificate_principal_owns_and_acts(pb, mtls):
    server, pki, _ = mtls
    with tls_channel(server, pki.ca_pem, cert=client_cert(pki.ca, "writer")) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        created = create(pb, stub, unique("writer"))
        assert created.owner == "writer"
        events = stub.ListConnectionEvents(
            pb.service.ListConnectionEventsRequest(connection_id=created.id),
            timeout=CALL_TIMEOUT,
        ).events
        assert [e.actor for e in events] == ["writer"]


def test_unlisted_client_certificate_holds_no_role(pb, mtls):
    server, pki, _ = mtls
    with tls_channel(server, pki.ca_pem, cert=client_cert(pki.ca, "stranger")) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        err = refused(
            lambda: stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert error_info(pb, err).reason == "PERMISSION_DENIED"


def test_client_certificate_from_another_ca_fails_the_handshake(pb, mtls):
    server, pki, token = mtls
    foreign = trustme.CA()
    # Its CN is one the access file lists: only the signature is wrong.
    cert = client_cert(foreign, "reader")
    with tls_channel(server, pki.ca_pem, token, cert=cert) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        refused(
            lambda: stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )


def test_without_a_client_certificate_a_token_still_works(pb, mtls):
    server, pki, token = mtls
    with tls_channel(server, pki.ca_pem, token) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        created = create(pb, stub, unique("dave"))
        assert created.owner == "dave"
    with tls_channel(server, pki.ca_pem) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        err = refused(
            lambda: stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert error_info(pb, err).reason == "UNAUTHENTICATED"


def test_a_bad_token_is_refused_even_with_a_good_certificate(pb, mtls):
    server, pki, _ = mtls
    cert = client_cert(pki.ca, "reader")
    with tls_channel(server, pki.ca_pem, "tether_wrong", cert=cert) as ch:
        stub = pb.grpc.ConnectionServiceStub(ch)
        err = refused(
            lambda: stub.ListConnections(list_request(pb), timeout=CALL_TIMEOUT),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert error_info(pb, err).reason == "UNAUTHENTICATED"


# 4. grpcurl over TLS with a token.


def grpcurl_tls(grpcurl, server, pki, *args, token=None, data=None, extra=()):
    cmd = [grpcurl, "-max-time", "10", "-cacert", str(pki.ca_path), *extra]
    if token is not None:
        cmd += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [server.addr, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_grpcurl_lists_services_through_reflection_with_a_token(grpcurl, tls):
    server, pki, tokens = tls
    out = grpcurl_tls(grpcurl, server, pki, "list", token=tokens["carol"])
    assert out.returncode == 0, out.stderr
    services = out.stdout.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services


def test_grpcurl_calls_with_a_token(grpcurl, pb, tls):
    server, pki, tokens = tls
    with tls_channel(server, pki.ca_pem, tokens["bob"]) as ch:
        created = create(pb, pb.grpc.ConnectionServiceStub(ch), unique("bob"))
    out = grpcurl_tls(
        grpcurl, server, pki, f"{SERVICE}/ListConnections", token=tokens["bob"], data={}
    )
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)["connections"]
    assert created.id in [c["id"] for c in listed]
    assert {c["owner"] for c in listed} == {"bob"}


def test_grpcurl_without_a_token_is_unauthenticated(grpcurl, tls):
    server, pki, _ = tls
    # Reflection itself needs a role, so even listing is refused.
    out = grpcurl_tls(grpcurl, server, pki, "list")
    assert out.returncode != 0
    assert "Unauthenticated" in out.stderr, out.stderr

    out = grpcurl_tls(grpcurl, server, pki, f"{SERVICE}/ListConnections", data={})
    assert out.returncode != 0
    assert "Unauthenticated" in out.stderr, out.stderr


def test_grpcurl_health_check_needs_no_token(grpcurl, tls, tmp_path):
    server, pki, _ = tls
    (tmp_path / "health.proto").write_text(HEALTH_PROTO)
    out = grpcurl_tls(
        grpcurl,
        server,
        pki,
        "grpc.health.v1.Health/Check",
        extra=["-import-path", str(tmp_path), "-proto", "health.proto"],
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_grpcurl_refuses_the_server_without_its_ca(grpcurl, tls):
    server, _, tokens = tls
    out = subprocess.run(
        [
            grpcurl,
            "-max-time",
            "10",
            "-H",
            f"authorization: Bearer {tokens['carol']}",
            server.addr,
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "certificate" in out.stderr, out.stderr
