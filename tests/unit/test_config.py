import ipaddress
import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macvlan_router import cli, config
from macvlan_router.errors import EX_CONFIG, ConfigError
from tests.envfile_cases import CASES, REFUSED


def load_text(tmp_path, text, environ=None):
    path = tmp_path / "macvlan-router"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return config.load(str(path), environ or {})


def parse(data):
    return config.parse_environment_file(data.decode("utf-8", "surrogateescape"), "f")


# --------------------------------------------------------------------------- the syntax

@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reads_the_file_as_systemd_does(case):
    """tests/e2e/test_envfile_systemd.py holds real systemd to the same table."""
    parsed = parse(case.data)
    if case.problem is None:
        assert parsed.problems == ()
        assert parsed.values == case.systemd
    else:
        assert len(parsed.problems) == 1, parsed.problems
        assert parsed.problems[0].startswith(f"f, line {case.line}: ")
        assert case.problem in parsed.problems[0]
        if case.systemd is not REFUSED:
            # What we do read is what systemd reads.
            for key, value in parsed.values.items():
                assert case.systemd[key] == value


def systemd_reference(text, version):
    """parse_env_file_internal() of systemd's src/basic/env-file.c, one character at a
    time as written there, followed by strv_env_clean() (invalid names dropped)."""
    whitespace, newline = " \t\n\r", "\n\r"
    state, key, value, key_blank, value_blank = "pre_key", [], [], None, None
    assignments = []

    def push(trim):
        name = "".join(key[:key_blank] if key_blank is not None else key)
        text = value[:value_blank] if trim and value_blank is not None else value
        assignments.append((name, "".join(text)))

    for c in text:
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif c not in whitespace:
                state, key_blank, key = "key", None, [c]
        elif state == "key":
            if c in newline:
                state = "pre_key"
            elif c == "=":
                state, value_blank, value = "pre_value", None, []
            else:
                if c not in whitespace:
                    key_blank = None
                elif key_blank is None:
                    key_blank = len(key)
                key.append(c)
        elif state == "pre_value":
            if c in newline:
                state = "pre_key"
                push(False)
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "value_escape"
            elif c not in whitespace:
                state = "value"
                value.append(c)
        elif state == "value":
            if c in newline:
                state = "pre_key"
                push(True)
            elif c == "\\":
                state, value_blank = "value_escape", None
            else:
                if c not in whitespace:
                    value_blank = None
                elif value_blank is None:
                    value_blank = len(value)
                value.append(c)
        elif state == "value_escape":
            state = "value"
            if c not in newline:
                value.append(c)
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value.append(c)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value.append(c)
        elif state == "double_escape":
            state = "double"
            if c in '"\\`$':
                value.append(c)
            elif c != "\n":
                value.extend(("\\", c))
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in newline:
                state = "pre_key"
        elif state == "comment_escape":
            state = "pre_key" if version >= 254 and c in newline else "comment"
    if state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push(state == "value")
    return {name: text for name, text in assignments if config._NAME.match(name)}


# Lines made of the characters the state machine treats specially.
LINE_STARTS = ["A=", "B=", " A =", "\tB=", "#", ";", "  # ", "", "A-B=", "export A="]
VALUE_PIECES = [" ", "\t", "x", "x y", "é", "\\", "\\\n", "\\\r\n", "'", '"', "#", ";",
                "$", "`", "-", "="]
LINE_ENDS = ["\n", "\r\n", "\r", "\\\n", ""]
lines = st.tuples(st.sampled_from(LINE_STARTS),
                  st.lists(st.sampled_from(VALUE_PIECES), max_size=8).map("".join),
                  st.sampled_from(LINE_ENDS)).map("".join)


@settings(max_examples=500)
@given(st.lists(lines, max_size=6).map("".join))
def test_follows_systemds_state_machine(text):
    parsed = config.parse_environment_file(text, "f")
    old, new = systemd_reference(text, 252), systemd_reference(text, 257)
    if not parsed.problems:
        assert parsed.values == old == new
    # Where systemd's versions disagree, we refuse to pick one.
    assert old == new or parsed.problems


@given(st.text(max_size=200))
def test_parser_never_raises(text):
    parsed = config.parse_environment_file(text, "f")
    assert all(problem.startswith("f, line ") for problem in parsed.problems)


# Without what systemd's utf8_is_valid() refuses, and the parser with it: the
# noncharacters U+FDD0-U+FDEF and U+xFFFE, U+xFFFF (hypothesis found U+FFFE).
safe_text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs"),
                                           blacklist_characters="\\\"'").filter(
    lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE)), max_size=30)


def test_a_noncharacter_in_a_value_is_refused_as_systemd_refuses_it():
    for text in ("\ufffe", "\ufdd0", "\U0001ffff"):
        assert config.parse_environment_file(f"KEY='{text}'\nB=1\n", "f").values == {"B": "1"}


