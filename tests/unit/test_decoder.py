"""The decoder runtime over a real ONNX Runtime session of the tiny llama-style test decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders.examples import tiny_decoder_path
from core.errors import InvalidInputError, KilnError, RepositoryError
from harness.llama import TINY_EOS, TINY_SHAPE, random_weights, reference_logits
from runtime.decoder import Generation, Sampling, choose_token, generate, layout_of, read_layout
from runtime.onnxruntime import OrtRunner
from runtime.tokenizer import ByteTokenizer, TextStream, load_tokenizer


@pytest.fixture(scope="module")
def runner() -> OrtRunner:
    return OrtRunner(tiny_decoder_path(), intra_op_threads=1, model="tiny")


def test_layout_is_read_from_the_graph() -> None:
    layout = read_layout(tiny_decoder_path())
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (2, 2, 16)
    assert layout.max_context == 256 and layout.position_ids
    assert layout.kv_dtype == np.float32


def test_a_model_without_kv_inputs_is_refused_naming_the_expected_names() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])],
        "no_kv",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])],
    )
    with pytest.raises(InvalidInputError) as err:
        layout_of(helper.make_model(graph), model="bert")
    text = str(err.value)
    assert "'bert'" in text and "attention_mask" in text
    assert "past_key_values.0.key" in text and "present.0.value" in text and "['input_ids']" in text


def test_kv_cache_decoding_matches_a_full_forward_in_numpy(runner: OrtRunner) -> None:
    """Greedy tokens stepped with the cache equal argmax of a no-cache numpy forward at every step."""
    weights = random_weights(TINY_SHAPE, 16)
    prompt = list(b"Hello, ")
    tokens = generate(runner.run, read_layout(tiny_decoder_path()), prompt, max_new_tokens=6, max_context=256)
    assert len(tokens) == 6
    seq = list(prompt)
    for token in tokens:
        expected = int(np.argmax(reference_logits(TINY_SHAPE, weights, np.array(seq))[-1]))
        assert token == expected
        seq.append(token)


def test_limits_context_stop_tokens_and_close(runner: OrtRunner) -> None:
    layout = read_layout(tiny_decoder_path())
    with pytest.raises(InvalidInputError, match="prompt has 10 tokens; this model's context is 10"):
        Generation(runner.run, layout, [1] * 10, max_new_tokens=4, max_context=10)
    with pytest.raises(InvalidInputError, match="max_tokens must be >= 1, got 0"):
        Generation(runner.run, layout, [1], max_new_tokens=0, max_context=10)
    near_end = Generation(runner.run, layout, [65] * 8, max_new_tokens=50, max_context=10)
    while not near_end.finished:
        near_end.step()
    assert len(near_end.tokens) == 2 and near_end.finish_reason == "length"
    first = generate(runner.run, layout, [72, 105], max_new_tokens=3, max_context=256)
    stopped = Generation(runner.run, layout, [72, 105], max_new_tokens=3, max_context=256, stop_ids=[first[1]])
    assert stopped.step() == first[0]
    assert stopped.step() is None and stopped.finish_reason == "stop" and stopped.tokens == first[:1]
    live = Generation(runner.run, layout, [72, 105], max_new_tokens=30, max_context=256)
    live.step()
    assert live.cache_bytes > 0
    live.close()
    assert live.cache_bytes == 0 and live.finished and live.finish_reason == "cancelled"
    with pytest.raises(KilnError, match="finished or was closed"):
        live.step()


def test_sampling_is_seeded_and_greedy_by_default() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert choose_token(logits, Sampling(), np.random.default_rng(0)) == 1
    assert choose_token(logits, Sampling(temperature=5.0, top_k=1), np.random.default_rng(0)) == 1
    draws = [choose_token(logits, Sampling(temperature=2.0), np.random.default_rng(s)) for s in range(40)]
    again = [choose_token(logits, Sampling(temperature=2.0), np.random.default_rng(s)) for s in range(40)]
    assert draws == again and len(set(draws)) > 1
    top2 = {choose_token(logits, Sampling(temperature=50.0, top_k=2), np.random.default_rng(s)) for s in range(60)}
    assert top2 == {1, 2}
    with pytest.raises(InvalidInputError, match="temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(InvalidInputError, match="top_k"):
        Sampling(top_k=-3)


def test_text_stream_never_splits_a_character() -> None:
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]
    assert ByteTokenizer().decode([72, TINY_EOS, 105]) == "Hi"


def test_the_tiny_decoder_is_small_and_reproducible(tmp_path: Path) -> None:
    from harness.llama import build_decoder

    path = tiny_decoder_path()
    assert path.stat().st_size < 1_000_000
    rebuilt = build_decoder(TINY_SHAPE, random_weights(TINY_SHAPE, 16))
    assert rebuilt.SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_a_tokenizer_json_encodes_decodes_and_streams(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {ch: i for i, ch in enumerate(["<|end|>", "h", "e", "l", "o", "he", "ll", "hell", "hello"])}
    bpe = tokenizers.models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")])
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken("<|end|>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer("tokenizer.json", tmp_path)
    assert loaded.encode("hello") == [8]
    assert loaded.decode([8, 0]) == "hello"
    stream = TextStream(loaded)
    assert [stream.push(t) for t in (8, 0, 8)] == ["hello", "", "hello"]
    with pytest.raises(RepositoryError, match="tokenizer file .* is missing"):
        load_tokenizer("other.json", tmp_path)
    with pytest.raises(InvalidInputError, match="must be 'byte' or a file name"):
        load_tokenizer("../tokenizer.json", tmp_path)
