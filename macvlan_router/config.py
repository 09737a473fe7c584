"""Read /etc/default/macvlan-router (systemd EnvironmentFile= syntax) into a frozen Config.

Everything here is static validation: values that are wrong whatever Docker says.
Checks that need Docker or the host (is the address inside the network's subnet?)
belong to desired.py.
"""

import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from . import safety
from .errors import ConfigError

DEFAULT_PATH = "/etc/default/macvlan-router"
IFNAMSIZ = 16

# Every setting and how its text (stripped) becomes a value; "" means unset.
_PARSERS = {
    "MACVLAN_DOCKER_NETWORK": lambda text: tuple(_selector(word) for word in text.split()),
    "MACVLAN_BRIDGE_IP": lambda text: _addresses("MACVLAN_BRIDGE_IP", text, 4),
    "MACVLAN_BRIDGE_IP6": lambda text: _addresses("MACVLAN_BRIDGE_IP6", text, 6),
    "MACVLAN_BRIDGE_INTERFACE_NAME": lambda text: _interface_names(text),
    "ADDITIONAL_ROUTES": lambda text: tuple(_route(word) for word in text.split()),
    "CLEANUP_ON_EXIT": lambda text: _boolean("CLEANUP_ON_EXIT", text, True),
    "RESYNC_INTERVAL": lambda text: _seconds("RESYNC_INTERVAL", text, 60.0),
    "LOG_LEVEL": lambda text: _log_level(text),
    "DEBUG": lambda text: _boolean("DEBUG", text, False),
    "DOCKER_HOST": lambda text: text or None,
}
KEYS = tuple(_PARSERS)
# Generic names that a user's shell often sets for other programs (DOCKER_HOST for the
# docker CLI): they come from the file only, so that `macvlan-router check` run from such
# a shell checks what the service does. The other keys may be overridden from the
# environment (a drop-in's Environment=, or a one-off run).
FILE_ONLY_KEYS = ("LOG_LEVEL", "DEBUG", "DOCKER_HOST")
ENVIRONMENT_KEYS = tuple(key for key in KEYS if key not in FILE_ONLY_KEYS)
ENVIRONMENT = "the environment"
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


# --------------------------------------------------------------------------- the file
#
# systemd's EnvironmentFile= parser is parse_env_file_internal() in src/basic/env-file.c,
# with load_env_file() and exec_context_load_environment() (src/core/execute.c) around
# it. This follows its state machine as in v252 (Debian 12) and v257 (Debian 13), which
# differ only after a comment that ends in a backslash (see _comment). Where systemd
# would take something we cannot use, or silently drop a line, this reports a problem
# instead. Runs of ordinary characters are skipped with regular expressions, so the
# time is linear in the size of the file.

# read_full_file() refuses a longer file (READ_FULL_BYTES_MAX in src/basic/fileio.c).
MAX_FILE_BYTES = 64 * 1024 * 1024 - 1
_NEWLINE = "\n\r"
_BLANKS = re.compile(r"[ \t\n\r]*")
_INDENT = re.compile(r"[ \t]*")
_KEY_REST = re.compile(r"[^=\n\r]*")
_UNQUOTED = re.compile(r"[^\\\n\r]*")
_SINGLE_QUOTED = re.compile(r"[^']*")
_DOUBLE_QUOTED = re.compile(r'[^"\\]*')
_COMMENT = re.compile(r"[^\\\n\r]*")
# Inside double quotes a backslash escapes these (SHELL_NEED_ESCAPE) and is kept before
# any other character, as in the shell.
_DOUBLE_QUOTE_ESCAPES = '"\\`$'
# env_name_is_valid(): bash's rule.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EXPORT = re.compile(r"export[ \t]+([A-Za-z_][A-Za-z0-9_]*)\Z")
# What systemd's utf8_is_valid() refuses, once the bytes are decoded with surrogateescape:
# bytes that are not UTF-8, and the code points unichar_is_valid() excludes.
_NOT_UTF8 = re.compile("[\udc80-\udcff\ufdd0-\ufdef" + "".join(
    chr(plane | 0xfffe) + chr(plane | 0xffff) for plane in range(0, 0x110000, 0x10000)) + "]")


