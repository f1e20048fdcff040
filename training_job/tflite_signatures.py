"""The TF Serving contract of a version's ``model.tflite``: which TF SignatureDef it carries and how.

TF Serving (``servables/tensorflow/tflite_session.cc``, under ``--prefer_tflite_model``) reads the SignatureDefs a
TFLite file stores in its ``signature_defs_metadata`` metadata buffer: a flexbuffer map of signature key -> serialized
``SignatureDef`` (a flexbuffer string), as ``tensorflow/lite/tools/signature/signature_def_util.cc`` writes it. It
matches a SignatureDef's tensor names to the primary subgraph's input and output tensors: older releases accept one
SignatureDef, serve it as ``serving_default``, require it to name every input and output, and compare names with
the ``:N`` suffix cut off; newer ones keep the keys and take the exact name or, failing that, the name without the
suffix. A file whose tensors are named ``<alias>`` (no colon) and whose one SignatureDef ``serving_default`` names
them ``<alias>:0`` is read the same way by both. The file's own (LiteRT) signatures are not read by TF Serving.
"""
from __future__ import annotations

from tensorflow.core.protobuf import meta_graph_pb2

TFLITE_FILE = "model.tflite"
SIGNATURE_DEFS_METADATA = "signature_defs_metadata"


def read_signature_defs(content: bytes) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The TF SignatureDefs a TFLite file carries in its ``signature_defs_metadata`` (none: an empty dict)."""
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        metadata = model.Metadata(i)
        if metadata.Name() != SIGNATURE_DEFS_METADATA.encode():
            continue
        data = model.Buffers(metadata.Buffer()).DataAsNumpy().tobytes()
        stored = flexbuffers.GetRoot(data).AsMap
        signature_defs = {}
        for key, value in zip(stored.Keys, stored.Values):
            signature_def = meta_graph_pb2.SignatureDef()
            signature_def.ParseFromString(bytes(value.AsStringBytes))
            signature_defs[key.AsKey] = signature_def
        return signature_defs
    return {}


def _flexbuffer_map_of_strings(entries: dict[str, bytes]) -> bytes:
    """A flexbuffer map of key -> string holding arbitrary bytes (C++ ``Builder::String(const std::string&)``; the
    Python builder's ``String`` takes text only, so the same STRING value is written through its blob writer)."""
    from flatbuffers import flexbuffers

    builder = flexbuffers.Builder()
    with builder.Map():
        for key in sorted(entries):
            builder.Key(key)
            builder._WriteBlob(entries[key], append_zero=True, type_=flexbuffers.Type.STRING)
    return bytes(builder.Finish())


def with_signature_def(content: bytes, native_key: str, key: str,
                       signature_def: meta_graph_pb2.SignatureDef) -> bytes:
    """``content`` (a converted model whose own signature ``native_key`` maps ``signature_def``'s aliases to tensors)
    with its primary subgraph's input and output tensors renamed after those aliases, and ``signature_def`` stored
    under ``key`` in ``signature_defs_metadata`` with tensor names ``<alias>:0`` (replacing any stored before).
    Raises ValueError when the aliases do not name exactly the subgraph's inputs and outputs."""
    import numpy as np
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    native = {s.signatureKey.decode(): s for s in (model.signatureDefs or [])}
    if native_key not in native:
        raise ValueError(f"the TFLite file has no signature {native_key!r} (it has {sorted(native)})")
    subgraph = model.subgraphs[native[native_key].subgraphIndex]
    if native[native_key].subgraphIndex != 0:
        raise ValueError(f"signature {native_key!r} is not the primary subgraph's, which TF Serving runs")
    stored = meta_graph_pb2.SignatureDef()
    stored.CopyFrom(signature_def)
    for side, infos, tensor_map, graph_ends in (
            ("input", stored.inputs, native[native_key].inputs, subgraph.inputs),
            ("output", stored.outputs, native[native_key].outputs, subgraph.outputs)):
        index = {t.name.decode(): t.tensorIndex for t in tensor_map}
        if set(index) != set(infos) or sorted(index.values()) != sorted(int(i) for i in graph_ends):
            raise ValueError(f"the SignatureDef's {side}s {sorted(infos)} are not the TFLite file's "
                             f"{sorted(index)}")
        for alias, info in infos.items():
            subgraph.tensors[index[alias]].name = alias.encode()
            info.name = f"{alias}:0"
    data = _flexbuffer_map_of_strings({key: stored.SerializeToString()})
    from tensorflow.lite.python import schema_py_generated as schema

    model.metadata = [m for m in (model.metadata or []) if m.name.decode() != SIGNATURE_DEFS_METADATA]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, np.uint8)
    model.buffers.append(buffer)
    metadata = schema.MetadataT()
    metadata.name = SIGNATURE_DEFS_METADATA
    metadata.buffer = len(model.buffers) - 1
    model.metadata.append(metadata)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
