"""Read /etc/default/macvlan-router (systemd EnvironmentFile= syntax) into a frozen Config.

Everything here is static validation: values that are wrong whatever Docker says.
Checks that need Docker or the host (is the address inside the network's subnet?)
belong to desired.py.
"""

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from . import safety
from .errors import ConfigError

DEFAULT_PATH = "/etc/default/macvlan-router"
IFNAMSIZ = 16

KEYS = (
    "MACVLAN_DOCKER_NETWORK",
    "MACVLAN_BRIDGE_IP",
    "MACVLAN_BRIDGE_IP6",
    "MACVLAN_BRIDGE_INTERFACE_NAME",
    "ADDITIONAL_ROUTES",
    "CLEANUP_ON_EXIT",
    "RESYNC_INTERVAL",
    "LOG_LEVEL",
    "DEBUG",
    "DOCKER_HOST",
)
# Keys of the original container that mean nothing to a host daemon.
RETIRED_KEYS = {
    "TZ": "journald stamps every line itself",
}
LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selector:
    """One MACVLAN_DOCKER_NETWORK entry: a name or ID, or a label match."""

    text: str
    label_key: Optional[str] = None
    label_value: Optional[str] = None

    @property
    def is_label(self):
        return self.label_key is not None


@dataclass(frozen=True)
class Config:
    networks: Tuple[Selector, ...] = ()
    bridge_ips: Tuple[ipaddress.IPv4Address, ...] = ()
    bridge_ip6s: Tuple[ipaddress.IPv6Address, ...] = ()
    # (parent or None for "the only parent", shim name)
    interface_names: Tuple[Tuple[Optional[str], str], ...] = ()
    additional_routes: Tuple[ipaddress._BaseNetwork, ...] = ()
    cleanup_on_exit: bool = True
    resync_interval: float = 60.0
    log_level: str = "info"
    docker_host: Optional[str] = None
    source: str = field(default=DEFAULT_PATH, compare=False)


def parse_environment_file(text, source):
    """Parse KEY=value lines the way systemd's EnvironmentFile= does.

    Supports comments (# and ;), blank lines, single quotes (literal), double
    quotes (backslash escapes), and a trailing backslash to continue a line.
    """
    values = {}
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        line = lines[number]
        first = number + 1
        number += 1
        while line.endswith("\\") and number < len(lines):
            line = line[:-1] + lines[number]
            number += 1
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        key, sep, raw = stripped.partition("=")
        # Shell-style files often say "export KEY=value"; the meaning is the same.
        key = key.strip().removeprefix("export ").strip()
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ConfigError(
                f"{source}, line {first}: {stripped!r} is not a KEY=value line; "
                "fix or comment it out with #")
        values[key] = _unquote(raw.strip(), source, first)
    return values


def _unquote(raw, source, line):
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        body = raw[1:-1]
        if raw[0] == "'":
            return body
        out, escaped = [], False
        for char in body:
            if escaped:
                out.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            else:
                out.append(char)
        return "".join(out)
    if raw[:1] in ("'", '"'):
        raise ConfigError(f"{source}, line {line}: the quote in {raw!r} is never closed")
    return raw