@dataclass(frozen=True)
class EnvironmentFile:
    """The assignments systemd would take from a file, and what we refuse to take.

    Each problem names the file and line and says what to do; a line with a problem
    is left out of `values`.
    """

    values: Dict[str, str]
    lines: Dict[str, int]      # the line that set each key (the last one)
    problems: Tuple[str, ...] = ()


def parse_environment_file(text, source):
    """Parse `text` (decoded with surrogateescape) as systemd's EnvironmentFile= does."""
    return _Scanner(text, source).scan()


class _Scanner:
    def __init__(self, text, source):
        self.text = text
        self.source = source
        self.values = {}
        self.lines = {}
        self.problems = []
        self._line, self._line_pos = 1, 0

    def scan(self):
        nul = self.text.find("\0")
        if nul >= 0:
            self.problem(nul, "a NUL byte, and systemd refuses a file with one: remove it")
        text, end, pos = self.text, len(self.text), 0
        comment_escaped_newline = False
        while True:
            ambiguous = False
            if comment_escaped_newline:
                first = _INDENT.match(text, pos).end()
                ambiguous = first < end and text[first] not in _NEWLINE + "#;"
            pos = _BLANKS.match(text, pos).end()
            if pos == end:
                break
            if text[pos] in "#;":
                pos, comment_escaped_newline = self._comment(pos + 1)
            else:
                pos, comment_escaped_newline = self._assignment(pos, ambiguous), False
        return EnvironmentFile(self.values, self.lines,
                               tuple(f"{self.source}, line {line}: {message}"
                                     for line, message in sorted(self.problems)))

    def line_at(self, pos):
        """The line number of text[pos]; mostly asked in order, so counting stays linear."""
        if pos >= self._line_pos:
            self._line += self.text.count("\n", self._line_pos, pos)
        else:
            self._line -= self.text.count("\n", pos, self._line_pos)
        self._line_pos = pos
        return self._line

    def problem(self, pos, message):
        self.problems.append((self.line_at(pos), message))

    def _comment(self, pos):
        """Skip a comment; also say whether it ended with a backslash before the newline.

        systemd before v254 takes the line after such a comment as part of the comment;
        v254 and later read it. The caller refuses to guess when that line says something.
        """
        text, end = self.text, len(self.text)
        while True:
            pos = _COMMENT.match(text, pos).end()
            if pos == end:
                return end, False
            if text[pos] in _NEWLINE:
                return pos + 1, False
            if pos + 1 == end:
                return end, False
            if text[pos + 1] in _NEWLINE:
                return pos + 2, True
            pos += 2

    def _assignment(self, start, ambiguous):
        """Read KEY=value from `start` (the key's first character); return where it ends."""
        text, end = self.text, len(self.text)
        # The first character belongs to the key even when it is "=", as in systemd.
        key_end = _KEY_REST.match(text, start + 1).end()
        key = text[start:key_end].rstrip(" \t")
        if key_end == end or text[key_end] != "=":
            self.problem(start, f"{key!r} is not a KEY=value line, and systemd ignores it: "
                         "add the = or comment the line out with #")
            return key_end
        value, pos, unclosed = self._value(key_end + 1)
        if ambiguous:
            self.problem(start, (
                f"{key} is set on the line after a comment that ends with a backslash; "
                "systemd before version 254 (Debian 12) takes this line for part of the "
                "comment, later versions read it: remove the backslash at the end of the "
                "comment"))
        elif unclosed is not None:
            self.problem(unclosed, (
                f"the quote that starts the value of {key} is never closed, so systemd "
                "takes the rest of the file as that value: close the quote"))
        elif _NOT_UTF8.search(key) or _NOT_UTF8.search(value):
            self.problem(start, (
                f"{'a name' if _NOT_UTF8.search(key) else 'the value of ' + key} is not "
                "valid UTF-8, and systemd refuses the whole file: save it as UTF-8"))
        elif not _NAME.match(key):
            self.problem(start, _bad_name(key))
        else:
            self.values[key] = value
            self.lines[key] = self.line_at(start)
        return pos

    def _value(self, pos):
        """Read a value from just after "=".

        Returns the value, where it ends and, when a quote is never closed, where it opened.
        """
        text, end = self.text, len(self.text)
        parts = []
        # Quoted strings, and blanks between them, until the line ends or a bare word starts.
        while True:
            pos = _INDENT.match(text, pos).end()
            if pos == end:
                return "".join(parts), end, None
            char = text[pos]
            if char in _NEWLINE:
                return "".join(parts), pos + 1, None
            if char == "'":
                quoted = _SINGLE_QUOTED.match(text, pos + 1)
                parts.append(quoted.group())
                if quoted.end() == end:
                    return "".join(parts), end, pos
                pos = quoted.end() + 1
            elif char == '"':
                closing = self._double_quoted(pos + 1, parts)
                if closing is None:
                    return "".join(parts), end, pos
                pos = closing + 1
            else:
                break
        # A bare word runs to the end of the line; quotes in it are plain characters. A
        # backslash takes the next character as it is, and joins the next line. Blanks at
        # the end of the line are dropped (not escaped ones).
        while True:
            run = _UNQUOTED.match(text, pos)
            pos = run.end()
            if pos == end or text[pos] in _NEWLINE:
                parts.append(run.group().rstrip(" \t"))
                return "".join(parts), min(pos + 1, end), None
            parts.append(run.group())
            if pos + 1 == end:
                return "".join(parts), end, None
            if text[pos + 1] not in _NEWLINE:
                parts.append(text[pos + 1])
            pos += 2

    def _double_quoted(self, pos, parts):
        """Append the text of a double-quoted string to parts; return its closing quote."""
        text, end = self.text, len(self.text)
        while True:
            run = _DOUBLE_QUOTED.match(text, pos)
            parts.append(run.group())
            pos = run.end()
            if pos == end:
                return None
            if text[pos] == '"':
                return pos
            if pos + 1 == end:
                return None
            char = text[pos + 1]
            if char in _DOUBLE_QUOTE_ESCAPES:
                parts.append(char)
            elif char != "\n":        # only "\n": a "\r" after a backslash stays
                parts.append("\\" + char)
            pos += 2


