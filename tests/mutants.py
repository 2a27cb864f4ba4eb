"""Deliberate breakages of onelora_fx that the test suite must catch (``test_mutants.py``).

Each mutant is one textual change to one source file and the tests that must fail on it:
a suite that passes with a mutant applied has a test that cannot fail against that bug.
The list is small on purpose (a few minutes to run); add one when a bug slips through.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # the text replaced (it must occur in the file)
    new: str
    tests: tuple[str, ...]  # pytest arguments: at least one of these tests must fail


MUTANTS = (
    Mutant("transform refuses every pattern", "onelora_fx/transform.py",
           "    _check_model(model)\n    compile_pattern(pattern)",
           "    _check_model(model)\n    from .analysis.patterns import PatternError\n"
           "    raise PatternError('mutant: selects nothing. Available sites: none')",
           ("tests/test_handwritten.py::test_invariants",)),
    Mutant("load_adapter refuses every file", "onelora_fx/adapters/files.py",
           "    tensors, meta = read_adapter(path)\n    targets = _targets(module, index)",
           "    raise AdapterFileError(f'mutant: {path} refused')",
           ("tests/test_boundaries.py", "-k", "random_corruptions and 1lora")),
    Mutant("load_peft refuses every directory", "onelora_fx/adapters/peft.py",
           "    directory = Path(directory)\n    _, vectors, extras = read_peft(directory)",
           "    raise AdapterFileError(f'mutant: {directory} refused')",
           ("tests/test_boundaries.py", "-k", "random_corruptions and peft")),
    Mutant("merge skips a weight", "onelora_fx/deploy/merge.py",
           "    plans = form.plan(target, _groups(adapted_sites(target)))",
           "    plans = form.plan(target, _groups(adapted_sites(target)))[1:]",
           ("tests/test_deploy.py",)),
    Mutant("the term uses x.mean instead of x.sum", "onelora_fx/ops.py",
           "    s = x.sum(-1)\n    b = b.to(x.dtype)",
           "    s = x.mean(-1)\n    b = b.to(x.dtype)",
           ("tests/test_ops.py", "-k", "zero_b_is_bit_exact and cpu")),
    Mutant("adapter ids off by one", "onelora_fx/ops.py",
           "B.index_select(0, ids.clamp(min=0))",
           "B.index_select(0, (ids + 1).clamp(min=0, max=B.shape[0] - 1))",
           ("tests/test_stack.py",)),
    Mutant("bitsandbytes layers shared with the user's model", "onelora_fx/quant.py",
           "    for m in root.modules():\n        if not is_quantized_layer(m) or not isinstance",
           "    return\n    for m in root.modules():\n        if not is_quantized_layer(m) or not isinstance",
           ("tests/test_quantized.py", "-k", "untouched")),
)
