"""``onelora-fx``: inspect a model's linear sites, merge an adapter into a checkpoint, or
run the end-to-end demo.

    onelora-fx inspect llama-tiny --pattern "*.q_proj" --pattern "*.v_proj"
    onelora-fx inspect mypackage.models:build --exclude "re:.*head.*"
    onelora-fx merge llama-8b adapter.safetensors llama-8b-finetuned
    onelora-fx export mypackage.models:build adapter.safetensors --format onnx --out model.onnx
    onelora-fx demo

A bad model spec or pattern exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

__all__ = ["main"]


class UsageError(Exception):
    """A mistake in what the user typed: reported as one line, exit status 2."""


def parse_pattern(texts: Optional[Sequence[str]]) -> Any:
    """CLI patterns: a glob or preset as is, ``re:...`` for a regex; repeat to combine."""
    if not texts:
        return None
    out = []
    for text in texts:
        if text.startswith("re:"):
            try:
                out.append(re.compile(text[3:]))
            except re.error as e:
                raise UsageError(f"bad regex in pattern {text!r}: {e}") from None
        else:
            out.append(text)
    return out[0] if len(out) == 1 else out


def load_model(spec: str) -> tuple[nn.Module, tuple, dict]:
    """A built-in zoo name, or ``package.module:callable`` returning a module or a
    ``(module, example_inputs)`` pair (a tuple of positional inputs or a dict of keyword
    inputs)."""
    from . import zoo

    if spec in zoo.ZOO:
        try:
            return zoo.build(spec)
        except ImportError as e:
            raise UsageError(f"{spec} needs {e.name}: pip install 'onelora-fx[models]'") from None
    if ":" not in spec:
        raise UsageError(f"MODEL must be one of {', '.join(zoo.ZOO)} or package.module:callable, got {spec!r}")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"MODEL {spec!r} must be package.module:callable, with both parts")
    # `python -m` puts the current directory on sys.path, the console script does not:
    # a model file next to the user must load the same way from both
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot load {spec!r}: {e}") from None
    except Exception as e:  # the user's module fails to import (a SyntaxError, an error at import time)
        raise UsageError(f"cannot load {spec!r}: importing {module_name} raised {type(e).__name__}: {_first(e)}") from None
    if callable(factory) and not isinstance(factory, nn.Module):
        try:
            inspect.signature(factory).bind()
        except TypeError as e:
            raise UsageError(f"{spec} must be callable without arguments (it is called as {attr}()): {e}") from None
        except ValueError:  # no signature to read (a builtin): call it and see
            pass
        try:
            made = factory()
        except Exception as e:
            raise UsageError(f"{spec}: {attr}() raised {type(e).__name__}: {_first(e)}") from None
    else:
        made = factory
    example: Any = ()
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
    if not isinstance(made, nn.Module):
        raise UsageError(f"{spec} gave a {type(made).__name__}, not a torch.nn.Module (or a (module, example_inputs) pair)")
    if isinstance(example, dict):
        return made, (), example
    return made, tuple(example) if isinstance(example, (list, tuple)) else (example,), {}


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _inspect(args: argparse.Namespace) -> int:
    from ..forms.graph.capture import CaptureError
    from ..analysis.patterns import PatternError, describe
    from ..summary import site_table, weight_lines
    from ..transform import inspect_sites

    model, inputs, kwargs = load_model(args.model)
    pattern = parse_pattern(args.pattern)
    exclude = parse_pattern(args.exclude)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            found, accounting = inspect_sites(model, pattern, exclude=exclude, example_inputs=inputs or None,
                                              example_kwargs=kwargs or None)
        except PatternError as e:
            head = str(e).splitlines()[0].removesuffix(" Available:").rstrip(".")
            raise UsageError(f"{head}; run `onelora-fx inspect {args.model}` to list them") from None
        except (TypeError, ValueError, CaptureError) as e:
            raise UsageError(str(e).strip().splitlines()[0]) from None
    for w in caught:  # what the Python API warns about, the command says too
        if issubclass(w.category, UserWarning):
            print(f"onelora-fx: warning: {w.message}", file=sys.stderr)
    print(site_table(found))
    if accounting is not None:
        print()
        print("\n".join(weight_lines(accounting, found)))
    chosen = [s for s in found if s.selected]
    vectors = {s.adapter_name: s.out_features * (s.experts or 1) for s in chosen}
    total = sum(p.numel() for p in model.parameters())
    print()
    print(f"{args.model}: {_plural(len(found), 'linear site')} on {_plural(len({s.weight_name for s in found}), 'weight')}")
    print(f"pattern {describe(pattern if pattern is not None else 'all-linear')!r}"
          + (f" minus {describe(exclude)!r}" if exclude is not None else "")
          + f" selects {_plural(len(chosen), 'site')}: {sum(vectors.values()):,} trainable parameters "
          f"({100 * sum(vectors.values()) / max(total, 1):.4f}% of {total:,})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from . import demo
        import sklearn  # noqa: F401  (the demo's data set ships with scikit-learn)
    except ImportError as e:
        raise UsageError(f"the demo needs {e.name or 'its dependencies'}: pip install 'onelora-fx[demo]'") from None

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".onelora-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write there ({e.strerror or e}); give a folder you can write to") from None
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give 1 or more")
    demo.run(quick=args.quick, out_dir=out, threads=args.threads)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..adapters.files import AdapterFileError
    from ..deploy.offline import merge_checkpoint
    from ..fold import MergeError

    try:
        out = merge_checkpoint(args.base, args.adapter, args.out, progress=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, FileExistsError, AdapterFileError, MergeError) as e:
        raise UsageError(_first(e)) from None
    print(f"wrote {out}")
    return 0


_SUFFIX = {"pt2": ".pt2", "onnx": ".onnx", "aoti": ".pt2"}


def _export(args: argparse.Namespace) -> int:
    from ..adapters.files import AdapterFileError
    from ..adapters.load import load
    from ..compat import aoti_compile_and_package
    from ..deploy.export import ExportError, export, export_onnx
    from ..forms.graph.capture import CaptureError

    model, inputs, kwargs = load_model(args.model)
    if not inputs and not kwargs:
        raise UsageError(f"{args.model} gives no example inputs, which an export needs: make it return "
                         "(module, example_inputs)")
    out = Path(args.out or f"{Path(args.adapter).stem}{_SUFFIX[args.format]}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = load(model, args.adapter, example_inputs=inputs or None, example_kwargs=kwargs or None)
            if args.format == "onnx":
                export_onnx(gm, inputs, kwargs, path=out, adapters=args.adapters)
            else:
                ep = export(gm, inputs, kwargs, path=out if args.format == "pt2" else None, adapters=args.adapters)
                if args.format == "aoti":
                    aoti_compile_and_package(ep, str(out))
    except (AdapterFileError, ExportError, CaptureError, FileNotFoundError, ImportError, ValueError) as e:
        raise UsageError(_first(e)) from None
    print(f"wrote {out} ({args.format}, adapter {'as inputs' if args.adapters == 'inputs' else 'merged'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="onelora-fx", description="1LoRA fine-tuning as a PyTorch graph pass.")
    parser.add_argument("--version", action="version", version=f"onelora-fx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect",
        help="list a model's linear sites and what a pattern selects",
        description="List every linear site of MODEL, what --pattern selects, and the trainable parameter count.",
    )
    p.add_argument("model", metavar="MODEL", help="a built-in tiny model (llama-tiny, gpt2-tiny, bert-tiny, vit-tiny, "
                   "depth-anything-tiny, dit-tiny) or package.module:callable")
    p.add_argument("--pattern", action="append", help="glob on site names, 'all-linear' (default), 'all', or re:REGEX; repeatable")
    p.add_argument("--exclude", action="append", help="same syntax; sites to leave out")
    p.set_defaults(run=_inspect)
    m = sub.add_parser(
        "merge",
        help="fold an adapter into a safetensors checkpoint, shard by shard",
        description="Write BASE (a safetensors checkpoint folder) with ADAPTER (an onelora_fx adapter file or a PEFT "
        "1LoRA folder) folded in, to the new folder OUT, holding one shard in memory at a time.",
    )
    m.add_argument("base", metavar="BASE", help="checkpoint folder (model.safetensors or its shards and index)")
    m.add_argument("adapter", metavar="ADAPTER", help="adapter file (ol.save_adapter) or PEFT folder (ol.save_peft)")
    m.add_argument("out", metavar="OUT", help="new folder for the merged checkpoint")
    m.set_defaults(run=_merge)
    e = sub.add_parser(
        "export",
        help="adapt MODEL with ADAPTER and export it: .pt2, ONNX or an AOTInductor package",
        description="Load ADAPTER (an adapter file or PEFT folder) into MODEL and export the result: a torch.export "
        ".pt2 (loads with only torch), an ONNX model (ONNX Runtime), or an AOTInductor package (compiled, runs "
        "without the model's code). The adapter is merged into the weights, or with --adapters inputs kept as "
        "inputs of the program (one artifact for any adapter).",
    )
    e.add_argument("model", metavar="MODEL", help="as for inspect; it must give example inputs ((module, inputs))")
    e.add_argument("adapter", metavar="ADAPTER", help="adapter file (ol.save_adapter) or PEFT folder")
    e.add_argument("--format", choices=sorted(_SUFFIX), default="pt2", help="default: %(default)s")
    e.add_argument("--adapters", choices=["merged", "inputs"], default="merged", help="default: %(default)s")
    e.add_argument("--out", help="output file (default: the adapter's name with the format's suffix)")
    e.set_defaults(run=_export)
    d = sub.add_parser(
        "demo",
        help="pretrain, fine-tune with 1LoRA, merge, export and check, on handwritten digits",
        description="Pretrain a small ViT on handwritten digits, fine-tune it to a shifted domain with 1LoRA, "
        "head-only and full fine-tuning, then merge, export to .pt2, reload and check.",
    )
    d.add_argument("--quick", action="store_true", help="a shortened run (for tests)")
    d.add_argument("--out", default="onelora_demo", help="folder for the exported program and adapter (default: %(default)s)")
    d.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default: %(default)s; the model is tiny, and a shared machine makes more threads slower)")
    d.set_defaults(run=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # transformers imports torchao when it is installed (the `quant` extra), and torchao logs a
    # WARNING for each CUDA kernel library a CPU build cannot load, torch one per torchao enum:
    # noise on a CPU machine; this command is an application, so it quiets those two loggers.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"onelora-fx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