@given(value=safe_text)
def test_quoted_values_round_trip(value):
    for quote in "'\"":
        parsed = config.parse_environment_file(f"KEY={quote}{value}{quote}\n", "f")
        assert parsed.values == {"KEY": value}


def test_big_file_parses_in_linear_time():
    """3 MB: the old parser joined continuation lines in quadratic time (76 s here).
    tests/bench_config.py prints the real figure."""
    continued = "ADDITIONAL_ROUTES=" + "203.0.113.1 \\\n" * 110_000 + "\n"
    lines = "".join(f"K{i}='v{i}'\n# comment {i}\n" for i in range(80_000))
    text = continued + lines
    assert len(text) > 3_000_000
    start = time.monotonic()
    parsed = config.parse_environment_file(text, "f")
    assert time.monotonic() - start < 20
    assert parsed.problems == ()
    assert parsed.values["ADDITIONAL_ROUTES"].split() == ["203.0.113.1"] * 110_000
    assert parsed.values["K79999"] == "v79999"


# --------------------------------------------------------------------------- load()

def test_missing_file_means_defaults(tmp_path):
    cfg = config.load(str(tmp_path / "absent"), {})
    assert cfg == config.Config()
    assert cfg.cleanup_on_exit is True
    assert cfg.networks == ()


