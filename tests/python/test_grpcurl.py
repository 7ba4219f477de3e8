"""The API as grpcurl sees it: everything through server reflection, no .proto files."""

import json
import re
import subprocess
import uuid

SERVICE = "tether.v1.ConnectionService"


def grpcurl_run(grpcurl, server, *args, data=None):
    cmd = [grpcurl, "-plaintext", "-max-time", "10"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [server.addr, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def call(grpcurl, server, method, data=None):
    out = grpcurl_run(grpcurl, server, method, data=data)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_list_shows_the_services(grpcurl, server):
    out = grpcurl_run(grpcurl, server, "list")
    assert out.returncode == 0, out.stderr
    services = out.stdout.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services


def test_describe_the_service(grpcurl, server):
    out = grpcurl_run(grpcurl, server, "describe", SERVICE)
    assert out.returncode == 0, out.stderr
    assert f"{SERVICE} is a service:" in out.stdout
    assert (
        "rpc WatchConnections ( .tether.v1.WatchConnectionsRequest )"
        " returns ( stream .tether.v1.WatchConnectionsResponse );" in out.stdout
    )
    assert "rpc CreateConnection ( .tether.v1.CreateConnectionRequest )" in out.stdout


def test_describe_lifecycle(grpcurl, server):
    response = call(grpcurl, server, f"{SERVICE}/DescribeLifecycle")
    states = {s["state"]: s for s in response["states"]}
    assert len(states) == 8
    discovered = states["CONNECTION_STATE_DISCOVERED"]
    assert discovered["userTargets"] == [
        "CONNECTION_STATE_REGISTERED",
        "CONNECTION_STATE_IGNORED",
        "CONNECTION_STATE_DELETED",
    ]
    assert discovered["verifiedTargets"] == ["CONNECTION_STATE_REGISTERED"]
    assert states["CONNECTION_STATE_DELETED"].get("terminal") is True
    assert [s for s, v in states.items() if v.get("terminal")] == ["CONNECTION_STATE_DELETED"]


def test_create_and_get_connection(grpcurl, server):
    created = call(
        grpcurl,
        server,
        f"{SERVICE}/CreateConnection",
        data={"connection": {"kind": "http", "name": "x"}},
    )
    uuid.UUID(created["id"])
    assert created["kind"] == "http"
    assert created["name"] == "x"
    assert created["state"] == "CONNECTION_STATE_DISCOVERED"
    assert created["stateTrigger"] == "TRIGGER_USER"
    assert created["managed"] is True
    assert created["etag"]
    # int64 fields are JSON strings.
    assert int(created["revision"]) > 0

    got = call(grpcurl, server, f"{SERVICE}/GetConnection", data={"id": created["id"]})
    assert got == created


def test_invalid_transition_shows_error_info(grpcurl, server):
    created = call(
        grpcurl,
        server,
        f"{SERVICE}/CreateConnection",
        data={"connection": {"kind": "http", "name": "x"}},
    )
    out = grpcurl_run(
        grpcurl,
        server,
        f"{SERVICE}/TransitionConnection",
        data={"id": created["id"], "target_state": "CONNECTION_STATE_CONNECTED"},
    )
    # grpcurl exits with 64 + the gRPC code: FAILED_PRECONDITION is 9.
    assert out.returncode == 64 + 9, (out.returncode, out.stderr)
    assert "Code: FailedPrecondition" in out.stderr
    # Details are printed decoded only when reflection resolves google.rpc.ErrorInfo.
    details = re.findall(r"^\s*1\)\s*(\{.*\})\s*$", out.stderr, re.MULTILINE)
    assert len(details) == 1, out.stderr
    info = json.loads(details[0])
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["domain"] == "tether.dev"
    assert info["reason"] == "INVALID_TRANSITION"
    assert info["metadata"]["allowed"] == "REGISTERED,IGNORED,DELETED"
    assert info["metadata"]["id"] == created["id"]


def test_health_check_is_serving(grpcurl, server):
    assert call(grpcurl, server, "grpc.health.v1.Health/Check") == {"status": "SERVING"}
    assert call(
        grpcurl, server, "grpc.health.v1.Health/Check", data={"service": SERVICE}
    ) == {"status": "SERVING"}
    out = grpcurl_run(
        grpcurl, server, "grpc.health.v1.Health/Check", data={"service": "no.such.Service"}
    )
    assert out.returncode == 64 + 5, (out.returncode, out.stderr)  # NOT_FOUND
