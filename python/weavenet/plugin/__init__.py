"""Docker integration: the plugin socket server, network and IPAM drivers, the Engine API client."""
