"""The manual: one man page per tool of every package, generated from its parser with argparse-manpage.

    python tools/manpages.py           regenerate packages/<pkg>/man/<tool>.1 for every tool
    python tools/manpages.py --check   exit 1 naming every page that differs from what its parser gives now

The tools are the [project.scripts] entries of packages/*/pyproject.toml, so a new entry gets a page (and
needs its include file) without touching this script. Each entry's module has ``get_parser()``.

What a page holds:

- NAME, SYNOPSIS, DESCRIPTION, ARGUMENTS, OPTIONS (argument groups as subsections) and NOTES (the epilog)
  come from the parser, through argparse-manpage's ``Manpage``. The NAME line is the names of the tool and
  its aliases and the first sentence of the parser's description. Text that the parser keeps as it is
  (``RawDescriptionHelpFormatter``) is laid out as argparse lays it out: indented "term  text" lines become
  tagged paragraphs, the rest is filled.
- ENVIRONMENT, FILES, EXIT STATUS, EXAMPLES (all four required) and optionally SEE ALSO come from
  ``packages/<pkg>/man/<tool>.include``, in argparse-manpage's include format (``[SECTION]`` lines, then
  roff text). A tool without one, or one that lacks a required section, is an error naming the file.
- Entries of [project.scripts] that point at the same function are one tool under several names
  (``jdls``/``jDLS``, ``show-item-locks``/``SHOW-ITEM-LOCKS``): the page is written under every name,
  the same text (a full copy rather than a ``.so`` link, so that ``man -l`` renders each file alone).
  The main name is the one equal to the parser's ``prog``, else the first; its include file serves all.

The date in the page header is the date of the package's version, taken from the committed pages: a page
carries the date of its package's other pages for as long as their header names the package's current
version (``dls-daemon 0.3.0``), whatever else changes in it; only a new version (its pages do not exist
yet, or name the old version) takes the day the pages are written, SOURCE_DATE_EPOCH if set, else today.
So the pages and ``--check`` never depend on the day they are generated or checked on: regenerating a
committed page that is current changes no byte, on any day, and the date moves once per release, with the
version beside it. (The alternative, a date kept in the sources, would be a second fact beside the version
in ``__about__.py`` to keep in step by hand.)

The pages do not depend on the Python version either. argparse's --help differs between minor versions
(3.13 shows an option's value once, ``-w, --wait SECONDS``, where 3.11 and 3.12 show ``-w SECONDS, --wait
SECONDS``; 3.14 may colour it; a long usage may wrap elsewhere), but a page is made only from the parser's
actions: argparse-manpage lays out every option itself (``-w SECONDS, --wait SECONDS`` on every version),
the SYNOPSIS is the usage's words without its line breaks, and the descriptions and help texts are filled
by textwrap, which argparse has not changed. The committed pages are the same bytes from Python 3.11, 3.12
and 3.13 (checked with 3.11.7, 3.12.1 and 3.13.0). The help is formatted as in a terminal of 80 columns
without colour (``HELP_ENV``: COLUMNS=80, NO_COLOR, PYTHON_COLORS=0), so that it depends on no terminal.

Besides the tools' pages there are pages of section 7, of what is no tool (``TOPICS``): ``dls-jdls(7)``, the
JDLS variable, installed with dls-client (it is the client's configuration). Its OPTIONS section is written
from ``dls_proto.jdls.OPTIONS``, the table the parser reads its option names from, so an option the parser
knows is in the page (and tests/test_manpages.py checks the parser knows no other); the rest of the page is
``packages/<pkg>/man/<page>.include``: [DESCRIPTION] first, then every other section in its order.

Every page must be installed with its package: the package's pyproject.toml maps ``man/<tool>.1`` to
``share/man/man1/<tool>.1`` in [tool.hatch.build.targets.wheel.shared-data]; a missing mapping is an error.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import importlib
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from argparse_manpage.manpage import Manpage, _ManpageFormatter

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ROOT / "packages"
#: The sections every include file must give, in the order they appear in the page.
REQUIRED_SECTIONS = ("ENVIRONMENT", "FILES", "EXIT STATUS", "EXAMPLES")
MANUAL = "dls manual"
COLUMNS = "80"
SHARED_DATA = "tool.hatch.build.targets.wheel.shared-data"


class ManpageError(Exception):
    """A page cannot be made; the message says what to do."""


@dataclass(frozen=True)
class Tool:
    package: str  #: the package's directory under packages/, e.g. dls-client
    name: str  #: the script's name, also the page's file name
    target: str  #: module:function of the script
    names: tuple[str, ...]  #: every name of the tool, main first

    @property
    def main(self) -> str:
        return self.names[0]

    @property
    def man_dir(self) -> Path:
        return PACKAGES / self.package / "man"

    @property
    def page(self) -> Path:
        return self.man_dir / f"{self.name}.1"

    @property
    def include(self) -> Path:
        return self.man_dir / f"{self.main}.include"

    @property
    def module(self) -> str:
        return self.target.partition(":")[0].strip()


def _scripts(pyproject: Path) -> dict[str, str]:
    with pyproject.open("rb") as f:
        data = tomllib.load(f)
    scripts = data.get("project", {}).get("scripts", {})
    return {str(k): str(v) for k, v in scripts.items()}


def discover(packages: Path = PACKAGES) -> list[Tool]:
    """Every tool of every package, from [project.scripts]; aliases grouped by their target."""
    tools: list[Tool] = []
    for pyproject in sorted(packages.glob("*/pyproject.toml")):
        package = pyproject.parent.name
        scripts = _scripts(pyproject)
        by_target: dict[str, list[str]] = {}
        for name, target in scripts.items():
            by_target.setdefault(target.replace(" ", ""), []).append(name)
        for target, names in by_target.items():
            try:
                prog = get_parser_of(target).prog
            except ManpageError:  # reported when its page is made
                prog = names[0]
            main = prog if prog in names else names[0]
            ordered = (main, *(n for n in names if n != main))
            tools.extend(Tool(package, name, target, ordered) for name in names)
    return tools


def get_parser_of(target: str) -> argparse.ArgumentParser:
    """The parser of a script's module (``get_parser()``), made in the help environment (HELP_ENV)."""
    module_name = target.partition(":")[0].strip()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ManpageError(f"{target}: cannot import {module_name} ({exc}); is the package installed "
                           "(./dev setup)?") from None
    get_parser = getattr(module, "get_parser", None)
    if get_parser is None:
        raise ManpageError(f"{target}: {module_name} has no get_parser()")
    with help_environment():
        parser = get_parser()
    if not isinstance(parser, argparse.ArgumentParser):
        raise ManpageError(f"{target}: {module_name}.get_parser() did not return an ArgumentParser")
    return parser