def test_missing_file_named_explicitly_is_an_error(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(ConfigError) as info:
        config.load(str(path), {}, required=True)
    assert f"{path} does not exist" in str(info.value)
    assert info.value.exit_status == EX_CONFIG


@pytest.fixture
def root_logging():
    """cli.main() sets up logging on the root logger: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.parametrize("command", ["check", "run", "status"])
def test_cli_refuses_a_named_file_that_does_not_exist(tmp_path, command, capsys, root_logging):
    path = tmp_path / "absent"
    assert cli.main([command, "--config", str(path)]) == EX_CONFIG
    assert f"{path} does not exist" in capsys.readouterr().err


def test_environment_file_syntax(tmp_path):
    cfg = load_text(tmp_path, """
# comment
; another comment
   MACVLAN_DOCKER_NETWORK="lan label=router=yes"
MACVLAN_BRIDGE_IP='198.51.100.250'
ADDITIONAL_ROUTES=198.51.100.64/26 \\
  203.0.113.7
CLEANUP_ON_EXIT=no
RESYNC_INTERVAL=30
""")
    assert [s.text for s in cfg.networks] == ["lan", "label=router=yes"]
    assert cfg.networks[1].label_key == "router" and cfg.networks[1].label_value == "yes"
    assert cfg.bridge_ips == (ipaddress.ip_address("198.51.100.250"),)
    assert cfg.additional_routes == (ipaddress.ip_network("198.51.100.64/26"),
                                     ipaddress.ip_network("203.0.113.7/32"))
    assert cfg.cleanup_on_exit is False
    assert cfg.resync_interval == 30


def test_a_problem_in_the_file_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "MACVLAN_DOCKER_NETWORK=lan\nexport CLEANUP_ON_EXIT=no\nx\n")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'macvlan-router'}, line 2: ")
    assert "write CLEANUP_ON_EXIT=... without it" in message
    assert "(and 1 more problem in the file)" in message


def test_a_bad_value_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "# settings\n\nMACVLAN_BRIDGE_IP=x\n")
    assert str(info.value) == (f"{tmp_path / 'macvlan-router'}, line 3: "
                               "MACVLAN_BRIDGE_IP='x' is not an IP address")


def test_environment_overrides_documented_keys(tmp_path):
    cfg = load_text(tmp_path, "MACVLAN_DOCKER_NETWORK=lan\nCLEANUP_ON_EXIT=true\n",
                    {"MACVLAN_DOCKER_NETWORK": "other", "CLEANUP_ON_EXIT": "false",
                     "RESYNC_INTERVAL": "5", "HOME": "/root"})
    assert [s.text for s in cfg.networks] == ["other"]
    assert cfg.cleanup_on_exit is False
    assert cfg.resync_interval == 5


def test_generic_names_come_from_the_file_only(tmp_path):
    """A Docker user's shell often sets DOCKER_HOST; DEBUG and LOG_LEVEL are as common."""
    environ = {"DEBUG": "true", "LOG_LEVEL": "not-a-level", "DOCKER_HOST": "tcp://elsewhere:2375"}
    cfg = load_text(tmp_path, "LOG_LEVEL=warning\n", environ)
    assert cfg.log_level == "warning"
    assert cfg.docker_host is None
    cfg = load_text(tmp_path, "DOCKER_HOST=unix:///run/other.sock\n", environ)
    assert cfg.docker_host == "unix:///run/other.sock" and cfg.log_level == "info"


def test_docker_host_ignores_the_shell(monkeypatch):
    from macvlan_router.docker_source import DEFAULT_DOCKER_HOST, docker_host
    monkeypatch.setenv("DOCKER_HOST", "tcp://elsewhere:2375")
    assert docker_host(config.Config()) == DEFAULT_DOCKER_HOST
    assert docker_host(config.Config(docker_host="unix:///x.sock")) == "unix:///x.sock"


def test_a_bad_value_from_the_environment_says_so(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "MACVLAN_BRIDGE_IP=198.51.100.2\n", {"MACVLAN_BRIDGE_IP": "x"})
    assert str(info.value) == (
        "MACVLAN_BRIDGE_IP='x' is not an IP address (MACVLAN_BRIDGE_IP comes from the "
        f"environment, which overrides {tmp_path / 'macvlan-router'}: fix or unset it there)")


def test_additional_routes_keep_their_prefix(tmp_path):
    cfg = load_text(tmp_path, "ADDITIONAL_ROUTES=203.0.113.0/28 2001:db8:5::/64\n")
    assert [str(r) for r in cfg.additional_routes] == ["203.0.113.0/28", "2001:db8:5::/64"]


@pytest.mark.parametrize("line, words", [
    ("MACVLAN_BRIDGE_IP=198.51.100.300", ["MACVLAN_BRIDGE_IP", "198.51.100.300"]),
    ("MACVLAN_BRIDGE_IP=2001:db8::1", ["MACVLAN_BRIDGE_IP6"]),
    ("MACVLAN_BRIDGE_IP6=198.51.100.1", ["MACVLAN_BRIDGE_IP6", "MACVLAN_BRIDGE_IP"]),
    ("MACVLAN_BRIDGE_IP=224.0.0.1", ["MACVLAN_BRIDGE_IP", "224.0.0.1"]),
    ("MACVLAN_BRIDGE_IP=198.51.100.0/24", ["'198.51.100.0/24'", "address alone", "/24"]),
    ("MACVLAN_BRIDGE_IP6=2001:db8::5/64", ["address alone", "/128"]),
    ("MACVLAN_BRIDGE_INTERFACE_NAME=a-very-long-name", ["16 bytes", "at most 15"]),
    ("MACVLAN_BRIDGE_INTERFACE_NAME=bad/name", ["not a valid interface name", "'/'"]),
    ("MACVLAN_BRIDGE_INTERFACE_NAME=a b", ["PARENT=NAME"]),
    ("ADDITIONAL_ROUTES=198.51.100.65/26", ["host bits", "198.51.100.64/26"]),
    ("ADDITIONAL_ROUTES=nonsense", ["ADDITIONAL_ROUTES", "nonsense"]),
    ("ADDITIONAL_ROUTES=0.0.0.0/0", ["cannot be routed"]),
    ("CLEANUP_ON_EXIT=maybe", ["CLEANUP_ON_EXIT", "true or false"]),
    ("RESYNC_INTERVAL=0", ["RESYNC_INTERVAL", "1 to 86400"]),
    ("LOG_LEVEL=loud", ["LOG_LEVEL", "debug"]),
    ("MACVLAN_DOCKER_NETWORK=label=", ["label=KEY"]),
    ("just words", ["line 1", "KEY=value"]),
    ('MACVLAN_BRIDGE_IP="198.51.100.250', ["never closed"]),
])
def test_bad_values_name_the_setting(tmp_path, line, words):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, line + "\n")
    for word in words:
        assert word in str(info.value)
    assert info.value.exit_status == EX_CONFIG


@pytest.mark.parametrize("value", ["198.51.100.7/32", "198.51.100.7"])
def test_shim_address_alone_or_as_host_prefix(tmp_path, value):
    cfg = load_text(tmp_path, f"MACVLAN_BRIDGE_IP={value}\nMACVLAN_BRIDGE_IP6=2001:db8::7/128\n")
    assert cfg.bridge_ips == (ipaddress.ip_address("198.51.100.7"),)
    assert cfg.bridge_ip6s == (ipaddress.ip_address("2001:db8::7"),)


def test_unreadable_file(tmp_path, monkeypatch):
    # Root reads any file, and CI runs as root: stand in for the kernel's answer.
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(config, "open", denied, raising=False)
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path / "macvlan-router"), {})
    assert "cannot read the configuration file" in str(info.value)
    assert "Permission denied" in str(info.value) and "0644" in str(info.value)


def test_directory_as_file_is_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        config.load(str(tmp_path), {})


