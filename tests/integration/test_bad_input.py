"""Bad input: a clear message naming the setting or value, exit 78 (EX_CONFIG), never a
traceback; for `check` always, for `run` at start (static errors at once, errors that
depend on Docker's state at the first reconcile)."""

import pytest

from lab import LAN0, SHIM0, assert_no_traceback, wait_until

pytestmark = pytest.mark.integration

C4 = "198.51.100.130"
EX_CONFIG = 78


def _lan_net(lab, engine):
    engine.network("lan")
    engine.container("c1", "lan", ip=C4)


def _lan_net6(lab, engine):
    engine.network("lan", v6=True)
    engine.container("c1", "lan", ip=C4, ip6="2001:db8:1::1:10")


def _missing_parent(lab, engine):
    """A network whose parent interface has gone away."""
    lab.ipc("link", "add", "lanx", "type", "veth", "peer", "name", "peerx", "netns", lab.P)
    lab.ipc("link", "set", "lanx", "up")
    engine.cli("network", "create", "-d", "macvlan", "--label", "org.macvlan-router.test=1",
               "--subnet", "203.0.113.0/24", "--ip-range", "203.0.113.128/25",
               "-o", "parent=lanx", "gone")
    lab.ipc("link", "del", "lanx")
    return "lanx"


def _clash_zero_config(lab, engine):
    """Docker gave a container the host's address, which zero-config puts on the shim."""
    engine.network("lan", ip_range=False, aux=False)
    engine.container("c1", "lan", ip=LAN0["host"])


def _clash_explicit(lab, engine):
    engine.network("lan")
    engine.container("c1", "lan", ip="198.51.100.140")


def _unreadable(lab, engine):
    d = lab.path("config-is-a-directory")
    d.mkdir(exist_ok=True)
    return str(d)


def _undecodable(lab, engine):
    p = lab.path("latin1.env")
    p.write_bytes(b"MACVLAN_DOCKER_NETWORK=caf\xe9\n")
    return str(p)


# id: (setup, config, words the message must contain, static?)
CASES = {
    "invalid-address": (_lan_net, {"MACVLAN_BRIDGE_IP": "198.51.100.300"},
                        ["MACVLAN_BRIDGE_IP", "198.51.100.300"], True),
    "invalid-address6": (_lan_net, {"MACVLAN_BRIDGE_IP6": "2001:db8:1::zz"},
                         ["MACVLAN_BRIDGE_IP6", "2001:db8:1::zz"], True),
    # With networks named: the set of networks is the configuration's own.
    "out-of-subnet": (_lan_net, {"MACVLAN_BRIDGE_IP": "203.0.113.50",
                                 "MACVLAN_DOCKER_NETWORK": "lan"}, ["203.0.113.50"], False),
    "out-of-subnet6": (_lan_net6, {"MACVLAN_BRIDGE_IP6": "2001:db8:9::5",
                                   "MACVLAN_DOCKER_NETWORK": "lan"}, ["2001:db8:9::5"], False),
    "name-too-long": (_lan_net, {"MACVLAN_BRIDGE_INTERFACE_NAME": "mvr-0123456789ab"},
                      ["MACVLAN_BRIDGE_INTERFACE_NAME", "mvr-0123456789ab"], True),
    "unknown-network": (_lan_net, {"MACVLAN_DOCKER_NETWORK": "nosuchnet"},
                        ["nosuchnet"], False),
    "unreadable-config": (_unreadable, None, ["config-is-a-directory"], True),
    "undecodable-config": (_undecodable, None, ["latin1.env"], True),
    "bad-syntax": (_lan_net, "this is not a setting\n", ["this is not a setting"], True),
    "bad-boolean": (_lan_net, {"CLEANUP_ON_EXIT": "maybe"}, ["CLEANUP_ON_EXIT", "maybe"],
                    True),
    "bad-interval": (_lan_net, {"RESYNC_INTERVAL": "soon"}, ["RESYNC_INTERVAL", "soon"],
                     True),
    "bad-route": (_lan_net, {"ADDITIONAL_ROUTES": "198.51.100.0/33"},
                  ["ADDITIONAL_ROUTES", "198.51.100.0/33"], True),
    # The route-safety policy: what would take over the host's traffic is refused.
    "route-default-halves": (_lan_net, {"ADDITIONAL_ROUTES": "0.0.0.0/1 128.0.0.0/1"},
                             ["ADDITIONAL_ROUTES", "0.0.0.0/1"], True),
    "route-link-local": (_lan_net, {"ADDITIONAL_ROUTES": "169.254.0.0/16"},
                         ["ADDITIONAL_ROUTES", "169.254.0.0/16"], True),
    "route-host-address": (_lan_net, {"ADDITIONAL_ROUTES": LAN0["host"]},
                           ["ADDITIONAL_ROUTES", LAN0["host"], "host itself"], False),
    "shim-named-as-parent": (_lan_net, {"MACVLAN_BRIDGE_INTERFACE_NAME": "lan0=lan0"},
                             ["MACVLAN_BRIDGE_INTERFACE_NAME", "lan0"], True),
    "shim-name-template": (_lan_net, {"MACVLAN_BRIDGE_INTERFACE_NAME": "mvr-%d"},
                           ["MACVLAN_BRIDGE_INTERFACE_NAME", "mvr-%d"], True),
    "bridge-ip-with-prefix": (_lan_net, {"MACVLAN_BRIDGE_IP": "198.51.100.0/24"},
                              ["MACVLAN_BRIDGE_IP", "198.51.100.0/24"], True),
}


