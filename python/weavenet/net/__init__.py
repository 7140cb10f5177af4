"""Host plumbing through pyroute2 (netlink): bridge, veth, TAP, netns attach, routes, firewall.

Nothing here shells out to `ip`; the firewall module is the one place that runs iptables, because
Docker's own rules live there and ours must sit beside them in the same backend.
"""
