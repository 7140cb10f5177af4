"""The "topology" gossip channel: peer records travel as neighbour gossip, like any other channel.

Changes to our own record are batched by the router and sent as `TopologyGossipData` naming the
changed peers; the records themselves are read from the topology only when a connection is ready
to send, so a backlog always carries the newest versions. Receivers merge and pass on what was
new to them. Full state goes out on new connections and with every anti-entropy round.

Never touches a connection; never lets an unvalidated record reach the topology.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from weavenet.mesh import wire
from weavenet.mesh.gossip import GossipError
from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.topology import MergeResult, Topology

CHANNEL = "topology"


class TopologyGossipData:
    """A set of peer names whose current records are to be sent."""

    def __init__(self, topology: Topology, names: Iterable[PeerName]) -> None:
        self._topology = topology
        self.names = set(names)

    def merge(self, other: TopologyGossipData) -> TopologyGossipData:
        self.names |= other.names
        return self

    def encode(self) -> list[bytes]:
        records = self._topology.records(self.names)
        return _encode_chunks(records) if records else []


def _encode_chunks(records: list[wire.PeerSummary]) -> list[bytes]:
    """Encode records, halving the batch until each payload fits under the gossip payload limit."""
    payload = wire.encode_topology(records)
    if len(payload) <= wire.MAX_GOSSIP_PAYLOAD or len(records) == 1:
        return [payload]
    middle = len(records) // 2
    return _encode_chunks(records[:middle]) + _encode_chunks(records[middle:])


class TopologyGossiper:
    """Merges gossiped peer records into the topology and tells the router what changed."""

    def __init__(self, topology: Topology, on_merge: Callable[[MergeResult], None]) -> None:
        self._topology = topology
        self._on_merge = on_merge

    def on_gossip(self, payload: bytes) -> TopologyGossipData | None:
        try:
            records = wire.decode_topology(payload, self._topology.outdated)
        except wire.ProtocolError as exc:
            raise GossipError(f"invalid topology update: {exc}") from None
        result = self._topology.merge(records)
        self._on_merge(result)
        return TopologyGossipData(self._topology, result.changed) if result.changed else None

    def on_gossip_broadcast(self, src: PeerName, payload: bytes) -> TopologyGossipData | None:
        return self.on_gossip(payload)

    def on_gossip_unicast(self, src: PeerName, payload: bytes) -> None:
        raise GossipError(f"unexpected topology unicast from {src}")

    def gossip(self) -> TopologyGossipData:
        return TopologyGossipData(self._topology, self._topology.peers.keys())
