"""IPAM's tables in the router's store: the ring, who holds which address, and consensus state.

  ipam_meta   key → JSON    "identity" {peer, range}, "paxos", "seeds", "nicknames", "takeovers"
  ipam_ring   one row       the ring's canonical encoding (`Ring.to_bytes`)
  ipam_owned  (ident, cidr) is_container: every address handed out or claimed, per ident

Every change to the ring and to the addresses it concerns is written in ONE transaction
(`save`), so a crash leaves either the old or the new state and never a ring that disagrees with
the addresses held. Writes are small and synchronous (local sqlite, fsynced): fine on the trio
loop. Nothing here interprets the ring; the allocator decides what is valid.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from typing import Any

from weavenet.store import Store

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ipam_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ipam_ring (id INTEGER PRIMARY KEY CHECK (id = 0), data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ipam_owned ("
    " ident TEXT NOT NULL, cidr TEXT NOT NULL, is_container INTEGER NOT NULL, PRIMARY KEY (ident, cidr))",
)


@dataclass
class Saved:
    """What a previous run left, as stored (validated by the allocator)."""

    identity: dict[str, Any] | None = None
    ring: bytes | None = None
    owned: list[tuple[str, IPv4Interface, bool]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Change:
    """One atomic write: any of the ring, address rows added/removed, and meta keys."""

    ring: bytes | None = None
    clear_ring: bool = False
    add: list[tuple[str, IPv4Interface, bool]] = field(default_factory=list)
    remove: list[tuple[str, IPv4Interface]] = field(default_factory=list)
    clear_owned: bool = False
    meta: dict[str, Any] = field(default_factory=dict)  # value None deletes the key


class IpamStore:
    """IPAM's view of the router's `Store`: its own tables, written only in transactions."""

    def __init__(self, store: Store) -> None:
        self._store = store
        with store.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    def load(self) -> Saved:
        saved = Saved()
        with self._store.transaction() as db:
            for key, value in db.execute("SELECT key, value FROM ipam_meta"):
                try:
                    saved.meta[key] = json.loads(value)
                except json.JSONDecodeError:
                    continue  # an unreadable key is as good as absent; the allocator warns
            row = db.execute("SELECT data FROM ipam_ring WHERE id = 0").fetchone()
            saved.ring = None if row is None else bytes(row[0])
            for ident, cidr, is_container in db.execute("SELECT ident, cidr, is_container FROM ipam_owned"):
                try:
                    saved.owned.append((str(ident), IPv4Interface(cidr), bool(is_container)))
                except ValueError:
                    continue
        identity = saved.meta.pop("identity", None)
        saved.identity = identity if isinstance(identity, dict) else None
        return saved

    def save(self, change: Change) -> None:
        with self._store.transaction() as db:
            self._apply(db, change)

    def wipe(self, identity: dict[str, Any]) -> None:
        """Forget everything (stale data: another peer name or range) and record who we are now."""
        with self._store.transaction() as db:
            db.execute("DELETE FROM ipam_meta")
            db.execute("DELETE FROM ipam_ring")
            db.execute("DELETE FROM ipam_owned")
            db.execute("INSERT INTO ipam_meta VALUES ('identity', ?)", (json.dumps(identity, sort_keys=True),))

    @staticmethod
    def _apply(db: sqlite3.Connection, change: Change) -> None:
        if change.clear_ring:
            db.execute("DELETE FROM ipam_ring")
        if change.ring is not None:
            db.execute("INSERT OR REPLACE INTO ipam_ring VALUES (0, ?)", (change.ring,))
        if change.clear_owned:
            db.execute("DELETE FROM ipam_owned")
        for ident, cidr in change.remove:
            db.execute("DELETE FROM ipam_owned WHERE ident = ? AND cidr = ?", (ident, str(cidr)))
        for ident, cidr, is_container in change.add:
            db.execute("INSERT OR REPLACE INTO ipam_owned VALUES (?, ?, ?)", (ident, str(cidr), int(is_container)))
        for key, value in change.meta.items():
            if value is None:
                db.execute("DELETE FROM ipam_meta WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO ipam_meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))
