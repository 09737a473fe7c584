"""The route-safety policy (macvlan_router/safety.py) and its one gate in desired.py."""

import pytest

from macvlan_router import config, desired, safety
from macvlan_router.config import Config
from macvlan_router.errors import ConfigError
from macvlan_router.model import Route

from .factories import endpoint, host, ip, net, network

FACTS = safety.HostFacts(
    addresses=frozenset({ip("198.51.100.2"), ip("2001:db8:1::2")}),
    default_gateways=frozenset({ip("198.51.100.1")}),
    subnets=((net("198.51.100.0/24"), frozenset({ip("198.51.100.1")})),))


@pytest.mark.parametrize("prefix, reason", [
    ("0.0.0.0/1", "wider than /8"),
    ("128.0.0.0/1", "wider than /8"),
    ("126.0.0.0/7", "wider than /8"),
    ("224.0.0.0/3", "wider than /8"),
    ("2000::/3", "wider than /16"),
    ("127.0.0.1/32", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("169.254.3.4/32", "link-local"),
    ("224.0.0.251/32", "multicast"),
    ("240.1.2.3/32", "reserved"),
    ("255.255.255.255/32", "limited broadcast"),
    ("0.0.0.0/32", "unspecified"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::1/128", "link-local"),
    ("ff02::1/128", "multicast"),
    ("198.51.100.2/32", "host itself holds 198.51.100.2"),
    ("2001:db8:1::2/128", "host itself holds"),
    ("198.51.100.0/32", "network address"),
    ("198.51.100.255/32", "broadcast address"),
    ("198.51.100.240/28", "broadcast address"),
    ("198.51.100.1/32", "default gateway"),
    ("198.51.100.0/25", "host itself holds"),
])
def test_refused(prefix, reason):
    assert reason in safety.refusal(net(prefix), FACTS)


@pytest.mark.parametrize("prefix", [
    "198.51.100.130/32", "198.51.100.224/28", "203.0.113.0/24", "198.18.0.0/15",
    "2001:db8:1::1:5/128", "2001:db8:2::/48"])
def test_allowed(prefix):
    assert safety.refusal(net(prefix), FACTS) is None


def test_static_refusal_needs_no_host():
    assert safety.static_refusal(net("0.0.0.0/1"))
    assert safety.static_refusal(net("203.0.113.0/24")) is None


def _compute(cfg, networks, h=None):
    return desired.compute(cfg, networks, h or host())


def test_endpoints_on_special_addresses_get_no_route():
    lan = network(gateways=frozenset({ip("198.51.100.1")}), endpoints=[
        endpoint("gw", "198.51.100.1"), endpoint("netaddr", "198.51.100.0"),
        endpoint("bcast", "198.51.100.255"), endpoint("ok", "198.51.100.130")])
    result = _compute(Config(), [lan])
    assert set(result.routes) == {net("198.51.100.130/32")}
    refused = [p.message for p in result.problems if "not routed" in p.message]
    assert len(refused) == 3 and all(p.kind == "warning" for p in result.problems)


def test_additional_routes_that_take_over_the_default_gateway_are_config_errors():
    h = host()
    h = h.__class__(links=h.links, addresses=h.addresses, machine_id=h.machine_id,
                    routes=(Route(dst=net("0.0.0.0/0"), ifname="eth0", proto=4,
                                  gateways=(ip("203.0.113.1"),)),))
    lan = network(endpoints=[endpoint("ok", "198.51.100.130")])
    result = _compute(Config(additional_routes=(net("203.0.113.0/29"),
                                                net("198.51.100.200/32"))), [lan], h)
    assert net("198.51.100.200/32") in result.routes
    assert net("203.0.113.0/29") not in result.routes
    (error,) = [p for p in result.problems if p.kind == "error"]
    assert "203.0.113.0/29" in error.message and "default gateway 203.0.113.1" in error.message


def test_a_subnet_wider_than_a_lan_from_the_engine_is_not_served():
    lan = network(subnets=("0.0.0.0/0",), ip_ranges=(),
                  endpoints=[endpoint("web", "198.51.100.130")])
    result = _compute(Config(), [lan])
    assert not result.routes and not result.shims
    assert any("wider than /8" in p.message and p.kind == "warning" for p in result.problems)


@pytest.mark.parametrize("entry", ["0.0.0.0/1", "128.0.0.0/1", "126.0.0.0/7", "224.0.0.0/3",
                                   "169.254.0.0/16", "240.0.0.0/4", "127.0.0.1"])
def test_additional_routes_outside_the_policy_are_refused_at_once(entry):
    with pytest.raises(ConfigError, match="cannot be routed via a shim"):
        config.from_values({"ADDITIONAL_ROUTES": entry})
