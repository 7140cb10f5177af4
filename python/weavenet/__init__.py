"""weavenet: a container network for Docker and Linux hosts, in the tradition of Weave Net.

The package is the Python control plane (router, IPAM, plugin, CLI); the compiled Rust core is
`weavenet._fastdp`. Importing this package must stay cheap: no I/O, no threads.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("weavenet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