def read_file(path):
    """Return the file's KEY=value pairs; a missing file means all defaults."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"cannot read the configuration file {path}: {reason}; "
            "make it readable by the service (mode 0644) or pass --config") from None
    return parse_environment_file(text, path)


def load(path=DEFAULT_PATH, environ: Mapping[str, str] = None):
    """Read the file, let the environment override it, validate, return a Config."""
    environ = os.environ if environ is None else environ
    values = read_file(path)
    for key, why in RETIRED_KEYS.items():
        if key in values:
            log.info("%s: %s is not used by macvlan-router (%s)", path, key, why)
            values.pop(key)
    for key in sorted(set(values) - set(KEYS)):
        log.warning("%s: unknown setting %s ignored; known settings: %s",
                    path, key, ", ".join(KEYS))
    values = {key: values[key] for key in KEYS if key in values}
    values.update({key: environ[key] for key in KEYS if key in environ})
    return from_values(values, source=path)


def from_values(values: Mapping[str, str], source=DEFAULT_PATH):
    get = lambda key: values.get(key, "").strip()  # noqa: E731
    debug = _boolean("DEBUG", get("DEBUG"), False)
    level = get("LOG_LEVEL").lower() or "info"
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={get('LOG_LEVEL')!r} is not one of {', '.join(LOG_LEVELS)}")
    return Config(
        networks=tuple(_selector(word) for word in get("MACVLAN_DOCKER_NETWORK").split()),
        bridge_ips=_addresses("MACVLAN_BRIDGE_IP", get("MACVLAN_BRIDGE_IP"), 4),
        bridge_ip6s=_addresses("MACVLAN_BRIDGE_IP6", get("MACVLAN_BRIDGE_IP6"), 6),
        interface_names=_interface_names(get("MACVLAN_BRIDGE_INTERFACE_NAME")),
        additional_routes=tuple(_route(word) for word in get("ADDITIONAL_ROUTES").split()),
        cleanup_on_exit=_boolean("CLEANUP_ON_EXIT", get("CLEANUP_ON_EXIT"), True),
        resync_interval=_seconds("RESYNC_INTERVAL", get("RESYNC_INTERVAL"), 60.0),
        log_level="debug" if debug else level,
        docker_host=get("DOCKER_HOST") or None,
        source=source,
    )


def _selector(word):
    if word.startswith("label="):
        key, _, value = word[len("label="):].partition("=")
        if not key:
            raise ConfigError(
                f"MACVLAN_DOCKER_NETWORK entry {word!r} names no label; "
                "write label=KEY or label=KEY=VALUE")
        return Selector(word, key, value if _ else None)
    return Selector(word)


def _addresses(key, text, version):
    result = []
    for word in text.split():
        try:
            address = ipaddress.ip_interface(word).ip
        except ValueError:
            raise ConfigError(f"{key}={word!r} is not an IP address") from None
        if address.version != version:
            other = "MACVLAN_BRIDGE_IP6" if version == 4 else "MACVLAN_BRIDGE_IP"
            raise ConfigError(
                f"{key}={word!r} is an IPv{address.version} address; it belongs in {other}")
        if address.is_multicast or address.is_unspecified or address.is_loopback \
                or address.is_link_local:
            raise ConfigError(
                f"{key}={word!r} cannot be a shim address: use a free unicast address "
                "inside the macvlan network's subnet")
        if address in result:
            raise ConfigError(f"{key} lists {word} twice")
        result.append(address)
    return tuple(result)


def validate_ifname(name, key="MACVLAN_BRIDGE_INTERFACE_NAME"):
    """Apply the kernel's dev_valid_name() rules, with a message that says which."""
    size = len(name.encode())
    if size >= IFNAMSIZ:
        raise ConfigError(
            f"{key}={name!r} is {size} bytes long; Linux interface names are at most "
            f"{IFNAMSIZ - 1} bytes")
    if not name or name in (".", "..") or any(c in name for c in "/:") \
            or any(c.isspace() for c in name):
        raise ConfigError(
            f"{key}={name!r} is not a valid interface name "
            "(no '/', ':', spaces, and not '.' or '..')")
    return name


def _interface_names(text):
    result = []
    for word in text.split():
        parent, sep, name = word.rpartition("=")
        if sep:
            validate_ifname(parent, "MACVLAN_BRIDGE_INTERFACE_NAME (parent)")
        validate_ifname(name)
        result.append((parent or None, name))
    if len(result) > 1 and any(parent is None for parent, _ in result):
        raise ConfigError(
            "MACVLAN_BRIDGE_INTERFACE_NAME lists several names; with several parents "
            "write each as PARENT=NAME, e.g. eth0=mvr-lan eth0.10=mvr-iot")
    names = [name for _, name in result]
    if len(set(names)) != len(names):
        raise ConfigError("MACVLAN_BRIDGE_INTERFACE_NAME gives two parents the same shim name")
    return tuple(result)


def _route(word):
    try:
        network = ipaddress.ip_network(word, strict=True)
    except ValueError as exc:
        try:
            fixed = ipaddress.ip_network(word, strict=False)
        except ValueError:
            raise ConfigError(
                f"ADDITIONAL_ROUTES entry {word!r} is not an address or prefix "
                f"({exc})") from None
        raise ConfigError(
            f"ADDITIONAL_ROUTES entry {word!r} has host bits set; did you mean {fixed}?"
        ) from None
    refusal = safety.static_refusal(network)
    if refusal:
        raise ConfigError(
            f"ADDITIONAL_ROUTES entry {word!r} cannot be routed via a shim: {refusal}; "
            "give unicast addresses or prefixes on the macvlan LAN")
    return network


def _boolean(key, text, default):
    if not text:
        return default
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ConfigError(f"{key}={text!r} is not a boolean; use true or false")


def _seconds(key, text, default):
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 86400:
        raise ConfigError(f"{key}={text!r} must be a number of seconds from 1 to 86400")
    return value
