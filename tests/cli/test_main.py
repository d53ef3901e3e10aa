"""The command line: `harvest run`, one-line user errors, tracebacks for bugs and under HARVEST_DEBUG=1."""

import subprocess
import sys
from pathlib import Path

import pytest

from harvest.cli import main as cli_main
from harvest.cli import pipeline
from harvest.cli.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_console_script_runs_and_reports_user_errors_in_one_line(tmp_path):
    script = Path(sys.executable).with_name("harvest")
    assert script.is_file(), "the `harvest` console script is not installed (pip install -e .)"
    r = subprocess.run([str(script), "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "missing.yaml" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout


def test_python_m_harvest_run_is_the_same_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harvest.run", str(tmp_path / "missing.yaml")], capture_output=True,
                       text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "missing.yaml" in r.stderr and "Traceback" not in r.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(cfg, overwrite=False):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr(pipeline, "run", broken)
    with pytest.raises(ValueError, match="internal bug"):
        cli_main.main(["run", str(ROOT / "configs" / "demo.yaml")])


def test_harvest_debug_shows_user_error_tracebacks(monkeypatch, tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert cli_main.main(["run", missing]) == 2
    assert "harvest: error:" in capsys.readouterr().err
    monkeypatch.setenv("HARVEST_DEBUG", "1")
    with pytest.raises(ConfigError, match="does not exist"):
        cli_main.main(["run", missing])
