"""The output head: found from the dataflow, not from names.

A linear call is a head when its value reaches a graph output through

* shape, cast, activation, dropout and copy ops (``view``, ``permute``, ``to``,
  ``softmax``, ``tanh``, ...),
* ops that pick elements of it (``index``, ``gather``: a decoder classifier's logits
  at each sequence's last token, ``score(h)[arange(B), last]``), and
* arithmetic with values that do not depend on the model's inputs (constants,
  parameters, buffers: Bart's ``lm_head(h) + final_logits_bias``, a logit scale,
  Gemma 2's soft-capping ``tanh(x / c) * c``) or that depend on them only through the
  value itself (CLIP's ``x / x.norm(dim=-1, keepdim=True)``).

``lm_head`` -> logits, a ViT ``classifier`` and ``LlamaForSequenceClassification``'s
``score`` are heads; the last block's ``down_proj`` is not (its output is added to the
residual stream, which depends on the inputs by another path), nor is any projection
followed by a norm or another linear.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from .linear_ops import op_name

__all__ = ["HeadRule"]

# Ops through which a projection's output still "is" the model output. Matched by name
# so aten, torch, F and Tensor-method spellings of the same op all count.
_PASS_THROUGH = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze",
    "unsqueeze", "flatten", "unflatten", "slice", "select", "narrow", "split",
    "split_with_sizes", "chunk", "unbind", "getitem", "alias", "detach", "contiguous",
    "clone", "to", "_to_copy", "type", "float", "double", "half", "bfloat16", "relu",
    "gelu", "silu", "sigmoid", "tanh", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "softplus", "elu", "leaky_relu", "hardtanh", "mish", "dropout",
    "feature_dropout", "lift_fresh_copy", "movedim", "swapaxes", "view_as", "reshape_as",
}
# Ops that pick elements of their first operand (a classifier of a decoder model reads
# the logits at each sequence's last token: ``logits[arange(B), last]``): the picked
# values are still the projection's, whatever computed the indices
_SELECT = {"index", "index_select", "gather", "take_along_dim", "__getitem__"}
_ARITHMETIC = {
    "add", "sub", "mul", "div", "true_divide", "truediv", "rsub", "__add__", "__radd__",
    "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
}
_PASS_THROUGH_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.ReLU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.Softplus, nn.ELU, nn.LeakyReLU,
)
_SHAPE_QUERIES = {"sym_size", "size", "numel", "dim", "sym_numel", "sym_stride", "stride", "_assert_tensor_metadata"}


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    return found


class HeadRule:
    """The head rule over one graph (input dependence is computed once).

    ``resolve(target)`` returns the module a ``call_module`` target names.
    """

    def __init__(self, graph: fx.Graph, resolve: Callable[[str], Any]):
        self.resolve = resolve
        self.from_inputs: set[fx.Node] = set()
        for node in graph.nodes:  # topological order: one pass
            if node.op == "placeholder" or any(a in self.from_inputs for a in _node_args(node)):
                self.from_inputs.add(node)

    def _only_through(self, value: fx.Node, cur: fx.Node) -> bool:
        """Does ``value`` depend on the model's inputs only by way of ``cur``?"""
        seen, todo = {cur}, [value]
        while todo:
            node = todo.pop()
            if node in seen or node not in self.from_inputs:
                continue
            if node.op == "placeholder":
                return False
            seen.add(node)
            todo.extend(_node_args(node))
        return True

    def _passes(self, user: fx.Node, cur: fx.Node) -> bool:
        if user.op == "call_module":
            return isinstance(self.resolve(str(user.target)), _PASS_THROUGH_MODULES)
        if user.op not in ("call_function", "call_method"):
            return False
        name = op_name(user.op, user.target)
        if name == "einsum":  # one operand: a permutation
            operands = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) else user.args[1:]
            return len(operands) == 1
        if name in _PASS_THROUGH:
            return True
        if name in _SELECT:
            return bool(user.args) and user.args[0] is cur
        if name in _ARITHMETIC:
            return all(self._only_through(a, cur) for a in _node_args(user) if a is not cur)
        return False

    def is_head(self, node: fx.Node) -> bool:
        """Does ``node``'s value reach the graph output through head-preserving ops?"""
        seen = {node}
        todo = [node]
        while todo:
            cur = todo.pop()
            for user in cur.users:
                if user in seen:
                    continue
                if user.op == "output":
                    return True
                if op_name(user.op, user.target) in _SHAPE_QUERIES:
                    continue
                if self._passes(user, cur):
                    seen.add(user)
                    todo.append(user)
        return False
