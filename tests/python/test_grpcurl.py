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


def readme_api_commands():
    """Every command of the README's API examples, as argument lists."""
    import pathlib
    import shlex

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("\n## API\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    commands, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if pending.rstrip().endswith("\\"):
            continue
        try:
            args = shlex.split(pending.replace("\\\n", " "))
        except ValueError:  # a quoted JSON body continues on the next line
            continue
        commands.append(args)
        pending = ""
    assert not pending, f"unfinished command in the README: {pending}"
    return commands


def test_readme_api_commands_are_accepted(grpcurl, server):
    """Each example runs as written (with real ids): grpcurl accepts its JSON and
    finds its method, and the server answers; an error status is fine (the
    examples' etags and states are placeholders), a request grpcurl cannot
    even send is not."""
    made = call(
        grpcurl,
        server,
        f"{SERVICE}/CreateConnection",
        {"connection": {"kind": "tcp", "url": f"tcp://{server.addr}"}, "skip_verification": True},
    )
    cred = call(
        grpcurl,
        server,
        "tether.v1.CredentialService/CreateCredential",
        {
            "name": "readme",
            "type": "prometheus",
            "secret": {"token": "t"},
            "allowed_hosts": ["prometheus.example.com"],
        },
    )
    commands = readme_api_commands()
    assert len(commands) >= 15, commands
    for args in commands:
        assert args[0] == "grpcurl", args
        args = [
            {
                "localhost:50051": server.addr,
            }.get(a, a)
            for a in args
        ]
        args = [
            re.sub(r'"(ID|ID1|ID2)"', f'"{made["id"]}"', a).replace('"CRED"', f'"{cred["id"]}"')
            for a in args
        ]
        out = subprocess.run(
            [grpcurl, "-max-time", "3", *args[1:]], capture_output=True, text=True, timeout=30
        )
        shown = " ".join(args)
        assert "Error invoking method" not in out.stderr, f"{shown}\n{out.stderr}"
        if args[-1].rsplit("/", 1)[-1] in PLACEHOLDER_DEPENDENT:
            assert out.returncode == 0 or "ERROR:\n  Code: " in out.stderr, f"{shown}\n{out.stderr}"
        else:
            assert out.returncode == 0, f"{shown}\n{out.stderr}"


# README examples whose etag, target state or endless stream make an error
# answer (or the deadline) the expected outcome when run in sequence.
PLACEHOLDER_DEPENDENT = {
    "UpdateConnection",
    "TransitionConnection",
    "BatchTransitionConnections",
    "WatchConnections",
}