def _bad_name(key):
    export = _EXPORT.match(key)
    if export:
        return (f"systemd does not know 'export' and ignores this line: "
                f"write {export.group(1)}=... without it")
    hint = ""
    if key.startswith("\ufeff"):
        hint = " (the file starts with a byte order mark: save it without one)"
    return (f"{key!r} is not a valid variable name{hint}, and systemd ignores this line: "
            "use letters, digits and _, not starting with a digit")


def read_file(path, required=False):
    """Return the file's assignments; a missing file means all defaults unless `required`."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"the configuration file {path} does not exist: create it (an empty file "
                "means all defaults) or name another one") from None
        return EnvironmentFile({}, {})
    except OSError as exc:
        raise ConfigError(
            f"cannot read the configuration file {path}: {exc.strerror or exc}; "
            "make it readable by the service (mode 0644) or pass --config") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            f"the configuration file {path} is larger than 64 MiB, which systemd refuses: "
            "it holds a handful of settings, so it is probably not the right file")
    return parse_environment_file(data.decode("utf-8", "surrogateescape"), path)


def load(path=DEFAULT_PATH, environ: Mapping[str, str] = None, required=False):
    """Read the file, let the environment override it, validate, return a Config.

    `required`: the file was named explicitly, so a missing one is an error.
    """
    environ = os.environ if environ is None else environ
    parsed = read_file(path, required)
    if parsed.problems:
        more = len(parsed.problems) - 1
        raise ConfigError(parsed.problems[0] + (
            f" (and {more} more problem{'s' if more > 1 else ''} in the file)" if more else ""))
    values, origins = {}, {}
    for key, value in parsed.values.items():
        where = f"{path}, line {parsed.lines[key]}"
        if key in RETIRED_KEYS:
            log.info("%s: %s is not used by macvlan-router (%s)", where, key, RETIRED_KEYS[key])
        elif key not in KEYS:
            log.warning("%s: unknown setting %s ignored; check its spelling (known settings: %s)",
                        where, key, ", ".join(KEYS))
        else:
            values[key], origins[key] = value, where
    for key in ENVIRONMENT_KEYS:
        if key in environ:
            values[key], origins[key] = environ[key], ENVIRONMENT
    return from_values(values, source=path, origins=origins)


def read_cleanup_on_exit(path=DEFAULT_PATH, environ: Mapping[str, str] = None):
    """CLEANUP_ON_EXIT for `cleanup --if-enabled`; never raises.

    Cleanup needs nothing else, and must work when the rest of the file is broken: the
    setting is read when it can be, else the default is taken, with a warning either way.
    """
    key, default = "CLEANUP_ON_EXIT", Config.cleanup_on_exit
    environ = os.environ if environ is None else environ
    assumed = f"assuming {key}={str(default).lower()}, the default"
    broken = None
    try:
        if key in environ:
            text, origin = environ[key], ENVIRONMENT
        else:
            parsed = read_file(path)
            broken = parsed.problems[0] if parsed.problems else None
            if key not in parsed.values:
                if broken:
                    log.warning("%s; so %s cannot be read: %s", broken, key, assumed)
                return default
            text, origin = parsed.values[key], f"{path}, line {parsed.lines[key]}"
        value = from_values({key: text}, path, {key: origin}).cleanup_on_exit
    except ConfigError as exc:
        log.warning("%s; %s", exc, assumed)
        return default
    if broken:
        log.warning("%s; %s=%s from %s is used all the same", broken, key,
                    str(value).lower(), origin)
    return value


# --------------------------------------------------------------------------- the values

def from_values(values: Mapping[str, str], source=DEFAULT_PATH, origins=None):
    """Validate the settings' texts; an error says where the bad one came from.

    `origins` maps a key to "FILE, line N" or ENVIRONMENT.
    """
    origins = origins or {}
    parsed = {}
    for key, parse in _PARSERS.items():
        try:
            parsed[key] = parse(values.get(key, "").strip())
        except ConfigError as exc:
            raise ConfigError(_located(key, origins.get(key), source, exc)) from None
    return Config(
        networks=parsed["MACVLAN_DOCKER_NETWORK"],
        bridge_ips=parsed["MACVLAN_BRIDGE_IP"],
        bridge_ip6s=parsed["MACVLAN_BRIDGE_IP6"],
        interface_names=parsed["MACVLAN_BRIDGE_INTERFACE_NAME"],
        additional_routes=parsed["ADDITIONAL_ROUTES"],
        cleanup_on_exit=parsed["CLEANUP_ON_EXIT"],
        resync_interval=parsed["RESYNC_INTERVAL"],
        log_level="debug" if parsed["DEBUG"] else parsed["LOG_LEVEL"],
        docker_host=parsed["DOCKER_HOST"],
        source=source,
    )


def _located(key, origin, source, exc):
    if origin == ENVIRONMENT:
        return (f"{exc} ({key} comes from the environment, which overrides {source}: "
                "fix or unset it there)")
    return f"{origin}: {exc}" if origin else str(exc)


def _log_level(text):
    level = text.lower() or "info"
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


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
            interface = ipaddress.ip_interface(word)
        except ValueError:
            raise ConfigError(f"{key}={word!r} is not an IP address") from None
        address = interface.ip
        if address.version != version:
            other = "MACVLAN_BRIDGE_IP6" if version == 4 else "MACVLAN_BRIDGE_IP"
            raise ConfigError(
                f"{key}={word!r} is an IPv{address.version} address; it belongs in {other}")
        if interface.network.prefixlen != address.max_prefixlen:
            raise ConfigError(
                f"{key}={word!r} has a prefix length: give the shim's own address alone, "
                f"without /{interface.network.prefixlen} (the shim holds it as a "
                f"/{address.max_prefixlen}, with no route for the subnet)")
        if getattr(address, "scope_id", None):
            raise ConfigError(f"{key}={word!r} has a zone index: give the address alone")
        if address.is_multicast or address.is_unspecified or address.is_loopback \
                or address.is_link_local:
            raise ConfigError(
                f"{key}={word!r} cannot be a shim address: use a free unicast address "
                "inside the macvlan network's subnet")
        if address in result:
            raise ConfigError(f"{key} lists {word} twice")
        result.append(address)
    return tuple(result)


# Bytes the kernel's isspace() accepts (lib/ctype.c): tab to carriage return, space, and
# 0xa0, which is also a byte inside some UTF-8 characters ("à" is c3 a0).
_KERNEL_SPACES = b"\t\n\v\f\r \xa0"


def validate_ifname(name, key="MACVLAN_BRIDGE_INTERFACE_NAME"):
    """Apply the kernel's dev_valid_name() rules (net/core/dev.c), and refuse '%'.

    '%' makes the kernel take the name for a template (eth%d) and pick another name.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) >= IFNAMSIZ:
        raise ConfigError(
            f"{key}={name!r} is {len(raw)} bytes long; Linux interface names are at most "
            f"{IFNAMSIZ - 1} bytes")
    if not raw:
        reason = "it is empty"
    elif name in (".", ".."):
        reason = "'.' and '..' name directories in /sys/class/net"
    else:
        reason = ", ".join(sorted({_refused_byte(byte) for byte in raw
                                   if byte in b"/:%\0" + _KERNEL_SPACES}))
    if reason:
        raise ConfigError(
            f"{key}={name!r} is not a valid interface name: {reason}; "
            "use letters, digits, '-', '_' and '.'")
    return name


