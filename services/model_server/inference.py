"""Classify, Regress and MultiInference: signatures run on tf.Example inputs, as TF Serving's classifier.cc,
regressor.cc and multi_inference.cc run them, shared by the gRPC and REST APIs.

A request's examples become one string tensor of serialized tf.Examples (with a context, each is the context's
bytes followed by the example's: protobuf merges them, the example's features winning). It is fed to the
signature's only input, which must be named ``inputs``; the outputs are read back as classes/scores or as one
regression value per example. TF Serving checks the signature's method_name only with
--enable_signature_method_name_check (off by default): a TF2 export's signatures all say
tensorflow/serving/predict, and are served by Classify and Regress when their inputs and outputs fit.
"""
from __future__ import annotations

import grpc
import numpy as np
from tensorflow_serving.apis import (
    classification_pb2, inference_pb2, input_pb2, model_pb2, regression_pb2,
)

from services.model_server.core import PredictionCore
from services.model_server.errors import DEFAULT_SIGNATURE, ServingError, invalid

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


def serialized_examples(inp: input_pb2.Input) -> np.ndarray:
    """The string tensor TF Serving feeds (util.cc InputToSerializedExampleTensor)."""
    kind = inp.WhichOneof("kind")
    if kind == "example_list":
        rows = [e.SerializeToString() for e in inp.example_list.examples]
    elif kind == "example_list_with_context":
        context = inp.example_list_with_context.context.SerializeToString()
        rows = [context + e.SerializeToString() for e in inp.example_list_with_context.examples]
    else:
        rows = []
    if not rows:
        raise invalid("Input is empty.")
    return np.array(rows, dtype=object)


def _signature_def(servable, name: str):
    signature = servable.signature_defs.get(name)
    if signature is None:
        raise invalid(f"No signature was found with the name: {name}")
    return signature


def _method_check(signature, method: str, what: str, enabled: bool) -> None:
    if enabled and signature.method_name != method:
        raise invalid(f"Expected {what} signature method_name to be {method}. Was: {signature.method_name}")


