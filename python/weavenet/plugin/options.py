"""Reading Docker plugin request bodies: typed fields, Go-bool options, one-line errors.

Docker's remote-driver structs are decoded by Go's encoding/json in Weave Net, so a field of the
wrong type is a decode error (HTTP 400), while a well-formed request that asks for something
impossible is an operation error (500 with `{"Err": ...}`). This module makes the same split:
`BadRequest` for the first, `DriverError` for the second. Pure functions; never touches the host.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

MULTICAST_OPTION = "works.weave.multicast"
GENERIC_OPTIONS = "com.docker.network.generic"

_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


class BadRequest(Exception):
    """The body is not what Docker sends (not JSON, not an object, a field of the wrong type): HTTP 400."""


class DriverError(Exception):
    """The call is well-formed but cannot be done; answered 500 `{"Err": message}` (one line)."""


def parse_go_bool(text: str) -> bool:
    """Go's strconv.ParseBool, which Weave Net's option values were written for."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(text)


def multicast_option(value: str) -> bool:
    """`--opt works.weave.multicast[=BOOL]`: empty means on; anything but a Go bool is an error."""
    if value == "":
        return True
    try:
        return parse_go_bool(value)
    except ValueError:
        raise DriverError(
            f'unrecognized value "{value}" for option {MULTICAST_OPTION}: '
            "use true/false (or 1/0, t/f), or give the option without a value for true"
        ) from None


def multicast_from_options(options: Mapping[str, Any] | None, *, default: bool = False) -> bool:
    """The multicast flag from CreateNetwork's Options (its generic map) or AllocateNetwork's map."""
    if not options:
        return default
    generic = options.get(GENERIC_OPTIONS)
    flat = generic if isinstance(generic, Mapping) else options
    multicast = default
    for key, value in flat.items():
        if key == MULTICAST_OPTION:
            if isinstance(value, str):
                multicast = multicast_option(value)
            elif isinstance(value, bool):
                multicast = value
            else:
                raise DriverError(f"option {MULTICAST_OPTION} must be a string, got {type(value).__name__}")
        elif flat is generic:
            log.warning("ignoring unknown network option %s=%r", key, value)
    return multicast


def multicast_from_docker_options(options: Mapping[str, Any] | None) -> bool:
    """The multicast flag from `docker network inspect`'s Options (strings); bad values mean off."""
    value = (options or {}).get(MULTICAST_OPTION)
    if not isinstance(value, str):
        return False
    try:
        return multicast_option(value)
    except DriverError:
        return False


# --- typed access to request bodies ---


def body_object(value: Any) -> dict[str, Any]:
    """The request body as an object; Docker sends `{}` or nothing for argument-less calls."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"expected a JSON object, got {_json_type(value)}")
    return value


def string_field(body: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = body.get(name)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise BadRequest(f"field {name}: expected a string, got {_json_type(value)}")
    if required and not value:
        raise DriverError(f"missing {name}")
    return value


def bool_field(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"field {name}: expected a boolean, got {_json_type(value)}")
    return value


def object_field(body: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """An object field; None when absent or null (Docker sends `"Options": null` at times)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"field {name}: expected an object, got {_json_type(value)}")
    return value


def list_field(body: Mapping[str, Any], name: str) -> list[Any]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"field {name}: expected an array, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
