"""The command line as a reference: ``--help`` names every default, and one flag name per idea
across commands (earlier names still work and print a deprecation line)."""

from __future__ import annotations

import argparse

import pytest
from rela_train.cli import build_parser, main, warn_deprecated
from rela_train.commands import COMMANDS


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_help_names_each_default(name: str) -> None:
    parser = _subparsers()[name]
    formatter = parser._get_formatter()
    silent = []
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue  # a switch: off unless given
        text = formatter._expand_help(action) if action.help else ""
        if action.default is not None or name == "fit":
            if "default" not in text:
                silent.append(action.option_strings[0])
    assert silent == []
    help_text = parser.format_help()
    if name == "fit":
        assert "(default: 256, or the preset's)" in " ".join(help_text.split())


def test_one_flag_name_per_idea_across_commands() -> None:
    flags = {name: set(p._option_string_actions) for name, p in _subparsers().items()}
    assert "--data-dir" in flags["embed"] and "--data-dir" in flags["fit"]
    assert "--probe-epochs" in flags["eval"] and "--probe-epochs" in flags["fit"]
    assert "--policy" in flags["fit"]


@pytest.mark.parametrize(
    "argv, old, new, dest, value",
    [
        (["embed", "--data", "D", "--prior", "pixels", "--out", "O"], "--data", "--data-dir",
         "data", "D"),
        (["eval", "CKPT", "--probe-iterations", "7"], "--probe-iterations", "--probe-epochs",
         "probe_iterations", 7),
        (["fit", "--selection", "hard"], "--selection", "--policy", "policy", "hard"),
    ],
)  # fmt: skip
def test_earlier_names_still_work_and_say_so(argv, old, new, dest, value, capsys) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    current = [new if word == old else word for word in argv]
    assert getattr(build_parser().parse_args(current), dest) == value  # the same setting
    assert warn_deprecated(current) == []
    (line,) = warn_deprecated(argv)
    assert line == (
        f"rela-train {argv[0]}: warning: {old} is deprecated and will be removed; use {new} "
        "(the same setting)"
    )
    assert capsys.readouterr().err.strip() == line


def test_main_prints_the_deprecation_line(tmp_path, capsys) -> None:
    code = main(["embed", "--data", str(tmp_path / "void"), "--prior", "pixels:2",
                 "--out", str(tmp_path / "s"), "--dry-run"])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0].startswith("rela-train embed: warning: --data is deprecated")
    assert "does not exist" in err[-1]