def _refused_byte(byte):
    if byte == 0xa0:
        return "it holds the byte 0xa0 (in a non-ASCII character), a space to the kernel"
    if byte in _KERNEL_SPACES:
        return "it holds white space"
    if byte == 0:
        return "it holds a NUL byte"
    if byte == ord("%"):
        return "'%' makes the kernel take it for a template such as eth%d"
    return f"{chr(byte)!r} is not allowed"


def _interface_names(text):
    result = []
    for word in text.split():
        parent, sep, name = word.rpartition("=")
        if sep:
            validate_ifname(parent, "MACVLAN_BRIDGE_INTERFACE_NAME (parent)")
        validate_ifname(name)
        if name == "lo":
            raise ConfigError(
                "MACVLAN_BRIDGE_INTERFACE_NAME='lo' is the loopback interface: "
                "give the shim a name of its own, e.g. mvr-eth0")
        result.append((parent or None, name))
    if len(result) > 1 and any(parent is None for parent, _ in result):
        raise ConfigError(
            "MACVLAN_BRIDGE_INTERFACE_NAME lists several names; with several parents "
            "write each as PARENT=NAME, e.g. eth0=mvr-lan eth0.10=mvr-iot")
    names = [name for _, name in result]
    if len(set(names)) != len(names):
        raise ConfigError("MACVLAN_BRIDGE_INTERFACE_NAME gives two parents the same shim name")
    parents = {parent for parent, _ in result}
    for parent, name in result:
        if name in parents:
            raise ConfigError(
                f"MACVLAN_BRIDGE_INTERFACE_NAME={parent}={name} names the shim after "
                f"{'its own' if name == parent else 'another'} parent interface: the shim is "
                f"a new interface next to it, give it a name of its own, e.g. mvr-{parent}")
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