def test_unknown_and_retired_keys_only_warn(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = load_text(tmp_path, "MACVLAN_BRIDGE_IPS=1\nTZ=Europe/Berlin\n")
    assert cfg == config.Config(source=cfg.source)
    assert "line 1: unknown setting MACVLAN_BRIDGE_IPS ignored; check its spelling" in caplog.text
    assert "line 2: TZ is not used" in caplog.text


# --------------------------------------------------------------------------- shim names

def test_parent_name_pairs(tmp_path):
    cfg = load_text(tmp_path, "MACVLAN_BRIDGE_INTERFACE_NAME=eth0=mvr-lan eth0.10=mvr-iot\n")
    assert cfg.interface_names == (("eth0", "mvr-lan"), ("eth0.10", "mvr-iot"))


@pytest.mark.parametrize("name", ["mvr-lan", "a" * 15, "mvr.é", "x_1"])
def test_names_the_kernel_takes(name):
    assert config.validate_ifname(name) == name


@pytest.mark.parametrize("name, reason", [
    ("", "empty"),
    (".", "'.' and '..'"),
    ("..", "'.' and '..'"),
    ("a" * 16, "16 bytes"),
    ("ééééééééé", "18 bytes"),
    ("a/b", "'/'"),
    ("a:b", "':'"),
    ("mvr%d", "template"),
    ("a%b", "template"),
    ("a\x00b", "NUL"),
    ("a\tb", "white space"),
    ("a\vb", "white space"),
    ("a\fb", "white space"),
    ("a\rb", "white space"),
    ("a b", "white space"),
    ("mvr\u00a0x", "0xa0"),     # NO-BREAK SPACE: c2 a0
    ("mvrà", "0xa0"),           # c3 a0: 0xa0 is a space to the kernel's isspace()
])
def test_names_the_kernel_refuses(name, reason):
    with pytest.raises(ConfigError) as info:
        config.validate_ifname(name)
    assert reason in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("lo", ["'lo'", "loopback"]),
    ("eth0=lo", ["loopback"]),
    ("eth0=eth0", ["eth0=eth0", "its own parent", "mvr-eth0"]),
    ("eth0=mvr-lan eth1=eth0", ["eth1=eth0", "another parent"]),
    ("eth0=a%d", ["template"]),
    ("a%b=mvr", ["(parent)", "template"]),
])
def test_shim_names_refused(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, f"MACVLAN_BRIDGE_INTERFACE_NAME='{text}'\n")
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------- cleanup

def write(tmp_path, data):
    path = tmp_path / "macvlan-router"
    path.write_bytes(data)
    return str(path)


def test_cleanup_setting_without_a_file(tmp_path, caplog):
    assert config.read_cleanup_on_exit(str(tmp_path / "absent"), {}) is True
    assert not caplog.records


@pytest.mark.parametrize("value, expected", [("false", False), ("no", False), ("true", True),
                                             ("", True)])
def test_cleanup_setting_from_a_good_file(tmp_path, caplog, value, expected):
    path = write(tmp_path, f"CLEANUP_ON_EXIT={value}\nMACVLAN_BRIDGE_IP=x\n".encode())
    assert config.read_cleanup_on_exit(path, {}) is expected
    assert not caplog.records       # the bad address is none of cleanup's business


def test_cleanup_setting_read_from_a_broken_file(tmp_path, caplog):
    path = write(tmp_path, b"CLEANUP_ON_EXIT=false\nexport MACVLAN_BRIDGE_IP=1\n")
    assert config.read_cleanup_on_exit(path, {}) is False
    assert caplog.records[0].levelno == logging.WARNING
    assert "line 2: systemd does not know 'export'" in caplog.text
    assert f"CLEANUP_ON_EXIT=false from {path}, line 1 is used all the same" in caplog.text


@pytest.mark.parametrize("data, why", [
    (b"CLEANUP_ON_EXIT='false\n", "never closed"),
    (b"# \\\nCLEANUP_ON_EXIT=false\n", "ends with a backslash"),
    (b"CLEANUP_ON_EXIT=\xff\n", "not valid UTF-8"),
    (b"CLEANUP_ON_EXIT=maybe\n", "not a boolean"),
])
def test_cleanup_setting_unreadable_means_the_default(tmp_path, caplog, data, why):
    path = write(tmp_path, data)
    assert config.read_cleanup_on_exit(path, {}) is True
    assert why in caplog.text
    assert "assuming CLEANUP_ON_EXIT=true, the default" in caplog.text


def test_cleanup_setting_from_an_unreadable_file(tmp_path, caplog):
    assert config.read_cleanup_on_exit(str(tmp_path), {}) is True
    assert "cannot read the configuration file" in caplog.text
    assert "assuming CLEANUP_ON_EXIT=true" in caplog.text


def test_cleanup_setting_from_the_environment(tmp_path, caplog):
    path = write(tmp_path, b"CLEANUP_ON_EXIT=true\n")
    assert config.read_cleanup_on_exit(path, {"CLEANUP_ON_EXIT": "0"}) is False
    assert config.read_cleanup_on_exit(path, {"CLEANUP_ON_EXIT": "maybe"}) is True
    assert "comes from the environment" in caplog.text
