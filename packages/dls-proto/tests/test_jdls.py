"""The JDLS variable as every dls program reads it: the SERVER it names, and a server's spelling."""

from __future__ import annotations

import pytest
from dls_proto import Server, jdls


@pytest.mark.parametrize(("text", "server"), [
    ("SERVER=10.44.1.56", Server("10.44.1.56", 50002)),
    ("SERVER=lockhost,50010", Server("lockhost", 50010)),
    ("WAIT,server=lockhost,50010,TIMEOUT=5", Server("lockhost", 50010)),
    ("SERVER=a,SERVER2=b,50003", Server("a", 50002)),
    ("SERVER2=b,50003,SERVER=a,50004", Server("a", 50004)),
    ("", None),
    ("WAIT,BINARY", None),
])
def test_named_server(text: str, server: Server | None) -> None:
    assert jdls.named_server(text) == server


@pytest.mark.parametrize("text", ["SERVER=", "SERVER=h,0", "SERVER=h,70000"])
def test_named_server_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        jdls.named_server(text)


def test_server_parse() -> None:
    assert Server.parse("h") == Server("h", 50002)
    assert Server.parse("::1,5000") == Server("::1", 5000)
    assert str(Server.parse(" h , 7 ")) == "h,7"
    for bad in ("", ",5", "h,x", "h,"):
        with pytest.raises(ValueError):
            Server.parse(bad)


@pytest.mark.parametrize(("text", "server"), [
    ("SERVER=lockhost:47999", Server("lockhost", 47999)),
    ("SERVER=[2001:db8::7]:47999", Server("2001:db8::7", 47999)),
    ("SERVER=[2001:db8::7]", Server("2001:db8::7", 50002)),
    ("SERVER=2001:db8::7", Server("2001:db8::7", 50002)),
    ("SERVER=2001:db8::7,47999", Server("2001:db8::7", 47999)),
    ("SERVER=h,wait", Server("h", 50002)),  # a flag after the host, not a port
])
def test_host_port_spellings(text: str, server: Server) -> None:
    assert jdls.named_server(text) == server


@pytest.mark.parametrize(("text", "says"), [
    ("SERVER=h,notaport", "JDLS SERVER: 'notaport' after the host is neither a port (a number from 1 to 65535) "
                          "nor a JDLS option"),
    ("SERVER=h,99999", "JDLS SERVER: port '99999' is not a number from 1 to 65535"),
    ("SERVER=h:notaport", "JDLS SERVER: port 'notaport' is not a number from 1 to 65535"),
    ("SERVER=h:1,2", "JDLS SERVER: the port is given twice ('h:1' and '2')"),
    ("SERVER=[::1", "JDLS SERVER: '[::1' is not [address] or [address]:port"),
    ("SERVER=:5", "JDLS SERVER: ':5' has no host before the port"),
    ("SERVER=h,SERVER=i", "JDLS SERVER is given twice: give each option once"),
    ("TIMEOUT=1,TIMEOUT=2", "JDLS TIMEOUT is given twice"),
    ("TIMEOUT", "JDLS TIMEOUT: expected TIMEOUT=seconds"),
    ("TIMEOUT=", "JDLS TIMEOUT: expected TIMEOUT=seconds"),
    ("TIMEOUT=nan", "JDLS TIMEOUT: 'nan' is not a number of seconds from 0.5 to 86400"),
    ("TIMEOUT=inf", "JDLS TIMEOUT: 'inf' is not"),
    ("TIMEOUT=86401", "JDLS TIMEOUT: '86401' is not"),
    ("TIMEOUT=0", "JDLS TIMEOUT: '0' is not"),
    ("LOCK", "JDLS LOCK: expected LOCK=EXTERNAL|INTERNAL|ALL"),
    ("TRACE", "JDLS TRACE: expected TRACE=file"),
    ("WAIT=yes", "JDLS WAIT takes no value (got 'WAIT=yes')"),
    ("SERVER=h,,WAIT", "JDLS: empty option in 'SERVER=h,,WAIT' (two commas, or one at an end)"),
    ("WAIT,", "JDLS: empty option in 'WAIT,'"),
    (",", "JDLS: empty option"),
    ("SERVER2=h", "JDLS SERVER2 has no meaning without SERVER"),
    ("NOSUCH", "JDLS: unknown option 'NOSUCH'; expected SERVER, SERVER2, WAIT, TIMEOUT,"),
    # Host names DNS cannot carry: refused here, not a UnicodeError from the resolver's idna codec.
    ("SERVER=a..b", "JDLS SERVER: host 'a..b' has an empty label"),
    ("SERVER=.a,50003", "JDLS SERVER: host '.a' has an empty label"),
    ("SERVER=[a..b]:5", "JDLS SERVER: host 'a..b' has an empty label"),
    (f"SERVER={'a' * 64}", f"JDLS SERVER: host '{'a' * 64}' has a label longer than 63 characters (64)"),
    (f"SERVER=h,SERVER2={'a' * 64}.b:5", "JDLS SERVER2: host 'aaaa"),
    (f"SERVER={'abcdefghi.' * 25}abcd", "JDLS SERVER: host 'abcdefghi.abcdefghi.abcdefghi.abcdefghi.'... is 254 "
                                        "characters long: a host name is at most 253"),
    ("SERVER=a b", "JDLS SERVER: host 'a b' has a space or control character"),
    ("SERVER=a:b:c", "JDLS SERVER: host 'a:b:c' is not an IPv6 address (a host name has no colon)"),
    ("SERVER=[a..b:1]:5", "JDLS SERVER: host 'a..b:1' is not an IPv6 address"),
    ("SERVER=a\x00b", "JDLS SERVER: host 'a\\x00b' has a space or control character"),
    # Numbers are ASCII digits: int() and float() would take other scripts' (and isdigit() superscripts).
    ("SERVER=h:\u0663\u0663", "JDLS SERVER: port '\u0663\u0663' is not a number from 1 to 65535"),
    ("SERVER=h,\u0663\u0663", "JDLS SERVER: '\u0663\u0663' after the host is neither a port"),
    ("SERVER=h,\u00b2", "JDLS SERVER: '\u00b2' after the host is neither a port"),
    ("SERVER=h:\u00b2", "JDLS SERVER: port '\u00b2' is not"),
    ("TIMEOUT=\u0663", "JDLS TIMEOUT: '\u0663' is not a number of seconds"),
    ("TIMEOUT=1_0", "JDLS TIMEOUT: '1_0' is not a number of seconds"),
    # SERVER2 the same service as SERVER: each lock would wait behind itself on it.
    ("SERVER=localhost:50002,SERVER2=localhost:50002", "JDLS SERVER2 (localhost,50002) is the same service as "
                                                       "SERVER (localhost,50002)"),
    ("SERVER=LockHost.,SERVER2=lockhost", "JDLS SERVER2 (lockhost,50002) is the same service as SERVER"),
    ("SERVER=::1,7,SERVER2=[0:0::1]:7", "JDLS SERVER2 (0:0::1,7) is the same service as SERVER (::1,7)"),
    ("SERVER=127.0.0.1,SERVER2=::ffff:127.0.0.1", "JDLS SERVER2 (::ffff:127.0.0.1,50002) is the same service"),
])
def test_refusals_name_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        jdls.parse(text)
    assert str(caught.value).startswith(says), str(caught.value)


