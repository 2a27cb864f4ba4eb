"""The one table of how values pass through ops, shared by every analysis.

Sites follow a weight through views, casts, transposes and row slices to the matrix
product that reads it; heads follow a projection's output to the model's output; norms
follow a LayerNorm's output to the linear that reads it; the weight accounting follows
every parameter to each op that reads it; the module form follows an adapted weight at
run time. Each asks a different question, but of the same ops, so the ops are named
once, here, by kind. Names match every spelling of an op (aten overloads, ``torch.*``
functions, ``Tensor`` methods and properties, ``operator``): see
:func:`onelora_fx.analysis.linear_ops.op_name`.
"""

from __future__ import annotations

__all__ = [
    "VIEWS", "CASTS", "COPIES", "TRANSPOSES", "SLICES", "SPLITS", "SHAPE_QUERIES", "DROPOUTS", "ACTIVATIONS",
    "ARITHMETIC", "LEADING_VIEWS", "carries_weight",
]

#: reshape the value without changing its elements or their order
VIEWS = frozenset({
    "view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "view_as",
    "reshape_as", "movedim", "alias", "lift_fresh_copy",
})
#: views that keep the last (feature) dimension as it is: rows stay rows
LEADING_VIEWS = frozenset({"view", "_unsafe_view", "reshape", "flatten", "squeeze", "unsqueeze", "expand", "alias"})
#: change the dtype (or device) only
CASTS = frozenset({"to", "_to_copy", "type", "float", "double", "half", "bfloat16"})
#: the same values in new memory, or without autograd history
COPIES = frozenset({"contiguous", "clone", "detach"})
#: swap the last two dimensions (``.T``, ``.mT``, ``numpy_T``, ...; the conjugating
#: ones are plain transposes on real weights)
TRANSPOSES = frozenset({
    "t", "transpose", "swapaxes", "swapdims", "permute", "T", "mT", "H", "mH", "numpy_T", "matrix_H", "adjoint",
})
#: a contiguous block of rows (or of another dimension): ``W[a:b]``, ``narrow``
SLICES = frozenset({"slice", "narrow", "getitem", "__getitem__", "select"})
#: several blocks at once, picked by ``getitem`` afterwards
SPLITS = frozenset({"split", "split_with_sizes", "chunk", "unbind", "tensor_split"})
#: read shapes, dtypes or check metadata: not a use of the values
SHAPE_QUERIES = frozenset({
    "sym_size", "size", "numel", "dim", "sym_numel", "sym_stride", "stride", "_assert_tensor_metadata",
    "sym_storage_offset", "_assert_scalar", "is_floating_point", "is_contiguous",
})
DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"})
ACTIVATIONS = frozenset({
    "relu", "gelu", "silu", "sigmoid", "tanh", "softmax", "_softmax", "log_softmax", "_log_softmax", "softplus", "elu",
    "leaky_relu", "hardtanh", "mish",
})
ARITHMETIC = frozenset({
    "add", "sub", "mul", "div", "true_divide", "truediv", "rsub", "__add__", "__radd__", "__sub__", "__rsub__",
    "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
})


def carries_weight(name: str) -> bool:
    """Does an op hand (part of) a weight on as a weight: a view, cast, copy,
    transpose, slice or split of it?"""
    return name in VIEWS or name in CASTS or name in COPIES or name in TRANSPOSES or name in SLICES or name in SPLITS \
        or name in {"index_select", "index"}
