"""Podman behind the Docker API: recognising it, its libpod reads, its records in Docker's shape.

A rootful Podman (`podman.socket`, /run/podman/podman.sock) speaks Docker's API and
docker-py talks to it, but its answers differ (checked against podman 4.3 with netavark,
and in Podman's source):

- the compat `GET /networks/{id}` has `"Options": {}` and no `IPRange`: the parent and the
  allocation ranges are only in the libpod record (`network_interface`,
  `subnets[].lease_range`), read here over a libpod path;
- a blank parent means "the interface of the host's default route", which netavark picks
  when a container starts;
- a network whose IPAM driver is "dhcp" lists no subnet: the prefix lengths of its
  containers' addresses (CIDR in `Containers`) are all there is to know of it;
- `Containers` gives one address per family only (the first on Podman 4, the last on
  Podman 5): all of them are in the libpod container record (`IPAddress`,
  `SecondaryIPAddresses`).

`docker_shaped()` turns a libpod record into what Docker's `network inspect` would have
answered, so that docker_source.to_network translates and checks both engines' records
alike. The events differ too; docker_source.classify() says how.
"""

import ipaddress
import re

ENGINE = "Podman Engine"
# The oldest libpod API that Podman 4 and 5 both serve; libpod paths need a libpod version
# (/v1.41/libpod/... is refused), and docker-py builds only Docker-versioned URLs.
OLDEST_LIBPOD_API = "4.0.0"
IPAM_DHCP = "dhcp"  # the IPAM driver of a network whose addresses the LAN's DHCP gives
PRIMARY = (("IPv4Address", "IPAddress"), ("IPv6Address", "GlobalIPv6Address"))
SECONDARY = (("IPv4Address", "SecondaryIPAddresses"), ("IPv6Address", "SecondaryIPv6Addresses"))


def libpod_prefix(version):
    """'/v4.3.1/libpod' when `GET /version` names the Podman engine; None for Docker."""
    components = version.get("Components") if isinstance(version, dict) else None
    for component in components if isinstance(components, list) else ():
        if isinstance(component, dict) and component.get("Name") == ENGINE:
            details = component.get("Details")
            api = details.get("APIVersion") if isinstance(details, dict) else None
            if not (isinstance(api, str) and re.fullmatch(r"\d+\.\d+\.\d+", api)):
                api = OLDEST_LIBPOD_API
            return f"/v{api}/libpod"
    return None


def docker_shaped(record, containers=None):
    """A libpod network record (`GET /libpod/networks/{name}/json`) as Docker would shape
    it: parent in Options, lease ranges as IPRange entries, and for a DHCP network the
    subnets its containers' addresses lie in. `containers`: the compat inspect's
    `Containers`, None for a listing. Odd values are passed on for to_network to report."""
    if not isinstance(record, dict):
        return record
    parent = record.get("network_interface")
    subnets = record.get("subnets") or []
    config = list(_ipam_entries(subnets)) if isinstance(subnets, list) else subnets
    ipam = record.get("ipam_options")
    if isinstance(ipam, dict) and ipam.get("driver") == IPAM_DHCP and isinstance(config, list):
        config.extend({"Subnet": prefix} for prefix in _lease_subnets(containers))
    options = {"parent": parent} if parent else {}
    libpod_options = record.get("options")
    # netavark's `mode` (l2 or bridge when absent, as in Docker) under Docker's key.
    mode_key = {"ipvlan": "ipvlan_mode", "macvlan": "macvlan_mode"}.get(record.get("driver"))
    if mode_key and isinstance(libpod_options, dict) and libpod_options.get("mode"):
        options[mode_key] = libpod_options["mode"]
    shaped = {"Id": record.get("id"), "Name": record.get("name"), "Driver": record.get("driver"),
              "Options": options,
              "IPAM": {"Driver": ipam.get("driver") if isinstance(ipam, dict) else None,
                       "Config": config},
              "Labels": record.get("labels")}
    if containers is not None:
        shaped["Containers"] = containers
    return shaped


def default_route_parent(record):
    """True for a macvlan record without a parent: netavark then uses the interface of
    the host's default route."""
    return isinstance(record, dict) and not record.get("network_interface")


def primary_addresses(container, network):
    """[(field, text)] of the first address per family that `container` (a libpod
    container record) holds on `network` (its name). Podman 5's compat `Containers` may
    show another of them (the last): the record's own first one is then not there."""
    entry = _network_entry(container, network)
    return [(field, entry[key]) for field, key in PRIMARY
            if isinstance(entry.get(key), str) and entry[key]]


def secondary_addresses(container, network):
    """[(field, text)] of the addresses beyond the first per family that `container` (a
    libpod container record) holds on `network` (its name)."""
    entry = _network_entry(container, network)
    found = []
    for field, key in SECONDARY:
        items = entry.get(key)
        for item in items if isinstance(items, list) else ():
            text = item.get("Addr") if isinstance(item, dict) else item
            found.append((field, text))
    return found


def _network_entry(container, network):
    settings = container.get("NetworkSettings") if isinstance(container, dict) else None
    networks = settings.get("Networks") if isinstance(settings, dict) else None
    entry = networks.get(network) if isinstance(networks, dict) else None
    return entry if isinstance(entry, dict) else {}


def several_per_family(subnets):
    """Whether a container may hold more addresses on the network than `Containers` shows."""
    versions = [subnet.version for subnet in subnets]
    return len(versions) != len(set(versions))


def _ipam_entries(subnets):
    for subnet in subnets:
        if not isinstance(subnet, dict):
            yield subnet
            continue
        yield {"Subnet": subnet.get("subnet"), "Gateway": subnet.get("gateway")}
        lease = subnet.get("lease_range")
        if lease:
            yield from ({"IPRange": text} for text in _lease_prefixes(subnet.get("subnet"), lease))


def _lease_prefixes(subnet, lease):
    """A lease range (start and end, either may be missing) as the prefixes covering it;
    what does not parse is passed on as one text for to_network to report."""
    raw = f"{lease.get('start_ip')}-{lease.get('end_ip')}" if isinstance(lease, dict) \
        else repr(lease)
    try:
        network = ipaddress.ip_network(subnet)
        start = ipaddress.ip_address(lease.get("start_ip") or network[1])
        end = ipaddress.ip_address(lease.get("end_ip") or network[-1])
        if start in network and end in network:
            return [str(prefix) for prefix in ipaddress.summarize_address_range(start, end)]
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    return [raw]


def _lease_subnets(containers):
    """The prefixes of the containers' CIDR addresses, each once (unparsable ones are
    reported by to_network with the container that holds them)."""
    prefixes = []
    for info in containers.values() if isinstance(containers, dict) else ():
        for field in ("IPv4Address", "IPv6Address"):
            text = info.get(field) if isinstance(info, dict) else None
            try:
                interface = ipaddress.ip_interface(text)
            except (TypeError, ValueError):
                continue
            if interface.network.prefixlen < interface.max_prefixlen \
                    and str(interface.network) not in prefixes:
                prefixes.append(str(interface.network))
    return prefixes
