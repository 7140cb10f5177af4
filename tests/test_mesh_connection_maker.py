"""Connection maker: targets, discovery, backoff with jitter and cap, never-retry cases."""

from __future__ import annotations

import random

import pytest

from weavenet.mesh.connection_maker import (
    ConnectionMaker,
    Failure,
    LiveConnection,
    TargetState,
    parse_target,
)
from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.wire import ConnectionSummary, PeerSummary

US, A, B, C = (PeerName(0x0A0000000000 + i) for i in range(4))


def maker(**kw: object) -> ConnectionMaker:
    return ConnectionMaker(port=6783, rng=random.Random(4), **kw)  # type: ignore[arg-type]


def due(
    m: ConnectionMaker,
    now: float,
    conns: list[LiveConnection] | None = None,
    peers: list[PeerSummary] | None = None,
    room: int | None = None,
) -> list[str]:
    return m.refresh(conns or [], peers or [], US, now, room)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("10.0.0.1", "10.0.0.1:6783"),
        ("10.0.0.1:7000", "10.0.0.1:7000"),
        ("host.example", "host.example:6783"),
        (" host:1 ", "host:1"),
        ("[fe80::1]:7000", "[fe80::1]:7000"),
        ("fe80::1", "[fe80::1]:6783"),
    ],
)
def test_parse_target(text: str, address: str) -> None:
    assert parse_target(text)[0] == address


@pytest.mark.parametrize("text", ["", "host:", "host:http", ":80", "a b", "10.0.0.1:0", "10.0.0.1:70000", "[::1"])
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"host\[:port\]|empty"):
        parse_target(text)


def test_connect_reports_unparsable_peers_and_applies_nothing() -> None:
    m = maker()
    errors = m.connect(["10.0.0.1", "bad peer"], replace=False, now=0)
    assert len(errors) == 1 and "bad peer" in errors[0]
    assert m.direct_targets() == []


def test_first_try_is_immediate_then_backoff_grows_with_jitter_up_to_the_cap() -> None:
    m = maker(backoff_base=2.0, backoff_cap=10.0)
    m.connect(["10.0.0.1"], replace=False, now=0)
    now = 0.0
    assert due(m, now) == ["10.0.0.1:6783"]
    delays = []
    for _ in range(8):
        interval = m.targets["10.0.0.1:6783"].interval
        m.attempt_failed("10.0.0.1:6783", "connection refused", Failure.TRANSIENT, now)
        try_after = m.targets["10.0.0.1:6783"].try_after
        assert try_after is not None
        delay = try_after - now
        assert interval / 2 <= delay < 1.5 * interval
        delays.append(delay)
        assert due(m, try_after - 0.001) == []
        now = try_after
        assert due(m, now) == ["10.0.0.1:6783"]
    assert m.targets["10.0.0.1:6783"].interval == 10.0
    assert max(delays) < 15.0


def test_wrong_password_backs_off_at_the_cap() -> None:
    m = maker(backoff_base=2.0, backoff_cap=300.0)
    m.connect(["10.0.0.1"], replace=False, now=0)
    due(m, 0)
    m.attempt_failed("10.0.0.1:6783", "password mismatch", Failure.AUTH, 0)
    assert m.targets["10.0.0.1:6783"].try_after >= 150.0


@pytest.mark.parametrize("reason", ["cannot connect to ourself", "peer name collision"])
def test_never_retry_self_or_collision_until_connect_is_asked_again(reason: str) -> None:
    m = maker()
    m.connect(["10.0.0.1"], replace=False, now=0)
    due(m, 0)
    m.attempt_failed("10.0.0.1:6783", reason, Failure.NEVER, 0)
    assert due(m, 1e9) == []
    [status] = m.status(now=1)
    assert status["State"] == "failed" and reason in str(status["Info"]) and "never" in str(status["Info"])
    m.connect(["10.0.0.1"], replace=False, now=5)
    assert due(m, 5) == ["10.0.0.1:6783"]


