"""Make a captured graph follow ``.train()`` / ``.eval()``.

A trace bakes the mode in: ``torch.export`` records ``aten.dropout(x, 0.1, True)``,
``aten.batch_norm(..., training=True, ...)``, Hugging Face attention passes
``dropout_p=0.1`` only in training, and ``symbolic_trace`` records ``F.dropout(...,
training=True)`` for functional calls. We capture in training mode and replace each
of these constants by one graph input, ``training = self._onelora_mode()``: a tiny
submodule returning its own ``training`` flag, which ``gm.train()`` / ``gm.eval()``
set like any other submodule's. (torchao's ``_replace_dropout`` does the same job by
re-tracing two patterns; one flag node is simpler and covers batch-norm statistics
and attention dropout too.)
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...analysis.linear_ops import argument
from .passes import GraphPass

__all__ = ["FollowTrainEval", "first_difference", "MODE_MODULE"]

MODE_MODULE = "_onelora_mode"

aten = torch.ops.aten

# target -> (position, keyword) of its bool "training" argument
_TRAIN_FLAGS = {
    aten.dropout.default: (2, "train"),
    aten.feature_dropout.default: (2, "train"),
    aten.alpha_dropout.default: (2, "train"),
    aten.feature_alpha_dropout.default: (2, "train"),
    F.dropout: (2, "training"),
    F.dropout1d: (2, "training"),
    F.dropout2d: (2, "training"),
    F.dropout3d: (2, "training"),
    F.alpha_dropout: (2, "training"),
    F.feature_alpha_dropout: (2, "training"),
    aten.batch_norm.default: (5, "training"),
    F.batch_norm: (5, "training"),
}
# target -> (position, keyword) of a dropout probability that only applies in training
_TRAIN_PROBS = {
    aten.scaled_dot_product_attention.default: (4, "dropout_p"),
    F.scaled_dot_product_attention: (4, "dropout_p"),
}
# batch norm's running-mean argument: without running stats it always normalizes by
# batch statistics, whatever the mode
_RUNNING_MEAN = {aten.batch_norm.default: (3, "running_mean"), F.batch_norm: (1, "running_mean")}


class _TrainingFlag(nn.Module):
    """Returns ``self.training``: the graph's view of ``gm.train()`` / ``gm.eval()``."""

    def forward(self) -> bool:
        return self.training


def _get(node: fx.Node, pos: int, kw: str, default=None):
    return argument(node.args, node.kwargs, pos, kw, default=default)


def _set(node: fx.Node, pos: int, kw: str, value) -> None:
    if kw in node.kwargs or len(node.args) <= pos:
        node.update_kwarg(kw, value)
    else:
        node.update_arg(pos, value)


class FollowTrainEval(GraphPass):
    """Route every training-only constant of the graph through one mode node that reads
    the module's ``_onelora_mode`` submodule (added when missing). Idempotent.

    Examples:
        >>> gm = torch.fx.symbolic_trace(Model())          # doctest: +SKIP
        >>> FollowTrainEval()(gm); gm.eval()              # doctest: +SKIP
    """

    def run(self, gm: fx.GraphModule, graph: fx.Graph) -> bool:
        targets = []
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _TRAIN_FLAGS:
                pos, kw = _TRAIN_FLAGS[node.target]
                if _get(node, pos, kw, False) is not True:
                    continue
                if node.target in _RUNNING_MEAN and _get(node, *_RUNNING_MEAN[node.target]) is None:
                    continue
                targets.append((node, pos, kw, None))
            elif node.target in _TRAIN_PROBS:
                pos, kw = _TRAIN_PROBS[node.target]
                p = _get(node, pos, kw, 0.0)
                if isinstance(p, float) and p > 0.0:
                    targets.append((node, pos, kw, p))
            elif node.target is aten.add_.Tensor and _counts_batches(node):
                targets.append((node, 1, "other", None))
        if not targets:
            return False
        if not hasattr(gm, MODE_MODULE):
            gm.add_submodule(MODE_MODULE, _TrainingFlag())
        flag = next((n for n in graph.nodes if n.op == "call_module" and n.target == MODE_MODULE), None)
        if flag is None:
            last_input = [n for n in graph.nodes if n.op == "placeholder"]
            anchor = last_input[-1] if last_input else next(iter(graph.nodes))
            with graph.inserting_after(anchor):
                flag = graph.call_module(MODE_MODULE)
        for node, pos, kw, prob in targets:
            if prob is None:
                _set(node, pos, kw, flag)
            else:
                with graph.inserting_before(node):
                    p_node = graph.call_function(operator.mul, (flag, prob))
                _set(node, pos, kw, p_node)
        return True


def _counts_batches(node: fx.Node) -> bool:
    """``num_batches_tracked += 1``: batch norm counts batches only in training."""
    buf = node.args[0] if node.args else None
    return (
        isinstance(buf, fx.Node)
        and buf.op == "get_attr"
        and str(buf.target).endswith("num_batches_tracked")
        and len(node.args) > 1
        and node.args[1] == 1
    )


_NO_OPS = {aten.contiguous.default, aten.alias.default}
# Dropout is the identity in eval mode, and eval-mode dropout returns its input object
# itself: some torch versions then trace later uses of that tensor through the dropout
# node (dropout(dropout(x)) where training has dropout(x) twice). Compared modulo
# dropout, both traces are the same computation.
_DROPOUTS = {t for t in _TRAIN_FLAGS if "dropout" in getattr(t, "__name__", str(t))}


def _mode_arg(node: fx.Node) -> Optional[tuple[int, str]]:
    if node.op != "call_function":
        return None
    return _TRAIN_FLAGS.get(node.target) or _TRAIN_PROBS.get(node.target)


def _fingerprint(graph: fx.Graph) -> list[tuple[fx.Node, Any]]:
    """Each node as (op, target, args) with node references as positions and the
    mode arguments blanked: equal fingerprints compute the same up to the mode."""
    index: dict[fx.Node, int] = {}
    out = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.add_.Tensor and _counts_batches(node):
            continue  # only the training trace counts batches: the mode node handles it
        if node.op == "call_function" and node.target in (_NO_OPS | _DROPOUTS) and isinstance(node.args[0], fx.Node):
            # export records .contiguous() only when the strides need it, and dropout
            # changes the strides attention returns; dropout itself: see _DROPOUTS
            index[node] = index.get(node.args[0], -1)
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        where = _mode_arg(node)
        if where is not None:  # present or defaulted, the mode argument is ignored
            pos, kw = where
            kwargs.pop(kw, None)
            del args[pos : pos + 1]
        ref = lambda n: ("node", index.get(n, -1))  # noqa: E731
        key = (node.op, node.target, fx.node.map_arg(tuple(args), ref), fx.node.map_arg(kwargs, ref))
        index[node] = len(out)
        out.append((node, key))
    return out


def first_difference(train: fx.Graph, eval_: fx.Graph) -> Optional[str]:
    """None if two traces of one model agree up to the mode; else the first node that
    differs, formatted for a message."""
    a, b = _fingerprint(train), _fingerprint(eval_)
    for (node_a, key_a), (node_b, key_b) in zip(a, b):
        if key_a != key_b:
            return f"{node_a.format_node()} in training, {node_b.format_node()} in eval"
    if len(a) != len(b):
        longer, name = (a, "training") if len(a) > len(b) else (b, "eval")
        return f"{longer[min(len(a), len(b))][0].format_node()} only in {name}"
    return None
