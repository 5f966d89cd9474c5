"""The ``weakseg`` command line: every command listed, only the command that runs imported (Lightning alone
costs ~5 s of start-up; ``benchmarks/startup.py``)."""

import subprocess
import sys

from weakseg.cli import build_parser, chosen_command, main
from weakseg.commands import COMMANDS


def _subparsers(parser):
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action


def test_help_lists_every_command_with_its_modules_own_help():
    full, lazy = _subparsers(build_parser("all")), _subparsers(build_parser(None))
    assert list(full.choices) == list(lazy.choices) == list(COMMANDS)
    helps = {a.dest: a.help for a in full._choices_actions}
    assert helps == {name: summary for name, (_, summary) in COMMANDS.items()}
    assert {a.dest: a.help for a in lazy._choices_actions} == helps


def test_chosen_command():
    assert chosen_command(["-q", "evaluate", "--split", "x"]) == "evaluate"
    assert chosen_command(["make-data", "out"]) == "make-data"
    assert chosen_command(["--help"]) is None and chosen_command(["nonsense"]) is None


def test_evaluate_does_not_import_lightning(tmp_path):
    code = ("import sys; from weakseg.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'lightning' in sys.modules)")
    (tmp_path / "p").mkdir()
    run = subprocess.run([sys.executable, "-c", code, "evaluate", "--predictions", str(tmp_path / "p"),
                          "--datadir", str(tmp_path), "--split", "test"], capture_output=True, text=True)
    assert run.stdout.split()[-2:] == ["2", "False"], run.stdout + run.stderr  # rc 2: no such split
    assert "no DFC2020 'test' split" in run.stderr


def test_unknown_command_is_an_error(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as e:
        assert e.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_log_lines_follow_the_current_stderr(monkeypatch):
    import io
    import logging

    from weakseg.cli import setup_logging

    setup_logging(quiet=False, lightning=False)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logging.getLogger("weakseg").info("one")
    first.close()  # what pytest's capture does between tests
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("weakseg").info("two")
    assert second.getvalue() == "two\n"
