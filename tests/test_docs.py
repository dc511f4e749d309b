"""The README and the guides say what works: every `ear-dist` command they show parses with the real
CLI parser, every `--set section.key=value` names a key of the config tree with a value of its type,
every config YAML they show loads, and every relative link points at a file. A user who copies a
command from the docs would otherwise meet an argparse or config error the docs never mentioned.
Nothing here runs a job: parsing is what the docs promise, and it takes seconds."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from ear_dist.cli import build_parser
from ear_dist.config import Config, ConfigError, from_dict, parse_override

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
RESULTS = sorted((ROOT / "results").glob("*.md"))
README_MAX_LINES = 350
# Guides that other work adds; a link to them is allowed before they exist. Empty once they are in.
PAGES_TO_COME = {"docs/recipes.md"}

FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "text"}
ISSUE_NUMBER = re.compile(r"(?i)\bissues?\W{0,3}#?\d+|\(#\d+\)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first line, lines) of each fenced block of a markdown file."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence and language is None:
            language, start, lines = fence.group(1) or "text", number + 1, []
        elif line.startswith("```") and language is not None:
            blocks.append((language, start, lines))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def shell_lines(lines: list[str], start: int) -> list[tuple[int, str]]:
    """Logical shell lines (backslash continuations joined), with the number of their first line."""
    out, pending, first = [], "", start
    for offset, line in enumerate(lines):
        if not pending:
            first = start + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    if pending:
        out.append((first, pending))
    return out


def placeholder(match: re.Match) -> str:
    """A shell variable in a shown command stands for a path or a name: substitute its lower-cased name."""
    return (match.group(1) or match.group(2)).lower()


def cli_invocations(words: list[str]) -> list[list[str]]:
    """The argument lists given to the CLI on one shell line (after the program or module name)."""
    found = []
    # the CLI starts at `ear-dist`, `python -m ear_dist`, `torchrun ... -m ear_dist`, `deepspeed ... --module ear_dist`
    for i, word in enumerate(words):
        two = " ".join(words[i:i + 2])
        if word == "ear-dist":
            rest = words[i + 1:]
        elif two in ("-m ear_dist", "--module ear_dist"):
            rest = words[i + 2:]
        else:
            continue
        end = next((k for k, w in enumerate(rest) if w in SHELL_SEPARATORS), len(rest))
        found.append(rest[:end])
    return found


def documents() -> list[Path]:
    return [README, *GUIDES]


def shown_shell_lines() -> list[tuple[str, list[str]]]:
    """(where, words) of every logical line of a shell block in the README and the guides, shell
    variables substituted and comments dropped."""
    found = []
    for path in documents():
        for language, start, lines in code_blocks(path):
            if language in SHELL_LANGUAGES:
                for number, line in shell_lines(lines, start):
                    words = shlex.split(SHELL_VARIABLE.sub(placeholder, line), comments=True)
                    found.append((f"{path.relative_to(ROOT)}:{number}", words))
    return found


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every CLI command shown in a shell block."""
    return [(where, argv) for where, words in shown_shell_lines() for argv in cli_invocations(words)]


def shown_overrides() -> list[tuple[str, str]]:
    """(where, key=value) of every `--set` in a shell block, whatever program takes it (the benchmarks
    take the same overrides)."""
    overrides = []
    for where, words in shown_shell_lines():
        for i, word in enumerate(words):
            if word == "--set" and i + 1 < len(words):
                overrides.append((where, words[i + 1]))
            elif word.startswith("--set="):
                overrides.append((where, word[len("--set="):]))
    return overrides


def shown_configs() -> list[tuple[str, dict]]:
    """(where, data) of every YAML block whose top-level keys are all sections of the config tree (a
    suite file, for one, is not a config)."""
    sections = set(Config.__dataclass_fields__)
    configs = []
    for path in documents():
        for language, start, lines in code_blocks(path):
            if language not in ("yaml", "yml"):
                continue
            data = yaml.safe_load("\n".join(lines))
            if isinstance(data, dict) and data and set(data) <= sections:
                configs.append((f"{path.relative_to(ROOT)}:{start}", data))
    return configs


COMMANDS = shown_commands()
OVERRIDES = shown_overrides()
CONFIGS = shown_configs()


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def test_the_docs_show_commands_of_every_kind(parser):
    """The extraction itself works: the README and guides show dozens of commands and overrides, and
    every top-level command of the CLI appears at least once."""
    assert len(COMMANDS) >= 40, COMMANDS
    assert len(OVERRIDES) >= 40, OVERRIDES
    assert CONFIGS, "no config YAML found in the docs"
    shown = {argv[0] for _, argv in COMMANDS if argv}
    listed = set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    assert listed <= shown, f"commands the docs never show: {sorted(listed - shown)}"


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_shown_command_parses(parser, where, argv):
    """A command copied from the README or a guide is accepted by the CLI as written."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            asked_for_text = any(flag in argv for flag in ("--help", "-h", "--version"))
            if not (asked_for_text and e.code == 0):
                pytest.fail(f"{where}: `ear-dist {shlex.join(argv)}` does not parse:\n{stderr.getvalue()}")


@pytest.mark.parametrize("where,override", OVERRIDES, ids=[f"{w}:{o.split('=')[0]}" for w, o in OVERRIDES])
def test_every_shown_override_names_a_config_key(where, override):
    """Each `--set section.key=value` names a key of the config tree, with a value of the key's type."""
    try:
        from_dict(Config, parse_override(override))
    except ConfigError as e:
        pytest.fail(f"{where}: --set {override}: {e}")


@pytest.mark.parametrize("where,data", CONFIGS, ids=[w for w, _ in CONFIGS])
def test_every_shown_config_loads(where, data):
    """A config YAML shown in the docs fills the config tree without an unknown key or a wrong type."""
    try:
        from_dict(Config, data)
    except ConfigError as e:
        pytest.fail(f"{where}: {e}")


def test_readme_is_a_front_door():
    """The README stays short enough to read in one sitting; history and tables go to results/."""
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", [README, *GUIDES, *RESULTS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers_where_users_read(path):
    """Users read the README, the guides and the results; a tracker's issue number means nothing to them."""
    hits = [f"{n}: {line}" for n, line in enumerate(path.read_text().splitlines(), 1) if ISSUE_NUMBER.search(line)]
    assert not hits, f"{path.relative_to(ROOT)} names issue numbers:\n" + "\n".join(hits)


@pytest.mark.parametrize("path", [README, *GUIDES, *RESULTS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path):
    """Every relative link of the README, the guides and the results opens a file of the repository."""
    broken = []
    for target in MARKDOWN_LINK.findall(path.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#", 1)[0]).resolve()
        relative = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
        if not resolved.exists() and relative not in PAGES_TO_COME:
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"