@pytest.mark.parametrize("text", ["SERVER=bücher.example", "SERVER=lockhost.,SERVER2=lockhost,50003",
                                  "SERVER=fe80::1%eth0", f"SERVER={'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 61}",
                                  "SERVER=h,SERVER2=i", "SERVER=h:5,SERVER2=h:6", "TIMEOUT=1e1", "TIMEOUT=.5"])
def test_what_is_accepted(text: str) -> None:
    jdls.parse(text)


def test_connect_makes_a_host_the_resolver_refuses_an_oserror() -> None:
    """A Server made without parse (by a program's own code) fails to connect as an OSError, never as the
    resolver's UnicodeError or ValueError: callers report OSError as the service they cannot reach."""
    for host in ("a..b", "a" * 64):
        with pytest.raises(OSError, match="cannot be looked up"):
            jdls.connect(Server(host, 5), 1.0)


def test_the_unknown_option_message_lists_every_option() -> None:
    with pytest.raises(ValueError) as caught:
        jdls.parse("NOSUCH")
    assert str(caught.value).endswith(", ".join(o.name for o in jdls.OPTIONS[:-1]) + f" or {jdls.OPTIONS[-1].name}")


def test_every_option_of_the_table_is_parsed() -> None:
    """Each option of OPTIONS (what dls-jdls(7) lists) is one the parser takes, with an example value."""
    examples = {"SERVER": "h", "SERVER2": "h2,50003", "TIMEOUT": "5", "LOCK": "internal", "TRACE": "/tmp/t",
                "CA": __file__, "CERT": __file__, "KEY": __file__}
    for option in jdls.OPTIONS:
        text = option.name if not option.value else f"{option.name}={examples[option.name]}"
        extra = {"SERVER2": "SERVER=h,", "CA": "TLS,", "CERT": "TLS,", "KEY": "TLS,CERT=x,"}.get(option.name, "")
        assert jdls._options(extra + text), option.name  # no unknown option, no assertion


def test_servers_print_in_the_jdls_spelling() -> None:
    assert str(jdls.parse("SERVER=[::1]:7").server) == "::1,7"


def test_a_record_behaves_as_a_frozen_dataclass() -> None:
    """Server and Config are frozen records made without dataclasses (dls-lock's start-up does without it):
    equal by class and fields, hashable, refusing assignment, copied changed by ``replace``."""
    server = jdls.Server("db1", 50010)
    assert server == jdls.Server(host="db1", port=50010) and hash(server) == hash(jdls.Server("db1", 50010))
    assert server != jdls.Server("db1") and jdls.Server("db1").port == jdls.DEFAULT_PORT
    assert repr(server) == "Server(host='db1', port=50010)"
    with pytest.raises(AttributeError):
        server.port = 1  # type: ignore[misc]
    config = jdls.Config(server=server, wait=True)
    changed = config.replace(timeout=5.0)
    assert (changed.server, changed.wait, changed.timeout, config.timeout) == (server, True, 5.0, jdls.DEFAULT_TIMEOUT)

    class Sub(jdls.Config):
        pass

    assert Sub(server=server, wait=True) != config  # another class, as a dataclass's __eq__ says
    assert type(Sub().replace(wait=True)) is Sub and Sub().replace(wait=True).wait
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        jdls.Config(colour="blue")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing required argument 'host'"):
        jdls.Server()  # type: ignore[call-arg]
