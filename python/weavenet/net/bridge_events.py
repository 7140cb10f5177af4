"""Wake-ups when the bridge's forwarding table or a link changes, from the kernel's netlink events.

The kernel path tells its neighbours which MACs live on this host's bridge. Rather than poll the
table, it listens to the kernel's neighbour and link notifications and re-reads the table when one
concerns a bridge (family AF_BRIDGE) or a link; a burst of them costs one read. A notification
lost to a full socket (ENOBUFS) only means a read. Never blocks the trio loop.
"""

from __future__ import annotations

import errno
import socket

import trio
from pyroute2.netlink.rtnl import RTMGRP_LINK, RTMGRP_NEIGH
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

AF_BRIDGE = 7
_NEIGH = {"RTM_NEWNEIGH", "RTM_DELNEIGH"}
_LINK = {"RTM_NEWLINK", "RTM_DELLINK"}


class BridgeEvents:
    """A netlink socket subscribed to neighbour and link notifications of this network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, RTMGRP_NEIGH | RTMGRP_LINK))
        except OSError:
            self._sock.close()
            raise
        self._marshal = MarshalRtnl()

    def close(self) -> None:
        self._sock.close()

    async def changed(self) -> None:
        """Return once a notification about a bridge's table or a link has arrived (or some were lost)."""
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            if self._drain():
                return

    def _drain(self) -> bool:
        relevant = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return relevant
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped some: the caller re-reads anyway
                    relevant = True
                    continue
                raise
            for message in self._marshal.parse(data):
                event = message.get("event")
                if event in _LINK or (event in _NEIGH and message.get("family") == AF_BRIDGE):
                    relevant = True
