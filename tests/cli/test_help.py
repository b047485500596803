"""Every option of every subcommand says what it does."""

from __future__ import annotations

import argparse

from upgd_ref.cli import SUBCOMMANDS, build_parser


def _parsers(parser: argparse.ArgumentParser, path=("upgd-ref",)):
    """``(command path, parser)`` for the parser and every subparser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _missing_help(parser: argparse.ArgumentParser, path) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            missing += [f"{' '.join(path)} {name}" for name in action.choices if name not in helped]
        elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_subcommand_has_help():
    parsers = list(_parsers(build_parser()))
    assert {path[1] for path, _ in parsers if len(path) > 1} == {name.replace("_", "-") for name in SUBCOMMANDS}
    assert len(parsers) > len(SUBCOMMANDS)  # golden's own subcommands are walked too
    missing = [m for path, parser in parsers for m in _missing_help(parser, path)]
    assert missing == []


def test_the_walker_finds_an_option_without_help():
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--documented", help="says what it does")
    sub = parser.add_subparsers()
    child = sub.add_parser("child")
    child.add_argument("--bare")
    found = [m for path, p in _parsers(parser, ("p",)) for m in _missing_help(p, path)]
    assert found == ["p child", "p child --bare"]