def classification_outputs(signature, method_check: bool = False) -> tuple[str, ...]:
    """The output keys a classification reads (classes and/or scores); TF Serving's PreProcessClassification."""
    _method_check(signature, CLASSIFY_METHOD, "classification", method_check)
    if len(signature.inputs) != 1:
        raise invalid("Expected one input Tensor.")
    if len(signature.outputs) not in (1, 2):
        raise invalid(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if "inputs" not in signature.inputs:
        raise invalid(f"No classification inputs found in SignatureDef: {signature}")
    wanted = tuple(k for k in ("classes", "scores") if k in signature.outputs)
    if not wanted:
        raise invalid('Expected classification signature outputs to contain at least one of "classes" or '
                       f'"scores". Signature was: {signature}')
    return wanted


def regression_outputs(signature, method_check: bool = False) -> tuple[str, ...]:
    """TF Serving's PreProcessRegression."""
    _method_check(signature, REGRESS_METHOD, "regression", method_check)
    if len(signature.inputs) != 1:
        raise invalid("Expected one input Tensor.")
    if len(signature.outputs) != 1:
        raise invalid("Expected one output Tensor.")
    if "inputs" not in signature.inputs:
        raise invalid(f"No regression inputs found in SignatureDef: {signature}")
    if "outputs" not in signature.outputs:
        raise invalid(f"No regression outputs found in SignatureDef: {signature}")
    return ("outputs",)


def classification_result(outputs: dict[str, np.ndarray], examples: int,
                          result: classification_pb2.ClassificationResult) -> None:
    """TF Serving's PostProcessClassificationResult: [batch, classes] string labels and/or float scores."""
    classes, scores = outputs.get("classes"), outputs.get("scores")
    for name, tensor, kind in (("classes", classes, "O"), ("scores", scores, "f")):
        if tensor is None:
            continue
        if tensor.ndim != 2:
            raise invalid(f"Expected Tensor shape: [batch_size num_classes] but got {list(tensor.shape)}")
        if (kind == "O") != (tensor.dtype == object) or (kind == "f" and tensor.dtype != np.float32):
            expected = "DT_STRING" if kind == "O" else "DT_FLOAT"
            raise invalid(f"Expected {name} Tensor of {expected}. Got: {tensor.dtype}")
        if tensor.shape[0] != examples:
            raise invalid(f"Expected {name} output batch size of {examples}. Got: {tensor.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid(f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. "
                       f"{scores.shape[1]}")
    count = (classes if classes is not None else scores).shape[1]
    for row in range(examples):
        classifications = result.classifications.add()
        for column in range(count):
            entry = classifications.classes.add()
            if classes is not None:
                label = classes[row, column]
                entry.label = label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
            if scores is not None:
                entry.score = float(scores[row, column])


def regression_result(outputs: dict[str, np.ndarray], examples: int,
                      result: regression_pb2.RegressionResult) -> None:
    """TF Serving's PostProcessRegressionResult: [batch] or [batch, 1] floats."""
    values = outputs["outputs"]
    if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
        raise invalid("Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                       f"{list(values.shape)}")
    if values.shape[0] != examples:
        raise invalid(f"Input batch size did not match output batch size: {examples} vs. {values.shape[0]}")
    if values.dtype != np.float32:
        raise invalid(f"Expected output Tensor of DT_FLOAT.  Got: {values.dtype}")
    for value in values.reshape(-1):
        result.regressions.add(value=float(value))


def prepared(servable, request, outputs_of, method_check: bool = False) -> tuple[str, tuple[str, ...], np.ndarray]:
    """What a Classify or Regress ``request`` runs on ``servable``: its signature's name, the outputs it reads
    (``outputs_of``: classification_outputs or regression_outputs) and its examples."""
    name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    wanted = outputs_of(_signature_def(servable, name), method_check)
    return name, wanted, serialized_examples(request.input)


def multi_inference_plan(servable, request: inference_pb2.MultiInferenceRequest, method_check: bool = False
                         ) -> list[tuple[inference_pb2.InferenceTask, str, tuple[str, ...]]]:
    """Each task of a MultiInference with its signature's name and the outputs it reads, after the checks of TF
    Serving's TensorFlowMultiInferenceRunner::Infer, in its order."""
    model_name, seen, plan = "", set(), []
    for task in request.tasks:
        if not task.model_spec.name:
            raise invalid("Found ModelSpec with an empty model name.")
        if model_name and task.model_spec.name != model_name:
            raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        model_name = task.model_spec.name
        name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if name in seen:
            raise invalid(f"Duplicate evaluation of signature: {name}")
        seen.add(name)
        signature = servable.signature_defs.get(name)
        if signature is None:
            raise invalid(f"Requested signature not found in model graph: {name}")
        if task.method_name == CLASSIFY_METHOD:
            plan.append((task, name, classification_outputs(signature, method_check)))
        elif task.method_name == REGRESS_METHOD:
            plan.append((task, name, regression_outputs(signature, method_check)))
        else:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                               f"Unsupported signature method_name: {task.method_name}")
    return plan


def inference_result(task: inference_pb2.InferenceTask, outputs: dict[str, np.ndarray], examples: int,
                     result: inference_pb2.InferenceResult) -> None:
    """One MultiInference task's outputs written into its ``result``, by its method."""
    if task.method_name == CLASSIFY_METHOD:
        classification_result(outputs, examples, result.classification_result)
    else:
        regression_result(outputs, examples, result.regression_result)


def _model_spec(spec: model_pb2.ModelSpec, signature: str, version: int, out: model_pb2.ModelSpec) -> None:
    out.name = spec.name
    out.signature_name = signature
    out.version.value = version


def version_and_label(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    """The (version, label) a ModelSpec asks for; (None, None) = the latest AVAILABLE version."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


class Inference:
    """Classify / Regress / MultiInference over a PredictionCore (which batches and counts). A request resolves
    its servable once and runs every signature it asks for on that one."""

    def __init__(self, core: PredictionCore, method_name_check: bool = False):
        self.core = core
        self.method_name_check = method_name_check  # --enable_signature_method_name_check

    async def _run(self, api: str, servable, signature_name: str, examples: np.ndarray, wanted):
        """The ``wanted`` outputs of a signature on the examples, run on ``servable``: the one the request
        resolved, held until it ends."""
        return await self.core.run(api, servable, signature_name, {"inputs": examples}, tuple(wanted))

    async def classify(self, request: classification_pb2.ClassificationRequest, api: str = "grpc_classify"
                       ) -> classification_pb2.ClassificationResponse:
        return await self._single(request, api, classification_outputs, classification_result,
                                  classification_pb2.ClassificationResponse())

    async def regress(self, request: regression_pb2.RegressionRequest, api: str = "grpc_regress"
                      ) -> regression_pb2.RegressionResponse:
        return await self._single(request, api, regression_outputs, regression_result,
                                  regression_pb2.RegressionResponse())

    async def _single(self, request, api: str, outputs_of, write_result, response):
        """One Classify or Regress: the signature's outputs (``outputs_of``) on the request's examples, written into
        ``response.result`` by ``write_result``, with the model spec that answered."""
        spec = request.model_spec
        servable = self.core.manager.resolve(spec.name, *version_and_label(spec))
        name, wanted, examples = prepared(servable, request, outputs_of, self.method_name_check)
        outputs = await self._run(api, servable, name, examples, wanted)
        write_result(outputs, len(examples), response.result)
        _model_spec(spec, name, servable.version, response.model_spec)
        return response

    async def multi_inference(self, request: inference_pb2.MultiInferenceRequest
                              ) -> inference_pb2.MultiInferenceResponse:
        """TF Serving's TensorFlowMultiInferenceRunner: every task names the same model and a distinct signature;
        each runs on the same examples, from the version the first task's spec picks."""
        first = request.tasks[0].model_spec if request.tasks else model_pb2.ModelSpec()
        servable = self.core.manager.resolve(first.name, *version_and_label(first))  # first, as TF Serving does
        plan = multi_inference_plan(servable, request, self.method_name_check)
        examples = serialized_examples(request.input)
        response = inference_pb2.MultiInferenceResponse()
        for task, name, wanted in plan:
            outputs = await self._run("grpc_multi_inference", servable, name, examples, wanted)
            result = response.results.add()
            inference_result(task, outputs, len(examples), result)
            _model_spec(task.model_spec, name, servable.version, result.model_spec)
        return response
