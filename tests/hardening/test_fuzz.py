"""Property-based fuzzing of request decoding and validation against a live server: whatever arrives,
the answer is a precise status (or a result), never UNKNOWN or INTERNAL, and the server keeps serving.

Every field of both request types is drawn: convserve.v1 ClassifyRequest (model, version, images as
encoded bytes or typed tensors, top_k, request_id) and the v2 ModelInferRequest (model name and version,
id, request/input/output parameters with each InferParameter oneof member, inputs' datatype, shape and all
eight typed contents lists, requested outputs, raw contents in any number).

Bounded: ~500 requests in all, no per-example deadline (a busy CI machine), well under 30 s.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from convserve.protos.convserve.v1 import classifier_pb2 as pb
from convserve.protos.convserve.v1 import classifier_pb2_grpc
from convserve.protos.inference import grpc_service_pb2 as v2pb
from convserve.protos.inference import grpc_service_pb2_grpc

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def classifier(channel: grpc.Channel) -> Any:
    return classifier_pb2_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def v2(channel: grpc.Channel) -> Any:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _png(seed: int, size: int, mode: str) -> bytes:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(buf, format="PNG")
    return buf.getvalue()


VALID_PNGS = [_png(i, s, m) for i, (s, m) in enumerate([(8, "L"), (16, "RGB"), (3, "RGBA"), (40, "L")])]

# Names a hostile client might send: path traversal (plain, URL-encoded, absolute, Windows-style), NULs,
# huge strings, names of real and broken models.
NAMES = st.one_of(
    st.sampled_from(
        [
            "gray",
            "rgb",
            "probs",
            "mismatch",
            "broken_onnx",
            "no_file",
            "",
            ".",
            "..",
            "../gray",
            "gray/../rgb",
            "%2e%2e",
            "%2e%2e%2fgray",
            "..%2fgray",
            "/etc/passwd",
            "C:\\Windows",
            "..\\gray",
            "gray\x00",
            "gray/1",
            "gray/1/model.onnx",
            "config.json",
            "GRAY",
            " gray",
            "x" * 10_000,
            "\u202egray",
            "gray\n",
        ]
    ),
    st.text(max_size=40),
)


@st.composite
def mutated_png(draw: st.DrawFn) -> bytes:
    """A valid PNG with a few bytes flipped, cut short, or extended with junk."""
    data = bytearray(draw(st.sampled_from(VALID_PNGS)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=16))


ENCODED = st.one_of(st.binary(max_size=600), mutated_png(), st.sampled_from(VALID_PNGS))
DIMS = st.one_of(st.integers(-3, 20), st.sampled_from([0, 1, 3, 8, 16, 2**31, 2**40, 2**62, -(2**63)]))


@st.composite
def tensor_image(draw: st.DrawFn) -> pb.Image:
    dtype = draw(st.one_of(st.sampled_from(list(pb.DataType.values())), st.integers(-5, 1000)))
    shape = draw(
        st.one_of(
            st.lists(DIMS, max_size=6), st.sampled_from([[1, 8, 8], [1, 1, 8, 8], [3, 16, 16], [2, 1, 8, 8]])
        )
    )
    itemsize = {pb.DATA_TYPE_UINT8: 1, pb.DATA_TYPE_FLOAT16: 2, pb.DATA_TYPE_FLOAT64: 8}.get(dtype, 4)
    if draw(st.booleans()) and all(0 <= d <= 64 for d in shape):
        n = int(np.prod(shape)) if shape else 1
        if draw(st.booleans()):  # the right size, with possibly non-finite values
            data = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
        else:
            data = np.full(
                n, draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e38])), dtype=np.float32
            ).tobytes()
    else:
        data = draw(st.binary(max_size=300))
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))


IMAGE = st.one_of(ENCODED.map(lambda b: pb.Image(encoded=b)), tensor_image(), st.just(pb.Image()))


@st.composite
def classify_request(draw: st.DrawFn) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=draw(NAMES),
        version=draw(st.one_of(st.integers(-3, 4), st.integers(-(2**63), 2**63 - 1))),
        top_k=draw(st.one_of(st.integers(-2, 12), st.integers(-(2**31), 2**31 - 1))),
        images=draw(st.lists(IMAGE, max_size=4)),
        request_id=draw(st.one_of(st.text(max_size=20), st.just("r" * 3000))),
    )


V2_TYPES = st.one_of(
    st.sampled_from(
        ["FP32", "BYTES", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
         "FP64", "BF16", "BOOL", "fp32", "", "FP32 ", "FP32\x00"]
    ),
    st.text(max_size=8),
)  # fmt: skip

# Strings a client might put in a typed parameter: numbers in every spelling (signs, spaces, exponents,
# Unicode digits and superscripts that str.isdigit() accepts but int() may not), huge numbers, junk.
PARAM_STRINGS = st.one_of(
    st.sampled_from(
        ["3", "-3", "+3", " 3 ", "0", "99", "1e3", "3.0", "0x10", "", " ", "\u00b2", "\u0663", "\u2460",
         "\uff13", "1" * 5000, "9" * 30, "-" + "9" * 30, "NaN", "inf", "3\x00", "true"]
    ),
    st.text(max_size=12),
)  # fmt: skip
PARAM_KEYS = st.one_of(
    st.sampled_from(
        ["classification", "binary_data", "binary_data_size", "priority", "timeout", "sequence_id"]
    ),
    st.text(max_size=10),
)


@st.composite
def infer_parameter(draw: st.DrawFn) -> v2pb.InferParameter:
    """An InferParameter with any one of its oneof members set (or none), across each member's full range."""
    param = v2pb.InferParameter()
    kind = draw(st.sampled_from(["bool", "int64", "uint64", "string", "double", "unset"]))
    if kind == "bool":
        param.bool_param = draw(st.booleans())
    elif kind == "int64":
        param.int64_param = draw(st.one_of(st.integers(-3, 12), st.integers(-(2**63), 2**63 - 1)))
    elif kind == "uint64":
        param.uint64_param = draw(st.one_of(st.integers(0, 12), st.integers(0, 2**64 - 1)))
    elif kind == "string":
        param.string_param = draw(PARAM_STRINGS)
    elif kind == "double":
        param.double_param = draw(st.one_of(st.floats(), st.sampled_from([3.0, 2.5, -1.0, 1e300])))
    return param


