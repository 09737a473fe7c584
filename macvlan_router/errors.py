"""Exceptions that carry the exit status a command ends with (sysexits.h values)."""

EX_OK = 0
EX_FAILURE = 1
EX_UNAVAILABLE = 69
EX_NOPERM = 77
EX_CONFIG = 78


class MacvlanRouterError(Exception):
    exit_status = EX_FAILURE


class ConfigError(MacvlanRouterError):
    """A setting has a value we cannot use; the message names the setting and the fix."""

    exit_status = EX_CONFIG


class DockerUnavailable(MacvlanRouterError):
    exit_status = EX_UNAVAILABLE


class PermissionDenied(MacvlanRouterError):
    exit_status = EX_NOPERM
