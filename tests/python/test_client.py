"""The API through a Python grpcio client, against the real server."""

import socket

import grpc
import pytest

from conftest import CALL_TIMEOUT, error_info


def state(pb, name):
    return pb.connection.ConnectionState.Value(f"CONNECTION_STATE_{name}")


def create(pb, stub, **fields):
    initial = fields.pop("initial_state", None)
    request = pb.service.CreateConnectionRequest(
        connection=pb.connection.Connection(**fields),
        initial_state=state(pb, initial) if initial else 0,
        skip_verification=initial is not None,
    )
    return stub.CreateConnection(request, timeout=CALL_TIMEOUT)


def transition(pb, stub, conn, target, **kw):
    request = pb.service.TransitionConnectionRequest(
        id=conn.id, target_state=state(pb, target), **kw
    )
    return stub.TransitionConnection(request, timeout=CALL_TIMEOUT)


def test_create_get_and_move_through_the_lifecycle(pb, stub, tcp_target):
    created = create(pb, stub, kind="tcp", name="db", url=tcp_target, labels={"env": "test"})
    assert created.id
    assert created.kind == "tcp"
    assert created.url == tcp_target
    assert created.state == state(pb, "DISCOVERED")
    assert created.state_trigger == pb.connection.TRIGGER_USER
    assert created.managed is True
    assert created.etag
    assert created.revision > 0

    got = stub.GetConnection(pb.service.GetConnectionRequest(id=created.id), timeout=CALL_TIMEOUT)
    assert got == created

    # REGISTERED is verified: the server really connects to tcp_target.
    registered = transition(pb, stub, created, "REGISTERED", etag=created.etag)
    assert registered.state == state(pb, "REGISTERED")
    assert "tcp connect" in registered.state_reason
    assert registered.revision > created.revision
    assert registered.etag != created.etag

    connected = transition(pb, stub, registered, "CONNECTED", reason="taken into use")
    assert connected.state == state(pb, "CONNECTED")
    assert connected.state_reason == "taken into use"
    assert connected.state_trigger == pb.connection.TRIGGER_USER
    assert connected.revision > registered.revision

    got = stub.GetConnection(pb.service.GetConnectionRequest(id=created.id), timeout=CALL_TIMEOUT)
    assert got == connected

    events = stub.ListConnectionEvents(
        pb.service.ListConnectionEventsRequest(connection_id=created.id), timeout=CALL_TIMEOUT
    ).events
    assert [(e.type, e.from_state, e.to_state) for e in events] == [
        (pb.connection.EVENT_TYPE_CREATED, state(pb, "DISCOVERED"), state(pb, "DISCOVERED")),
        (pb.connection.EVENT_TYPE_TRANSITIONED, state(pb, "DISCOVERED"), state(pb, "REGISTERED")),
        (pb.connection.EVENT_TYPE_TRANSITIONED, state(pb, "REGISTERED"), state(pb, "CONNECTED")),
    ]
    assert [e.revision for e in events] == [
        created.revision,
        registered.revision,
        connected.revision,
    ]


def test_register_of_an_unreachable_connection_fails_and_marks_it_not_found(pb, stub):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    # The port is closed now: the reachability check must fail.
    created = create(pb, stub, kind="tcp", url=f"tcp://127.0.0.1:{port}")
    with pytest.raises(grpc.RpcError) as e:
        transition(pb, stub, created, "REGISTERED")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(pb, e.value)
    assert (info.domain, info.reason) == ("tether.dev", "CONNECTION_UNREACHABLE")
    assert info.metadata["state"] == "NOT_FOUND"
    got = stub.GetConnection(pb.service.GetConnectionRequest(id=created.id), timeout=CALL_TIMEOUT)
    assert got.state == state(pb, "NOT_FOUND")
    assert got.state_trigger == pb.connection.TRIGGER_SYSTEM


