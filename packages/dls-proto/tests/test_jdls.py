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
