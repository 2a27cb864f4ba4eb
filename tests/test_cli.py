"""The `onelora-fx` command line and the shortened demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run([sys.executable, "-m", "onelora_fx", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["demo", "--help"]])
def test_help(args):
    r = cli(*args)
    assert r.returncode == 0 and "usage: onelora-fx" in r.stdout


def test_inspect_builtin_with_patterns():
    r = cli("inspect", "llama-tiny", "--pattern", "*.q_proj", "--pattern", "re:.*v_proj")
    assert r.returncode == 0, r.stderr
    assert "model.layers.1.self_attn.q_proj" in r.stdout and "lm_head" in r.stdout
    assert "selects 4 sites: 96 trainable parameters" in r.stdout  # 2 x (q 32 + v 16)


def test_inspect_import_spec_with_examples():
    r = cli("inspect", "handwritten:MLP", "--exclude", "fc2")
    assert r.returncode == 0, r.stderr
    assert "selects 1 site: 16 trainable parameters" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "no-such-model"], "MODEL must be one of"),
        (["inspect", "nosuchpackage.mod:make"], "cannot load"),
        (["inspect", "llama-tiny", "--pattern", "*.k_proj_typo"], "selects none of the 15 linear sites"),
        (["inspect", "llama-tiny", "--pattern", "re:(unclosed"], "bad regex"),
    ],
)
def test_bad_input_is_one_line(args, message):
    r = cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("onelora-fx: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_quick_demo(tmp_path):
    pytest.importorskip("sklearn")
    from onelora_fx import demo

    results = demo.run(quick=True, out_dir=tmp_path)
    onelora = results["methods"]["1LoRA + head (onelora_fx)"]
    assert onelora["trainable"] < results["methods"]["full fine-tuning"]["trainable"] / 20
    assert onelora["accuracy"] != pytest.approx(results["start_accuracy"], abs=0.02), "fine-tuning moved nothing"
    assert results["reloaded_accuracy"] == onelora["accuracy"]
    assert results["max_abs_diff"] < 1e-3
    assert (tmp_path / "digits_negative.pt2").is_file() and results["adapter_bytes"] > 0
    assert results["llama_7b_adapter_values"] == 32 * (4 * 4096 + 2 * 11008 + 4096)
