"""A servable run by LiteRT (TFLite with XNNPACK): a version's ``model.tflite``, served in place of its SavedModel under
``--prefer_tflite_model`` as TF Serving's TfLiteSession serves it.

Signatures, in this order:
1. the TF SignatureDefs stored in the file's ``signature_defs_metadata`` (``training_job/tflite_signatures.py``, what
   the training job writes; their tensor names may carry a ``:0`` suffix the file's tensors lack), the ones TF
   Serving reads (``servables/tensorflow/tflite_session.cc``);
2. else the file's own signatures (what today's converter writes), run through LiteRT's signature runners, as
   predict signatures. TF Serving ignores them and goes on to 3, which for a converted Keras model names the outputs
   after graph tensors (``StatefulPartitionedCall``) and keeps only one of them;
3. else one ``serving_default`` predict signature over the primary subgraph's inputs and outputs, named by their
   tensor names without the suffix, as TF Serving builds it.
Every call feeds the inputs as given: an input whose shape differs from the interpreter's is resized first (the
batch dimension, or any, rank included), as TF Serving does; one LiteRT cannot run at a shape other than the declared
one is INVALID_ARGUMENT, and an interpreter whose call failed is not used again. Interpreters are pools that grow
to one per model call running at once (so one per worker thread). A call that starts while another call of this
servable runs gets an interpreter with the intra-op threads one TensorFlow call gets (``configure_tensorflow_threads``:
its share of the cores); a call that starts alone gets one with every core this process may use, so a lone request
(low load, concurrency 1) is not held to one core's speed while the others idle. Both give the same outputs.

A batch the batch scheduler joined (``run_batch``: its rows are independent, the assumption batching joins requests
on) of two rows or more, or of one row while other rows run, is split instead into its rows, which the process's row
workers run: one thread per core (at most MAX_SPLIT_PARTS), each running one row at a time on an interpreter of its
share of the cores kept at one row, taking rows in the order they were handed over, from any batch of any servable.
A multi-thread XNNPACK call spends part of every operator synchronising its threads, and an interpreter resized to
each batch's size re-plans its operators at each new size; interpreters of fewer threads kept at one row spend less
on the first and nothing on the second, for the same outputs (bench/model_server_bench.py measures both). And with
more than one batch thread (``num_batch_threads``), the rows of the next batch wait in line while a batch runs, so
the cores do not idle while one batch's last rows end apart or while the batch scheduler hands the next batch over.
Only where the file declares every input and output of the signature batch-first (a first dimension of any size),
and not when the operator fixed the interpreters' threads.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from services.model_server.errors import DEFAULT_SIGNATURE, ServingError
from services.model_server.servable import Servable, SignatureInfo, _short, with_defaults
from training_job.tflite_signatures import TFLITE_FILE, read_signature_defs

log = logging.getLogger("model_server.tflite")
PREDICT_METHOD = "tensorflow/serving/predict"


# A float TFLite file served in place of its SavedModel must give, on the version's warm-up requests, float outputs
# within this absolute difference of the SavedModel's, the same argmax along the last axis (top-1) for float outputs of
# rank >= 2, and equal non-float outputs.
PARITY_ATOL = 1e-3
# A quantized file (one holding int8 tensors: the ``<model>_int8`` variant the training job publishes) computes
# other numbers by design, so it is held to a looser rule: over all the rows of the warm-up requests, the top-1 of its
# float outputs of rank >= 2 must agree with the SavedModel's on at least this fraction of rows, and string outputs
# must be equal; other outputs are not compared. This catches a wrong or broken file (another model's file agrees on
# about 1 / classes of the rows), not a loss of accuracy: the training job measures the int8 test accuracy at export
# (``metrics.json`` ``tflite.int8_test_accuracy``).
QUANTIZED_MIN_TOP1_AGREEMENT = 0.75


def parity_problem(lite: "TfLiteServable", saved_model: Servable,
                   requests: list[tuple[str, dict[str, np.ndarray]]]) -> str | None:
    """How ``lite`` disagrees with ``saved_model`` on ``requests`` (those of signatures both serve, on the outputs
    both give), by the rule for its kind of file; None when it agrees or nothing could be compared."""
    quantized = lite.quantized
    agreeing_rows, rows = 0, 0
    for signature, inputs in requests:
        name = signature or DEFAULT_SIGNATURE
        if name not in lite.signatures or name not in saved_model.signatures:
            continue
        wanted = tuple(sorted(set(lite.signatures[name].outputs) & set(saved_model.signatures[name].outputs)))
        if not wanted:
            continue
        expected = saved_model.run(name, inputs, wanted)
        answered = lite.run(name, inputs, wanted)
        for alias in wanted:
            a, b = np.asarray(expected[alias]), np.asarray(answered[alias])
            where = f"signature {name} output {alias}"
            if a.shape != b.shape:
                return f"{where}: shape {b.shape}, SavedModel {a.shape}"
            top1 = a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1]
            if quantized:
                if top1:
                    same = a.argmax(-1) == b.argmax(-1)
                    agreeing_rows, rows = agreeing_rows + int(same.sum()), rows + same.size
                elif a.dtype.kind in "OSU" and not np.array_equal(a, b):
                    return f"{where}: other values"
            elif a.dtype.kind == "f":
                worst = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
                if not worst <= PARITY_ATOL:
                    return f"{where}: differs by up to {worst:.3g} > {PARITY_ATOL}"
                if top1 and not np.array_equal(a.argmax(-1), b.argmax(-1)):
                    return f"{where}: another top-1"
            elif not np.array_equal(a, b):
                return f"{where}: other values"
    if quantized and rows and agreeing_rows < QUANTIZED_MIN_TOP1_AGREEMENT * rows:
        return (f"quantized file: top-1 agrees on {agreeing_rows} of {rows} warm-up rows, fewer than "
                f"{QUANTIZED_MIN_TOP1_AGREEMENT:.0%}")
    return None


def has_tflite_model(version_dir: Path) -> bool:
    return (Path(version_dir) / TFLITE_FILE).is_file()


def _legacy_name(tensor_name: str) -> str:
    """TF tensor names end in ':0'; early TFLite converters dropped the suffix."""
    return tensor_name.split(":", 1)[0]


def _tensor_index(tensor_name: str, by_name: dict[str, int], what: str) -> int:
    for name in (tensor_name, _legacy_name(tensor_name)):
        if name in by_name:
            return by_name[name]
    raise ValueError(f"Signature {what} references an unknown tensor '{tensor_name}'")


def _tensor_info(detail: dict, shape_key: str = "shape") -> meta_graph_pb2.TensorInfo:
    info = meta_graph_pb2.TensorInfo(name=detail["name"], dtype=tf.as_dtype(detail["dtype"]).as_datatype_enum)
    for size in detail[shape_key]:
        info.tensor_shape.dim.add(size=int(size))
    return info


def native_signature_defs(interpreter) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The file's own signatures (LiteRT's signature runners) as predict SignatureDefs; dims unknown until a call
    are -1."""
    signature_defs = {}
    for key in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(key)
        signature_def = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
        for alias, detail in runner.get_input_details().items():
            signature_def.inputs[alias].CopyFrom(_tensor_info(detail, "shape_signature"))
        for alias, detail in runner.get_output_details().items():
            signature_def.outputs[alias].CopyFrom(_tensor_info(detail, "shape_signature"))
        signature_defs[key] = signature_def
    return signature_defs


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Rows of split batches run on at most this many threads, whatever the cores: each thread holds its own interpreter
# (its own copy of the model's packed weights) of every version it has run.
MAX_SPLIT_PARTS = 4


