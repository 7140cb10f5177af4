"""What the plugin remembers across restarts: the networks Docker created through it, and the
addresses the weavemesh IPAM driver handed to Docker.

Docker sends CreateNetwork once per network and never again, not after a plugin restart either
(activation is cached for the daemon's lifetime). So a network's settings (its multicast flag,
its pools) are kept in the router's store, and Join can still answer after a restart. A network
this host never saw (a global network created on another host) is looked up in Docker instead.
The address book tells the addresses Docker got from us apart from other addresses IPAM files
under their own text (`POST /ip/_`), so that a release Docker sent while the router was down can
be made good at the next start (plugin.prune) without touching anyone else's.
Writes are one small sqlite transaction each; never called with a lock held across an await.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from weavenet.store import Store

log = logging.getLogger(__name__)

STORE_KEY = "plugin.networks"
ADDRESSES_KEY = "plugin.addresses"


@dataclass(frozen=True)
class NetworkRecord:
    network_id: str
    driver: str
    multicast: bool
    pools: tuple[str, ...] = ()
    created: bool = True  # False when learned lazily (Docker API) rather than from CreateNetwork

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> NetworkRecord | None:
        try:
            return cls(
                network_id=str(value["network_id"]),
                driver=str(value["driver"]),
                multicast=bool(value["multicast"]),
                pools=tuple(str(p) for p in value.get("pools", ())),
                created=bool(value.get("created", True)),
            )
        except (KeyError, TypeError, AttributeError):
            return None


@dataclass
class NetworkTable:
    """Networks by id, mirrored to the store (when there is one) on every change."""

    store: Store | None = None
    networks: dict[str, NetworkRecord] = field(default_factory=dict)

    def load(self) -> None:
        if self.store is None:
            return
        raw = self.store.get_json(STORE_KEY, {})
        if not isinstance(raw, dict):
            log.warning("ignoring unreadable plugin state under %s", STORE_KEY)
            return
        for value in raw.values():
            record = NetworkRecord.from_json(value)
            if record is not None:
                self.networks[record.network_id] = record

    def get(self, network_id: str) -> NetworkRecord | None:
        return self.networks.get(network_id)

    def put(self, record: NetworkRecord) -> None:
        self.networks[record.network_id] = record
        self._save()

    def remove(self, network_id: str) -> bool:
        if self.networks.pop(network_id, None) is None:
            return False
        self._save()
        return True

    def for_driver(self, driver: str) -> list[NetworkRecord]:
        return [r for r in self.networks.values() if r.driver == driver]

    def _save(self) -> None:
        if self.store is not None:
            self.store.put_json(STORE_KEY, {nid: r.to_json() for nid, r in sorted(self.networks.items())})


@dataclass
class AddressBook:
    """Addresses the weavemesh IPAM driver handed to Docker that Docker has not released yet.

    `held` is mirrored to the store; `mentioned` (memory only) is every address Docker asked for
    or plugged into an endpoint since this router started: those are in use, never pruned.
    """

    store: Store | None = None
    held: set[str] = field(default_factory=set)
    mentioned: set[str] = field(default_factory=set)

    def load(self) -> AddressBook:
        if self.store is not None:
            raw = self.store.get_json(ADDRESSES_KEY, [])
            if isinstance(raw, list):
                self.held = {str(a) for a in raw if isinstance(a, str)}
            else:
                log.warning("ignoring unreadable plugin state under %s", ADDRESSES_KEY)
        return self

    def add(self, address: str) -> None:
        """Docker got `address` from us (RequestAddress, or a running container's, reclaimed)."""
        self.mentioned.add(address)
        if address not in self.held:
            self.held.add(address)
            self._save()

    def discard(self, address: str) -> None:
        """Docker released `address` (or a prune freed it)."""
        if address in self.held:
            self.held.discard(address)
            self._save()

    def mention(self, address: str) -> None:
        """Docker uses `address` now (CreateEndpoint): it is not a leftover, whatever Docker lists."""
        self.mentioned.add(address)

    def leftovers(self) -> set[str]:
        """Addresses handed out before this start that Docker has not mentioned since."""
        return self.held - self.mentioned

    def _save(self) -> None:
        if self.store is not None:
            self.store.put_json(ADDRESSES_KEY, sorted(self.held))
