"""Single-decree Paxos over gossip: how electors agree on the peers that seed the ring.

Weave Net's scheme (spec §2), with two changes for safety:
  - a node is its **peer name** (not name + per-process UID), and the allocator persists this
    node's claims before anything can gossip them, so a restarted router is the *same* acceptor
    with the same promises instead of an extra one that inflates the electorate;
  - consensus is a quorum of nodes that accepted the **same proposal** (round, proposer), which
    is classic Paxos's "chosen". Weave Net counts acceptances of the same value *origin* across
    rounds, which can decide two values when rounds interleave.

Every elector plays every role. The whole state (node → claims) is gossiped; merging is a join
(per node: the highest promise, the highest accepted proposal with its value), so any order of
delivery, duplication or loss is fine. After a merge each node *thinks*:
  1. promise the highest proposal seen;
  2. if that is our own proposal and a quorum of nodes show it as their promise, accept it with
     the value of the highest proposal those nodes had accepted, or, if none, every node we know;
  3. if some node has accepted the proposal we promised, accept it too.
A quorum of nodes whose accepted proposal is the same means that proposal's value is chosen.

Pure: no I/O, no clocks, no randomness. The allocator persists, gossips and retries.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class ProposalId:
    """Ordered by round, then by proposer name; round 0 means "none"."""

    round: int = 0
    proposer: int = 0

    def __bool__(self) -> bool:
        return self.round > 0


NO_PROPOSAL = ProposalId()


@dataclass(frozen=True)
class Claims:
    """What one node has promised and accepted (with the accepted proposal's value)."""

    promise: ProposalId = NO_PROPOSAL
    accepted: ProposalId = NO_PROPOSAL
    value: tuple[int, ...] = ()

    def join(self, other: Claims) -> Claims:
        accepted, value = max((self.accepted, self.value), (other.accepted, other.value))
        return Claims(max(self.promise, other.promise), accepted, value)


def quorum_for(consensus_size: int | None, targets: int) -> int:
    """Weave Net's rule: consensus=N gives ⌊N/2⌋+1; otherwise ⌊(targets+1)/2⌋+1 from the launch peers."""
    if consensus_size is not None:
        return consensus_size // 2 + 1
    return (targets + 1) // 2 + 1


@dataclass
class Paxos:
    """One elector's Paxos state. `us` is our peer name; `quorum` how many nodes decide."""

    us: int
    quorum: int
    nodes: dict[int, Claims] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nodes.setdefault(self.us, Claims())

    @property
    def ours(self) -> Claims:
        return self.nodes[self.us]

    def known(self) -> int:
        """How many nodes take part (we have heard from), ourselves included."""
        return len(self.nodes)

    def propose(self) -> bool:
        """Start a new round above every round seen. Returns whether our claims changed (always)."""
        highest = max(max(c.promise.round, c.accepted.round) for c in self.nodes.values())
        ours = self.ours
        self.nodes[self.us] = Claims(ProposalId(highest + 1, self.us), ours.accepted, ours.value)
        self.think()
        return True

    def update(self, incoming: dict[int, Claims]) -> bool:
        """Join a peer's view of the state; returns whether *our* claims changed (gossip them)."""
        before = self.ours
        changed = False
        for node, claims in incoming.items():
            current = self.nodes.get(node)
            joined = claims if current is None else current.join(claims)
            if joined != current:
                self.nodes[node] = joined
                changed = True
        if changed:
            self.think()
        return self.ours != before

    def think(self) -> None:
        ours = self.ours
        highest = max(c.promise for c in self.nodes.values())
        if highest > ours.promise:
            ours = Claims(highest, ours.accepted, ours.value)
        promise = ours.promise
        if promise and promise.proposer == self.us and ours.accepted != promise:
            promisers = [c for c in self.nodes.values() if c.promise == promise]
            if len(promisers) >= self.quorum:
                best = max(promisers, key=lambda c: (c.accepted, c.value))
                value = best.value if best.accepted else tuple(sorted(self.nodes))
                ours = Claims(promise, promise, value)
        if promise and ours.accepted != promise:
            for claims in self.nodes.values():
                if claims.accepted == promise:
                    ours = Claims(promise, promise, claims.value)
                    break
        self.nodes[self.us] = ours

    def consensus(self) -> tuple[int, ...] | None:
        """The chosen value (sorted, de-duplicated peer names), or None while undecided."""
        counts: dict[tuple[ProposalId, tuple[int, ...]], int] = {}
        for claims in self.nodes.values():
            if claims.accepted:
                key = (claims.accepted, claims.value)
                counts[key] = counts.get(key, 0) + 1
        for (_, value), count in sorted(counts.items(), reverse=True):
            if count >= self.quorum:
                return tuple(sorted(set(value)))
        return None

    # -- persistence (JSON-ready) -------------------------------------------------------------

    def to_json(self) -> list[list[int | list[int]]]:
        return [
            [n, c.promise.round, c.promise.proposer, c.accepted.round, c.accepted.proposer, list(c.value)]
            for n, c in sorted(self.nodes.items())
        ]

    @staticmethod
    def nodes_from_json(data: object) -> dict[int, Claims]:
        """Claims persisted by `to_json`; raises ValueError on anything else."""
        if not isinstance(data, list):
            raise ValueError("paxos state is not a list")
        nodes: dict[int, Claims] = {}
        for item in data:
            if not isinstance(item, list) or len(item) != 6:
                raise ValueError("paxos claims are not 6 fields")
            node, pr, pp, ar, ap, value = item
            if not all(isinstance(x, int) for x in (node, pr, pp, ar, ap)) or not isinstance(value, list):
                raise ValueError("paxos claims have the wrong types")
            nodes[node] = Claims(ProposalId(pr, pp), ProposalId(ar, ap), tuple(int(v) for v in value))
        return nodes
