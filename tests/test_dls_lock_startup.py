"""dls-lock starts on what its path needs: a real dls-lock process taking a free lock of a real service.

Start-up is most of what ``dls-lock -n FILE KEY true`` costs (flock(1) takes about nothing), and most of
start-up is imports. A lock through a plain (not TLS) service with one SERVER needs neither ssl, nor the
configuration test of ``jdls -C``/dls-test, nor the two-server route of SERVER2, nor construct: this test reads the
process's own import list (``python -X importtime``), so that an import added at the top of a module
cannot bring them back unnoticed. Nor the standard library's modules that only some paths use, each a few
milliseconds with what it imports (issue 13): dataclasses (with inspect, ast, tokenize, dis), pathlib (with
urllib.parse and ipaddress), the idna codec (a host name looked up as text), shutil (with bz2 and lzma: the
help's terminal width), textwrap and traceback; json (the client's lock information is written without it) and
locale (argparse's translations, which dls-lock does not look up).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ForwardRef

from dls_testkit import DLS_LOCK, KEY, Service, data_file

#: Modules the plain lock path does without: ssl and dls-proto's TLS (only with JDLS TLS), the configuration
#: test (only jdls -C and dls-test), the two-server route (only with SERVER2), construct and the definitions
#: (the codec is generated from its written-down layouts); and the standard library's of the docstring.
NOT_NEEDED = ("ssl", "_ssl", "dls_proto.tls", "dls_proto.probe", "dls_client.resilience", "construct", "dls_proto.spec",
              "dataclasses", "inspect", "pathlib", "urllib.parse", "ipaddress", "encodings.idna", "shutil",
              "textwrap", "traceback", "tokenize", "json", "locale")


def _imported(stderr: str) -> set[str]:
    """The modules ``-X importtime`` reports in ``stderr`` (one line each: 'import time: self | total | name')."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_a_free_lock_imports_only_what_its_path_needs(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    result = subprocess.run([sys.executable, "-X", "importtime", DLS_LOCK, "-n", str(data), KEY, "true"],
                            env=service.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = _imported(result.stderr)
    assert "dls_client.client" in imported  # the service was used: the list is the lock path's
    assert imported.isdisjoint(NOT_NEEDED), sorted(imported.intersection(NOT_NEEDED))


#: dls-lock run as its entry point runs it, with an audit hook that writes to standard error, in order, its
#: connections, its forks and the imports of the client's and the keeper's modules.
_AUDITED = """\
import sys
WATCHED = {"dls_client.client", "dls_client.command_keeper"}
def audit(event, args):
    if event in ("socket.connect", "os.fork") or (event == "import" and args[0] in WATCHED):
        print("audit:", event, args[0] if event == "import" else "", file=sys.stderr, flush=True)
sys.addaudithook(audit)
from dls_client.lock_command import run
sys.argv[0] = "dls-lock"
run()
"""


def test_dls_lock_connects_before_the_rest_of_its_start(service: Service, tmp_path: Path) -> None:
    """The service forks a new connection's lock server, which then starts (milliseconds): dls-lock connects
    as soon as it knows the service and the lock, and imports the client, forks its keeper and starts its
    threads meanwhile, rather than connecting after them and waiting for the lock server then."""
    data = data_file(tmp_path)
    result = subprocess.run([sys.executable, "-c", _AUDITED, "-n", str(data), KEY, "true"],
                            env=service.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [line.split(None, 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("audit:")]
    assert events[0] == "socket.connect", events
    assert {"import dls_client.client", "import dls_client.command_keeper", "os.fork"} <= set(events[1:]), events


#: dls-lock run as its entry point runs it, every call of compile() written to standard error.
_COMPILES = """\
import builtins, sys
compile = builtins.compile
def counted(source, filename, *args, **kwargs):
    print("compile:", filename, repr(source)[:60], file=sys.stderr, flush=True)
    return compile(source, filename, *args, **kwargs)
builtins.compile = counted
from dls_client.lock_command import run
sys.argv[0] = "dls-lock"
run()
"""


def test_a_free_lock_compiles_nothing(service: Service, tmp_path: Path) -> None:
    """The first compile() of a process makes the ast module's classes (about 2 ms; exec() of a text does not),
    and each NamedTuple field annotated as a string is compiled (typing's ForwardRef): neither on the lock
    path, whose codecs are made with exec() and whose NamedTuples' modules do without the future import."""
    data = data_file(tmp_path)
    result = subprocess.run([sys.executable, "-c", _COMPILES, "-n", str(data), KEY, "true"],
                            env=service.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "compile:" not in result.stderr, result.stderr


def test_the_submodules_imported_on_first_use_are_there() -> None:
    """dls_proto's ``probe`` and ``tls`` are not imported with the package, yet are its attributes when asked."""
    code = ("import sys, dls_proto\n"
            "assert 'dls_proto.tls' not in sys.modules and 'dls_proto.probe' not in sys.modules\n"
            "assert dls_proto.tls.MIN_VERSION and dls_proto.probe.MAX_TEST_STRING\n"
            "from dls_proto import probe, tls\n"
            "assert tls is sys.modules['dls_proto.tls'] and probe is sys.modules['dls_proto.probe']\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_messages_are_made_without_compiling_their_annotations() -> None:
    """typing.NamedTuple compiles each field's annotation given as a string (``from __future__ import
    annotations``): about a hundred ``compile()`` calls at every client's start-up for the messages alone."""
    from dls_proto.messages import CLASSES, ConnectionClosed, UnknownMessage

    for cls in (*(cls for _, cls in CLASSES), UnknownMessage, ConnectionClosed):
        compiled = [name for name, kind in cls.__annotations__.items() if isinstance(kind, str | ForwardRef)]
        assert not compiled, f"{cls.__name__}: {compiled} annotated as strings"


def test_the_daemon_generates_every_codec_before_it_forks() -> None:
    """dls-proto generates each kind's codec on first use (for a client's start-up); the daemon's listener has
    them all made when it imports the lock server, so that no lock server it forks makes them again."""
    code = ("from dls_proto import Kind, codec\n"
            "assert not dict(codec.DECODERS)\n"
            "import dls_daemon.listener\n"
            "assert len(dict(codec.DECODERS)) == len(dict(codec.ENCODERS)) == len(Kind)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_text_escapes_are_compiled_on_first_use() -> None:
    """dls_proto.text's pattern of the characters to escape (a millisecond to compile) is made when first
    needed, not when a client imports it before it connects."""
    code = ("import dls_client.channel\n"
            "from dls_proto import text\n"
            "assert text._controls.cache_info().currsize == 0\n"
            "assert text.printable('a\\x1bb') == 'a\\\\x1bb'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
