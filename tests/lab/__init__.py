"""Multi-host test lab: N hosts on one switch, built from network namespaces on this machine.

    from tests.lab import Lab, wait_until

    with Lab(hosts=3) as lab:                       # or the `lab` / `make_lab` pytest fixtures
        h1, h2, h3 = lab.hosts                      # h1.address is its underlay IPv4 address
        router = h1.start(["weavenet", "launch"])   # own process group, logs, kill, restart
        h2.run(["ping", "-c1", h1.address])         # to completion, CompletedProcess
        lab.cut(h1, h2); lab.heal(h1, h2)           # nft drops in the switch, links stay up
        lab.isolate(h3); lab.rejoin(h3)
        c1 = h1.add_container("c1")                 # a netns standing for a container
        print(lab.iperf3(h1, h2).gbits_per_second)

Everything a lab creates is named `wn<6 hex>-...` and removed when it closes; leftovers of aborted
runs are removed by `python -m tests.lab --cleanup` (see tests/lab/sweep.py). Nothing here may
change the network of the machine the tests run on: every change is inside a lab namespace.
"""

from tests.lab.firewall import SwitchFirewall
from tests.lab.iperf import IperfError, IperfResult, iperf3, parse_iperf3_json
from tests.lab.lab import Container, Host, Lab
from tests.lab.netns import Namespace, VethPair
from tests.lab.process import CommandFailed, CommandTimeout, LabProcess
from tests.lab.sweep import SweepReport, sweep_labs
from tests.lab.wait import Deadline, LabTimeout, wait_until

__all__ = [
    "CommandFailed",
    "CommandTimeout",
    "Container",
    "Deadline",
    "Host",
    "IperfError",
    "IperfResult",
    "Lab",
    "LabProcess",
    "LabTimeout",
    "Namespace",
    "SweepReport",
    "SwitchFirewall",
    "VethPair",
    "iperf3",
    "parse_iperf3_json",
    "sweep_labs",
    "wait_until",
]
