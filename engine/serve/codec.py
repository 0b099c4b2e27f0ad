"""Tinker's protobuf wire format, read and written with the SDK's own generated module.

``forward_backward`` requests arrive as ``tinker_public_pb2.ForwardBackwardRequest``; the
results of ``forward_backward`` and ``sample`` leave as ``ForwardBackwardOutput`` and
``SampleResponse`` messages. Each function here is the inverse of the SDK's own converter
(``tinker.proto.request_conv`` / ``response_conv``), so the SDK decodes exactly what it sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

PROTO_CONTENT_TYPE = "application/x-protobuf"

_DTYPES: dict[int, tuple[str, np.dtype]] = {
    pb.DTYPE_FLOAT32: ("float32", np.dtype(np.float32)),
    pb.DTYPE_INT64: ("int64", np.dtype(np.int64)),
    pb.DTYPE_INT32: ("int64", np.dtype(np.int32)),
}
_TO_PROTO_DTYPE = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}
_NP_OF = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64)}
_STOP = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


class WireError(ValueError):
    """A request body that is not what the protocol says; the message names the part."""


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None
    forward_only: bool
    data: list[types.Datum]


def _tensor(msg: Any, where: str) -> types.TensorData:
    if msg.dtype not in _DTYPES:
        raise WireError(f"{where}: unsupported tensor dtype {msg.dtype}")
    dtype, np_dtype = _DTYPES[msg.dtype]
    shape = list(msg.shape) or None
    if msg.HasField("sparse_csr"):
        csr = msg.sparse_csr
        return types.TensorData(
            data=np.frombuffer(csr.values, dtype=np_dtype).copy(),
            dtype=dtype,  # type: ignore[arg-type]
            shape=shape,
            sparse_crow_indices=np.frombuffer(csr.crow_indices, dtype=np.int64).tolist(),
            sparse_col_indices=np.frombuffer(csr.col_indices, dtype=np.int64).tolist(),
        )
    if len(msg.dense) % np_dtype.itemsize:
        raise WireError(f"{where}: {len(msg.dense)} bytes is not a whole number of {dtype}s")
    arr = np.frombuffer(msg.dense, dtype=np_dtype).copy()
    if shape is not None and int(np.prod(shape)) != arr.size:
        raise WireError(f"{where}: shape {shape} does not hold {arr.size} values")
    return types.TensorData(data=arr, dtype=dtype, shape=shape)  # type: ignore[arg-type]


def _datum(msg: Any, i: int) -> types.Datum:
    chunks: list[Any] = []
    for c in msg.model_input:
        kind = c.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(f"datum {i}: only text chunks are served here (got {kind or 'none'})")
        raw = c.encoded_text.tokens
        if len(raw) % 4:
            raise WireError(f"datum {i}: token bytes are not whole int32 values")
        tokens = np.frombuffer(raw, dtype=np.int32).tolist()
        chunks.append(types.EncodedTextChunk(tokens=tokens))
    inputs = {name: _tensor(t, f"datum {i} {name}") for name, t in msg.loss_fn_inputs.items()}
    return types.Datum(model_input=types.ModelInput(chunks=chunks), loss_fn_inputs=inputs)


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise WireError(f"forward_backward: not a ForwardBackwardRequest protobuf ({e})") from None
    if not msg.model_id:
        raise WireError("forward_backward: model_id is missing")
    config: dict[str, float | str] = {}
    for k, v in msg.loss_fn_config_v2.items():
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    for k, num in msg.loss_fn_config.items():
        config.setdefault(k, float(num))
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=msg.loss_fn,
        loss_fn_config=config or None,
        forward_only=bool(msg.forward_only),
        data=[_datum(d, i) for i, d in enumerate(msg.data)],
    )


def metric_name(name: str) -> str:
    """The SDK folds metrics by their ``name:reduction`` suffix; a bare name is a sum."""
    return name if name.count(":") == 1 else f"{name.replace(':', '_')}:sum"


def encode_forward_backward(out: types.ForwardBackwardOutput) -> bytes:
    """One batched ArrayRecord holding every datum's fields (offsets in bytes)."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type=out.loss_fn_output_type or "ArrayRecord")
    for k, v in (out.metrics or {}).items():
        msg.metrics[metric_name(k)] = float(v)
    outputs = list(out.loss_fn_outputs or [])
    if outputs:
        record = msg.loss_fn_outputs.add(num_datums=len(outputs))
        for name in outputs[0]:
            tds = [o[name] for o in outputs]
            dtype = tds[0].dtype
            arrays = [np.ascontiguousarray(td.to_numpy(), dtype=_NP_OF[dtype]) for td in tds]
            sizes = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64)
            bt = record.fields[name]
            bt.dtype = _TO_PROTO_DTYPE[dtype]
            bt.data = b"".join(a.tobytes() for a in arrays)
            bt.offsets = sizes.tobytes()
            bt.trailing_shape.extend(list(arrays[0].shape[1:]))
    return msg.SerializeToString()


def encode_sample(resp: types.SampleResponse, prompt_logprobs_last_n: int | None) -> bytes:
    msg = pb.SampleResponse()
    for seq in resp.sequences:
        s = msg.sequences.add(stop_reason=_STOP.get(str(seq.stop_reason), pb.STOP_REASON_STOP))
        s.tokens = np.asarray(seq.tokens, dtype=np.int32).tobytes()
        if seq.logprobs is not None:
            s.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
    if resp.prompt_logprobs_np is not None:
        values = np.array(resp.prompt_logprobs_np, dtype=np.float32)
        if prompt_logprobs_last_n is not None:
            values[: max(0, len(values) - prompt_logprobs_last_n)] = np.nan
        msg.prompt_logprobs = values.tobytes()
    return msg.SerializeToString()