def _parameters(draw: st.DrawFn, target: Any) -> None:
    """Fill a ``map<string, InferParameter>``: usually empty, else a few typed entries."""
    for key in draw(st.lists(PARAM_KEYS, max_size=3, unique=True)):
        target[key].CopyFrom(draw(infer_parameter()))


def _contents(draw: st.DrawFn, contents: Any) -> None:
    """Set any of InferTensorContents' eight typed lists (bounded), whatever the declared datatype."""
    fields = draw(
        st.lists(
            st.sampled_from(["bool", "int", "int64", "uint", "uint64", "fp32", "fp64", "bytes"]),
            max_size=2,
            unique=True,
        )
    )
    for f in fields:
        if f == "bool":
            contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=80)))
        elif f == "int":
            contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=80)))
        elif f == "int64":
            contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=80)))
        elif f == "uint":
            contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=80)))
        elif f == "uint64":
            contents.uint64_contents.extend(draw(st.lists(st.integers(0, 2**64 - 1), max_size=80)))
        elif f == "fp32":
            contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=80)))
        elif f == "fp64":
            contents.fp64_contents.extend(draw(st.lists(st.floats(), max_size=80)))
        else:
            contents.bytes_contents.extend(draw(st.lists(ENCODED, max_size=3)))


@st.composite
def v2_request(draw: st.DrawFn) -> v2pb.ModelInferRequest:
    """Every field of ModelInferRequest: names, version, id, request/input/output parameters, each input's
    datatype, shape and typed contents, requested outputs, and raw contents (in any number)."""
    request = v2pb.ModelInferRequest(
        model_name=draw(NAMES),
        model_version=draw(
            st.one_of(
                st.sampled_from(
                    ["", "1", "2", "0", "-1", "99999999999999999999", "../1", "1.0", " 1", "%31", "\u00b2"]
                ),
                st.text(max_size=8),
            )
        ),
        id=draw(st.one_of(st.text(max_size=10), st.just("i" * 3000))),
    )
    if draw(st.booleans()):
        _parameters(draw, request.parameters)
    for _ in range(draw(st.integers(0, 2))):
        datatype = draw(V2_TYPES)
        inp = request.inputs.add(
            name=draw(st.one_of(st.sampled_from(["input", "x", "", "input\n"]), st.text(max_size=6))),
            datatype=datatype,
            shape=draw(
                st.one_of(st.lists(DIMS, max_size=5), st.sampled_from([[1, 1, 8, 8], [2], [1], [2, 1]]))
            ),
        )
        if draw(st.booleans()):
            _parameters(draw, inp.parameters)
        how = draw(st.sampled_from(["raw", "typed", "both", "none"]))
        if how in ("raw", "both"):
            if datatype == "BYTES" and draw(st.booleans()):
                blobs = draw(st.lists(ENCODED, max_size=3))
                request.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in blobs))
            else:
                request.raw_input_contents.append(draw(st.binary(max_size=600)))
        if how in ("typed", "both"):
            _contents(draw, inp.contents)
    if draw(st.integers(0, 5)) == 0:  # raw contents not matching the inputs in number
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["logits", "probs", "", "logits "])))
        if draw(st.booleans()):
            _parameters(draw, out.parameters)
        if draw(st.booleans()):
            out.parameters["classification"].CopyFrom(draw(infer_parameter()))
    if draw(st.booleans()):
        request.parameters["classification"].CopyFrom(draw(infer_parameter()))
    return request


def _code(method: Any, request: Any) -> grpc.StatusCode:
    try:
        method(request, timeout=20)
    except grpc.RpcError as err:
        assert err.code() not in FORBIDDEN, f"{err.code()}: {err.details()} for {request!r:.500}"
        return err.code()
    return grpc.StatusCode.OK


