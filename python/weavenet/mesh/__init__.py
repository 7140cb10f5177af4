"""The mesh: connections and handshake, gossip channels, topology and routes, connection maker."""
