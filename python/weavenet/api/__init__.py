"""The HTTP API: a small h11 server on trio, and the status/control/metrics handlers."""