@FUZZ
@given(request=classify_request())
def test_fuzz_classify(classifier: Any, request: pb.ClassifyRequest) -> None:
    _code(classifier.Classify, request)


def _known_hard(where: str, value: str) -> v2pb.ModelInferRequest:
    """A good gray request whose classification parameter (request- or output-level) is ``value``."""
    request = v2pb.ModelInferRequest(model_name="gray")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(np.zeros(64, "<f4").tobytes())
    params = request.parameters if where == "request" else request.outputs.add(name="logits").parameters
    params["classification"].string_param = value
    return request


def _typed_and_raw() -> v2pb.ModelInferRequest:
    request = _known_hard("request", "2")
    request.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    return request


@settings(FUZZ, max_examples=300)
@given(request=v2_request())
@example(request=_known_hard("request", "\u00b2"))  # str.isdigit() says yes, int() says no
@example(request=_known_hard("output", "\u0663"))
@example(request=_known_hard("output", "1" * 5000))  # over Python's int() digit limit
@example(request=_typed_and_raw())
def test_fuzz_model_infer(v2: Any, request: v2pb.ModelInferRequest) -> None:
    _code(v2.ModelInfer, request)


@settings(FUZZ, max_examples=60)
@given(
    name=NAMES,
    version=st.one_of(st.integers(-3, 4), st.integers(-(2**63), 2**63 - 1)),
    text_version=st.text(max_size=8),
)
def test_fuzz_metadata_lookups(classifier: Any, v2: Any, name: str, version: int, text_version: str) -> None:
    _code(classifier.DescribeModel, pb.DescribeModelRequest(model=name, version=version))
    _code(v2.ModelMetadata, v2pb.ModelMetadataRequest(name=name, version=text_version))
    _code(v2.ModelReady, v2pb.ModelReadyRequest(name=name, version=text_version))


@settings(FUZZ, max_examples=25)
@given(
    requests=st.lists(classify_request(), min_size=1, max_size=5),
    v2_requests=st.lists(v2_request(), min_size=1, max_size=5),
)
def test_fuzz_streams(
    classifier: Any, v2: Any, requests: list[pb.ClassifyRequest], v2_requests: list[v2pb.ModelInferRequest]
) -> None:
    """Each stream message gets exactly one reply in order, its error (if any) a precise status."""
    replies = list(classifier.ClassifyStream(iter(requests), timeout=30))
    assert len(replies) == len(requests)
    bad = {c.value[0] for c in FORBIDDEN}
    assert all(r.error_code not in bad for r in replies), [r.error_message for r in replies]
    v2_replies = list(v2.ModelStreamInfer(iter(v2_requests), timeout=30))
    assert len(v2_replies) == len(v2_requests)
    assert not [r.error_message for r in v2_replies if r.error_message.startswith(("UNKNOWN", "INTERNAL"))]


WIRE_METHODS = [
    ("/convserve.v1.Classifier/Classify", pb.ClassifyRequest),
    ("/convserve.v1.Classifier/DescribeModel", pb.DescribeModelRequest),
    ("/inference.GRPCInferenceService/ModelInfer", v2pb.ModelInferRequest),
]


@settings(FUZZ, max_examples=100)
@given(
    target=st.sampled_from(WIRE_METHODS),
    wire=st.one_of(
        st.binary(max_size=400),
        classify_request().map(lambda r: r.SerializeToString()),
        st.builds(lambda r, cut: r.SerializeToString()[:cut], v2_request(), st.integers(0, 200)),
    ),
)
def test_fuzz_raw_wire_bytes(channel: grpc.Channel, target: tuple[str, Any], wire: bytes) -> None:
    """Arbitrary bytes as the request message. Bytes that parse as the method's request must get a precise
    status; bytes that do not parse are refused as INVALID_ARGUMENT, not as UNKNOWN/INTERNAL."""
    path, message = target
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        message.FromString(wire)
    except DecodeError:
        with pytest.raises(grpc.RpcError) as err:
            call(wire, timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
        assert "do not parse" in (err.value.details() or "")
        return
    try:
        call(wire, timeout=20)
    except grpc.RpcError as err:
        assert err.code() not in FORBIDDEN, f"{err.code()}: {err.details()}"


def test_undecodable_stream_message_is_invalid_argument(channel: grpc.Channel) -> None:
    """A stream message that does not parse gets its own INVALID_ARGUMENT reply and the stream goes on."""
    call = channel.stream_stream(
        "/convserve.v1.Classifier/ClassifyStream",
        request_serializer=None,
        response_deserializer=pb.ClassifyStreamResponse.FromString,
    )
    good = pb.ClassifyRequest(model="gray", images=[pb.Image(encoded=VALID_PNGS[0])]).SerializeToString()
    replies = list(call(iter([good, b"\xff\xff\xff", good]), timeout=20))
    assert [r.error_code for r in replies] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "do not parse" in replies[1].error_message
    assert replies[0].response.results == replies[2].response.results
