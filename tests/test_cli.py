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


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["merge", "--help"], ["export", "--help"], ["demo", "--help"]])
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


@pytest.mark.slow
def test_quick_demo(tmp_path):
    pytest.importorskip("sklearn")
    from onelora_fx.tools import demo

    results = demo.run(quick=True, out_dir=tmp_path)
    onelora = results["methods"]["1LoRA + head (onelora_fx)"]
    assert onelora["trainable"] < results["methods"]["full fine-tuning"]["trainable"] / 20
    # the negatives start near chance (10 classes); 30 quick steps must lift 1LoRA well above it
    assert results["start_accuracy"] < 0.15 and onelora["accuracy"] > results["start_accuracy"] + 0.15
    assert results["reloaded_accuracy"] == onelora["accuracy"]
    assert results["max_abs_diff"] < 1e-4  # the full demo prints 2.43e-05 (README); float32 noise is ~1e-6
    assert (tmp_path / "digits_negative.pt2").is_file() and results["adapter_bytes"] > 0
    assert results["llama_7b_adapter_values"] == 32 * (4 * 4096 + 2 * 11008 + 4096)


MYMOD = """
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
"""


@pytest.mark.slow
def test_console_script_imports_from_the_current_directory(tmp_path):
    (tmp_path / "mymod.py").write_text(MYMOD)
    script = Path(sys.executable).with_name("onelora-fx")
    if not script.exists():
        pytest.skip("the onelora-fx console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(script), "inspect", "mymod:build"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "selects 1 site: 8 trainable parameters" in r.stdout


def test_exclude_that_removes_nothing_warns_and_names_are_left_aligned():
    r = cli("inspect", "handwritten:MLP", "--exclude", "no_such_layer")
    assert r.returncode == 0, r.stderr
    assert "onelora-fx: warning: exclude=['no_such_layer'] removes nothing" in r.stderr or \
        "onelora-fx: warning: exclude='no_such_layer' removes nothing" in r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("fc1", "fc2", "head"))]
    assert [line.split()[0] for line in rows] == ["fc1", "fc2", "head"], "site names start each row (left-aligned)"
    assert "selects 2 sites" in r.stdout


USER_FILES = {
    "broken.py": "def make(:\n",
    "raising.py": "def make():\n    raise RuntimeError('no weights here')\n",
    "sklearn.py": "raise ImportError('No module named sklearn', name='sklearn')\n",  # as if not installed
}


@pytest.mark.parametrize("args, message", [
    (["inspect", "broken:make"], "cannot load 'broken:make': importing broken raised SyntaxError"),
    (["inspect", "raising:make"], "raising:make: make() raised RuntimeError: no weights here"),
    (["inspect", ":"], "must be package.module:callable, with both parts"),
    (["demo", "--quick"], "the demo needs sklearn: pip install 'onelora-fx[demo]'"),
], ids=["syntax-error", "factory-raises", "colon", "demo-without-sklearn"])
def test_a_failing_user_factory_is_one_line(args, message, tmp_path):
    """What the user's own code does wrong is reported in one line (exit 2), never a traceback."""
    for name, text in USER_FILES.items():
        (tmp_path / name).write_text(text)
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("onelora-fx: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_merge_command_writes_the_merged_checkpoint_and_bad_input_is_one_line(tmp_path):
    import torch

    import onelora_fx as ol
    from toolkit import quiet_transform, tiny_llama
    from reference import randomize_adapters

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    gm = quiet_transform(model, "all-linear", capture="module", example_kwargs={"input_ids": ids})
    randomize_adapters(gm)
    adapter = ol.save_adapter(gm, tmp_path / "a.safetensors")
    r = cli("merge", str(tmp_path / "base"), str(adapter), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    shards = len(list((tmp_path / "base").glob("*.safetensors")))
    assert r.stderr.count("merged model-") == shards > 1 and f"wrote {tmp_path / 'out'}" in r.stdout
    assert (tmp_path / "out" / "config.json").is_file()
    r = cli("merge", str(tmp_path / "nowhere"), str(adapter), str(tmp_path / "out2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds no .safetensors checkpoint" in r.stderr


def test_export_command_writes_a_program_of_the_adapted_model(tmp_path):
    import torch

    import onelora_fx as ol
    from onelora_fx.tools import zoo
    from reference import randomize_adapters
    from toolkit import quiet_transform

    model, _, kwargs = zoo.build("llama-tiny")
    gm = quiet_transform(model, "all-linear", example_kwargs=kwargs)
    randomize_adapters(gm)
    adapter = ol.save_adapter(gm, tmp_path / "a.safetensors")
    r = cli("export", "llama-tiny", str(adapter), "--out", str(tmp_path / "m.pt2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and "adapter merged" in r.stdout
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    torch.testing.assert_close(program(**kwargs)["logits"], gm(**kwargs).logits, rtol=1e-5, atol=1e-5)


def test_version_py_typed_and_the_warning_category():
    import importlib.resources
    import warnings
    from importlib.metadata import version

    import torch

    import onelora_fx as ol

    assert ol.__version__ == version("onelora-fx")
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"onelora-fx {ol.__version__}"
    assert importlib.resources.files("onelora_fx").joinpath("py.typed").is_file()
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ol.transform(model, "all", exclude="2")  # a LayerNorm-fed site: the one warning it gives
    assert caught and all(issubclass(w.category, ol.OneLoRAWarning) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=ol.OneLoRAWarning)
        ol.transform(model, "all", exclude="2")


def test_export_command_with_a_missing_adapter_is_one_line(tmp_path, capsys):
    from onelora_fx.tools.cli import main

    assert main(["export", "llama-tiny", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.safetensors" in err
