"""The manual: every tool of every package has a man page that is current, installed and renders cleanly.

The pages are generated from the parsers by tools/manpages.py (``./dev man``); these tests are its
``--check`` and more: each page renders with ``man -l`` without a single groff warning, names every
option of its parser and has the sections ENVIRONMENT, FILES, EXIT STATUS and EXAMPLES, and every line
that the installed tool prints for ``--help`` is in the rendered page.

They need man-db and groff (``apt-get install man-db groff-base``; ``./dev setup`` installs them when
run as root). Without them they fail rather than skip: the manual is part of what is shipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("dls_manpages", ROOT / "tools" / "manpages.py")
assert _spec is not None and _spec.loader is not None
manpages = importlib.util.module_from_spec(_spec)
sys.modules["dls_manpages"] = manpages
_spec.loader.exec_module(manpages)

TOOLS = manpages.discover()
BIN = Path(sys.executable).parent
#: The sections every page has (the last four from its include file).
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", *manpages.REQUIRED_SECTIONS)
#: How group titles of --help appear in the page (argparse-manpage's section names).
GROUP_HEADINGS = {"positional arguments": "arguments", "options": "options", "optional arguments": "options"}
#: groff's UTF-8 output: typographic hyphens, minus signs and quotes, as typed.
_PLAIN = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2212": "-", "\u2013": "-", "\u2019": "'",
                        "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})


def _ids(tool: object) -> str:
    return str(getattr(tool, "name", tool))


@pytest.fixture(scope="session")
def man() -> str:
    missing = [program for program in ("man", "groff", "nroff") if shutil.which(program) is None]
    assert not missing, (f"{', '.join(missing)} not found: the man page tests need man-db and groff "
                         "(apt-get install man-db groff-base; ./dev setup installs them when run as root)")
    return shutil.which("man") or "man"


def render(man: str, page: Path, *options: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MANPAGER": "cat", "PAGER": "cat"}
    env.pop("MAN_KEEP_FORMATTING", None)
    return subprocess.run([man, *options, "-l", str(page)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def plain(text: str) -> str:
    """Text with groff's typography undone and all whitespace one space, lower case."""
    return " ".join(text.translate(_PLAIN).split()).lower()


def page_text(man: str, page: Path) -> str:
    """The page as man shows it, without hyphenation or justification, so that words stay whole."""
    result = render(man, page, "--nh", "--nj")
    assert result.returncode == 0, f"man -l {page}: {result.stderr}"
    return result.stdout


def test_tools_are_discovered() -> None:
    names = {t.name for t in TOOLS}
    assert {"jdls", "jDLS", "dls-lock", "dls-test", "show-item-locks", "SHOW-ITEM-LOCKS"} <= names


@pytest.mark.parametrize("tool", TOOLS, ids=_ids)
def test_committed_page_is_what_the_parser_gives(tool: manpages.Tool) -> None:
    assert tool.page.is_file(), f"{tool.page} is missing: run ./dev man (python tools/manpages.py)"
    assert tool.page.read_text(encoding="utf-8") == manpages.expected(tool), (
        f"{tool.page.relative_to(ROOT)} differs from what the parser of {tool.name} gives now: "
        "run ./dev man (python tools/manpages.py) and commit the page")


def test_the_date_is_the_versions_not_the_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed page keeps its date on any later day; only a new version takes the day it is written."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "4102444800")  # 2100-01-01
    for tool in TOOLS:
        assert manpages.expected(tool) == tool.page.read_text(encoding="utf-8"), f"{tool.name} on a later day"
    tool = next(t for t in TOOLS if t.name == "jdls")
    meta = manpages._package_meta(tool.package)
    monkeypatch.setattr(manpages, "_package_meta", lambda package: {**meta, "version": "99.0.0"})
    header = manpages.expected(tool).split("\n", 1)[0]
    assert '"2100\\-01\\-01" "dls\\-daemon 99.0.0"' in header, header


def test_check_mode_passes() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "manpages.py"), "--check", "--quiet"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_every_page_is_installed_with_its_package() -> None:
    assert manpages.shared_data_problems(TOOLS) == []
    assert manpages.stale_pages(TOOLS) == []


