"""Leaving: which way out removes what we own (a stop) and which keeps it (everything else)."""

from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macvlan_router import lifecycle
from macvlan_router.lifecycle import Decision, QueryFailed, decide, job_types, list_jobs

from .factories import host, route

UNIT = "macvlan-router.service"
# What `systemctl list-jobs --no-legend` printed in the e2e box (systemd 252).
RESTARTING = f"1234 {UNIT} restart running\n"
STOPPING = f"1301 {UNIT} stop running\n"
SHUTDOWN = ("1400 docker.service stop waiting\n"
            f"1399 {UNIT} stop running\n"
            "1402 containerd.service stop waiting\n")


def canned(text):
    return lambda: text


def failing(message):
    def query():
        raise QueryFailed(message)
    return query


# --------------------------------------------------------------------------- which unit

@pytest.mark.parametrize("text, unit", [
    ("0::/system.slice/macvlan-router.service\n", UNIT),                        # cgroup v2
    ("12:pids:/system.slice/macvlan-router.service\n"
     "1:name=systemd:/system.slice/macvlan-router.service\n"
     "0::/system.slice/macvlan-router.service\n", UNIT),                       # hybrid
    ("4:memory:/docker/0123abcd\n"
     "1:name=systemd:/docker/0123abcd/system.slice/macvlan-router.service\n", UNIT),
    ("0::/system.slice/macvlan-router.service/\n", UNIT),
    ("0::/user.slice/user-0.slice/session-3.scope\n", None),                  # a login shell
    ("0::/user.slice/user-0.slice/user@0.service/app.slice/tmux-1.scope\n", None),
    ("4:memory:/system.slice/macvlan-router.service\n1:name=systemd:/\n", None),
    ("0::/\n", None),
    ("", None),
])
def test_unit_from_cgroup(text, unit):
    assert lifecycle.unit_from_cgroup(text) == unit


def test_service_unit_needs_invocation_id_and_a_service_cgroup(tmp_path):
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/system.slice/macvlan-router.service\n")
    assert lifecycle.service_unit({"INVOCATION_ID": "9f2c"}, str(cgroup)) == UNIT
    # Started by hand from a shell: no INVOCATION_ID, whatever the cgroup says.
    assert lifecycle.service_unit({}, str(cgroup)) is None
    assert lifecycle.service_unit({"INVOCATION_ID": ""}, str(cgroup)) is None
    assert lifecycle.service_unit({"INVOCATION_ID": "9f2c"}, str(tmp_path / "absent")) is None
    cgroup.write_text("0::/user.slice/user-0.slice/session-3.scope\n")
    assert lifecycle.service_unit({"INVOCATION_ID": "9f2c"}, str(cgroup)) is None


# --------------------------------------------------------------------------- the job

def test_job_types_of_our_unit_only():
    listing = (f"1 {UNIT} restart running\n"
               "2 macvlan-router-extra.service stop waiting\n"
               "3 x-macvlan-router.service stop waiting\n"
               "garbage\n\n")
    assert job_types(listing, UNIT) == {"restart"}
    assert job_types(SHUTDOWN, UNIT) == {"stop"}
    assert job_types("", UNIT) == set()


def test_stop_removes():
    assert decide(True, UNIT, canned(STOPPING)) == Decision(True, f"{UNIT} is stopping")
    assert decide(True, UNIT, canned(SHUTDOWN)).remove


def test_restart_keeps_for_the_next_start():
    d = decide(True, UNIT, canned(RESTARTING))
    assert d == Decision(False, "restarting", lifecycle.NEXT_START)


def test_no_job_keeps_it_was_a_crash():
    """The daemon was killed (SIGKILL, watchdog) or crashed: systemd may restart it."""
    for listing in ("", "1400 docker.service stop running\n"):
        d = decide(True, UNIT, canned(listing))
        assert not d.remove
        assert "without a stop job" in d.reason and "crash" in d.reason
        assert "macvlan-router cleanup" in d.note


