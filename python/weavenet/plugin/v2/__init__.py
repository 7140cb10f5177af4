"""The Docker managed (V2) plugin: packaging (`weavenet plugin build|install`) and what runs inside.

    config_json.py   the plugin's manifest: interface, capabilities, mounts, settable environment
    rootfs.py        the plugin's filesystem: a Python runtime, weavenet, iptables (cached per host)
    build.py         folder + `docker plugin create`, and `install` (build, set, enable)
    entrypoint.py    PID 1 inside the plugin: validate the settings, then run the router
    service.py       the router's plugin side in V2 mode: one global NetworkDriver socket
    swarm.py         peers from the swarm, learned on every start and followed afterwards
    command.py       the `weavenet plugin` sub-commands

V2 mode serves only the plugin's own socket (`/run/docker/plugins/weave.sock` inside the plugin);
the legacy `weavemesh`/`weave` sockets and the automatic `weave` network belong to `weavenet launch`.
"""
