"""fdbhook: static FDB entries, no learning, no unicast flood for libvirt guests."""

__version__ = "0.1.0"

# The one input limit: a domain XML (hook stdin, capture, --xml) larger than
# this is refused. Defined here so the stdlib-only hook client shares it.
MAX_INPUT_BYTES = 8 * 1024 * 1024
