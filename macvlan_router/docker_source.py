"""The Docker edge: list and inspect networks as model values, and follow the event stream."""

import ipaddress
import logging
import threading
from dataclasses import dataclass
from typing import Tuple

import docker
import requests

from .errors import DockerUnavailable
from .model import Endpoint, Network, Problem

log = logging.getLogger(__name__)

DEFAULT_DOCKER_HOST = "unix:///run/docker.sock"
API_TIMEOUT = 10
EVENT_FILTERS = {
    "type": ["network", "container"],
    "event": ["connect", "disconnect", "create", "destroy", "start", "die"],
}
# What an event asks the next reconcile to refresh.
REFRESH_ALL = "all"            # re-list networks and inspect every managed one
REFRESH_ENDPOINTS = "endpoints"  # inspect every managed network again
CONTAINER_CHANGED = "container"  # a container started or died: see network_events

# docker-py raises its own errors, requests', urllib3's and plain OSErrors
# depending on where the connection broke; all mean "Docker is not there".
UNREACHABLE = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
# A read can also fail on what came back: a body that is not JSON, or cut short.
FAILED = UNREACHABLE + (ValueError,)


def docker_host(config):
    # Not os.environ: a DOCKER_HOST in a user's shell is meant for the docker CLI, and
    # config.py takes DOCKER_HOST from the configuration file only.
    return config.docker_host or DEFAULT_DOCKER_HOST


def _client(url):
    try:
        # version="auto" asks the engine, so old engines (20.10) and new
        # docker-py releases agree on an API version.
        return docker.APIClient(base_url=url, version="auto", timeout=API_TIMEOUT)
    except UNREACHABLE as exc:
        raise DockerUnavailable(describe_unreachable(url, exc)) from None


def describe_unreachable(url, exc):
    text = str(exc)
    if isinstance(exc, docker.errors.APIError) or isinstance(exc, ValueError):
        return f"Docker at {url} answered badly ({_brief(text, 200)}); retrying"
    if "Permission denied" in text or "PermissionError" in text:
        hint = "the user running macvlan-router needs to be in the docker group"
    elif "No such file" in text or "FileNotFoundError" in text or "Connection refused" in text:
        hint = "is the Docker engine running? (systemctl status docker)"
    else:
        hint = "check DOCKER_HOST and that the engine is running"
    return f"cannot reach Docker at {url}: {hint}"


def to_network(raw, by_name, known=None):
    """Translate one `docker network inspect` (or list) record, following --config-from.
    `known`: see _endpoints.

    Returns (Network or None, problems). Whatever the engine sends, a bad field costs
    only itself: a bad address or subnet is left out with a warning that names the
    network, the container and the field; a record without a usable Id or Name is None.
    """
    if not isinstance(raw, dict):
        return None, [_odd(f"a network record that is not an object ({_brief(raw)})")]
    net_id, name = raw.get("Id"), raw.get("Name")
    for field, value in (("Id", net_id), ("Name", name)):
        if not isinstance(value, str) or not value:
            known = ", ".join(f"{key} {_brief(other, 20)}" for key, other in
                              (("Name", name), ("Id", net_id)) if key != field)
            return None, [_odd(f"a network record without a usable {field} ({known}); it "
                               "is skipped")]
    problems = []
    bad = _Complaints(f"network {name}", name, problems)
    source = raw
    config_from = _mapping(raw.get("ConfigFrom"), bad, "ConfigFrom").get("Network")
    if config_from:
        source = by_name.get(config_from, {})
    options = _mapping(source.get("Options"), bad, "Options")
    parent = options.get("parent")
    if parent is not None and not isinstance(parent, str):
        parent = bad.skip("Options.parent", parent)
    ipam = _ipam_entries(source, bad)
    return Network(
        id=net_id,
        name=name,
        driver=raw.get("Driver") if isinstance(raw.get("Driver"), str) else "",
        parent=parent or None,
        subnets=tuple(_parsed(ipam, "Subnet", _prefix, bad)),
        endpoints=_endpoints(raw, name, problems, known),
        gateways=frozenset(_parsed(ipam, "Gateway", _host, bad)),
        aux_addresses=frozenset(
            address for entry in ipam
            for key, text in _mapping(entry.get("AuxiliaryAddresses"), bad,
                                      "IPAM.Config.AuxiliaryAddresses").items()
            for address in _parsed([{key: text}], key, _host, bad)),
        ip_ranges=tuple(_parsed(ipam, "IPRange", _prefix, bad)),
        labels=tuple(sorted((str(k), str(v)) for k, v in
                            _mapping(raw.get("Labels"), bad, "Labels").items())),
    ), problems