#: How the help is formatted, whatever the terminal: 80 columns, no colour (Python 3.14 colours --help).
HELP_ENV = {"COLUMNS": COLUMNS, "NO_COLOR": "1", "PYTHON_COLORS": "0"}
#: Variables that would colour the help even so.
COLOUR_ENV = ("FORCE_COLOR",)


@contextmanager
def help_environment() -> Iterator[None]:
    """argparse takes the width from COLUMNS when set, and (3.14) its colours from the environment too."""
    old = {name: os.environ.get(name) for name in (*HELP_ENV, *COLOUR_ENV)}
    os.environ.update(HELP_ENV)
    for name in COLOUR_ENV:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- roff text -------------------------------------------------------------------------------------------

def escape(text: str) -> str:
    """One line of text as roff: backslashes and hyphens escaped, a leading . or ' made harmless."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


_GAP = re.compile(r"\S( {2,})\S")


def _entries(lines: list[str]) -> list[tuple[str, list[str]]] | None:
    """Indented lines laid out as argparse lays out options ("term  text", continuation lines under
    the text) as (term, text lines); None when they are not laid out so."""
    base = min(_indent(line) for line in lines)
    deeper = [_indent(line) for line in lines if _indent(line) > base]
    gaps = [m.end(1) for line in lines if _indent(line) == base and (m := _GAP.search(line, base))]
    column = min(deeper) if deeper else (max(set(gaps), key=gaps.count) if gaps else None)
    if column is None:
        return None
    entries: list[tuple[str, list[str]]] = []
    for line in lines:
        if _indent(line) > base:
            if not entries:
                return None
            entries[-1][1].append(line.strip())
            continue
        m = _GAP.search(line, base)
        if m:
            term, rest = line[base:m.start(1)].strip(), line[m.end(1):].strip()
        elif len(line) > column and line[column - 1] == " " and line[column] != " ":
            term, rest = line[base:column].strip(), line[column:].strip()
        else:
            term, rest = line.strip(), ""
        entries.append((term, [rest] if rest else []))
    return entries


def roff_text(text: str) -> str:
    """Help text as roff. Lines at the margin are filled (a blank line between them starts a new
    paragraph); indented runs of lines become tagged paragraphs, or stay as they are (.nf)."""
    out: list[str] = []
    runs: list[tuple[bool, list[str]]] = []  # (indented, lines)
    for line in text.strip("\n").split("\n"):
        line = line.rstrip()
        if not line:
            runs.append((False, []))  # a paragraph break
            continue
        indented = _indent(line) > 0
        if runs and runs[-1][0] == indented and runs[-1][1]:
            runs[-1][1].append(line)
        else:
            runs.append((indented, [line]))
    started = False
    follows_text = False  # the previous run is text at the margin with no blank line in between
    for indented, lines in runs:
        if not lines:
            follows_text = False
            continue
        if not indented:
            if started:
                out.append(".PP")
            out.extend(escape(line.strip()) for line in lines)
        else:
            entries = _entries(lines)
            if entries is None and follows_text:  # a hanging paragraph's later lines: fill them too
                out.extend(escape(line.strip()) for line in lines)
            elif entries is None:
                out.append(".nf")
                out.extend(escape(line) for line in lines)
                out.append(".fi")
            else:
                for term, body in entries:
                    out.append(".TP")
                    out.append(f"\\fB{escape(term)}\\fR")
                    out.extend(escape(b) for b in body)
        started = True
        follows_text = not indented
    return "\n".join(out)


class _Formatter(_ManpageFormatter):  # type: ignore[misc]
    """argparse-manpage's formatter, with the text laid out by roff_text, --help listed, and the argument
    groups as ARGUMENTS, OPTIONS and subsections of OPTIONS under their own titles."""

    @staticmethod
    def format_text(text: str) -> str:
        return roff_text(text)

    def format_parser(self, parser: argparse.ArgumentParser, extra_description: str | None = None) -> list[str]:
        self._options_started = False
        description = parser.description
        if description:  # as argparse shows it: filled, or kept as it is by a Raw formatter
            parser.description = self.of._format_text(description)
        try:
            return self._format_parser(parser, extra_description=extra_description)  # type: ignore[no-any-return]
        finally:
            parser.description = description

    def _format_action_group(self, action_group: argparse._ArgumentGroup, subcommand: str | None = None) -> list[str]:
        actions = [a for a in action_group._group_actions if a.help != argparse.SUPPRESS]
        if subcommand or any(isinstance(a, argparse._SubParsersAction) for a in actions):
            return super()._format_action_group(action_group, subcommand)  # type: ignore[no-any-return]
        if not actions:
            return []
        title = action_group.title
        if title in ("options", "optional arguments"):
            heading = [".SH OPTIONS"]
            self._options_started = True
        elif title == "positional arguments":
            heading = [".SH ARGUMENTS"]
        else:
            heading = [] if self._options_started else [".SH OPTIONS"]
            heading.append(f'.SS "{escape(title or "")}"')
            self._options_started = True
        lines = list(heading)
        if action_group.description:
            lines.extend([roff_text(self.of._format_text(action_group.description)), ".PP"])
        for n, action in enumerate(actions):
            if n:
                lines.append("")
            lines.extend(self._format_action(action))
        return lines


def short_description(parser: argparse.ArgumentParser) -> str:
    """The NAME line's text: the first sentence of the parser's description."""
    if not parser.description:
        raise ManpageError(f"{parser.prog}: the parser has no description (needed for the NAME line)")
    text = parser.description.replace("%(prog)s", parser.prog).strip()
    paragraph = " ".join(text.split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", paragraph)[0].rstrip(".")
    if len(sentence) > 1 and sentence[1].islower():
        sentence = sentence[0].lower() + sentence[1:]
    return sentence


class _Page(Manpage):  # type: ignore[misc]
    def __init__(self, tool: Tool, parser: argparse.ArgumentParser, date: str) -> None:
        meta = _package_meta(tool.package)
        super().__init__(parser, _data={
            "date": date, "project_name": tool.package, "version": meta["version"], "manual_title": MANUAL,
            "description": short_description(parser), "include": str(tool.include),
        })
        self.tool = tool
        self.prog = tool.main
        self.mf = _Formatter(parser.prog, self.formatter, format="pretty")
        synopsis: list[str] = self.synopsis
        if synopsis:  # argparse-manpage escapes the program's name, not the rest
            self.synopsis = [synopsis[0], *(escape(word) for word in synopsis[1:])]

    def __str__(self) -> str:
        text = str(super().__str__())
        lines = text.split("\n")
        i = lines.index(".SH NAME")
        lines[i + 1] = escape(", ".join(self.tool.names)) + " \\- " + escape(short_description(self.parser))
        text = "\n".join(lines).replace("\n.SH COMMENTS\n", "\n.SH NOTES\n")
        return text


def _package_meta(package: str) -> dict[str, str]:
    """The package's version, read from the file [tool.hatch.version] names."""
    with (PACKAGES / package / "pyproject.toml").open("rb") as f:
        data = tomllib.load(f)
    path = PACKAGES / package / data["tool"]["hatch"]["version"]["path"]
    m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', path.read_text(encoding="utf-8"), re.M)
    if not m:
        raise ManpageError(f"{path}: no __version__")
    return {"version": m.group(1)}


