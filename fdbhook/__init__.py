"""fdbhook: static FDB entries, no learning, no unicast flood for libvirt guests."""

__version__ = "0.1.0"
