"""A servable: one loaded version of a SavedModel, its signatures, and how to run them on numpy arrays."""
from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from services.model_server.errors import DEFAULT_SIGNATURE, ServingError, invalid, signature_not_found
from services.model_server.graph_ranks import GraphRanks
from services.model_server.loader import LoadOptions

log = logging.getLogger("model_server.servable")
# The input names a refusal quotes of a request that names more than ten beyond its signature's
LISTED_INPUT_NAMES = 10


def dtype_name(dtype: tf.dtypes.DType) -> str:
    """TensorFlow's DataTypeString of ``dtype``: "float", "uint8", "string" (json_tensor.py's dtypes)."""
    return types_pb2.DataType.Name(dtype.as_datatype_enum)[len("DT_"):].lower()


@dataclass(frozen=True)
class SignatureInfo:
    name: str
    method_name: str
    inputs: dict[str, tf.dtypes.DType]
    outputs: list[str]
    # The shape each input is declared with (-1: any size), for the inputs whose rank requests are held to.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class Servable:
    """One loaded version: its SignatureDefs (for metadata), its signatures, and how to run them on numpy arrays.
    Subclasses load the model and call it (``_call``); checking names against the signature is shared."""

    model_name: str
    version: int
    path: Path
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]
    signatures: dict[str, SignatureInfo]
    load_note: str = ""  # why it is served the way it is, when that needs saying (GetModelStatus shows it)
    engine: str = "SavedModel"  # what runs its signatures: "SavedModel", or the TFLite file's name

    def signature(self, name: str) -> SignatureInfo:
        name = name or DEFAULT_SIGNATURE
        try:
            return self.signatures[name]
        except KeyError:
            raise signature_not_found(name) from None

    def engine_of(self, signature_name: str) -> str:
        """What runs the signature (an engine that serves some signatures from another engine overrides this)."""
        self.signature(signature_name)
        return self.engine

    def check_request(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()) -> SignatureInfo:
        """The signature a request names, once its input names (with the SignatureDef's defaults for those it leaves
        out), the ranks of its inputs (where the signature declares them: ``SignatureInfo.shapes``) and its output
        filter are checked against it; INVALID_ARGUMENT otherwise. ``run`` checks this before any model call, the
        batch scheduler before queueing a request.

        Only the rank is checked, not the sizes: TF Serving feeds inputs as given, and a convolutional model answers
        photos of other sizes than it declares. Fed an input of another rank, TensorFlow's oneDNN kernels abort the
        whole process on some (a CHECK failure in a convolution fed a matrix) instead of returning an error, so TF2
        SavedModels declare their inputs' shapes here, and a TF1 graph is asked which ranks it takes
        (graph_ranks.py); LiteRT returns an error instead, and TF Serving's TFLite engine resizes inputs to any
        rank, so a TFLite file declares none."""
        info = self.check_input_names(signature_name, inputs)
        refusal = self._rank_refusal(info, inputs)
        if refusal:
            raise invalid(refusal)
        seen = set()
        for alias in output_filter:  # as TF Serving's predict_util.cc checks them
            if alias not in info.outputs:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                                   f"the set {{{','.join(sorted(info.outputs))}}}.")
            if alias in seen:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return info

    def check_input_names(self, signature_name: str, names: Collection[str]) -> SignatureInfo:
        """The signature a request names, once its input ``names`` (with the SignatureDef's defaults for those it
        leaves out) are the signature's; INVALID_ARGUMENT otherwise. More names than the signature takes are refused
        without reading them, and the refusal lists a few of them: a request may carry hundreds of thousands."""
        info = self.signature(signature_name)
        signature_def = self.signature_defs.get(info.name)
        defaults = set(signature_def.defaults) if signature_def is not None else set()
        if len(names) <= len(info.inputs) and set(names) | defaults == set(info.inputs):
            return info
        if len(names) > len(info.inputs) + LISTED_INPUT_NAMES:
            got = (f"{len(names)} names, among them "
                   f"{', '.join(repr(name) for name in itertools.islice(names, LISTED_INPUT_NAMES))}")
        else:
            got = str(sorted(set(names) | defaults))
        raise invalid(f"input names do not match signature {info.name!r}: expected {sorted(info.inputs)}, got {got}")

    def _rank_refusal(self, info: SignatureInfo, inputs: dict[str, np.ndarray]) -> str | None:
        """Why the inputs' ranks cannot be fed (None when they can): here, held to ``info.shapes``."""
        for alias, value in inputs.items():
            declared = info.shapes.get(alias)
            if declared is not None and np.ndim(value) != len(declared):
                return (f"input {alias!r} of signature {info.name!r} has shape {list(np.shape(value))}, of rank "
                        f"{np.ndim(value)}; the signature takes rank {len(declared)}: {list(declared)} (-1: any size)")
        return None

    def run(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()) -> dict[str, np.ndarray]:
        info = self.check_request(signature_name, inputs, output_filter)
        inputs = with_defaults(self.signature_defs.get(info.name), inputs)
        return self._call(info, inputs, list(output_filter) or info.outputs)

    def run_batch(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()) -> dict[str, np.ndarray]:
        """A call of the batch scheduler, whose rows are independent (batching joins requests on that assumption):
        ``run``, unless an engine has a better way to run independent rows (tflite_servable.TfLiteServable)."""
        return self.run(signature_name, inputs, output_filter)

    def _call(self, info: SignatureInfo, inputs: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def with_defaults(signature_def: meta_graph_pb2.SignatureDef | None, inputs: dict[str, np.ndarray]) -> dict:
    """``inputs`` plus the SignatureDef's ``defaults`` for the inputs it leaves out, as TF Serving fills them in."""
    if signature_def is None or not signature_def.defaults:
        return inputs
    return {**{k: tf.make_ndarray(v) for k, v in signature_def.defaults.items() if k not in inputs}, **inputs}


def _short(exc: Exception) -> str:
    """One line saying what went wrong. An error a TF2 function raises reads "Graph execution error:", where it was
    detected, a stack, then the op's own message and the node it ran in: this is that message and node."""
    text = (getattr(exc, "message", None) or str(exc)).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    if lines[0] == "Graph execution error:":
        node_line = next((i for i, line in enumerate(lines) if line.startswith("\t [[")), None)
        if node_line:
            node = re.search(r"\{\{node ([^}]+)\}\}", lines[node_line])
            return f"{lines[node_line - 1].strip()}{f' (node {node.group(1)})' if node else ''}"[:500]
    return lines[0][:500]


class FunctionServable(Servable):
    """A TF2 SavedModel (one with an object graph): its signatures are concrete functions (tf.saved_model.load)."""

    def __init__(self, model_name: str, version: int, path: Path, meta_graph: meta_graph_pb2.MetaGraphDef,
                 tags: tuple[str, ...]):
        self.model_name, self.version, self.path = model_name, version, Path(path)
        self.signature_defs = _signature_defs(meta_graph)
        self._loaded = tf.saved_model.load(str(self.path), tags=list(tags))
        self._functions = dict(self._loaded.signatures)
        self.signatures = {name: self._describe(name, fn) for name, fn in self._functions.items()}

    def _describe(self, name: str, fn) -> SignatureInfo:
        specs = fn.structured_input_signature[1]
        method = self.signature_defs[name].method_name if name in self.signature_defs else ""
        shapes = {k: tuple(-1 if d is None else d for d in s.shape.as_list())
                  for k, s in specs.items() if s.shape.rank is not None}
        return SignatureInfo(name, method, {k: s.dtype for k, s in specs.items()}, sorted(fn.structured_outputs),
                             shapes)

    def _call(self, info: SignatureInfo, inputs: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        try:
            tensors = {k: tf.convert_to_tensor(v, dtype=info.inputs[k]) for k, v in inputs.items()}
            outputs = self._functions[info.name](**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, _short(exc)) from None
        return {k: outputs[k].numpy() for k in wanted}


class SessionServable(Servable):
    """A TF1 SavedModel (no object graph), run as TF Serving runs every SavedModel: a Session on its MetaGraph,
    feeding and fetching the tensors its SignatureDefs name. Inputs are fed as given: neither the SignatureDef's
    shapes nor the placeholders' are checked first (TF2's loader refuses signatures whose shapes disagree with the
    graph, such as TF Serving's saved_model_half_plus_three, which TF Serving serves); only ranks the graph's own
    ops cannot take are refused (graph_ranks.py)."""

    def __init__(self, model_name: str, version: int, path: Path, tags: tuple[str, ...]):
        self.model_name, self.version, self.path = model_name, version, Path(path)
        self._graph = tf.Graph()
        threads = tf.config.threading  # the same thread counts as the TF2 runtime (configure_tensorflow_threads)
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads.get_intra_op_parallelism_threads(),
                                          inter_op_parallelism_threads=threads.get_inter_op_parallelism_threads())
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)
        with self._graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self._session, list(tags), str(self.path))
        self.signature_defs = _signature_defs(meta_graph)
        self._ranks = GraphRanks(meta_graph.graph_def, {
            name: {k: (v.name, tf.as_dtype(v.dtype)) for k, v in sig.inputs.items()}
            for name, sig in self.signature_defs.items()})
        self.signatures = {}
        self._feeds: dict[str, dict[str, tf.Tensor]] = {}
        self._fetches: dict[str, dict[str, tf.Tensor]] = {}
        for name, sig in self.signature_defs.items():
            self._feeds[name] = {k: self._graph.get_tensor_by_name(v.name) for k, v in sig.inputs.items()}
            self._fetches[name] = {k: self._graph.get_tensor_by_name(v.name) for k, v in sig.outputs.items()}
            self.signatures[name] = SignatureInfo(name, sig.method_name,
                                                  {k: tf.as_dtype(v.dtype) for k, v in sig.inputs.items()},
                                                  sorted(sig.outputs))

    def _rank_refusal(self, info: SignatureInfo, inputs: dict[str, np.ndarray]) -> str | None:
        defaults = self.signature_defs[info.name].defaults
        ranks = {**{k: len(v.tensor_shape.dim) for k, v in defaults.items()},
                 **{k: np.ndim(v) for k, v in inputs.items()}}
        refusal = self._ranks.refusal(info.name, ranks)
        if refusal is None:
            return None
        given = ", ".join(f"{k!r} of shape {list(np.shape(v))}" for k, v in sorted(inputs.items()))
        noun = "input" if len(inputs) == 1 else "inputs"
        return f"{noun} {given} of signature {info.name!r} cannot be fed to its graph: {refusal}"

    def _call(self, info: SignatureInfo, inputs: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        feeds, fetches = self._feeds[info.name], self._fetches[info.name]
        try:
            feed_dict = {feeds[k]._as_tf_output(): np.asarray(v, dtype=info.inputs[k].as_numpy_dtype)
                         for k, v in inputs.items()}
            # Session.run would first check each value against the placeholder's static shape; TF Serving's
            # Session::Run does not, so this calls the step Session.run ends in (pinned TensorFlow version).
            values = self._session._call_tf_sessionrun(None, feed_dict, [fetches[k]._as_tf_output() for k in wanted],
                                                       [], None)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, _short(exc)) from None
        return dict(zip(wanted, values))