def _prepare(lab, engine, case):
    setup, config, words, static = CASES[case]
    made = setup(lab, engine)
    if config is None:
        config = made          # the setup made the config path itself
    return lab.config_file(config), words, static


def _assert_message(rc, text, words, what):
    assert rc == EX_CONFIG, f"{what} exited {rc}, want {EX_CONFIG}:\n{text}"
    for w in words:
        assert w in text, f"{what}: message does not name {w!r}:\n{text}"
    assert_no_traceback(text, what)


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_rejects(lab, engine, case):
    cfg, words, _ = _prepare(lab, engine, case)
    rc, out, err = lab.mvr("check", config=cfg)
    _assert_message(rc, out + err, words, "check")
    assert lab.link(SHIM0) is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_rejects_at_start(lab, engine, case):
    cfg, words, static = _prepare(lab, engine, case)
    d = lab.daemon(cfg, ready=False)
    rc = d.wait_exit(timeout=30)
    _assert_message(rc, d.stderr, words, "run")
    assert "READY=1" not in d.notified() or not static, \
        "a static configuration error must stop the daemon before READY=1"
    # CLEANUP_ON_EXIT defaults to true: whatever it did before giving up is gone
    assert lab.link(SHIM0) is None, f"shim left behind by a daemon that exited {rc}"
    assert lab.owned_routes() == [], lab.owned_routes()


# What Docker or the host did: a warning naming it, the service runs (a restart must never
# stop on it). id: (setup, config, words the warning must contain)
WARNED = {
    "missing-parent": (_missing_parent, {"MACVLAN_DOCKER_NETWORK": "gone"}, ["lanx"]),
    "clash-explicit": (_clash_explicit, {"MACVLAN_BRIDGE_IP": "198.51.100.140"},
                       ["198.51.100.140", "c1"]),
    # Serving every network: the address's network may have been removed since.
    "out-of-subnet-all-networks": (_lan_net, {"MACVLAN_BRIDGE_IP": "203.0.113.50"},
                                   ["203.0.113.50", "remove it if its network is gone"]),
}