class _SplitBatch:
    """The rows of one batch handed to the row workers: each row's outputs, or the errors of the rows that failed."""

    def __init__(self, servable: "TfLiteServable", info: SignatureInfo, values: dict[str, np.ndarray],
                 wanted: list[str], rows: int):
        self.servable, self.info, self.values, self.wanted = servable, info, values, wanted
        self.answers: list[dict[str, np.ndarray] | None] = [None] * rows
        self.errors: dict[int, BaseException] = {}
        self._left = rows
        self._left_lock = threading.Lock()
        self.answered = threading.Event()  # set once every row has run or been skipped

    def run_row(self, row: int) -> None:
        """Runs row ``row`` unless another row of the batch failed already (its caller gets that error, and the batch
        scheduler runs a batch failed by a request's input again task by task)."""
        try:
            if not self.errors:
                self.answers[row] = self.servable._run_row(
                    self.info, {alias: value[row:row + 1] for alias, value in self.values.items()}, self.wanted)
        except BaseException as exc:  # noqa: BLE001 - the caller re-raises it
            self.errors[row] = exc
        finally:
            with self._left_lock:
                self._left -= 1
                if not self._left:
                    self.answered.set()


class RowWorkers:
    """Threads that run the rows of split batches of every servable, one row at a time each, in the order the rows
    were handed over: a batch's rows queue behind earlier batches' rows, and a thread that ends its share of one
    batch goes on with the next batch's rows, so the cores do not idle while one batch's last rows end apart or
    while the batch scheduler hands the next batch over. The threads never end: ``run_row`` keeps every failure of a
    row with its batch."""

    def __init__(self, threads: int):
        self._rows: queue.SimpleQueue[tuple[_SplitBatch, int]] = queue.SimpleQueue()
        self._pending_lock = threading.Lock()
        self._pending = 0  # rows handed over and not yet run
        for k in range(threads):
            threading.Thread(target=self._serve, name=f"tflite-rows-{k}", daemon=True).start()

    def busy(self) -> bool:
        return self._pending > 0

    def run(self, batch: _SplitBatch) -> None:
        """Hands ``batch``'s rows over and waits until each has run (or been skipped after another failed)."""
        rows = len(batch.answers)
        with self._pending_lock:
            self._pending += rows
        for row in range(rows):
            self._rows.put((batch, row))
        batch.answered.wait()

    def _serve(self) -> None:
        while True:
            batch, row = self._rows.get()
            try:
                batch.run_row(row)
            finally:
                with self._pending_lock:
                    self._pending -= 1


