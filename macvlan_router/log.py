"""Logging to journald (with fields users can filter on) or to stderr."""

import logging
import os
import sys

IDENTIFIER = "macvlan-router"


def setup(level="info", daemon=False):
    """Send log records to the journal when systemd connected our stderr to it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = _journal_handler() if _stderr_is_journal() else None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(message)s" if daemon else "%(levelname)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    set_level(level)


def set_level(level):
    logging.getLogger().setLevel(getattr(logging, level.upper()))
    # Library chatter (urllib3 connection logs, pyroute2 internals) is not for users.
    for noisy in ("urllib3", "docker", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stderr_is_journal():
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected; a shell started
    from a user service inherits the variable but has a terminal as stderr."""
    try:
        device, inode = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def _journal_handler():
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER)


def fields(network=None, shim=None, container_id=None, container_name=None, address=None):
    """Journal fields for one log line: `journalctl MACVLAN_NETWORK=lan` and friends."""
    values = {
        "MACVLAN_NETWORK": network,
        "MACVLAN_SHIM": shim,
        "MACVLAN_CONTAINER": container_id[:12] if container_id else None,
        "MACVLAN_CONTAINER_NAME": container_name,
        "MACVLAN_ADDRESS": address,
    }
    return {key: str(value) for key, value in values.items() if value}
