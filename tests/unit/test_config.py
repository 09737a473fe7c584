import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macvlan_router import config
from macvlan_router.errors import EX_CONFIG, ConfigError


def load_text(tmp_path, text, environ=None):
    path = tmp_path / "macvlan-router"
    path.write_text(text)
    return config.load(str(path), environ or {})


def test_missing_file_means_defaults(tmp_path):
    cfg = config.load(str(tmp_path / "absent"), {})
    assert cfg == config.Config()
    assert cfg.cleanup_on_exit is True
    assert cfg.networks == ()


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


def test_shell_export_prefix_is_accepted(tmp_path):
    cfg = load_text(tmp_path, "export MACVLAN_DOCKER_NETWORK=lan\n")
    assert [s.text for s in cfg.networks] == ["lan"]


def test_double_quotes_unescape(tmp_path):
    cfg = load_text(tmp_path, 'MACVLAN_BRIDGE_INTERFACE_NAME="mvr\\-x"\n')
    assert cfg.interface_names == ((None, "mvr-x"),)


def test_environment_overrides_file(tmp_path):
    cfg = load_text(tmp_path, "MACVLAN_DOCKER_NETWORK=lan\nDEBUG=false\n",
                    {"MACVLAN_DOCKER_NETWORK": "other", "DEBUG": "true", "HOME": "/root"})
    assert [s.text for s in cfg.networks] == ["other"]
    assert cfg.log_level == "debug"


def test_additional_routes_keep_their_prefix(tmp_path):
    cfg = load_text(tmp_path, "ADDITIONAL_ROUTES=203.0.113.0/28 2001:db8:5::/64\n")
    assert [str(r) for r in cfg.additional_routes] == ["203.0.113.0/28", "2001:db8:5::/64"]


@pytest.mark.parametrize("line, words", [
    ("MACVLAN_BRIDGE_IP=198.51.100.300", ["MACVLAN_BRIDGE_IP", "198.51.100.300"]),
    ("MACVLAN_BRIDGE_IP=2001:db8::1", ["MACVLAN_BRIDGE_IP6"]),
    ("MACVLAN_BRIDGE_IP6=198.51.100.1", ["MACVLAN_BRIDGE_IP6", "MACVLAN_BRIDGE_IP"]),
    ("MACVLAN_BRIDGE_IP=224.0.0.1", ["MACVLAN_BRIDGE_IP", "224.0.0.1"]),
    ("MACVLAN_BRIDGE_INTERFACE_NAME=a-very-long-name", ["16 bytes", "at most 15"]),
    ("MACVLAN_BRIDGE_INTERFACE_NAME=bad/name", ["not a valid interface name"]),
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
    assert "unknown setting MACVLAN_BRIDGE_IPS" in caplog.text
    assert "TZ is not used" in caplog.text


def test_parent_name_pairs(tmp_path):
    cfg = load_text(tmp_path, "MACVLAN_BRIDGE_INTERFACE_NAME=eth0=mvr-lan eth0.10=mvr-iot\n")
    assert cfg.interface_names == (("eth0", "mvr-lan"), ("eth0.10", "mvr-iot"))


safe_text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs"),
                                           blacklist_characters="\\\"'"), max_size=30)


@given(value=safe_text)
def test_quoted_values_round_trip(value):
    for quote in "'\"":
        parsed = config.parse_environment_file(f"KEY={quote}{value}{quote}\n", "f")
        assert parsed == {"KEY": value}


@given(text=st.text(max_size=200))
def test_parser_never_crashes_unexpectedly(text):
    try:
        config.parse_environment_file(text, "f")
    except ConfigError:
        pass
