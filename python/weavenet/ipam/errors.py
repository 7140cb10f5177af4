"""IPAM's one exception type: what callers (HTTP API, Docker IPAM driver, attach) catch and show.

`str(error)` is one line a user can act on. `kind` lets the HTTP layer pick a status without
parsing messages; it never changes what the user reads.
"""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["invalid", "conflict", "unavailable", "cancelled"]


class IpamError(Exception):
    """An allocation, claim, free or peer operation that could not be done; one-line message.

    kind: "invalid" (bad argument: malformed address, subnet outside the range), "conflict"
    (the address is someone else's), "unavailable" (not ready, no space, timed out: retry later)
    or "cancelled" (the router is leaving or shutting down).
    """

    def __init__(self, message: str, kind: ErrorKind = "invalid") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