def test_a_tool_without_include_file_is_an_error_naming_it(tmp_path: Path) -> None:
    tool = TOOLS[0]
    lost = manpages.Tool(tool.package, "no-such-tool", tool.target, ("no-such-tool",))
    with pytest.raises(manpages.ManpageError, match=r"man/no-such-tool\.include is missing"):
        manpages.render(lost, "2026-01-01")


def test_aliases_have_the_page_of_their_main_name() -> None:
    for tool in TOOLS:
        if tool.name != tool.main:
            main_page = tool.man_dir / f"{tool.main}.1"
            assert tool.page.read_text(encoding="utf-8") == main_page.read_text(encoding="utf-8")


@pytest.mark.parametrize("tool", TOOLS, ids=_ids)
def test_installed_page_is_the_committed_one(tool: manpages.Tool) -> None:
    installed = Path(sys.prefix) / "share" / "man" / "man1" / f"{tool.name}.1"
    assert installed.is_file(), f"{installed} is not installed: run ./dev setup (it reinstalls {tool.package})"
    assert installed.read_text(encoding="utf-8") == tool.page.read_text(encoding="utf-8"), (
        f"{installed} is an older copy of {tool.page.relative_to(ROOT)}: run ./dev setup")


@pytest.mark.parametrize("tool", TOOLS, ids=_ids)
def test_page_renders_without_warnings(man: str, tool: manpages.Tool) -> None:
    for options in (("--warnings=w",), ()):
        result = render(man, tool.page, *options)
        assert result.returncode == 0, f"man {' '.join(options)} -l {tool.page}: {result.stderr}"
        assert result.stderr == "", f"man {' '.join(options)} -l {tool.page} warns:\n{result.stderr}"
        assert len(result.stdout.splitlines()) > 20


@pytest.mark.parametrize("tool", TOOLS, ids=_ids)
def test_page_documents_every_option_and_section(man: str, tool: manpages.Tool) -> None:
    text = page_text(man, tool.page)
    headings = {line.strip() for line in text.splitlines() if line[:1].isalpha() and line.isupper()}
    for section in SECTIONS:
        assert section in headings, f"{tool.page}: no {section} section"
    words = plain(text)
    parser = manpages.get_parser_of(tool.target)
    for action in parser._actions:
        names = action.option_strings or ([action.metavar] if isinstance(action.metavar, str) else [])
        for name in names:
            assert re.search(rf"(?<![\w-]){re.escape(name.lower())}(?![\w-])", words), (
                f"{tool.page}: {name} is not in the rendered page")
    name_line = plain(text.split("NAME", 1)[1])
    assert name_line.startswith(plain(f"{', '.join(tool.names)} - ")), f"{tool.page}: NAME does not name {tool.names}"


def _group_titles(parser: argparse.ArgumentParser) -> set[str]:
    return {g.title for g in parser._action_groups if g.title}


