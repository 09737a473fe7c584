"""The Docker edge: list and inspect networks as model values, and follow the event stream."""

import ipaddress
import logging
import threading
import time

import docker
import requests

from .errors import DockerUnavailable
from .model import Endpoint, Network

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

# docker-py raises its own errors, requests', urllib3's and plain OSErrors
# depending on where the connection broke; all mean "Docker is not there".
UNREACHABLE = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


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
    if "Permission denied" in text or "PermissionError" in text:
        hint = "the user running macvlan-router needs to be in the docker group"
    elif "No such file" in text or "FileNotFoundError" in text or "Connection refused" in text:
        hint = "is the Docker engine running? (systemctl status docker)"
    else:
        hint = "check DOCKER_HOST and that the engine is running"
    return f"cannot reach Docker at {url}: {hint}"


def _subnets(raw):
    return tuple(ipaddress.ip_network(s, strict=False) for s in _ipam(raw, "Subnet"))


def _ipam(raw, key):
    return [entry[key] for entry in (raw.get("IPAM") or {}).get("Config") or [] if entry.get(key)]


def _address(text):
    return ipaddress.ip_interface(text).ip if text else None


def to_network(raw, by_name):
    """Translate one `docker network inspect` result, following --config-from."""
    source = raw
    config_from = (raw.get("ConfigFrom") or {}).get("Network")
    if config_from:
        source = by_name.get(config_from, {})
    endpoints = tuple(
        Endpoint(container_id=cid, container_name=(info.get("Name") or cid[:12]),
                 ipv4=_address(info.get("IPv4Address")), ipv6=_address(info.get("IPv6Address")))
        for cid, info in sorted((raw.get("Containers") or {}).items())
        if not cid.startswith("ep-"))  # ep-*: endpoints of other swarm nodes
    return Network(
        id=raw["Id"],
        name=raw["Name"],
        driver=raw.get("Driver") or "",
        parent=(source.get("Options") or {}).get("parent"),
        subnets=_subnets(source),
        endpoints=endpoints,
        gateways=frozenset(ipaddress.ip_interface(g).ip for g in _ipam(source, "Gateway")),
        aux_addresses=frozenset(ipaddress.ip_address(a) for aux in _ipam(source, "AuxiliaryAddresses")
                                for a in aux.values()),
        ip_ranges=tuple(ipaddress.ip_network(r, strict=False) for r in _ipam(source, "IPRange")),
        labels=tuple(sorted((raw.get("Labels") or {}).items())))


class DockerSource:
    """Reads networks for reconciles. One client per thread: docker-py is not thread-safe."""

    def __init__(self, url):
        self.url = url
        self._api = None
        self._raw = {}  # network name -> list entry, for --config-from lookups

    def _connected(self):
        if self._api is None:
            self._api = _client(self.url)
        return self._api

    def disconnect(self):
        if self._api is not None:
            self._api.close()
        self._api = None

    def list_networks(self):
        """Every network, without endpoints (the list call does not return them)."""
        try:
            raw = self._connected().networks()
        except UNREACHABLE as exc:
            self.disconnect()
            raise DockerUnavailable(describe_unreachable(self.url, exc)) from None
        self._raw = {entry["Name"]: entry for entry in raw}
        return [to_network(entry, self._raw) for entry in raw if not entry.get("ConfigOnly")]

    def inspect(self, network_id):
        """The network with its endpoints, or None if it vanished meanwhile."""
        try:
            raw = self._connected().inspect_network(network_id)
        except docker.errors.NotFound:
            return None
        except UNREACHABLE as exc:
            self.disconnect()
            raise DockerUnavailable(describe_unreachable(self.url, exc)) from None
        return to_network(raw, self._raw)


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
                    log.debug("Docker event %s %s %s, %.1f ms old", event.get("Type"),
                              event.get("Action"), (event.get("Actor") or {}).get("ID", "")[:12],
                              (time.time_ns() - event.get("timeNano", 0)) / 1e6)
                    scope = classify(event)
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
    so "create" cannot be limited to networks).
    """
    kind = event.get("Type")
    action = event.get("Action", "")
    if kind == "network" and action in ("connect", "disconnect"):
        return (event.get("Actor") or {}).get("ID") or REFRESH_ENDPOINTS
    if kind == "network":
        return REFRESH_ALL
    if kind == "container" and action in ("start", "die"):
        return REFRESH_ENDPOINTS
    return None