def _signature_defs(meta_graph: meta_graph_pb2.MetaGraphDef) -> dict[str, meta_graph_pb2.SignatureDef]:
    return {k: v for k, v in meta_graph.signature_def.items() if k != "__saved_model_init_op"}


def _meta_graph(path: Path, tags: tuple[str, ...]) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef whose tag set is exactly ``tags`` (TensorFlow's FindMetaGraphDef)."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == set(tags):
            return meta_graph
    raise RuntimeError(f"Could not find meta graph def matching supplied tags: {{ {' '.join(sorted(tags))} }}. "
                       "To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
                       "`saved_model_cli`")


def saved_model_signature_defs(path: Path, tags: tuple[str, ...] = ("serve",)
                               ) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The signatures a SavedModel folder serves (those of its MetaGraphDef tagged ``tags``), read without loading
    it."""
    return _signature_defs(_meta_graph(Path(path), tags))


def open_saved_model(model_name: str, version: int, path: Path, tags: tuple[str, ...] = ("serve",)) -> Servable:
    """The servable for a SavedModel folder: TF2 exports through their functions, TF1 exports through a Session."""
    path = Path(path)
    meta_graph = _meta_graph(path, tags)
    if meta_graph.object_graph_def.nodes:
        return FunctionServable(model_name, version, path, meta_graph, tags)
    return SessionServable(model_name, version, path, tags)


def load_servable(model_name: str, version: int, path: Path,
                  options: LoadOptions = LoadOptions()) -> tuple[Servable, float]:
    from services.model_server import warmup  # imports inference, which imports this module
    from services.model_server.tflite_servable import (
        TFLITE_FILE, TfLiteServable, TfLiteWithSavedModel, has_tflite_model, parity_problem,
    )

    start = time.perf_counter()
    if options.prefer_tflite_model and has_tflite_model(path):
        fixed = options.intra_op_threads
        if not (Path(path) / "saved_model.pb").is_file():  # nothing to fall back on: the file serves or the load fails
            servable, source = TfLiteServable(model_name, version, path, fixed, lone_call_threads=fixed), TFLITE_FILE
        else:
            saved_model, problem = open_saved_model(model_name, version, path, options.tags), None
            try:
                servable = TfLiteServable(model_name, version, path, fixed, lone_call_threads=fixed)
                source = TFLITE_FILE
            except Exception as exc:  # noqa: BLE001 - whatever keeps LiteRT from reading the file
                problem = f"{TFLITE_FILE} cannot be opened ({_short(exc)})"
            if problem is None:
                try:
                    disagreement = parity_problem(servable, saved_model, warmup.predict_requests(path))
                except Exception as exc:  # noqa: BLE001 - the file fails where the SavedModel answers
                    problem = f"{TFLITE_FILE} fails on the warm-up requests ({_short(exc)})"
                else:
                    problem = disagreement and f"{TFLITE_FILE} disagrees with it ({disagreement})"
            if problem:
                servable, source = saved_model, "SavedModel"
                servable.load_note = f"serving the SavedModel: {problem}"
                log.warning("%s version %d: %s", model_name, version, servable.load_note)
            elif set(saved_model.signatures) - set(servable.signatures):
                servable = TfLiteWithSavedModel(servable, saved_model)  # keeps what the file lacks
                source = servable.load_note
    else:
        servable, source = open_saved_model(model_name, version, path, options.tags), "SavedModel"
    replayed = "no warm-up"
    if options.warmup:
        count = warmup.replay(servable, options.warmup_iterations)
        replayed = f"{count} warm-up records, each run {options.warmup_iterations} times"
    elapsed = time.perf_counter() - start
    log.info("loaded %s version %d from %s (%s) in %.2fs (%s)", model_name, version, path, source, elapsed,
             replayed)
    return servable, elapsed
