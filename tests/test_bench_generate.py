"""benchmarks/bench_generate.py: its arguments only (the benchmark itself takes minutes and is run by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    """``benchmarks/bench_generate.py`` (a script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location("l2i_bench_generate", ROOT / "benchmarks" / "bench_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_small_documented_run():
    args = _bench().parse_args([])
    assert (args.num_layouts, args.domains, args.steps, args.repeats) == (8, ["day", "night"], 10, 1)
    assert args.adapter is None and args.work is None


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--adapter", "--num-layouts", "--domains", "--steps", "--repeats", "--work"):
        assert option in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--num-layouts", "-1"], "--num-layouts must be >= 1"),
        (["--size", "20"], "--size must be a multiple of 8"),
        (["--adapter", "no/such/export"], "--adapter no/such/export does not exist"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_non_empty_work_folder_is_refused(tmp_path, capsys):
    (tmp_path / "somebody's.txt").write_text("kept")
    with pytest.raises(SystemExit):
        _bench().parse_args(["--work", str(tmp_path)])
    assert "is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "somebody's.txt").read_text() == "kept"
    assert _bench().parse_args(["--work", str(tmp_path / "new")]).work == tmp_path / "new"