def render(tool: Tool, date: str) -> str:
    """The page of ``tool`` as its parser and include file give it now."""
    if not tool.include.is_file():
        raise ManpageError(
            f"{tool.include.relative_to(ROOT)} is missing: the page of {tool.main} ({tool.target}) needs its "
            f"{', '.join(REQUIRED_SECTIONS)} sections there (argparse-manpage include format: a [SECTION] "
            "line, then roff text)")
    parser = get_parser_of(tool.target)
    with help_environment():
        page = _Page(tool, parser, date)
        headings = [s["heading"].upper() for s in getattr(parser, "_manpage", [])]
        missing = [s for s in REQUIRED_SECTIONS if s not in headings]
        if missing:
            raise ManpageError(f"{tool.include.relative_to(ROOT)}: no {', '.join(missing)} section")
        return str(page)


#: A page's .TH line: title, section, date, source ("<package> <version>"), manual; roff-escaped.
_TH = re.compile(r'\.TH \S+ "[^"]*" "((?:[^"\\]|\\.)*)" "((?:[^"\\]|\\.)*)"')


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def page_header(path: Path) -> tuple[str, str] | None:
    """The date and the source (``dls-daemon 0.3.0``) in the .TH line of a page, if it has one."""
    try:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    except FileNotFoundError:
        return None
    m = _TH.match(first)
    return (_unescape(m.group(1)), _unescape(m.group(2))) if m else None


