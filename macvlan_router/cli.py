"""Command line: run, check, status, cleanup. Also the composition root that wires the edges."""

import argparse
import json
import logging
import os
import sys

from . import __version__
from . import config as config_mod
from . import log as log_mod
from .errors import EX_CONFIG, EX_FAILURE, EX_OK, EX_UNAVAILABLE, MacvlanRouterError

log = logging.getLogger("macvlan_router")


def build(config, before_call=lambda: None):
    """Create the real edges (imported here so `--help` works without them)."""
    from .docker_source import DockerSource, docker_host
    from .netlink import Netlink
    from .reconcile import Reconciler
    url = docker_host(config)
    return Reconciler(config, DockerSource(url, before_call), Netlink()), url


def cmd_run(args, config):
    """The composition root of the daemon: every edge is built here and handed over."""
    import queue

    from .daemon import DOCKER, HOST, LOST, STEP_BUDGET, Daemon
    from .docker_source import API_TIMEOUT, EventWatcher
    from .netlink import Monitor
    from .notify import Notifier, Watchdog
    notifier = Notifier()
    watchdog = Watchdog(notifier)
    reconciler, url = build(config, lambda: watchdog.renew(API_TIMEOUT + STEP_BUDGET))
    # SimpleQueue.put is reentrant: safe to call from a signal handler.
    triggers = queue.SimpleQueue()
    watcher = EventWatcher(url, lambda scope: triggers.put((DOCKER, scope)),
                           lambda why: triggers.put((LOST, why)))
    monitor = Monitor(lambda: triggers.put((HOST, None)), lambda: reconciler.watched)
    return Daemon(args.config, lambda: config_mod.load(args.config, required=args.config_required),
                  reconciler, notifier, watchdog, triggers, watcher, monitor, url).run()


def _gather(config):
    """The host, the outcome computed from what Docker answered (None when it answered
    nothing), and why Docker's answer is missing or incomplete (None when complete)."""
    from .docker_source import REFRESH_ALL
    reconciler, url = build(config)
    host = reconciler.netlink.read()
    _, error = reconciler.refresh({REFRESH_ALL})
    view = reconciler.view
    outcome = reconciler.compute(host) if view.listed else None
    if error is None and view.listed and not view.complete:
        error = (f"{view.listing.unreadable} network record(s) from {reconciler.docker.engine} "
                 "could not be read")
    return reconciler, url, host, outcome, str(error) if error else None


def cmd_check(args, config):
    reconciler, url, host, outcome, docker_error = _gather(config)
    print(f"configuration {args.config}: valid")
    if outcome is None:
        print(f"error: {docker_error}")
        return EX_UNAVAILABLE
    engine = reconciler.docker.engine
    print(f"{engine} at {url}: reachable")
    desired = outcome.desired
    if not desired.networks:
        print("no macvlan network to manage"
              + ("" if config.networks else " (MACVLAN_DOCKER_NETWORK is unset: all of them)"))
    for managed in desired.networks:
        network = managed.network
        subnets = ", ".join(map(str, network.subnets)) or "no subnet"
        print(f"network {network.name} ({network.id[:12]}): parent {network.parent or '-'}, "
              f"{subnets}, {len(network.endpoints)} container(s), shim {managed.shim or '-'}")
    for name, shim in sorted(desired.shims.items()):
        addresses = " ".join(str(a) for a in sorted(shim.addresses, key=lambda a: (a.version, a)))
        print(f"shim {name} ({shim.kind} {shim.mode}) on {shim.parent}: "
              f"{addresses or 'no address'}")
    for problem in outcome.problems:
        print(f"{problem.kind}: {problem.message}")
    if docker_error:
        # Judging the configuration on a partial answer could blame it for the engine's fault.
        print(f"error: {engine}'s answer is incomplete, so the check is too: {docker_error}")
        return EX_UNAVAILABLE
    if outcome.errors:
        print(f"{len(outcome.errors)} problem(s) to fix in {args.config}, {engine} or the host")
        return EX_CONFIG
    print("all good")
    return EX_OK


