"""IPAM: the allocator on top of the Rust ring (`weavenet._fastdp.Ring`), consensus seeding over
the mesh's gossip channel, persistence in the router's store, and the HTTP handlers for /ip.

Modules: `allocator` (the Allocator callers use), `consensus` (single-decree Paxos, pure),
`wire` (the gossip encoding, validated), `persist` (sqlite tables), `http` (routes), `status`
(text and metrics views), `hostcheck` (the range must not overlap a host route).
"""

from weavenet.ipam.errors import IpamError

__all__ = ["IpamError"]
