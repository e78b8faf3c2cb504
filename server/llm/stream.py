"""Answer one ModelStreamInfer request to a decoupled decoder: one response per token.

Each token goes out as soon as it is chosen, with ``text_output`` (the text it completes) and
``output_ids``; the response that ends the sequence carries ``triton_final_response: true`` (an
empty one when a stop token ended it). Errors go back as ``error_message`` and the stream stays
open. Cancelling the stream cancels this coroutine: the generation stops and its KV cache is freed.

Streaming is pipelined (``_Stepper``): each step, on the version's worker thread, hands its token
to the event loop and queues the next step itself, behind the steps of other streams, so
generation never waits for the loop and the per-token serving work (text decoding, protobuf, the
gRPC write) overlaps the model instead of adding to every inter-token gap. When the stream ends
early, no further step is queued and a step already running is dropped (``Generation.close``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from core.errors import InvalidInputError, KilnError
from runtime.decoder import Generation
from runtime.tokenizer import TextStream
from server.codec import decode_inputs, encode_outputs
from server.status import status_code

if TYPE_CHECKING:
    from server.model_store import ServedVersion

logger = logging.getLogger(__name__)

FINAL = "triton_final_response"
Put = Callable[[pb.ModelStreamInferResponse], Awaitable[None]]


async def answer_decoupled(served: ServedVersion, request: pb.ModelInferRequest, put: Put, in_flight: set[str]) -> None:
    """Generate for ``request`` and ``put`` its responses; ``in_flight`` holds this stream's busy ids."""
    endpoint = served.decoder
    if endpoint is None:
        raise KilnError(f"model {served.name!r} is not a decoder; answer it with ModelInfer")
    if request.id and request.id in in_flight:
        err = InvalidInputError(
            f"request id {request.id!r} is already generating on this stream; give each in-flight request its own id"
        )
        await put(error_response(request, err))
        return
    try:
        job = endpoint.parse(decode_inputs(request))
        generation = endpoint.start(job, served.run_unbatched)
    except KilnError as err:
        await put(error_response(request, err))
        return
    if request.id:
        in_flight.add(request.id)
    try:
        if job.stream:
            await _stream_tokens(served, request, generation, put)
        else:
            await _whole_sequence(served, request, generation, put)
    except KilnError as err:
        await put(error_response(request, err))
    finally:
        in_flight.discard(request.id)
        endpoint.finish(generation)


async def _stream_tokens(
    served: ServedVersion, request: pb.ModelInferRequest, generation: Generation, put: Put
) -> None:
    assert served.decoder is not None  # checked by the caller; narrows the type
    text = TextStream(served.decoder.tokenizer)
    stepper = _Stepper(served, generation)
    try:
        while True:
            item = await stepper.results.get()
            if isinstance(item, BaseException):
                raise item
            token, final, reason = item
            if token is None:
                break
            piece = text.push(token) + (text.flush() if final else "")
            await put(token_response(served, request, piece, [token], final, reason if final else None))
            if final:
                break
    finally:
        stepper.stopped = True  # the caller closes the generation; a running step's token is dropped
    if generation.finish_reason != "length" or not generation.tokens:
        await put(token_response(served, request, text.flush(), [], True, generation.finish_reason))


Step = tuple[int | None, bool, str | None]  # token (None: a stop token), finished, finish reason


class _Stepper:
    """Runs one generation's steps on the worker threads back to back, each handing its result to the loop."""

    def __init__(self, served: ServedVersion, generation: Generation) -> None:
        self._served, self._generation = served, generation
        self._loop = asyncio.get_running_loop()
        self.results: asyncio.Queue[Step | BaseException] = asyncio.Queue()
        self.stopped = False
        if generation.finished:
            self.results.put_nowait((None, True, generation.finish_reason))
        else:
            served.submit_to_worker(self._step)

    def _step(self) -> None:  # on a worker thread
        if self.stopped:
            return
        item: Step | BaseException
        try:
            token = self._generation.step()
            item = (token, self._generation.finished, self._generation.finish_reason)
        except Exception as err:  # handed to the loop, which raises it in the stream's coroutine
            item = err
        try:
            self._loop.call_soon_threadsafe(self.results.put_nowait, item)
            if isinstance(item, tuple) and item[0] is not None and not item[1] and not self.stopped:
                self._served.submit_to_worker(self._step)
        except RuntimeError:  # the loop is closed or the version's workers are shutting down
            self.stopped = True


async def _whole_sequence(
    served: ServedVersion, request: pb.ModelInferRequest, generation: Generation, put: Put
) -> None:
    assert served.decoder is not None  # checked by the caller; narrows the type
    while not generation.finished:
        await served.call_in_worker(generation.step)
    text = served.decoder.tokenizer.decode(generation.tokens)
    await put(token_response(served, request, text, generation.tokens, True, generation.finish_reason))


def token_response(
    served: ServedVersion,
    request: pb.ModelInferRequest,
    text: str,
    ids: list[int],
    final: bool,
    finish_reason: str | None,
) -> pb.ModelStreamInferResponse:
    response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
    outputs = {
        "text_output": np.array([text.encode("utf-8")], dtype=object),
        "output_ids": np.asarray(ids, dtype=np.int64),
    }
    encode_outputs(response, outputs)
    response.parameters[FINAL].bool_param = final
    if final and finish_reason:
        response.parameters["finish_reason"].string_param = finish_reason
    return pb.ModelStreamInferResponse(infer_response=response)


def error_response(request: pb.ModelInferRequest, err: KilnError) -> pb.ModelStreamInferResponse:
    failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    failed.parameters[FINAL].bool_param = True
    return pb.ModelStreamInferResponse(error_message=f"{status_code(err).name}: {err}", infer_response=failed)