def status_report(host, outcome, url, docker_error):
    from .model import IPVLAN
    from .plan import owned_shims
    shims = owned_shims(host)
    owners = outcome.desired.routes if outcome is not None else {}
    report = {
        "docker": {"host": url, "reachable": docker_error is None, "error": docker_error},
        "shims": [{
            "name": name,
            "parent": host.link_name(link.parent_index),
            "kind": link.kind,
            "mode": link.ipvlan_mode if link.kind == IPVLAN else link.macvlan_mode,
            "mac": link.mac,
            "up": link.up,
            "addresses": [str(a.interface) for a in host.addresses_of(name)
                          if not a.ip.is_link_local],
        } for name, link in sorted(shims.items())],
        "routes": [],
        "networks": [],
        "problems": [] if outcome is None else [
            {"kind": p.kind, "network": p.network, "message": p.message}
            for p in outcome.problems],
    }
    for route in sorted((r for r in host.routes if r.owned),
                        key=lambda r: (r.dst.version, r.dst)):
        spec = owners.get(route.dst)
        report["routes"].append({
            "dst": str(route.dst), "dev": route.ifname,
            "src": str(route.src) if route.src else None,
            "network": spec.network if spec else None,
            "container": spec.container_name if spec else None,
        })
    routed = {r.dst.network_address for r in host.routes if r.owned}
    for managed in (outcome.desired.networks if outcome else ()):
        network = managed.network
        report["networks"].append({
            "name": network.name, "id": network.id, "parent": network.parent,
            "shim": managed.shim, "subnets": [str(s) for s in network.subnets],
            "containers": [{
                "id": e.container_id, "name": e.container_name,
                "ipv4": str(e.ipv4) if e.ipv4 else None,
                "ipv6": str(e.ipv6) if e.ipv6 else None,
                "routed": all(a in routed for a in (e.ipv4, e.ipv6) if a is not None),
            } for e in network.endpoints],
        })
    return report


def cmd_status(args, config):
    _, url, host, outcome, docker_error = _gather(config)
    report = status_report(host, outcome, url, docker_error)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_status(report)
    return EX_UNAVAILABLE if docker_error else EX_OK


def print_status(report):
    if not report["shims"]:
        print("no shim interface: macvlan-router manages nothing on this host right now")
    for shim in report["shims"]:
        state = "up" if shim["up"] else "DOWN"
        print(f"shim {shim['name']} ({shim['kind']} {shim['mode']}) on {shim['parent']} "
              f"({state}): "
              f"{' '.join(shim['addresses']) or 'no address'}")
        for route in report["routes"]:
            if route["dev"] == shim["name"]:
                why = (f"{route['container']} on {route['network']}" if route["container"]
                       else route["network"] or "not wanted any more")
                print(f"  {route['dst']:<28} {why}")
    docker = report["docker"]
    if not docker["reachable"]:
        print(f"Docker: {docker['error']}")
    for network in report["networks"]:
        unrouted = [c["name"] for c in network["containers"] if not c["routed"]]
        print(f"network {network['name']}: parent {network['parent']}, shim {network['shim']}, "
              f"{len(network['containers'])} container(s)"
              + (f", not routed: {', '.join(unrouted)}" if unrouted else ""))
    for problem in report["problems"]:
        print(f"{problem['kind']}: {problem['message']}")


def cmd_cleanup(args, config):
    """Needs no valid configuration (`config` may be None): only CLEANUP_ON_EXIT, read on
    its own, and only with --if-enabled."""
    from . import lifecycle
    from .netlink import Netlink
    enabled = not args.if_enabled or config_mod.read_cleanup_on_exit(args.config)
    failed = lifecycle.leave(Netlink(), enabled, args.unit)
    return EX_FAILURE if failed else EX_OK


def parser():
    top = argparse.ArgumentParser(
        prog="macvlan-router",
        description="Let this Docker host reach its own containers on macvlan networks.")
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name, func, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="PATH",
                         help=f"configuration file (default {config_mod.DEFAULT_PATH})")
        sub.set_defaults(func=func)
        return sub

    command("run", cmd_run, "run the daemon in the foreground")
    command("check", cmd_check, "validate the configuration against Docker and this host")
    status = command("status", cmd_status, "show the shims, routes and networks managed now")
    status.add_argument("--json", action="store_true", help="print JSON")
    cleanup = command("cleanup", cmd_cleanup, "remove every link and route macvlan-router owns")
    cleanup.add_argument("--if-enabled", action="store_true",
                         help="do nothing when CLEANUP_ON_EXIT=false (for ExecStopPost=)")
    cleanup.add_argument("--unit", metavar="UNIT",
                         help="run from UNIT's ExecStopPost=: remove only when systemd is "
                              "stopping UNIT; a restart (also a package upgrade's) or a "
                              "crash keeps everything for the next start")
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    log_mod.setup(daemon=args.command == "run")
    # A file named on the command line must exist; the default one may be missing.
    args.config_required = args.config is not None
    args.config = args.config or config_mod.DEFAULT_PATH
    if args.func is cmd_cleanup:
        # Cleanup needs none of the configuration and must work with a broken file: it
        # reads only CLEANUP_ON_EXIT, with config.read_cleanup_on_exit().
        config = None
    else:
        try:
            config = config_mod.load(args.config, required=args.config_required)
        except MacvlanRouterError as exc:
            log.error("configuration error: %s", exc)
            return exc.exit_status
        log_mod.set_level(config.log_level)
    try:
        return args.func(args, config)
    except MacvlanRouterError as exc:
        log.error("%s", exc)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `macvlan-router status | head`: the reader left; nothing more to say.
        sys.stdout = open(os.devnull, "w")
        return EX_FAILURE


if __name__ == "__main__":
    sys.exit(main())
