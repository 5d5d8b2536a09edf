"""The JDLS variable: what it means, and every kind of nonsense refused with the option named."""

from __future__ import annotations

import pytest
from dls_client import DEFAULT_PORT, Config, ConfigurationError, Server, parse


def test_empty_means_localhost_on_the_default_port() -> None:
    config = parse("")
    assert config == Config()
    assert config.server == Server("localhost", 50002)
    assert DEFAULT_PORT == 50002
    assert config.server2 is None
    assert (config.wait, config.binary, config.oslocks, config.verbose, config.trace) == (False,) * 4 + (None,)
    assert config.lock == "ALL"
    assert config.timeout > 0


def test_blank_is_empty() -> None:
    assert parse("  ") == Config()


def test_server_alone_takes_the_default_port() -> None:
    assert parse("SERVER=h").server == Server("h", 50002)


def test_server_with_port() -> None:
    config = parse("SERVER=h,1234")
    assert config.server == Server("h", 1234)
    assert config.server2 is None
    assert str(config.server) == "h,1234"


def test_every_option() -> None:
    config = parse("SERVER=h,1234,SERVER2=g,99,WAIT,TIMEOUT=60,BINARY,OSLOCKS,LOCK=internal,VERBOSE,TRACE=/tmp/x")
    assert config == Config(
        server=Server("h", 1234), server2=Server("g", 99), wait=True, timeout=60.0, binary=True, oslocks=True,
        lock="INTERNAL", verbose=True, trace="/tmp/x",
    )


def test_server2_without_port() -> None:
    config = parse("SERVER=h,SERVER2=g")
    assert (config.server, config.server2) == (Server("h", 50002), Server("g", 50002))


@pytest.mark.parametrize("choice", ["EXTERNAL", "internal", "All"])
def test_lock_choices_in_any_case(choice: str) -> None:
    assert parse(f"LOCK={choice}").lock == choice.upper()


def test_fractional_timeout() -> None:
    assert parse("TIMEOUT=0.5").timeout == 0.5
    assert parse("TIMEOUT=86400").timeout == 86400  # the range's ends are accepted


def test_spaces_around_options_are_ignored() -> None:
    assert parse(" SERVER = h , 1234 , WAIT ") == Config(server=Server("h", 1234), wait=True)


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("TIMEOUT=abc", "TIMEOUT"),
        ("TIMEOUT=-1", "TIMEOUT"),
        ("TIMEOUT=0", "TIMEOUT"),
        ("TIMEOUT=nan", "TIMEOUT"),
        ("TIMEOUT=0.4", "TIMEOUT"),  # below TIMEOUT_RANGE: refused, not clamped
        ("TIMEOUT=86401", "TIMEOUT"),
        ("TIMEOUT=inf", "TIMEOUT"),
        ("TIMEOUT=1e300", "TIMEOUT"),
        ("TIMEOUT", "TIMEOUT"),
        ("LOCK=FOO", "LOCK"),
        ("LOCK", "LOCK"),
        ("SERVER=", "SERVER"),
        ("SERVER", "SERVER"),
        ("SERVER=,1234", "SERVER"),
        ("SERVER=h,99999", "SERVER"),
        ("SERVER=h,0", "SERVER"),
        ("SERVER=h,12ab", "SERVER"),
        ("SERVER=h,SERVER2=g,70000", "SERVER2"),
        ("WAIT=1", "WAIT"),
        ("BINARY=yes", "BINARY"),
        ("VERBOSE=", "VERBOSE"),
        ("SERVER2=h", "SERVER2"),
        ("SERVER2=h,99", "SERVER2"),
        ("TRACE=", "TRACE"),
        ("BOGUS", "BOGUS"),
        ("SERVER=h,BOGUS=1", "BOGUS"),
        ("SERVER=h,,", "SERVER"),
        ("SERVER=h,1234,5678", "5678"),
        (",", ""),
    ],
)
def test_nonsense_is_refused_naming_the_option(text: str, option: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith("JDLS"), message
    assert option in message, message


def test_from_environment() -> None:
    assert Config.from_environment({}) is None
    assert Config.from_environment({"JDLS": ""}) == Config()
    assert Config.from_environment({"JDLS": "SERVER=h,7"}) == Config(server=Server("h", 7))
    with pytest.raises(ConfigurationError, match="LOCK"):
        Config.from_environment({"JDLS": "LOCK=nope"})