def source(package: str) -> str:
    """What the page header gives as the page's source: the package and its version."""
    return f"{package} {_package_meta(package)['version']}"


def today() -> str:
    """The day a new version's pages are written: SOURCE_DATE_EPOCH's, else today's (UTC)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch else datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%d")


def version_date(package: str) -> str:
    """The date of the package's version: that of its committed pages that name this version (the earliest,
    should they differ), else, for a version no page names yet, the day (``today()``)."""
    current = source(package)
    dates = sorted(header[0] for page in (PACKAGES / package / "man").glob("*.1")
                   if (header := page_header(page)) is not None and header[1] == current)
    return dates[0] if dates else today()


def expected(tool: Tool) -> str:
    """The page as it should be committed: what its parser and include file give, dated by its version."""
    return render(tool, version_date(tool.package))


def shared_data_problems(tools: Sequence[Tool]) -> list[str]:
    """Pages that their package's pyproject.toml does not install (as share/man/man1/<tool>.1)."""
    problems = []
    for package in sorted({t.package for t in tools}):
        pyproject = PACKAGES / package / "pyproject.toml"
        with pyproject.open("rb") as f:
            data = tomllib.load(f)
        mapping = data.get("tool", {}).get("hatch", {}).get("build", {}).get("targets", {}).get("wheel", {})
        mapping = mapping.get("shared-data", {})
        for tool in (t for t in tools if t.package == package):
            source, dest = f"man/{tool.name}.1", f"share/man/man1/{tool.name}.1"
            if mapping.get(source) != dest:
                problems.append(f'{pyproject.relative_to(ROOT)}: [{SHARED_DATA}] lacks "{source}" = "{dest}"')
    return problems