_row_workers: RowWorkers | None = None
_row_workers_lock = threading.Lock()


def row_workers() -> RowWorkers:
    """The process's row workers, one per core (at most MAX_SPLIT_PARTS), started on first use."""
    global _row_workers
    with _row_workers_lock:
        if _row_workers is None:
            _row_workers = RowWorkers(min(usable_cores(), MAX_SPLIT_PARTS))
        return _row_workers


def _batch_first(details: list[dict]) -> bool:
    """Whether every tensor of ``details`` declares a first dimension of any size (a batch)."""
    return all(len(d["shape_signature"]) >= 1 and d["shape_signature"][0] == -1 for d in details)


@dataclass
class _Instance:
    """One interpreter of a pool, its intra-op threads, and the signature runners made for it so far."""
    interpreter: object
    threads: int
    runners: dict = field(default_factory=dict)

    def runner(self, key: str):
        if key not in self.runners:
            self.runners[key] = self.interpreter.get_signature_runner(key)
        return self.runners[key]


class TfLiteServable(Servable):
    engine = TFLITE_FILE

    def __init__(self, model_name: str, version: int, path: Path, threads: int = 0, lone_call_threads: int = 0):
        """``threads``: the interpreters' of calls that run beside another; 0 = TensorFlow's intra-op setting, or
        every core when that is 0. ``lone_call_threads``: the interpreters' of calls that start alone; 0 = every core
        this process may use (never fewer than ``threads``)."""
        self.model_name, self.version, self.path = model_name, version, Path(path)
        self._content = (self.path / TFLITE_FILE).read_bytes()
        self._threads = threads or tf.config.threading.get_intra_op_parallelism_threads() or usable_cores()
        self._lone_call_threads = max(self._threads, lone_call_threads or usable_cores())
        self._running_lock = threading.Lock()
        self._running = 0  # model calls of this servable running now
        first = self._new_instance(self._threads)
        probe = first.interpreter
        input_details, output_details = probe.get_input_details(), probe.get_output_details()
        tensor_details = probe.get_tensor_details()
        # int8 tensors with quantization scales: the file is quantized (parity_problem's looser rule)
        self.quantized = any(d["dtype"] == np.int8 and len(d["quantization_parameters"]["scales"])
                             for d in tensor_details)
        # Batches are split into rows unless an operator fixed the interpreters' threads
        self._split_parts = min(usable_cores(), MAX_SPLIT_PARTS) if not threads else 1
        self._part_threads = max(1, usable_cores() // self._split_parts)  # each row worker's interpreter's
        self._idle: dict[int, queue.SimpleQueue[_Instance]] = {
            count: queue.SimpleQueue() for count in {self._threads, self._lone_call_threads, self._part_threads}}
        self._idle[self._threads].put(first)
        inputs = {d["name"]: d["index"] for d in input_details}
        outputs = {d["name"]: d["index"] for d in output_details}

        self.signature_defs = read_signature_defs(self._content)
        self._native: set[str] = set()
        if not self.signature_defs:
            self.signature_defs = native_signature_defs(probe)
            self._native = set(self.signature_defs)
        if not self.signature_defs:
            log.warning("%s version %d: no SignatureDef in %s, serving its tensors as serving_default", model_name,
                        version, TFLITE_FILE)
            default = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
            for detail in input_details:
                default.inputs[_legacy_name(detail["name"])].CopyFrom(_tensor_info(detail))
            for detail in output_details:
                default.outputs[_legacy_name(detail["name"])].CopyFrom(_tensor_info(detail))
            self.signature_defs = {DEFAULT_SIGNATURE: default}
        self._input_index: dict[str, dict[str, int]] = {}
        self._output_index: dict[str, dict[str, int]] = {}
        self.signatures = {}
        for name, signature_def in self.signature_defs.items():
            if name not in self._native:
                self._input_index[name] = {alias: _tensor_index(info.name, inputs, f"input {alias}")
                                           for alias, info in signature_def.inputs.items()}
                self._output_index[name] = {alias: _tensor_index(info.name, outputs, f"output {alias}")
                                            for alias, info in signature_def.outputs.items()}
            self.signatures[name] = SignatureInfo(
                name, signature_def.method_name,
                {alias: tf.as_dtype(info.dtype) for alias, info in signature_def.inputs.items()},
                sorted(signature_def.outputs))  # no shapes: inputs of any rank are resized to, as TF Serving does
        self._batch_first = {name for name in self.signature_defs
                             if self._declares_batch_first(first, name, tensor_details)}

    def _declares_batch_first(self, instance: _Instance, name: str, tensor_details: list[dict]) -> bool:
        """Whether the file declares every input and output of signature ``name`` batch-first (``tensor_details``:
        the interpreter's, for the primary subgraph's)."""
        if name in self._native:
            runner = instance.runner(name)
            return _batch_first(list(runner.get_input_details().values())) and \
                _batch_first(list(runner.get_output_details().values()))
        tensors = {d["index"]: d for d in tensor_details}
        return _batch_first([tensors[i] for i in (*self._input_index[name].values(),
                                                  *self._output_index[name].values())])

    def _new_instance(self, threads: int) -> _Instance:
        from ai_edge_litert.interpreter import Interpreter

        # The default op resolver applies the XNNPACK delegate to the float ops it supports.
        interpreter = Interpreter(model_content=self._content, num_threads=threads)
        interpreter.allocate_tensors()
        return _Instance(interpreter, threads)

    def threads_for_call(self, calls_running: int) -> int:
        """The intra-op threads of a call that starts while ``calls_running`` others run."""
        return self._lone_call_threads if calls_running == 0 else self._threads

    def _acquire(self) -> _Instance:
        """An idle interpreter with the threads this call gets, or a new one when every such one is busy."""
        with self._running_lock:
            threads = self.threads_for_call(self._running)
            self._running += 1
        try:
            return self._idle_or_new(threads)
        except BaseException:
            with self._running_lock:
                self._running -= 1
            raise

    def _idle_or_new(self, threads: int) -> _Instance:
        """An idle interpreter of ``threads`` intra-op threads, or a new one when every such one is busy."""
        try:
            return self._idle[threads].get_nowait()
        except queue.Empty:
            return self._new_instance(threads)

    def _release(self, instance: _Instance, reuse: bool = True) -> None:
        """Ends a call on ``instance``; an interpreter whose call failed is not reused (LiteRT keeps the error's
        text, and each later error adds to it) and the next call that finds none idle makes another."""
        if reuse:
            self._idle[instance.threads].put(instance)
        with self._running_lock:
            self._running -= 1

    def _run_row(self, info: SignatureInfo, values: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        """One row of a split batch, on an idle (or new) interpreter of the row workers' threads; RowWorkers calls it.
        As in ``_release``, an interpreter whose call failed is not reused."""
        instance = self._idle_or_new(self._part_threads)
        outputs = self._invoke(instance, info, values, wanted)
        self._idle[instance.threads].put(instance)
        return outputs

    @staticmethod
    def _values(info: SignatureInfo, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {alias: np.asarray(value, dtype=object if info.inputs[alias] == tf.string
                                  else info.inputs[alias].as_numpy_dtype) for alias, value in inputs.items()}

    def _call(self, info: SignatureInfo, inputs: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        values = self._values(info, inputs)
        instance = self._acquire()
        succeeded = False
        try:
            outputs = self._invoke(instance, info, values, wanted)
            succeeded = True
        finally:
            self._release(instance, reuse=succeeded)
        return _as_served(outputs, wanted)

    def run_batch(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()) -> dict[str, np.ndarray]:
        """Servable.run_batch: a batch of two rows or more, or of one row while the row workers are busy, is split
        into its rows and run by the row workers (the module's docstring says when and why); otherwise run as ``run``
        runs it."""
        info = self.check_request(signature_name, inputs, output_filter)
        values = self._values(info, with_defaults(self.signature_defs.get(info.name), inputs))
        wanted = list(output_filter) or info.outputs
        rows = {np.shape(value)[0] if np.ndim(value) else 0 for value in values.values()}
        count = rows.pop() if len(rows) == 1 else 0
        workers = row_workers() if self._split_parts > 1 and info.name in self._batch_first and count else None
        if workers is None or (count == 1 and not workers.busy()):
            return self._call(info, values, wanted)
        batch = _SplitBatch(self, info, values, wanted, count)
        with self._running_lock:
            self._running += 1
        try:
            workers.run(batch)
        finally:
            with self._running_lock:
                self._running -= 1
        if batch.errors:
            raise batch.errors[min(batch.errors)]
        return _as_served({alias: np.concatenate([row[alias] for row in batch.answers]) for alias in wanted}, wanted)

    def _invoke(self, instance: _Instance, info: SignatureInfo, values: dict[str, np.ndarray],
                wanted: list[str]) -> dict[str, np.ndarray]:
        """One call of signature ``info`` on ``instance``; LiteRT's errors as ServingErrors."""
        try:
            if info.name in self._native:
                return instance.runner(info.name)(**values)  # resizes its inputs to the values' shapes
            return self._run_primary(instance.interpreter, info.name, values, wanted)
        except ValueError as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, _short(exc)) from None
        except RuntimeError as exc:
            mismatched = _shape_unlike_declared(self.signature_defs[info.name], values)
            if mismatched:  # a shape the file does not declare is what LiteRT could not run: the request's
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"{mismatched}; LiteRT cannot run it: {_short(exc)}") from None
            raise ServingError(grpc.StatusCode.INTERNAL, f"TFLite: {_short(exc)}") from None

    def _run_primary(self, interpreter, name: str, values: dict[str, np.ndarray],
                     wanted: list[str]) -> dict[str, np.ndarray]:
        """Feed and fetch the primary subgraph's tensors a SignatureDef names (as TF Serving's TfLiteSession)."""
        input_index, output_index = self._input_index[name], self._output_index[name]
        shapes = {d["index"]: tuple(d["shape"]) for d in interpreter.get_input_details()}
        resized = False
        for alias, value in values.items():
            if shapes[input_index[alias]] != value.shape:
                interpreter.resize_tensor_input(input_index[alias], value.shape)
                resized = True
        if resized:
            interpreter.allocate_tensors()
        for alias, value in values.items():
            interpreter.set_tensor(input_index[alias], value)
        interpreter.invoke()
        return {alias: interpreter.get_tensor(output_index[alias]) for alias in wanted}


def _as_served(outputs: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
    """The ``wanted`` outputs as the other engines give them: strings as Python objects."""
    return {alias: outputs[alias].astype(object) if outputs[alias].dtype.kind == "S" else outputs[alias]
            for alias in wanted}


def _shape_unlike_declared(signature_def: meta_graph_pb2.SignatureDef, values: dict[str, np.ndarray]) -> str:
    """Which input has another shape than its signature declares (-1: any size), so that the interpreter was resized
    to run it, or ''."""
    for alias, value in values.items():
        shape = signature_def.inputs[alias].tensor_shape
        declared = [d.size for d in shape.dim]
        if not shape.unknown_rank and (len(declared) != value.ndim
                                       or any(d not in (-1, size) for d, size in zip(declared, value.shape))):
            return f"input {alias!r} has shape {list(value.shape)}, the signature declares {declared}"
    return ""


class TfLiteWithSavedModel(Servable):
    """A version served from its ``model.tflite`` that keeps serving, from its SavedModel, the signatures the file
    lacks (the training job's file holds ``serving_default`` only: TFLite has no DecodeJpeg for
    ``predict_image_bytes`` and no gradients for the Grad-CAM ``explain`` signatures). One servable presenting the
    union: each signature the file has runs on LiteRT (its SignatureDef is the file's), every other one on the
    SavedModel; both stay resident. The checks of ``Servable.run`` are made once, against the engine's own
    SignatureDef. TF Serving under ``--prefer_tflite_model`` serves only what the file holds."""

    engine = TFLITE_FILE  # the file's signatures'; engine_of names each signature's engine

    def __init__(self, lite: TfLiteServable, saved_model: Servable):
        self.model_name, self.version, self.path = lite.model_name, lite.version, lite.path
        self.lite, self.saved_model = lite, saved_model
        self._engine_by_signature: dict[str, Servable] = {
            **{name: saved_model for name in saved_model.signatures}, **{name: lite for name in lite.signatures}}
        self.signature_defs = {name: engine.signature_defs[name] for name, engine in self._engine_by_signature.items()
                               if name in engine.signature_defs}
        self.signatures = {name: engine.signatures[name] for name, engine in self._engine_by_signature.items()}
        lacking = sorted(set(saved_model.signatures) - set(lite.signatures))
        self.load_note = (f"{', '.join(sorted(lite.signatures))} from {TFLITE_FILE}; {', '.join(lacking)} from the "
                          f"SavedModel ({TFLITE_FILE} lacks them)")

    def engine_of(self, signature_name: str) -> str:
        return self._engine_by_signature[self.signature(signature_name).name].engine

    def _call(self, info: SignatureInfo, inputs: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        return self._engine_by_signature[info.name]._call(info, inputs, wanted)

    def run_batch(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()) -> dict[str, np.ndarray]:
        return self._engine_by_signature[self.signature(signature_name).name].run_batch(signature_name, inputs,
                                                                                        output_filter)