def test_other_jobs_keep():
    """A start that failed (the daemon refused to start): what an earlier run left stays."""
    d = decide(True, UNIT, canned(f"77 {UNIT} start running\n"))
    assert not d.remove and "its job: start" in d.reason and "cleanup" in d.note


def test_systemd_not_answering_keeps_and_says_why():
    d = decide(True, UNIT, failing("systemctl list-jobs gave no answer within 5 s"))
    assert not d.remove
    assert d.reason == (f"cannot tell whether {UNIT} is stopping or restarting "
                        "(systemctl list-jobs gave no answer within 5 s)")
    assert "macvlan-router cleanup" in d.note


def test_cleanup_on_exit_false_keeps_without_asking():
    def never():
        raise AssertionError("systemd asked although CLEANUP_ON_EXIT=false")
    for unit in (UNIT, None):
        assert decide(False, unit, never) == Decision(False, "CLEANUP_ON_EXIT=false")


def test_not_under_systemd_removes_without_asking():
    def never():
        raise AssertionError("systemd asked for a command run by hand")
    assert decide(True, None, never) == Decision(True)


JOB_TYPES = st.sampled_from(["start", "stop", "restart", "reload", "verify-active", "nop"])
UNITS = st.sampled_from([UNIT, "docker.service", "macvlan-router.socket", "a.service"])


@given(st.lists(st.tuples(UNITS, JOB_TYPES, st.sampled_from(["running", "waiting"]))))
def test_only_a_stop_job_of_our_unit_removes(jobs):
    listing = "".join(f"{n} {u} {t} {s}\n" for n, (u, t, s) in enumerate(jobs, 1))
    stopping = (UNIT, "stop") in {(u, t) for u, t, _ in jobs}
    assert decide(True, UNIT, canned(listing)).remove == stopping


# --------------------------------------------------------------------------- asking systemd

def test_list_jobs_returns_what_systemctl_prints():
    assert list_jobs(("printf", RESTARTING)) == RESTARTING


@pytest.mark.parametrize("command, timeout, message", [
    (("sh", "-c", "echo 'Failed to connect to bus: No such file or directory' >&2; exit 1"),
     5, "sh -c echo 'Failed to connect to bus: No such file or directory' >&2; exit 1 failed: "
        "Failed to connect to bus: No such file or directory"),
    (("false",), 5, "false failed: exit status 1"),
    (("/nonexistent/systemctl", "list-jobs"), 5,
     "cannot run /nonexistent/systemctl: No such file or directory"),
    (("sleep", "10"), 0.2, "sleep 10 gave no answer within 0.2 s"),
])
def test_list_jobs_failures_say_what_went_wrong(command, timeout, message):
    with pytest.raises(QueryFailed) as info:
        list_jobs(command, timeout)
    assert str(info.value) == message


def test_a_hung_systemctl_means_keep():
    d = decide(True, UNIT, partial(list_jobs, ("sleep", "10"), 0.2))
    assert not d.remove and "gave no answer within 0.2 s" in d.reason


# --------------------------------------------------------------------------- the log line

@pytest.mark.parametrize("shims, routes, text", [
    ((("mvr-eth0", "eth0"),), ("198.51.100.140/32", "198.51.100.141/32"),
     "mvr-eth0 and its 2 routes"),
    ((("mvr-eth0", "eth0"),), ("198.51.100.140/32",), "mvr-eth0 and its 1 route"),
    ((("mvr-eth0", "eth0"),), (), "mvr-eth0 and its 0 routes"),
    ((("mvr-eth0", "eth0"), ("mvr-eth1", "eth1")), ("198.51.100.140/32", "203.0.113.0/28"),
     "mvr-eth0, mvr-eth1 and their 2 routes"),
    ((), (), ""),
])
def test_owned_summary(shims, routes, text):
    h = host(links=("eth0", "eth1"), shims=shims,
             routes=tuple(route(r, "mvr-eth0") for r in routes)
             + (route("198.51.100.0/24", "eth0", proto=2),))
    assert lifecycle.owned_summary(h) == text