# --- section 7: pages of what is no tool ------------------------------------------------------------------

@dataclass(frozen=True)
class Topic:
    package: str  #: the package that installs it, e.g. dls-client
    name: str  #: the page's name, e.g. dls-jdls
    title: str  #: the NAME line's text after the name
    synopsis: str  #: the SYNOPSIS line (roff)

    @property
    def page(self) -> Path:
        return PACKAGES / self.package / "man" / f"{self.name}.7"

    @property
    def include(self) -> Path:
        return PACKAGES / self.package / "man" / f"{self.name}.include"

    @property
    def installed_as(self) -> str:
        return f"share/man/man7/{self.name}.7"


TOPICS = (
    Topic("dls-client", "dls-jdls", "JDLS, the environment variable that configures every dls client",
          "\\fBJDLS=\\fR[\\fBSERVER=\\fIhost\\fR[\\fB,\\fIport\\fR]][\\fB,SERVER2=\\fIhost\\fR[\\fB,"
          "\\fIport\\fR]][\\fB,\\fIoption\\fR]..."),
)


def _include_sections(topic: Topic) -> dict[str, str]:
    """The [SECTION] parts of a topic's include file, in their order; DESCRIPTION required."""
    if not topic.include.is_file():
        raise ManpageError(f"{topic.include.relative_to(ROOT)} is missing: the page {topic.name}(7) needs its "
                           "[DESCRIPTION] (and further sections) there")
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in topic.include.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"\[([A-Z][A-Z ]*)\]", line)
        if m:
            current = sections.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
    if "DESCRIPTION" not in sections:
        raise ManpageError(f"{topic.include.relative_to(ROOT)}: no [DESCRIPTION] section")
    return {name: "\n".join(lines).strip("\n") for name, lines in sections.items()}


def _jdls_options() -> list[str]:
    """The OPTIONS section of dls-jdls(7), from the parser's table of options."""
    from dls_proto import jdls

    out = [".SH OPTIONS"]
    for option in jdls.OPTIONS:
        value = f"\\fB=\\fI{escape(option.value)}\\fR" if option.value else ""
        out += [".TP", f"\\fB{escape(option.name)}\\fR{value}", escape(option.does),
                f"Default: {escape(option.default)}."]
    return out


