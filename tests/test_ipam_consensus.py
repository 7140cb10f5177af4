"""Paxos as the allocator runs it (pure state machine): safety under a hostile network, liveness
when it behaves, and the join that makes gossip order irrelevant.

The network model delivers any node's current state to any other node, in random order, with
loss, duplication, stale (old) snapshots and restarts that keep the persisted claims.
"""

from __future__ import annotations

import random

import pytest

from weavenet.ipam.consensus import Claims, Paxos, ProposalId, quorum_for


def test_quorum_follows_weave_net():
    assert quorum_for(3, 0) == 2
    assert quorum_for(1, 5) == 1
    assert quorum_for(4, 0) == 3
    assert quorum_for(None, 0) == 1  # no peers given: a single host decides alone
    assert quorum_for(None, 2) == 2  # two targets: three peers, quorum two


def test_three_electors_decide_one_value_in_a_few_exchanges():
    nodes = {n: Paxos(n, 2) for n in (1, 2, 3)}
    for n in nodes.values():  # everyone has heard from everyone (zero claims)
        for m in nodes.values():
            n.update(dict(m.nodes))
    nodes[1].propose()
    for _ in range(3):
        for a in nodes.values():
            for b in nodes.values():
                b.update(dict(a.nodes))
    values = {n.consensus() for n in nodes.values()}
    assert values == {(1, 2, 3)}


def test_a_lone_elector_with_quorum_one_decides_at_once():
    p = Paxos(7, 1)
    p.propose()
    assert p.consensus() == (7,)


def test_claims_join_is_a_semilattice():
    a = Claims(ProposalId(2, 1), ProposalId(1, 5), (1, 5))
    b = Claims(ProposalId(3, 4), ProposalId(1, 2), (1, 2))
    c = Claims(ProposalId(1, 9), ProposalId(2, 1), (1, 9))
    assert a.join(b) == b.join(a)
    assert a.join(b).join(c) == a.join(b.join(c))
    assert a.join(a) == a
    assert a.join(b) == Claims(ProposalId(3, 4), ProposalId(1, 5), (1, 5))


def simulate(seed: int, n: int, quorum: int, steps: int, *, chaos: bool) -> dict[int, tuple[int, ...]]:
    """Run n electors on a random network; returns what each decided (if it did)."""
    rng = random.Random(seed)
    names = list(range(1, n + 1))
    nodes = {name: Paxos(name, quorum) for name in names}
    history: list[tuple[int, dict[int, Claims]]] = []  # every state ever gossiped, for stale deliveries
    decided: dict[int, tuple[int, ...]] = {}
    for _step in range(steps):
        actor = rng.choice(names)
        roll = rng.random()
        if roll < 0.08:
            nodes[actor].propose()
        elif chaos and roll < 0.10:
            # A restart: the node comes back with its persisted claims (and nothing else).
            nodes[actor] = Paxos(actor, quorum, {actor: nodes[actor].ours})
        else:
            if chaos and history and rng.random() < 0.2:
                src, snapshot = rng.choice(history)  # stale, reordered or duplicated gossip
            else:
                src = rng.choice(names)
                snapshot = dict(nodes[src].nodes)
            if not chaos or rng.random() > 0.1:  # loss
                nodes[actor].update(snapshot)
        for name, node in nodes.items():
            history.append((name, dict(node.nodes)))
            value = node.consensus()
            if value is not None:
                assert decided.setdefault(name, value) == value, "a node changed its decision"
        history = history[-200:]
    return decided


@pytest.mark.parametrize("seed", range(300))
def test_no_two_nodes_ever_decide_different_values(seed: int):
    n = 3 + seed % 4
    decided = simulate(seed, n, n // 2 + 1, 400, chaos=True)
    values = set(decided.values())
    assert len(values) <= 1, f"two values decided: {values}"
    for value in values:
        assert len(value) >= n // 2 + 1, "a decided value names at least a quorum of electors"


@pytest.mark.parametrize("seed", range(20))
def test_a_connected_quorum_decides(seed: int):
    decided = simulate(seed, 5, 3, 600, chaos=False)
    assert decided, "no decision on a well-behaved network"
