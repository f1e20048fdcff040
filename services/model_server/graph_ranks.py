"""Which input ranks a TF1 graph can be fed, asked of TensorFlow's shape functions before its kernels see them.

A TF1 SavedModel is fed as TF Serving feeds a Session: as given, whatever its placeholders or SignatureDef declare
(TF Serving's own test models rely on it: a vector fed where a [-1, 1] input is declared). But fed a tensor of a
rank it cannot take, one of TensorFlow's oneDNN kernels (a convolution fed a matrix) aborts the whole process with
a CHECK failure instead of returning an error. So before a Session runs, ``GraphRanks.refusal`` imports a copy of
the graph with each fed tensor replaced by a placeholder of the request's rank (sizes unknown) and lets TensorFlow's
shape inference say whether every op downstream takes it. The answer depends only on the signature and the ranks,
so it is kept (``CACHED_ANSWERS`` of them, the least recently asked dropped first); no kernel runs.

Shape inference sees only what the graph states: past an op whose output rank it cannot know (a py_func, a
reshape to a computed shape), a wrong rank is not caught here.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, graph_pb2

CACHED_ANSWERS = 256
# A constant larger than this reaches the copy as a placeholder of its dtype and shape: shape inference needs the
# values of small constants (a reshape's target shape, a reduction's axes), never those of weights.
_CONSTANT_VALUE_BYTES = 1024


def _shape_only(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """``graph_def`` with its large constants (weights frozen into the graph) turned into placeholders, and
    without the output shapes recorded at export (those of the ranks exported, which the import would enforce)."""
    copy = graph_pb2.GraphDef()
    copy.CopyFrom(graph_def)
    for node in copy.node:
        if "_output_shapes" in node.attr:
            del node.attr["_output_shapes"]
        if node.op == "Const" and node.attr["value"].tensor.ByteSize() > _CONSTANT_VALUE_BYTES:
            value = node.attr["value"].tensor
            dtype, shape = value.dtype, value.tensor_shape
            node.op = "Placeholder"
            node.attr.clear()
            node.attr["dtype"].CopyFrom(attr_value_pb2.AttrValue(type=dtype))
            node.attr["shape"].CopyFrom(attr_value_pb2.AttrValue(shape=shape))
    return copy


def _readable(message: str) -> str:
    """TensorFlow's shape error with the node written as its name, not as its whole definition."""
    message = re.sub(r"'\{\{node ([^}]+)\}\} = (\w+)\[[^']*'", r"node \1 (\2)", message.strip())
    return message.splitlines()[0][:500] if message else "its graph cannot take them"


class GraphRanks:
    """``refusal(signature, ranks)``: None when the graph takes inputs of those ranks, else TensorFlow's reason.
    ``feeds`` names, per signature, the tensor each input alias feeds and its dtype."""

    def __init__(self, graph_def: graph_pb2.GraphDef, feeds: dict[str, dict[str, tuple[str, tf.dtypes.DType]]]):
        self._graph_def = _shape_only(graph_def)
        self._feeds = feeds
        self._answers: OrderedDict[tuple, str | None] = OrderedDict()
        self._lock = threading.Lock()

    def refusal(self, signature: str, ranks: dict[str, int]) -> str | None:
        key = (signature, tuple(sorted(ranks.items())))
        with self._lock:  # one import per new key, however many requests ask at once
            if key in self._answers:
                self._answers.move_to_end(key)
                return self._answers[key]
            answer = self._infer(signature, ranks)
            self._answers[key] = answer
            if len(self._answers) > CACHED_ANSWERS:
                self._answers.popitem(last=False)
            return answer

    def _infer(self, signature: str, ranks: dict[str, int]) -> str | None:
        feeds = self._feeds[signature]
        with tf.Graph().as_default():
            with tf.name_scope("rank_probe"):
                input_map = {feeds[alias][0]: tf.compat.v1.placeholder(feeds[alias][1], [None] * rank)
                             for alias, rank in ranks.items() if alias in feeds}
            try:
                tf.compat.v1.import_graph_def(self._graph_def, input_map=input_map, name="")
            except ValueError as exc:
                return _readable(str(exc))
        return None
