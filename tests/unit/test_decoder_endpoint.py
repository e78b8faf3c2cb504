"""Request checks and config limits of a served decoder (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from builders.decoder_build import decoder_config
from builders.examples import tiny_decoder_path
from builders.request import DecoderOptions
from core.errors import InvalidInputError, RepositoryError
from runtime.decoder import read_layout
from runtime.tokenizer import ByteTokenizer
from server.llm.endpoint import DecoderEndpoint, is_decoupled, read_limits


@pytest.fixture(scope="module")
def endpoint() -> DecoderEndpoint:
    layout = read_layout(tiny_decoder_path())
    config = decoder_config("tiny", 1, layout, DecoderOptions(max_new_tokens=32, stop_token_ids=(257,)), 64)
    return DecoderEndpoint("tiny", layout, read_limits("tiny", config, layout), ByteTokenizer())


def _text(prompt: str, **extra: np.ndarray) -> dict[str, np.ndarray]:
    return {"text_input": np.array([prompt.encode()], dtype=object), **extra}


def test_config_is_decoupled_and_limits_come_from_it(endpoint: DecoderEndpoint) -> None:
    limits = endpoint.limits
    assert (limits.max_context, limits.max_tokens, limits.stop_ids, limits.tokenizer) == (64, 32, (257,), "byte")
    config = decoder_config("tiny", 1, endpoint.layout, DecoderOptions(), 64)
    assert is_decoupled(config) and all(t.optional for t in config.input)
    assert not is_decoupled(mc.ModelConfig(name="x"))


def test_a_good_request_is_parsed(endpoint: DecoderEndpoint) -> None:
    job = endpoint.parse(_text("Hi", max_tokens=np.array([5], np.int32), stream=np.array([False])))
    assert job.prompt == (72, 105) and job.max_tokens == 5 and not job.stream and job.sampling.temperature == 0
    ids = endpoint.parse({"input_ids": np.array([[1, 2, 3]], np.int64)})
    assert ids.prompt == (1, 2, 3) and ids.stream and ids.max_tokens == 32


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (_text("Hi", max_tokens=np.array([0], np.int32)), "max_tokens is 0; model 'tiny' generates 1..32"),
        (_text("Hi", max_tokens=np.array([-3], np.int32)), "max_tokens is -3"),
        (_text("Hi", max_tokens=np.array([10**6], np.int64)), "max_tokens is 1000000"),
        (_text("x" * 64), "the prompt is 64 tokens; model 'tiny' has a context of 64"),
        ({**_text("Hi"), "input_ids": np.array([1], np.int64)}, "exactly one of 'text_input' or 'input_ids'"),
        ({}, "exactly one of"),
        (_text("Hi", images=np.zeros(3, np.float32)), "no inputs ['images']"),
        (_text("Hi", max_tokens=np.array([1.5], np.float32)), "input 'max_tokens' has datatype float32"),
        (_text("Hi", temperature=np.array([-1.0], np.float32)), "temperature must be"),
        ({"input_ids": np.array([1.0], np.float32)}, "'input_ids' must be INT32 or INT64"),
        ({"text_input": np.array([b"\xff"], dtype=object)}, "not valid UTF-8"),
    ],
)
def test_bad_requests_are_refused_with_the_value(
    endpoint: DecoderEndpoint, inputs: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        endpoint.parse(inputs)


def test_bad_config_parameters_name_the_parameter(endpoint: DecoderEndpoint) -> None:
    config = decoder_config("tiny", 1, endpoint.layout, DecoderOptions(), 64)
    config.parameters["max_tokens"].string_value = "lots"
    with pytest.raises(RepositoryError, match="'max_tokens' must be a positive integer, got 'lots'"):
        read_limits("tiny", config, endpoint.layout)
    config.parameters["max_tokens"].string_value = "8"
    config.parameters["stop_token_ids"].string_value = "2,eos"
    with pytest.raises(RepositoryError, match="'stop_token_ids' must be comma-separated integers"):
        read_limits("tiny", config, endpoint.layout)