def _invocations(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option that takes a value as this Python's --help shows it, and as its page shows it.

    The one difference between Python versions in our --help: 3.13 shows the value once (``-w, --wait
    SECONDS``), 3.11 and 3.12 after every name (``-w SECONDS, --wait SECONDS``), as the page does on every
    version (argparse-manpage lays options out itself).
    """
    with manpages.help_environment():
        formatter = parser._get_formatter()
    shown = {}
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:
            args = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
            shown[formatter._format_action_invocation(action)] = ", ".join(
                f"{name} {args}" for name in action.option_strings)
    return shown


def _as_in_the_page(line: str, invocations: dict[str, str]) -> str:
    """A --help line with an option's invocation written as the page writes it."""
    for help_form, page_form in invocations.items():
        if line == help_form or line.startswith(help_form + "  "):
            return page_form + line[len(help_form):]
    return line


@pytest.mark.parametrize("tool", TOOLS, ids=_ids)
def test_help_of_the_installed_tool_matches_its_page(man: str, tool: manpages.Tool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    program = BIN / tool.name
    assert program.is_file(), (f"{program} is not installed: run ./dev setup (a new [project.scripts] "
                               f"entry of {tool.package} needs a reinstall)")
    env = {k: v for k, v in os.environ.items() if k not in manpages.COLOUR_ENV} | manpages.HELP_ENV
    result = subprocess.run([str(program), "--help"], capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    monkeypatch.setattr(sys, "argv", [str(program)])  # a usage that names the tool as called (jdls's) names it so
    parser = manpages.get_parser_of(tool.target)
    with manpages.help_environment():
        assert result.stdout == parser.format_help(), f"{tool.name} --help is not its get_parser()'s help"
    words = plain(page_text(man, tool.page))
    titles = _group_titles(parser)
    invocations = _invocations(parser)
    for line in result.stdout.splitlines():
        line = _as_in_the_page(line.strip(), invocations)
        if line.startswith("usage: "):
            line = line.removeprefix("usage: ")
            if line.startswith(f"{tool.name} ") and tool.name != tool.main:  # the page's synopsis: the main name
                line = tool.main + line.removeprefix(tool.name)
        if line.endswith(":") and line[:-1] in titles:
            line = GROUP_HEADINGS.get(line[:-1], line[:-1])
        if line:
            assert plain(line) in words, f"{tool.name} --help says {line!r}, its page does not"


# -- section 7: dls-jdls(7), the JDLS variable ---------------------------------------------------------------

TOPICS = manpages.TOPICS


def _words_the_jdls_parser_knows() -> set[str]:
    """Every option name the JDLS parser takes, found by trying it: each upper-case word of dls_proto/jdls.py's
    source (an option added with its own branch, outside OPTIONS, is found too), kept when the parser does
    not call it unknown."""
    from dls_proto import jdls

    source = Path(jdls.__file__).read_text(encoding="utf-8")
    known = set()
    for word in set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", source)):
        for text in (word, f"{word}=x"):
            try:
                jdls._options(text)
            except ValueError as exc:
                if "unknown option" in str(exc):
                    continue
            except AssertionError:  # in the table but not parsed: known to the page, a bug for the parser test
                pass
            known.add(word)
            break
    return known


@pytest.mark.parametrize("topic", TOPICS, ids=lambda t: t.name)
def test_committed_topic_page_is_what_its_table_gives(topic: manpages.Topic) -> None:
    assert topic.page.is_file(), f"{topic.page} is missing: run ./dev man"
    assert topic.page.read_text(encoding="utf-8") == manpages.expected_topic(topic), (
        f"{topic.page.relative_to(ROOT)} differs from what dls_proto.jdls.OPTIONS gives now: run ./dev man")
    assert manpages.topic_problems(check=True) == []


@pytest.mark.parametrize("topic", TOPICS, ids=lambda t: t.name)
def test_topic_page_renders_without_warnings_and_is_installed(man: str, topic: manpages.Topic) -> None:
    for options in (("--warnings=w",), ()):
        result = render(man, topic.page, *options)
        assert result.returncode == 0 and result.stderr == "", f"man -l {topic.page}: {result.stderr}"
    installed = Path(sys.prefix) / topic.installed_as
    assert installed.is_file(), f"{installed} is not installed: run ./dev setup"
    assert installed.read_text(encoding="utf-8") == topic.page.read_text(encoding="utf-8"), "run ./dev setup"


def test_jdls_page_documents_every_option_the_parser_knows(man: str) -> None:
    """An option the parser takes and the page does not describe fails here (another branch adding one
    without its OPTIONS entry, or without ./dev man, is seen at merge)."""
    from dls_proto import jdls

    page = next(t for t in TOPICS if t.name == "dls-jdls").page
    text = page_text(man, page)
    options = text.split("\nOPTIONS\n", 1)[1].split("\nERRORS\n", 1)[0]
    described = set(re.findall(r"^ {7}([A-Z][A-Z0-9]+)\b", options, re.M))
    known = _words_the_jdls_parser_knows()
    assert {o.name for o in jdls.OPTIONS} <= known, "an option of the table that the parser refuses"
    assert known - described == set(), f"the parser takes, dls-jdls(7) does not describe: {known - described}"
    assert described - known == set(), f"dls-jdls(7) describes, the parser refuses: {described - known}"
    for option in jdls.OPTIONS:
        assert f"Default: {option.default}." in " ".join(options.split()), option.name