def test_a_long_lived_connection_is_redialled_at_once_a_short_one_backs_off() -> None:
    m = maker(backoff_base=2.0, reset_after=60.0)
    m.connect(["10.0.0.1"], replace=False, now=0)
    due(m, 0)
    m.connected("10.0.0.1:6783")
    m.terminated("10.0.0.1:6783", "connection closed", Failure.TRANSIENT, now=100)
    assert due(m, 100) == ["10.0.0.1:6783"]
    m.connected("10.0.0.1:6783")
    m.terminated("10.0.0.1:6783", "connection closed", Failure.TRANSIENT, now=101)
    assert due(m, 101) == []
    assert m.termination_count == 2


def test_direct_peer_without_port_is_skipped_while_it_is_connected_inbound() -> None:
    m = maker()
    m.connect(["10.0.0.1"], replace=False, now=0)
    inbound = LiveConnection(A, "10.0.0.1:51000", outbound=False, target=None)
    assert due(m, 0, [inbound]) == []
    assert m.status(0) == [], "nothing to show: the peer is connected"
    assert due(m, 1) == ["10.0.0.1:6783"], "back to dialling once the inbound link is gone"


def test_discovery_adds_addresses_of_peers_we_lack_and_drops_them_when_connected() -> None:
    m = maker()
    peers = [
        PeerSummary(
            A,
            "a",
            1,
            1,
            (
                ConnectionSummary(B, "10.0.0.2:6783", True, True),
                ConnectionSummary(C, "10.0.0.3:40000", False, True),
                ConnectionSummary(US, "10.0.0.9:6783", True, True),
            ),
        ),
    ]
    assert sorted(due(m, 0, peers=peers)) == ["10.0.0.2:6783", "10.0.0.3:6783"]
    m.connected("10.0.0.2:6783")
    conns = [LiveConnection(B, "10.0.0.2:6783", True, "10.0.0.2:6783")]
    m.attempt_failed("10.0.0.3:6783", "refused", Failure.TRANSIENT, 0)
    due(m, 0, conns, peers)
    assert "10.0.0.3:6783" in m.targets
    # Once we are connected to C another way, its discovered target is forgotten.
    conns.append(LiveConnection(C, "10.0.0.3:51111", False, None))
    due(m, 0, conns, peers)
    assert "10.0.0.3:6783" not in m.targets


def test_no_discovery_means_only_direct_targets() -> None:
    m = maker(discovery=False)
    peers = [PeerSummary(A, "a", 1, 1, (ConnectionSummary(B, "10.0.0.2:6783", True, True),))]
    assert due(m, 0, peers=peers) == []


def test_replace_and_forget() -> None:
    m = maker()
    m.connect(["10.0.0.1", "10.0.0.2"], replace=False, now=0)
    m.connect(["10.0.0.3"], replace=True, now=0)
    assert m.direct_targets() == ["10.0.0.3"]
    m.forget(["10.0.0.3"])
    assert m.direct_targets() == []


def test_a_direct_target_that_becomes_connected_otherwise_is_suspended() -> None:
    m = maker()
    m.connect(["10.0.0.1"], replace=False, now=0)
    due(m, 0)
    m.attempt_failed("10.0.0.1:6783", "multiple connections", Failure.TRANSIENT, 0)
    inbound = LiveConnection(A, "10.0.0.1:51000", outbound=False, target=None)
    assert due(m, 100, [inbound]) == []
    assert m.targets["10.0.0.1:6783"].state is TargetState.SUSPENDED
    assert m.status(100) == [], "suspended targets are not shown as connections"


def test_room_caps_new_attempts() -> None:
    m = maker()
    m.connect(["10.0.0.1", "10.0.0.2", "10.0.0.3"], replace=False, now=0)
    assert len(due(m, 0, room=2)) == 2
    assert len(due(m, 0, room=5)) == 1


def test_status_shows_connecting_retrying_and_failed() -> None:
    m = maker()
    m.connect(["10.0.0.1"], replace=False, now=0)
    due(m, 0)
    assert m.status(0)[0]["State"] == "connecting"
    m.attempt_failed("10.0.0.1:6783", "connection refused", Failure.TRANSIENT, 0)
    [failed] = m.status(0)
    assert failed["State"] == "failed" and str(failed["Info"]).startswith("connection refused, retry: in ")
    due(m, 100)
    assert m.status(100)[0] == {
        "Address": "10.0.0.1:6783",
        "Outbound": True,
        "State": "retrying",
        "Info": "connection refused",
        "Attrs": None,
    }
