"""The ``memreg`` entry: subcommand plumbing (commands are imported lazily)."""

from __future__ import annotations

import sys

from memreg import cli


def test_help_lists_commands_without_importing_them(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "memreg.detect", raising=False)
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "detect" in out and "report" in out
    assert "memreg.detect" not in sys.modules


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "usage: memreg" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_detect_help(capsys):
    assert cli.main(["detect", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--mem", "--nonmem", "--out", "--seeds", "--batch-size", "--preset", "--g1", "--g2",
                 "--t-hi", "--t-lo", "--device", "--dtype", "--wen-steps", "--space", "--fit-weights",
                 "--revision", "--variant", "--overwrite"):
        assert flag in out


def test_detect_missing_required_args(capsys):
    assert cli.main(["detect", "--model", "x"]) == 2
    assert "--mem" in capsys.readouterr().err


def test_missing_command_module_fails_alone(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("memreg._no_such_module", "not installed"))
    assert cli.main(["ghost"]) == 2
    assert "memreg._no_such_module" in capsys.readouterr().err
    # other commands are unaffected
    assert cli.main(["detect", "--help"]) == 0


def test_plugged_command_runs(monkeypatch, tmp_path):
    mod = tmp_path / "memreg_fake_cmd.py"
    mod.write_text("def add_arguments(p):\n    p.add_argument('--x', type=int, required=True)\n"
                   "def run(args):\n    return args.x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("memreg_fake_cmd", "a plugged command"))
    assert cli.main(["fake", "--x", "7"]) == 7
    assert cli.main(["fake"]) == 2  # its own argparse error