@pytest.mark.parametrize("case", sorted(WARNED))
def test_dockers_or_the_hosts_doing_is_a_warning_not_a_stop(lab, engine, case):
    setup, config, words = WARNED[case]
    setup(lab, engine)
    rc, out, err = lab.mvr("check", config=config)
    assert rc == 0, (rc, out, err)
    assert any(line.startswith("warning:") and all(w in line for w in words)
               for line in out.splitlines()), out
    d = lab.daemon(config)
    assert d.alive() and all(w in d.stderr for w in words), d.stderr
    assert "fix the problems above" not in d.stderr
    assert_no_traceback(d.stderr)


def test_run_static_error_needs_no_docker(lab, engine):
    """Static errors are reported even when Docker is unreachable."""
    d = lab.daemon({"MACVLAN_BRIDGE_IP": "198.51.100.300"}, ready=False,
                   docker_host=f"unix://{lab.dir}/nothing.sock")
    rc = d.wait_exit(timeout=30)
    _assert_message(rc, d.stderr, ["MACVLAN_BRIDGE_IP", "198.51.100.300"], "run")


def test_check_ok_and_a_named_file_that_is_missing_is_an_error(lab, engine):
    _lan_net(lab, engine)
    missing = lab.path("does-not-exist.env")
    for command in ("check", "run"):
        rc, out, err = lab.mvr(command, config=missing, timeout=30)
        _assert_message(rc, out + err, [str(missing), "does not exist"], command)
    rc, out, err = lab.mvr("check", config={"MACVLAN_DOCKER_NETWORK": "lan",
                                            "MACVLAN_BRIDGE_IP": "198.51.100.10"})
    assert rc == 0, (rc, out, err)


def test_environment_overrides_file(lab, engine):
    _lan_net(lab, engine)
    rc, out, err = lab.mvr("check", config={"MACVLAN_DOCKER_NETWORK": "lan"},
                           env={"MACVLAN_DOCKER_NETWORK": "nosuchnet"})
    _assert_message(rc, out + err, ["nosuchnet"], "check with the environment overriding")


def test_usage_error_exit_2(lab, engine):
    rc, out, err = lab.mvr("no-such-command", config=False)
    assert rc == 2, (rc, out, err)
    rc, out, err = lab.mvr("--version", config=False)
    assert rc == 0 and out.strip(), (rc, out, err)
    assert_no_traceback(err)


def test_check_rejects_the_gateway_as_shim_address(lab, engine):
    _lan_net(lab, engine)
    rc, out, err = lab.mvr("check", config={"MACVLAN_BRIDGE_IP": LAN0["gateway"]})
    _assert_message(rc, out + err, [LAN0["gateway"]], "check")


def test_docker_handing_out_the_host_address_costs_only_that_container(lab, engine):
    """Zero-config: Docker gave c1 the host's own address. That is Docker's doing, not a
    configuration error: c1 is not routed (never a route to a host address), the daemon
    starts anyway and serves the rest, and check warns but passes."""
    _clash_zero_config(lab, engine)
    engine.container("c2", "lan", ip=C4)
    rc, out, err = lab.mvr("check", config={})
    assert rc == 0, f"check exited {rc}:\n{out}{err}"
    assert "warning:" in out and LAN0["host"] in out and "--aux-address" in out, out
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route for the other container")
    assert lab.route(LAN0["host"]) is None, "a route to the host's own address"
    assert LAN0["host"] in d.stderr and "not routed" in d.stderr, d.stderr
    assert d.alive()
    assert_no_traceback(d.stderr)


def test_stale_network_on_a_removed_parent_does_not_stop_the_rest(lab, engine):
    """With every macvlan network served, a network whose parent is gone is skipped."""
    _missing_parent(lab, engine)
    _lan_net(lab, engine)
    d = lab.daemon({})
    wait_until(lambda: lab.route_via(C4, SHIM0), desc="route on the network that works")
    assert "lanx" in d.stderr and "does not exist" in d.stderr, d.stderr
    assert d.alive()
    assert_no_traceback(d.stderr)
