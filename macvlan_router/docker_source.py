"""The Docker edge: list and inspect networks as model values, and follow the event stream.

The engine may be Docker or a rootful Podman behind its Docker-compatible API: each
connection asks `GET /version` which one answers, and podman.py holds what Podman
answers differently.
"""

import dataclasses
import ipaddress
import logging
import re
import threading
from dataclasses import dataclass
from typing import Tuple

import docker
import requests

from . import podman
from .errors import DockerUnavailable
from .model import IPVLAN, MACVLAN, Endpoint, Network, Problem

log = logging.getLogger(__name__)

DEFAULT_DOCKER_HOST = "unix:///run/docker.sock"
API_TIMEOUT = 10
EVENT_FILTERS = {
    "type": ["network", "container"],
    "event": ["connect", "disconnect", "create", "destroy", "start", "die"],
}
# Podman filters on its own names ("died"; the stream then says "die"), refuses filter keys
# it does not know, and tears a container's network down at "died" or "cleanup". Network
# create and remove are announced from Podman 5.4 only.
PODMAN_EVENT_FILTERS = {
    "type": ["network", "container"],
    "event": ["connect", "disconnect", "remove", "start", "died", "cleanup"],
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


def engine_named_by(url):
    """The engine a DOCKER_HOST names, for messages before it has answered: Podman's
    socket path says Podman."""
    return "Podman" if "podman" in url else "Docker"


def describe_unreachable(url, exc):
    text = str(exc)
    engine = engine_named_by(url)
    if isinstance(exc, docker.errors.APIError) or isinstance(exc, ValueError):
        return f"{engine} at {url} answered badly ({_brief(text, 200)}); retrying"
    podman_socket = engine == "Podman"
    if "Permission denied" in text or "PermissionError" in text:
        hint = ("the user running macvlan-router needs access to Podman's socket: the "
                "package's drop-in for podman.socket gives it to the group macvlan-router "
                "(SocketGroup=macvlan-router); if a drop-in of yours overrides it, or the "
                "socket was made before, run systemctl daemon-reload && systemctl restart "
                "podman.socket"
                if podman_socket else
                "the user running macvlan-router needs to be in the docker group")
    elif "No such file" in text or "FileNotFoundError" in text or "Connection refused" in text:
        hint = ("is Podman's API socket on? (systemctl enable --now podman.socket)"
                if podman_socket else "is the Docker engine running? (systemctl status docker)")
    else:
        hint = "check DOCKER_HOST and that the engine is running"
    return f"cannot reach {engine} at {url}: {hint}"


def to_network(raw, by_name, engine="Docker", known=None):
    """Translate one `docker network inspect` (or list) record, following --config-from.
    `known`: see _endpoints.

    Returns (Network or None, problems). Whatever the engine sends, a bad field costs
    only itself: a bad address or subnet is left out with a warning that names the
    network, the container and the field; a record without a usable Id or Name is None.
    `engine` names who answered, in the warnings.
    """
    if not isinstance(raw, dict):
        return None, [_odd(f"a network record that is not an object ({_brief(raw)})", engine)]
    net_id, name = raw.get("Id"), raw.get("Name")
    for field, value in (("Id", net_id), ("Name", name)):
        if not isinstance(value, str) or not value:
            known = ", ".join(f"{key} {_brief(other, 20)}" for key, other in
                              (("Name", name), ("Id", net_id)) if key != field)
            return None, [_odd(f"a network record without a usable {field} ({known}); it "
                               "is skipped", engine)]
    problems = []
    bad = _Complaints(f"network {name}", name, problems, engine)
    source = raw
    config_from = _mapping(raw.get("ConfigFrom"), bad, "ConfigFrom").get("Network")
    if config_from:
        source = by_name.get(config_from, {})
    options = _mapping(source.get("Options"), bad, "Options")
    parent = options.get("parent")
    if parent is not None and not isinstance(parent, str):
        parent = bad.skip("Options.parent", parent)
    ipam_driver, ipam = _ipam(source, bad)
    driver = raw.get("Driver")
    if not isinstance(driver, str) or not driver:
        # Unreadable, the network is served by no one; the warning ties it to the network,
        # so that the routes and shim it may have had are kept.
        driver = bad.skip("Driver", driver, "not known") or ""
    ipvlan_mode, ipvlan_flag = _ipvlan_options(driver, options)
    return Network(
        id=net_id,
        name=name,
        driver=driver,
        ipvlan_mode=ipvlan_mode,
        ipvlan_flag=ipvlan_flag,
        macvlan_mode=str(options.get("macvlan_mode") or "bridge") if driver == MACVLAN else None,
        parent=parent or None,
        subnets=tuple(_parsed(ipam, "Subnet", _prefix, bad)),
        endpoints=_endpoints(raw, name, problems, engine, known),
        gateways=frozenset(_parsed(ipam, "Gateway", _host, bad)),
        aux_addresses=frozenset(
            address for entry in ipam
            for key, text in _mapping(entry.get("AuxiliaryAddresses"), bad,
                                      "IPAM.Config.AuxiliaryAddresses").items()
            for address in _parsed([{key: text}], key, _host, bad)),
        ip_ranges=tuple(_parsed(ipam, "IPRange", _prefix, bad)),
        # Podman's name; Docker has DHCP only as third-party IPAM plugins.
        dhcp=ipam_driver == podman.IPAM_DHCP,
        labels=tuple(sorted((str(k), str(v)) for k, v in
                            _mapping(raw.get("Labels"), bad, "Labels").items())),
        engine=engine,
    ), problems


# Docker's ipvlan options and the values it takes when they are absent or empty.
IPVLAN_DEFAULTS = (("ipvlan_mode", "l2"), ("ipvlan_flag", "bridge"))


def _ipvlan_options(driver, options):
    """(ipvlan_mode, ipvlan_flag) of an ipvlan network, Docker's defaults filled in; (None,
    None) for other drivers. Any other value is passed on as text, for desired.py to
    refuse by name: guessing a mode would switch the containers' mode too."""
    if driver != IPVLAN:
        return None, None
    return tuple(str(options.get(key) or default) for key, default in IPVLAN_DEFAULTS)


class _Complaints:
    """Collects one warning per bad field, all worded the same way."""

    def __init__(self, subject, network, problems, engine):
        self.subject, self.network, self.problems = subject, network, problems
        self.engine = engine

    def skip(self, field, value, what="left out"):
        self.problems.append(Problem(
            f"{self.subject}: {self.engine} reports {field}={_brief(value)}, which is not "
            f"valid; it is {what} (routes it may have had are kept until {self.engine} "
            "reports it correctly)", self.network, kind="warning"))
        return None


def _odd(what, engine):
    return Problem(f"{engine} returned {what}; routes it may own are kept", kind="warning")


def _brief(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _mapping(value, bad, field):
    if value is None or isinstance(value, dict):
        return value or {}
    bad.skip(field, value, "ignored")
    return {}


def _ipam(source, bad):
    """(the IPAM driver's name, the IPAM.Config entries that are objects)"""
    ipam = _mapping(source.get("IPAM"), bad, "IPAM")
    entries = ipam.get("Config") or []
    if not isinstance(entries, list):
        bad.skip("IPAM.Config", entries, "ignored")
        return ipam.get("Driver"), []
    return ipam.get("Driver"), [entry for entry in entries if isinstance(entry, dict)
                                or bad.skip("IPAM.Config entry", entry)]


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


def _endpoints(raw, network, problems, engine, known=None):
    """`known`: container id -> (its record, its Endpoint) from the last read of this
    network, updated here: a record that did not change is not translated again, and
    keeps its Endpoint object (desired.Memo then finds its routes at once)."""
    containers = raw.get("Containers")
    if containers is None:
        return ()
    bad = _Complaints(f"network {network}", network, problems, engine)
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
                           problems, engine)
        addresses = {field: _address(info.get(field), field, mine) for field in FAMILY}
        endpoints.append(Endpoint(container_id=cid, container_name=name,
                                  ipv4=addresses["IPv4Address"], ipv6=addresses["IPv6Address"],
                                  mac=_mac(info.get("MacAddress"), mine)))
        if known is not None and len(problems) == complaints:
            known[cid] = (info, endpoints[-1])
    if known is not None:
        for gone in known.keys() - containers.keys():
            del known[gone]
    return tuple(endpoints)


def _mac(text, bad):
    if not text:
        return None
    if isinstance(text, str) and re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        return text.lower()
    return bad.skip("MacAddress", text)


FAMILY = {"IPv4Address": 4, "IPv6Address": 6}


def _address(text, field, bad):
    """A container's address in `field` (IPv4Address or IPv6Address, with or without a
    prefix length), None when empty, or None with a warning when it is not valid."""
    address = _host(text) if text else None
    if text and (address is None or address.version != FAMILY[field]):
        return bad.skip(field, text)
    return address


@dataclass(frozen=True)
class Listing:
    """Docker's network list: what translated, the warnings, and how many records did not."""

    networks: Tuple[Network, ...]
    problems: Tuple[Problem, ...] = ()
    unreadable: int = 0
    engine: str = "Docker"


class DockerSource:
    """Reads networks for reconciles. One client per thread: docker-py is not thread-safe.

    `before_call()` runs before every request: the daemon renews its watchdog lease
    there, so a slow but answering engine never gets it killed.
    """

    def __init__(self, url, before_call=lambda: None):
        self.url = url
        self.before_call = before_call
        self._api = None
        self._libpod = None  # "/vX.Y.Z/libpod" while connected to Podman; None: Docker
        self._answered = False  # has the engine answered /version yet?
        self._raw = {}  # network name -> list entry, for --config-from lookups
        self._known = {}  # network id -> _endpoints' translations of its last inspect
        self._records = {}  # Podman: network id -> libpod record, from the last list

    @property
    def engine(self):
        """Who answers at the URL, as its last /version said; before any answer, the
        engine the URL names."""
        if not self._answered:
            return engine_named_by(self.url)
        return "Podman" if self._libpod else "Docker"

    @property
    def network_events(self):
        """Docker reports a network connect/disconnect for every network a container joins
        or leaves when it starts or dies, so its container events need no read of their
        own; Podman does not (`podman run` emits no connect), so there they re-read."""
        return self._libpod is None

    def _connected(self):
        if self._api is None:
            api = _client(self.url)
            try:
                self._libpod = _libpod_prefix(api)
                self._answered = True
            except BaseException:
                api.close()
                raise
            self._api = api
        return self._api

    def disconnect(self):
        if self._api is not None:
            self._api.close()
        self._api = None

    def _request(self, read):
        """read(api) on the connected client; a failure becomes DockerUnavailable."""
        self.before_call()
        try:
            return read(self._connected())
        except docker.errors.NotFound:
            raise
        except FAILED as exc:
            self.disconnect()
            raise DockerUnavailable(describe_unreachable(self.url, exc)) from None

    def _call(self, method, *args):
        return self._request(lambda api: getattr(api, method)(*args))

    def _libpod_get(self, path, *args):
        return self._request(lambda api: self._libpod_read(api, path, *args))

    def _libpod_read(self, api, path, *args):
        """GET a libpod path. The URL is built here: docker-py puts its Docker API version
        in every URL it builds, and libpod paths need a libpod version."""
        return api._result(api._get(api._url(self._libpod + path, *args, versioned_api=False)),
                           json=True)

    def list_networks(self):
        """Every network, without endpoints (the list call does not return them)."""
        # Podman's compat list inspects every container for every network; its libpod list
        # is cheap, and holds the parents and ranges that the compat answers lack.
        raw = self._request(lambda api: api.networks() if self._libpod is None
                            else self._libpod_read(api, "/networks/json"))
        podman_list = self._libpod is not None
        if not isinstance(raw, list):
            raise DockerUnavailable(
                f"{self.engine} at {self.url} answered the network list with {_brief(raw)}, "
                "not a list; retrying")
        if podman_list:
            self._records = {entry["id"]: entry for entry in raw
                             if isinstance(entry, dict) and isinstance(entry.get("id"), str)}
            raw = [podman.docker_shaped(entry) for entry in raw]
        self._raw = {entry["Name"]: entry for entry in raw
                     if isinstance(entry, dict) and isinstance(entry.get("Name"), str)}
        listed = {entry.get("Id") for entry in raw if isinstance(entry, dict)}
        self._known = {k: v for k, v in self._known.items() if k in listed}
        networks, problems, unreadable = [], [], 0
        for entry in raw:
            if isinstance(entry, dict) and entry.get("ConfigOnly"):
                continue
            network, complaints = self._translate(entry)
            problems.extend(complaints)
            if network is None:
                unreadable += 1
            else:
                networks.append(network)
        return Listing(tuple(networks), tuple(problems), unreadable, self.engine)

    def inspect(self, network_id):
        """(the network with its endpoints, warnings), or (None, ()) if it is gone.

        A record that does not translate at all is a failed read (DockerUnavailable):
        the caller keeps what it knew and retries."""
        try:
            raw = self._call("inspect_network", network_id)
            if self._libpod:
                raw = self._podman_shaped(network_id, raw)
        except docker.errors.NotFound:
            return None, ()
        network, problems = self._translate(raw, self._known.setdefault(network_id, {}))
        if network is None:
            raise DockerUnavailable(f"reading network {network_id[:12]} from {self.engine} "
                                    f"at {self.url}: " + "; ".join(p.message for p in problems))
        if self._libpod and podman.several_per_family(network.subnets):
            network = self._with_secondary_addresses(network, problems)
        return network, tuple(problems)

    def _translate(self, raw, known=None):
        network, problems = to_network(raw, self._raw, self.engine, known)
        if network is not None and self._libpod \
                and podman.default_route_parent(self._records.get(network.id)):
            network = dataclasses.replace(network, default_route_parent=True)
        return network, problems

    def _podman_shaped(self, network_id, compat):
        """The compat inspect's containers on the network's libpod record. The record comes
        from the last list when it is there: a network's parent and subnets never change."""
        record = self._records.get(network_id)
        if record is None:
            record = self._libpod_get("/networks/{0}/json", network_id)
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                self._records[record["id"]] = record
        containers = compat.get("Containers") if isinstance(compat, dict) else compat
        return podman.docker_shaped(record, containers or {})

    def _with_secondary_addresses(self, network, problems):
        """Podman's `Containers` shows one address per family: on a network with several
        subnets of a family, the others are read from each running container's record."""
        extra = []
        for endpoint in network.endpoints:
            if endpoint.ipv4 is None and endpoint.ipv6 is None:
                continue  # not running
            try:
                record = self._libpod_get("/containers/{0}/json", endpoint.container_id)
            except docker.errors.NotFound:
                continue  # gone since: its own event re-reads the network
            bad = _Complaints(f"container {endpoint.container_name} ({endpoint.short_id}) on "
                              f"network {network.name}", network.name, problems, self.engine)
            for field, text in (podman.primary_addresses(record, network.name)
                                + podman.secondary_addresses(record, network.name)):
                address = _address(text, field, bad)
                if address is not None and address not in (endpoint.ipv4, endpoint.ipv6):
                    extra.append(Endpoint(
                        endpoint.container_id, endpoint.container_name, mac=endpoint.mac,
                        **{"ipv4" if address.version == 4 else "ipv6": address}))
        return dataclasses.replace(network, endpoints=network.endpoints + tuple(extra))


def _libpod_prefix(api):
    """Which engine answers: the libpod path prefix for Podman, None for Docker."""
    return podman.libpod_prefix(api.version())


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
                on_podman = _libpod_prefix(api) is not None
                engine = "Podman" if on_podman else "Docker"
                stream = api.events(decode=True, filters=PODMAN_EVENT_FILTERS if on_podman
                                    else EVENT_FILTERS)
                with self._lock:
                    self._stream = stream
                self.on_event(REFRESH_ALL)
                delay = 0.2
                for event in stream:
                    scope = classify(event, on_podman)
                    log.debug("%s event %.200r: refresh %s", engine, event, scope)
                    if scope is not None:
                        self.on_event(scope)
                message = f"lost the event stream from {engine} at {self.url}"
            except DockerUnavailable as exc:
                message = str(exc)
            except UNREACHABLE as exc:
                message = describe_unreachable(self.url, exc)
            except Exception as exc:  # noqa: BLE001 - the watcher must survive anything
                message = f"{engine_named_by(self.url)} event stream failed: {exc}"
            if self._stopping.is_set():
                return
            self.on_lost(message)
            self._stopping.wait(delay)
            delay = min(delay * 2, self.max_backoff)


def classify(event, on_podman=False):
    """What a reconcile must re-read for this event; None when it changes nothing for us.

    The filter lets container create/destroy through too (Docker ANDs filter keys,
    so "create" cannot be limited to networks). An event of an odd shape asks for a
    re-read of everything rather than being trusted or dropped.

    Podman's events differ: a network connect or disconnect names the container as
    Actor.ID (the network, from Podman 5 on, only by name in an attribute), so every
    managed network is read again; `podman run` emits no connect at all, and before
    Podman 5.4 no event announces a new network, so a container starting asks for the
    network list too; a container's network goes at "died" (the stream says "die") or
    at its "cleanup".
    """
    if not isinstance(event, dict):
        return REFRESH_ALL
    kind, action = event.get("Type"), event.get("Action")
    actor = event.get("Actor") if isinstance(event.get("Actor"), dict) else {}
    if kind == "network" and action in ("connect", "disconnect"):
        network_id = actor.get("ID")
        known = isinstance(network_id, str) and network_id and not on_podman
        return network_id if known else REFRESH_ENDPOINTS
    if kind == "network":
        return REFRESH_ALL
    if kind == "container" and action == "start":
        return REFRESH_ALL if on_podman else CONTAINER_CHANGED
    if kind == "container" and action in ("die", "cleanup"):
        return REFRESH_ENDPOINTS if on_podman else CONTAINER_CHANGED
    return None