class _Complaints:
    """Collects one warning per bad field, all worded the same way."""

    def __init__(self, subject, network, problems):
        self.subject, self.network, self.problems = subject, network, problems

    def skip(self, field, value, what="left out"):
        self.problems.append(Problem(
            f"{self.subject}: Docker reports {field}={_brief(value)}, which is not valid; it "
            f"is {what} (routes it may have had are kept until Docker reports it correctly)",
            self.network, kind="warning"))
        return None


def _odd(what):
    return Problem(f"Docker returned {what}; routes it may own are kept", kind="warning")


def _brief(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _mapping(value, bad, field):
    if value is None or isinstance(value, dict):
        return value or {}
    bad.skip(field, value, "ignored")
    return {}


def _ipam_entries(source, bad):
    entries = _mapping(source.get("IPAM"), bad, "IPAM").get("Config") or []
    if not isinstance(entries, list):
        bad.skip("IPAM.Config", entries, "ignored")
        return []
    return [entry for entry in entries if isinstance(entry, dict) or bad.skip(
        "IPAM.Config entry", entry)]


def _parsed(entries, key, parse, bad):
    for entry in entries:
        text = entry.get(key)
        if not text:
            continue
        value = parse(text)
        if value is None:
            bad.skip(key, text)
        else:
            yield value


def _prefix(text):
    try:
        return ipaddress.ip_network(text, strict=False) if isinstance(text, str) else None
    except ValueError:
        return None


def _host(text):
    """An address, with or without a prefix length (Docker writes both)."""
    try:
        return ipaddress.ip_interface(text).ip if isinstance(text, str) else None
    except ValueError:
        return None


def _endpoints(raw, network, problems, known=None):
    """`known`: container id -> (its record, its Endpoint) from the last read of this
    network, updated here: a record that did not change is not translated again, and
    keeps its Endpoint object (desired.Memo then finds its routes at once)."""
    containers = raw.get("Containers")
    if containers is None:
        return ()
    bad = _Complaints(f"network {network}", network, problems)
    if not isinstance(containers, dict):
        bad.skip("Containers", containers, "ignored")
        return ()
    endpoints = []
    for cid, info in sorted(containers.items()):
        if cid.startswith("ep-"):
            continue  # endpoints of other swarm nodes
        if not isinstance(info, dict):
            bad.skip(f"Containers[{cid[:12]}]", info)
            continue
        before = known.get(cid) if known is not None else None
        if before is not None and before[0] == info:
            endpoints.append(before[1])
            continue
        complaints = len(problems)
        name = info.get("Name") if isinstance(info.get("Name"), str) and info["Name"] \
            else cid[:12]
        mine = _Complaints(f"container {name} ({cid[:12]}) on network {network}", network,
                           problems)
        addresses = {}
        for field, version in (("IPv4Address", 4), ("IPv6Address", 6)):
            text = info.get(field)
            address = _host(text) if text else None
            if text and (address is None or address.version != version):
                address = mine.skip(field, text)
            addresses[version] = address
        endpoints.append(Endpoint(container_id=cid, container_name=name,
                                  ipv4=addresses[4], ipv6=addresses[6]))
        if known is not None and len(problems) == complaints:
            known[cid] = (info, endpoints[-1])
    if known is not None:
        for gone in known.keys() - containers.keys():
            del known[gone]
    return tuple(endpoints)


@dataclass(frozen=True)
class Listing:
    """Docker's network list: what translated, the warnings, and how many records did not."""

    networks: Tuple[Network, ...]
    problems: Tuple[Problem, ...] = ()
    unreadable: int = 0


class DockerSource:
    """Reads networks for reconciles. One client per thread: docker-py is not thread-safe.

    `before_call()` runs before every request: the daemon renews its watchdog lease
    there, so a slow but answering engine never gets it killed.
    """

    # Docker reports a network connect/disconnect for every network a container joins
    # or leaves when it starts or dies, so its container events need no read of their own;
    # an engine that does not sets this False and re-reads the networks on them.
    network_events = True

    def __init__(self, url, before_call=lambda: None):
        self.url = url
        self.before_call = before_call
        self._api = None
        self._raw = {}  # network name -> list entry, for --config-from lookups
        self._known = {}  # network id -> _endpoints' translations of its last inspect

    def _connected(self):
        if self._api is None:
            self._api = _client(self.url)
        return self._api

    def disconnect(self):
        if self._api is not None:
            self._api.close()
        self._api = None

    def _call(self, method, *args):
        self.before_call()
        try:
            return getattr(self._connected(), method)(*args)
        except docker.errors.NotFound:
            raise
        except FAILED as exc:
            self.disconnect()
            raise DockerUnavailable(describe_unreachable(self.url, exc)) from None

    def list_networks(self):
        """Every network, without endpoints (the list call does not return them)."""
        raw = self._call("networks")
        if not isinstance(raw, list):
            raise DockerUnavailable(
                f"Docker at {self.url} answered the network list with {_brief(raw)}, not a "
                "list; retrying")
        self._raw = {entry["Name"]: entry for entry in raw
                     if isinstance(entry, dict) and isinstance(entry.get("Name"), str)}
        listed = {entry.get("Id") for entry in raw if isinstance(entry, dict)}
        self._known = {k: v for k, v in self._known.items() if k in listed}
        networks, problems, unreadable = [], [], 0
        for entry in raw:
            if isinstance(entry, dict) and entry.get("ConfigOnly"):
                continue
            network, complaints = to_network(entry, self._raw)
            problems.extend(complaints)
            if network is None:
                unreadable += 1
            else:
                networks.append(network)
        return Listing(tuple(networks), tuple(problems), unreadable)

    def inspect(self, network_id):
        """(the network with its endpoints, warnings), or (None, ()) if it is gone.

        A record that does not translate at all is a failed read (DockerUnavailable):
        the caller keeps what it knew and retries."""
        try:
            raw = self._call("inspect_network", network_id)
        except docker.errors.NotFound:
            return None, ()
        network, problems = to_network(raw, self._raw, self._known.setdefault(network_id, {}))
        if network is None:
            raise DockerUnavailable(f"reading network {network_id[:12]} from Docker at "
                                    f"{self.url}: " + "; ".join(p.message for p in problems))
        return network, tuple(problems)


class EventWatcher:
    """Follows Docker's event stream in a thread, reconnecting with backoff.

    The backoff stops at a second: a failed connect to a local socket costs next to
    nothing, and a restarted engine must be noticed within a second.

    Calls on_event(REFRESH_ALL) right after each (re)subscription, so nothing that
    happened before or in the gap is missed; on_event(network id) for a connect or
    disconnect; on_lost(message) when the stream ends or cannot be opened (docker-py
    just stops iterating when dockerd goes away).
    """

    def __init__(self, url, on_event, on_lost, max_backoff=1.0):
        self.url = url
        self.on_event = on_event
        self.on_lost = on_lost
        self.max_backoff = max_backoff
        self._stopping = threading.Event()
        self._stream = None
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="docker-events", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self._stopping.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a dead stream may fail any way
                pass

    def _run(self):
        delay = 0.2
        while not self._stopping.is_set():
            try:
                api = _client(self.url)
                stream = api.events(decode=True, filters=EVENT_FILTERS)
                with self._lock:
                    self._stream = stream
                self.on_event(REFRESH_ALL)
                delay = 0.2
                for event in stream:
                    scope = classify(event)
                    log.debug("Docker event %.200r: refresh %s", event, scope)
                    if scope is not None:
                        self.on_event(scope)
                message = f"lost the event stream from Docker at {self.url}"
            except DockerUnavailable as exc:
                message = str(exc)
            except UNREACHABLE as exc:
                message = describe_unreachable(self.url, exc)
            except Exception as exc:  # noqa: BLE001 - the watcher must survive anything
                message = f"Docker event stream failed: {exc}"
            if self._stopping.is_set():
                return
            self.on_lost(message)
            self._stopping.wait(delay)
            delay = min(delay * 2, self.max_backoff)


def classify(event):
    """What a reconcile must re-read for this event; None when it changes nothing for us.

    The filter lets container create/destroy through too (Docker ANDs filter keys,
    so "create" cannot be limited to networks). An event of an odd shape asks for a
    re-read of everything rather than being trusted or dropped.
    """
    if not isinstance(event, dict):
        return REFRESH_ALL
    kind, action = event.get("Type"), event.get("Action")
    actor = event.get("Actor") if isinstance(event.get("Actor"), dict) else {}
    if kind == "network" and action in ("connect", "disconnect"):
        network_id = actor.get("ID")
        return network_id if isinstance(network_id, str) and network_id else REFRESH_ENDPOINTS
    if kind == "network":
        return REFRESH_ALL
    if kind == "container" and action in ("start", "die"):
        return CONTAINER_CHANGED
    return None
