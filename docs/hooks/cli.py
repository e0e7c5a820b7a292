"""mkdocs hook: the CLI reference, rendered from the argparse parsers at build time.

`docs/reference/cli.md` holds the prose and one marker line, `<!-- bcjax:cli -->`, which this hook
replaces with the help of `bcjax` (`bcjax.cli.build_parser()`), of each of its commands (argparse
subcommands, at any depth), of each target of a command that hands the rest of its line to the
target's own parser (what `bcjax bench NAME --help` prints) and of the `python -m` entry points the
guides use. So the page is what the installed
parsers say, never a copy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys

from mkdocs.exceptions import PluginError

PAGE = "reference/cli.md"
MARKER = "<!-- bcjax:cli -->"
WIDTH = "100"  # argparse wraps help at $COLUMNS
# `python -m` entry points the guides show (module, one line on what it is for)
MODULES = (
    ("bcjax.toyworld.train", "trains a toy-world model, stage by stage"),
    ("bcjax.toyworld.study", "the toy-world study: staggers x masks over models and seeds, 95% CIs"),
    ("bcjax.toyworld.lineage", "the lineage base's own samples, scored like a student's"),
    ("bcjax.toyworld.lookahead", "what reading newer in-flight blocks does to a block's x0"),
    ("bcjax.serve.soak", "many tabs of `bcjax serve` switching prompts: threads, memory, blocks/s"),
)


def _fence(text: str) -> str:
    return "```text\n" + text.rstrip() + "\n```\n"


def _help_of_argv(main, argv: list[str], prog: str | None = None) -> str:
    """What `main(argv)` prints for an argv ending in --help (argparse exits 0 after printing)."""
    out = io.StringIO()
    old_argv = sys.argv
    if prog is not None:
        sys.argv = [prog]  # the default prog of a parser built without one
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise PluginError(f"{prog or 'bcjax'} {' '.join(argv)} exited {e.code}") from None
    else:
        raise PluginError(f"{prog or 'bcjax'} {' '.join(argv)} printed no help and did not exit")
    finally:
        sys.argv = old_argv
    return out.getvalue()


def _subcommands(parser: argparse.ArgumentParser):
    """(name, one-line help, subparser) of a parser's subcommands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield name, helps.get(name, ""), sub


def _targets(sub: argparse.ArgumentParser) -> list[str]:
    """The choices of a command whose first positional picks a target that parses the rest
    (`bcjax bench NAME ...`, `bcjax eval NAME ...`); [] for a plain command."""
    positionals = [a for a in sub._actions if not a.option_strings]
    if len(positionals) == 2 and positionals[0].choices and positionals[1].nargs == argparse.REMAINDER:
        return list(positionals[0].choices)
    return []


def _command(cli, parser: argparse.ArgumentParser, words: list[str], summary: str, level: int) -> list[str]:
    """The help of `bcjax WORDS`, then of each command below it: argparse subcommands, or the targets
    of a command that hands the rest of the line to its target's own parser."""
    name = " ".join(["bcjax", *words])
    parts = [f"{'#' * level} {name}\n"]
    if summary:
        parts.append(f"{summary[0].upper()}{summary[1:]}.\n")
    parts.append(_fence(parser.format_help()))
    for sub_name, sub_summary, sub in _subcommands(parser):
        parts += _command(cli, sub, [*words, sub_name], sub_summary, min(level + 1, 4))
    rendered: dict[str, str] = {}
    for target in _targets(parser):
        text = _help_of_argv(cli.main, ["--no-compile-cache", *words, target, "--help"], prog="bcjax")
        parts.append(f"{'#' * min(level + 1, 4)} {name} {target}\n")
        if text in rendered:
            parts.append(f"Another name of `{name} {rendered[text]}`: the same parser, and a line saying so.\n")
            continue
        rendered[text] = target
        parts.append(_fence(text))
    return parts


def render() -> str:
    os.environ["COLUMNS"] = WIDTH
    from bcjax import cli

    parts = _command(cli, cli.build_parser(), [], "", 2)
    parts.append("## Module entry points\n")
    parts.append("Tools run as `python -m MODULE`; each prints the same help with `--help`.\n")
    for module, summary in MODULES:
        main = importlib.import_module(module).main
        parts.append(f"### python -m {module}\n")
        parts.append(f"{summary[0].upper()}{summary[1:]}.\n")
        parts.append(_fence(_help_of_argv(main, ["--help"], prog=f"python -m {module}")))
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE}: the line {MARKER} (where the CLI reference goes) is missing")
    return markdown.replace(MARKER, render())
