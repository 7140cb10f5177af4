"""The text views users and their scripts read: `status`, `status connections|peers|targets`."""

from __future__ import annotations

from typing import Any

from weavenet.mesh import status_text


def report(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Protocol": "weave",
        "ProtocolMinVersion": 1,
        "ProtocolMaxVersion": 2,
        "Encryption": True,
        "PeerDiscovery": True,
        "Name": "aa:aa:aa:aa:aa:01",
        "NickName": "host1",
        "Port": 6783,
        "Peers": [
            {
                "Name": "aa:aa:aa:aa:aa:01",
                "NickName": "host1",
                "UID": 1,
                "Version": 4,
                "Connections": [
                    {
                        "Name": "aa:aa:aa:aa:aa:02",
                        "NickName": "host2",
                        "Address": "10.0.0.2:6783",
                        "Outbound": True,
                        "Established": True,
                    }
                ],
            },
            {
                "Name": "aa:aa:aa:aa:aa:02",
                "NickName": "host2",
                "UID": 2,
                "Version": 3,
                "Connections": [
                    {
                        "Name": "aa:aa:aa:aa:aa:01",
                        "NickName": "host1",
                        "Address": "10.0.0.1:40000",
                        "Outbound": False,
                        "Established": False,
                    }
                ],
            },
        ],
        "Connections": [
            {
                "Address": "10.0.0.2:6783",
                "Outbound": True,
                "State": "established",
                "Info": "encrypted   aa:aa:aa:aa:aa:02(host2)",
                "Attrs": {"encrypted": True, "mtu": 1410},
            },
            {
                "Address": "10.0.0.3:6783",
                "Outbound": True,
                "State": "failed",
                "Info": "password mismatch, retry: in 300.0s",
                "Attrs": None,
            },
        ],
        "TerminationCount": 0,
        "Targets": ["10.0.0.2", "10.0.0.3"],
        "TrustedSubnets": [],
        "ConnLimit": 200,
    }
    base.update(overrides)
    return base


def test_status_block_is_right_aligned_and_counts_states() -> None:
    assert status_text.format_status(report()) == (
        "        Service: router\n"
        "       Protocol: weave 1..2\n"
        "           Name: aa:aa:aa:aa:aa:01(host1)\n"
        "     Encryption: enabled\n"
        "  PeerDiscovery: enabled\n"
        "        Targets: 2\n"
        "    Connections: 2 (1 established, 1 failed)\n"
        "          Peers: 2 (with 1 established, 1 pending connections)\n"
        " TrustedSubnets: none\n"
    )


def test_status_without_password_single_version_and_nothing_connected() -> None:
    text = status_text.format_status(
        report(Encryption=False, ProtocolMaxVersion=1, Connections=[], Peers=[], TrustedSubnets=["10.0.0.0/8"])
    )
    assert "     Encryption: disabled\n" in text
    assert "       Protocol: weave 1\n" in text
    assert "    Connections: 0\n" in text and "          Peers: 0\n" in text
    assert " TrustedSubnets: 10.0.0.0/8\n" in text


def test_connection_lines_carry_state_info_and_reasons() -> None:
    assert status_text.format_connections(report()) == (
        "-> 10.0.0.2:6783         established encrypted   aa:aa:aa:aa:aa:02(host2) mtu=1410\n"
        "-> 10.0.0.3:6783         failed      password mismatch, retry: in 300.0s\n"
    )


def test_peers_view_lists_each_peer_with_its_links() -> None:
    assert status_text.format_peers(report()) == (
        "aa:aa:aa:aa:aa:01(host1)\n"
        "   -> 10.0.0.2:6783         aa:aa:aa:aa:aa:02(host2)              established\n"
        "aa:aa:aa:aa:aa:02(host2)\n"
        "   <- 10.0.0.1:40000        aa:aa:aa:aa:aa:01(host1)              pending\n"
    )


def test_targets_view() -> None:
    assert status_text.format_targets(report()) == "10.0.0.2\n10.0.0.3\n"
    assert status_text.format_targets(report(Targets=[])) == ""