def render_topic(topic: Topic, date: str) -> str:
    """The section 7 page of ``topic``: its include file around the options of the parser's table."""
    sections = _include_sections(topic)
    source_ = source(topic.package)
    lines = [f'.TH {escape(topic.name.upper())} "7" "{escape(date)}" "{escape(source_)}" "{MANUAL}"',
             ".SH NAME", f"{escape(topic.name)} \\- {escape(topic.title)}",
             ".SH SYNOPSIS", topic.synopsis,
             ".SH DESCRIPTION", sections.pop("DESCRIPTION"), *_jdls_options()]
    for name, text in sections.items():
        lines += [f".SH {name}", text]
    return "\n".join(lines) + "\n"


def expected_topic(topic: Topic) -> str:
    return render_topic(topic, version_date(topic.package))


def topic_problems(topics: Sequence[Topic] = TOPICS, *, check: bool, quiet: bool = True) -> list[str]:
    """Write (or with ``check`` only compare) the section 7 pages; the problems found."""
    problems = []
    for topic in topics:
        rel = topic.page.relative_to(ROOT)
        try:
            text = expected_topic(topic)
        except ManpageError as exc:
            problems.append(str(exc))
            continue
        current = topic.page.read_text(encoding="utf-8") if topic.page.is_file() else None
        if text != current:
            if check:
                problems.append(f"{rel}: differs from what dls_proto.jdls.OPTIONS and its include file give now "
                                "(./dev man regenerates it)")
            else:
                topic.page.write_text(text, encoding="utf-8")
                if not quiet:
                    print(f"wrote {rel}")
        with (PACKAGES / topic.package / "pyproject.toml").open("rb") as f:
            data = tomllib.load(f)
        mapping = data.get("tool", {}).get("hatch", {}).get("build", {}).get("targets", {}).get("wheel", {})
        if mapping.get("shared-data", {}).get(f"man/{topic.name}.7") != topic.installed_as:
            problems.append(f'packages/{topic.package}/pyproject.toml: [{SHARED_DATA}] lacks '
                            f'"man/{topic.name}.7" = "{topic.installed_as}"')
    return problems


def stale_pages(tools: Sequence[Tool]) -> list[Path]:
    """Pages in a man/ directory that no tool has any more."""
    wanted = {t.page for t in tools}
    return sorted(p for p in PACKAGES.glob("*/man/*.1") if p not in wanted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="manpages.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming every page that differs from its parser's")
    parser.add_argument("-q", "--quiet", action="store_true", help="say nothing when all is well")
    args = parser.parse_args(argv)
    errors: list[str] = []
    tools = discover()
    for tool in tools:
        rel = tool.page.relative_to(ROOT)
        try:
            text = expected(tool)
        except ManpageError as exc:
            errors.append(str(exc))
            continue
        current = tool.page.read_text(encoding="utf-8") if tool.page.is_file() else None
        if text == current:
            continue
        if args.check:
            if current is None:
                errors.append(f"{rel}: missing (python tools/manpages.py writes it)")
            else:
                diff = difflib.unified_diff(current.splitlines(), text.splitlines(), f"{rel} (committed)",
                                            f"{rel} (from the parser)", lineterm="", n=1)
                errors.append(f"{rel}: differs from what the parser of {tool.name} gives now "
                              "(python tools/manpages.py, or ./dev man, regenerates it):\n  "
                              + "\n  ".join(list(diff)[:40]))
        else:
            tool.man_dir.mkdir(exist_ok=True)
            tool.page.write_text(text, encoding="utf-8")
            if not args.quiet:
                print(f"wrote {rel}")
    errors.extend(shared_data_problems(tools))
    errors.extend(topic_problems(check=args.check, quiet=args.quiet))
    for page in stale_pages(tools):
        errors.append(f"{page.relative_to(ROOT)}: no tool of its package has this page any more; remove it")
    for error in dict.fromkeys(errors):  # an alias repeats its main name's error
        print(f"manpages.py: {error}", file=sys.stderr)
    if not errors and not args.quiet:
        print(f"manpages.py: {len(tools) + len(TOPICS)} pages {'checked' if args.check else 'up to date'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