@pytest.fixture
def population(pb, stub):
    """Five http connections (team a, a, a, b, b) and two REGISTERED tcp ones."""
    http = [
        create(pb, stub, kind="http", name=f"conn-{i}", labels={"team": "ab"[i // 3]})
        for i in range(5)
    ]
    tcp = [
        create(
            pb,
            stub,
            kind="tcp",
            name=f"conn-{5 + i}",
            url=f"tcp://127.0.0.1:{1000 + i}",
            initial_state="REGISTERED",
        )
        for i in range(2)
    ]
    return http, tcp


def test_list_filters_and_pagination(pb, stub, population):
    http, tcp = population
    list_ = stub.ListConnections

    names, pages = [], 0
    request = pb.service.ListConnectionsRequest(kinds=["http"], page_size=2, order_by="name")
    while True:
        page = list_(request, timeout=CALL_TIMEOUT)
        pages += 1
        assert len(page.connections) <= 2
        names += [c.name for c in page.connections]
        if not page.next_page_token:
            break
        assert pages < 10, "pagination does not end"
        request.page_token = page.next_page_token
    assert pages == 3
    assert names == [f"conn-{i}" for i in range(5)]

    def ids(**filters):
        response = list_(pb.service.ListConnectionsRequest(**filters), timeout=CALL_TIMEOUT)
        assert response.next_page_token == ""
        return sorted(c.id for c in response.connections)

    assert ids() == sorted(c.id for c in http + tcp)
    assert ids(states=[state(pb, "REGISTERED")]) == sorted(c.id for c in tcp)
    assert ids(kinds=["tcp"], states=[state(pb, "DISCOVERED")]) == []
    assert ids(labels={"team": "b"}) == sorted(c.id for c in http[3:])
    assert ids(search="CONN-4") == [http[4].id]

    desc = list_(
        pb.service.ListConnectionsRequest(order_by="name desc", page_size=1), timeout=CALL_TIMEOUT
    )
    assert [c.name for c in desc.connections] == ["conn-6"]
    assert desc.next_page_token
    assert desc.revision == max(c.revision for c in http + tcp)


def test_count_connections(pb, stub, population):
    response = stub.CountConnections(pb.service.CountConnectionsRequest(), timeout=CALL_TIMEOUT)
    counts = {c.state: c.count for c in response.counts}
    assert response.total == 7
    assert counts[state(pb, "DISCOVERED")] == 5
    assert counts[state(pb, "REGISTERED")] == 2
    # One entry per state, zeros included; DELETED only with show_deleted.
    everything_but_deleted = {
        v for v in pb.connection.ConnectionState.values() if v not in (0, state(pb, "DELETED"))
    }
    assert set(counts) == everything_but_deleted
    assert sum(counts.values()) == 7

    tcp = stub.CountConnections(
        pb.service.CountConnectionsRequest(kinds=["tcp"]), timeout=CALL_TIMEOUT
    )
    assert tcp.total == 2


def test_invalid_transition_is_failed_precondition_with_error_info(pb, stub):
    created = create(pb, stub, kind="http", name="x")
    with pytest.raises(grpc.RpcError) as e:
        transition(pb, stub, created, "CONNECTED")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(pb, e.value)
    assert info.domain == "tether.dev"
    assert info.reason == "INVALID_TRANSITION"
    assert info.metadata["allowed"] == "REGISTERED,IGNORED,DELETED"
    assert (info.metadata["from"], info.metadata["to"]) == ("DISCOVERED", "CONNECTED")
    assert info.metadata["id"] == created.id

    got = stub.GetConnection(pb.service.GetConnectionRequest(id=created.id), timeout=CALL_TIMEOUT)
    assert got == created


def test_etag_mismatch_is_aborted(pb, stub):
    created = create(pb, stub, kind="http", name="x")
    with pytest.raises(grpc.RpcError) as e:
        transition(pb, stub, created, "IGNORED", etag="not-the-etag")
    assert e.value.code() == grpc.StatusCode.ABORTED
    info = error_info(pb, e.value)
    assert (info.domain, info.reason) == ("tether.dev", "ETAG_MISMATCH")
    assert info.metadata["current_etag"] == created.etag

    ignored = transition(pb, stub, created, "IGNORED", etag=created.etag)
    assert ignored.state == state(pb, "IGNORED")
    # The etag the caller read before that change is stale now.
    with pytest.raises(grpc.RpcError) as e:
        transition(pb, stub, created, "DELETED", etag=created.etag)
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert error_info(pb, e.value).reason == "ETAG_MISMATCH"


def watch(pb, stub, **request):
    """A watch stream whose reads fail with DEADLINE_EXCEEDED rather than hang."""
    return stub.WatchConnections(
        pb.service.WatchConnectionsRequest(**request), timeout=CALL_TIMEOUT
    )


def test_watch_snapshot_then_live_changes(pb, stub):
    a = create(pb, stub, kind="http", name="a")
    b = create(pb, stub, kind="http", name="b")
    stream = watch(pb, stub, after_revision=0)
    try:
        snapshot = [next(stream), next(stream)]
        assert [m.type for m in snapshot] == [pb.service.WATCH_EVENT_TYPE_ADDED] * 2
        assert {m.connection.id for m in snapshot} == {a.id, b.id}
        assert not any(m.HasField("event") for m in snapshot)

        synced = next(stream)
        assert synced.type == pb.service.WATCH_EVENT_TYPE_SYNCED
        assert synced.revision == b.revision
        assert not synced.HasField("connection")

        moved = transition(pb, stub, a, "IGNORED", reason="not ours")
        modified = next(stream)
        assert modified.type == pb.service.WATCH_EVENT_TYPE_MODIFIED
        assert modified.revision == moved.revision
        assert modified.connection == moved
        assert modified.event.type == pb.connection.EVENT_TYPE_TRANSITIONED
        assert modified.event.connection_id == a.id
        assert modified.event.from_state == state(pb, "DISCOVERED")
        assert modified.event.to_state == state(pb, "IGNORED")
        assert modified.event.reason == "not ours"

        c = create(pb, stub, kind="http", name="c")
        added = next(stream)
        assert added.type == pb.service.WATCH_EVENT_TYPE_ADDED
        assert added.event.type == pb.connection.EVENT_TYPE_CREATED
        assert added.connection == c
    finally:
        stream.cancel()


def test_watch_resumes_after_a_revision(pb, stub):
    a = create(pb, stub, kind="http", name="a")
    b = create(pb, stub, kind="http", name="b")
    a2 = transition(pb, stub, a, "IGNORED")
    c = create(pb, stub, kind="http", name="c")

    stream = watch(pb, stub, after_revision=b.revision)
    try:
        got = [next(stream) for _ in range(3)]
        assert [(m.type, m.revision, m.connection.id) for m in got] == [
            (pb.service.WATCH_EVENT_TYPE_MODIFIED, a2.revision, a.id),
            (pb.service.WATCH_EVENT_TYPE_ADDED, c.revision, c.id),
            (pb.service.WATCH_EVENT_TYPE_SYNCED, c.revision, ""),
        ]
        # Live from here: deleting b takes it out of the view.
        deleted = stub.DeleteConnection(
            pb.service.DeleteConnectionRequest(id=b.id), timeout=CALL_TIMEOUT
        )
        removed = next(stream)
        assert removed.type == pb.service.WATCH_EVENT_TYPE_REMOVED
        assert removed.revision == deleted.revision
        assert removed.event.type == pb.connection.EVENT_TYPE_DELETED
        assert removed.connection.id == b.id
    finally:
        stream.cancel()


def test_watch_from_a_future_revision_is_out_of_range(pb, stub):
    created = create(pb, stub, kind="http", name="a")
    stream = watch(pb, stub, after_revision=created.revision + 1)
    with pytest.raises(grpc.RpcError) as e:
        next(stream)
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(pb, e.value)
    assert (info.domain, info.reason) == ("tether.dev", "REVISION_IN_FUTURE")
    assert info.metadata["current_revision"] == str(created.revision)


def test_sigterm_ends_an_open_watch_with_unavailable_and_exits_0(pb, stub, server):
    create(pb, stub, kind="http", name="a")
    stream = watch(pb, stub, after_revision=0)
    assert next(stream).type == pb.service.WATCH_EVENT_TYPE_ADDED
    assert next(stream).type == pb.service.WATCH_EVENT_TYPE_SYNCED
    assert server.stop() == 0, server.log()
    with pytest.raises(grpc.RpcError) as e:
        next(stream)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def assert_refused_as_invalid(pb, channel, method: str, raw: bytes):
    """Sends `raw` bytes as the request of ConnectionService/`method`."""
    call = channel.unary_unary(
        f"/tether.v1.ConnectionService/{method}",
        request_serializer=None,
        response_deserializer=None,
    )
    with pytest.raises(grpc.RpcError) as e:
        call(raw, timeout=CALL_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert error_info(pb, e.value).reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "raw",
    [
        # GetConnectionRequest.id (field 1, a string) holding invalid UTF-8.
        b"\x0a\x02\xff\xfe",
        # A length that runs past the end of the message.
        b"\x0a\x10abc",
    ],
    ids=["invalid-utf8", "truncated"],
)
def test_a_request_that_does_not_decode_is_invalid_argument(pb, channel, raw):
    assert_refused_as_invalid(pb, channel, "GetConnection", raw)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_struct_nested_past_the_limit_is_invalid_argument(pb, channel):
    # Written by hand: the Python runtime itself refuses to build it.
    # Struct{fields: {"x": Value{struct_value: Struct{...}}}}, 10,000 deep.
    struct = b""
    for _ in range(10_000):
        value = field(5, struct)  # Value.struct_value
        struct = field(1, field(1, b"x") + field(2, value))  # Struct.fields entry
    connection = field(2, b"http") + field(9, struct)  # kind, metadata
    raw = field(1, connection)  # CreateConnectionRequest.connection
    assert_refused_as_invalid(pb, channel, "CreateConnection", raw)
