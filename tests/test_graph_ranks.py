"""graph_ranks.GraphRanks on a frozen TF1 graph (weights as constants, as `freeze_graph` leaves them): TensorFlow's
shape inference says which ranks its ops take, without the weights' values and without running a kernel."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from services.model_server import graph_ranks
from services.model_server.graph_ranks import GraphRanks


def frozen_conv_graph() -> tf.compat.v1.GraphDef:
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, None, name="images")
        kernel = tf.constant(np.ones((3, 3, 3, 64), np.float32), name="kernel")  # 6,912 bytes of weights
        features = tf.nn.conv2d(images, kernel, 1, "SAME")
        tf.reshape(tf.reduce_mean(features, axis=[1, 2]), [-1, 8, 8], name="scores")  # needs the small constant
    return graph.as_graph_def()


def test_ranks_the_graph_cannot_take_are_refused_with_the_op_that_refuses_them():
    ranks = GraphRanks(frozen_conv_graph(), {"serving_default": {"images": ("images:0", tf.float32)}})
    assert ranks.refusal("serving_default", {"images": 4}) is None
    refusal = ranks.refusal("serving_default", {"images": 2})
    assert refusal.startswith("Shape must be rank 4 but is rank 2 for node Conv2D (Conv2D)"), refusal
    assert "[3,3,3,64]" in refusal  # the weights' shape survives their values


def test_the_weights_are_not_copied_and_answers_are_kept_boundedly(monkeypatch):
    ranks = GraphRanks(frozen_conv_graph(), {"serving_default": {"images": ("images:0", tf.float32)}})
    kept = {node.name: node.op for node in ranks._graph_def.node}
    assert kept["kernel"] == "Placeholder" and kept["scores/shape"] == "Const"
    monkeypatch.setattr(graph_ranks, "CACHED_ANSWERS", 3)
    inferred = []
    monkeypatch.setattr(ranks, "_infer", lambda signature, given: inferred.append(given["images"]))
    for rank in (0, 1, 2, 3, 1, 0):
        ranks.refusal("serving_default", {"images": rank})
    assert inferred == [0, 1, 2, 3, 0]  # 0 was dropped when 3 came; 1, asked again, was kept
