"""What the plugin remembers across restarts: the networks Docker created through it.

Docker sends CreateNetwork once per network and never again, not after a plugin restart either
(activation is cached for the daemon's lifetime). So a network's settings (its multicast flag,
its pools) are kept in the router's store, and Join can still answer after a restart. A network
this host never saw (a global network created on another host) is looked up in Docker instead.
Writes are one small sqlite transaction each; never called with a lock held across an await.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from weavenet.store import Store

log = logging.getLogger(__name__)

STORE_KEY = "plugin.networks"


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
