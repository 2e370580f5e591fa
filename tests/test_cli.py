"""The command line parses its commands and refuses bad input with a message naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qviz.cli import DEFAULT_PROMPT as DEFAULT
from qviz.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["fetch", "diagnose", "serve", "report", "bench"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0
    assert f"usage: qviz {cmd}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: cmd"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["report", "--bits", "two"], "--bits takes a comma list of ints like 2,3,4,8, got 'two'"),
        (["diagnose", "--bits", "4,x"], "got '4,x'"),
        (["serve", "--port", "http"], "invalid int value: 'http'"),
        (["bench", "nothing"], "invalid choice: 'nothing'"),
        (["report", "--facts", "many"], "invalid int value: 'many'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m qviz.cli ARGS`` in a fresh process, offline; its exit code and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qviz.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


@pytest.mark.model
def test_diagnose_refuses_a_bit_width_outside_2_to_8():
    out = run_cli("diagnose", "--bits", "9")
    assert out.returncode == 2  # argparse refuses it before the model loads
    assert "--bits takes bit-widths in 2..8" in out.stderr and "[9]" in out.stderr
    assert "Traceback" not in out.stderr


def test_prescribe_refuses_a_budget_above_16_before_loading():
    out = run_cli("prescribe", "--budget", "17")
    assert out.returncode == 2 and "above 16 bits per weight" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["diagnose", "--method", "foo"], "method must be one of ('rtn', 'gptq', 'hqq', 'gguf')"),
        (["report", "--method", "gguf:Q7"], "unknown GGUF type 'Q7'; choices: Q8_0"),
        (["diagnose", "--method", "hqq:Q4_K"], "method 'hqq' takes no ':' argument"),
    ],
)
def test_a_bad_method_spelling_is_refused_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.model
def test_diagnose_puts_methods_side_by_side(lab):
    from qviz.cli import diagnose_rows

    rows = diagnose_rows(lab, ["rtn", "gguf:Q8_0", "gguf"], [8, 2], 128, DEFAULT, " Paris")
    got = [(r["method"], r["bits"], r["plan"]) for r in rows]
    assert got == [
        ("-", 16, "fp"),
        ("rtn", 8, "rtn8-g128"),
        ("rtn", 2, "rtn2-g128"),
        ("gguf:Q8_0", 8, "gguf8-ch-Q8_0"),  # the type fixes the bits: one row
        ("gguf", 8, "gguf8-ch"),  # Q8_0 too, spelled by bits
        ("gguf", 2, "gguf2-ch"),  # Q2_K (IQ4_NL on SmolLM2's 576-wide Linears)
    ]
    by = {r["plan"]: r for r in rows}
    assert by["fp"]["verdict"] == "reference" and by["fp"]["rank"] == 1
    assert by["rtn8-g128"]["verdict"] == "healthy" and by["rtn8-g128"]["cka_diag"] > 0.99
    assert by["rtn2-g128"]["verdict"] == "computation collapse"
    assert by["rtn2-g128"]["cka_diag"] < by["rtn8-g128"]["cka_diag"]
    assert by["gguf8-ch-Q8_0"]["bits/weight"] == 8.5  # 34 bytes per block of 32
    # 8 + two 16-bit numbers per group of 128 (576-wide rows: a ragged fifth group)
    assert 8.25 < by["rtn8-g128"]["bits/weight"] < 8.3
