"""Chat completion orchestration: provider calls, server-side tool rounds, OpenAI response shapes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from webapp.providers import Completion, Provider, ProviderError, StreamDelta, ToolCall
from webapp.schema import ApiError, ChatRequest
from webapp.settings import DEFAULT_TENANT
from webapp.telemetry import CANCELLED, MODEL_NOT_FOUND, NO_ERROR, OTHER, LLMTelemetry, error_type
from webapp.tools import SERVER_TOOLS, ToolFailed

MAX_TOOL_ROUNDS = 4


@dataclass
class Usage:
    """Token usage summed over every provider call made for one client request, in OpenAI's usage shape."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    response_model: str = ""  # the model the provider said answered last

    def add(self, answer: Completion | StreamDelta) -> None:
        """Add one provider call's reported usage."""
        self.prompt_tokens += answer.prompt_tokens or 0
        self.completion_tokens += answer.completion_tokens or 0
        self.cached_tokens += answer.cached_tokens
        self.reasoning_tokens += answer.reasoning_tokens
        self.response_model = answer.response_model or self.response_model

    def as_dict(self) -> dict:
        """``usage`` as OpenAI sends it, details included."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


def _tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def sse(payload: dict | str) -> bytes:
    """One Server-Sent Event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Gateway:
    """Serves chat completions from one provider and records what happened."""

    def __init__(self, provider: Provider, telemetry: LLMTelemetry) -> None:
        self.provider = provider
        self.telemetry = telemetry

    def _model_label(self, model: str) -> str:
        return self.telemetry.model_label(model, self.provider.models)

    def check_model(self, request: ChatRequest, started: float) -> None:
        """Raise a 404 in OpenAI's shape when the provider does not serve the model.

        `started` is when the request arrived (``time.perf_counter()``), as for every method here.
        """
        if request.model not in self.provider.models:
            seconds = time.perf_counter() - started
            self.telemetry.request_served(self.provider.name, OTHER, "", MODEL_NOT_FOUND, seconds)
            raise ApiError(
                404,
                f"The model '{request.model[:100]}' does not exist; this gateway serves: "
                + ", ".join(sorted(self.provider.models)),
                "model_not_found",
                "model",
            )

    def _complete_once(
        self, request: ChatRequest, messages: list[dict], usage: Usage, tenant: str, request_started: float | None
    ) -> Completion:
        """One provider call; with `request_started`, the call is the whole request and records it too."""
        model = self._model_label(request.model)
        started = time.perf_counter()
        try:
            completion = self.provider.complete(request, messages)
        except ProviderError as exc:
            self.telemetry.call_failed(self.provider.name, model, error_type(exc.status), time.perf_counter() - started)
            raise
        ended = time.perf_counter()
        request_seconds = None if request_started is None else ended - request_started
        self.telemetry.call_succeeded(
            self.provider.name, model, completion, tenant, ended - started, self.provider.models, request_seconds
        )
        usage.add(completion)
        return completion

    def _run_tool_rounds(self, request: ChatRequest, usage: Usage, tenant: str) -> tuple[list[dict], Completion]:
        """Call the provider, running server-side tools it asks for, until it answers."""
        messages = list(request.messages)
        for _ in range(MAX_TOOL_ROUNDS):
            completion = self._complete_once(request, messages, usage, tenant, None)
            calls = [c for c in completion.tool_calls if c.name in SERVER_TOOLS]
            if not calls or len(calls) != len(completion.tool_calls):
                return messages, completion
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [_tool_call(c) for c in calls],
                }
            )
            for call in calls:
                started = time.perf_counter()
                try:
                    result, status = SERVER_TOOLS[call.name](call.arguments), "ok"
                except ToolFailed as exc:
                    result, status = f"error: {exc}", "error"
                self.telemetry.tool_executed(call.name, status, time.perf_counter() - started)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        raise ApiError(502, f"the model kept calling tools after {MAX_TOOL_ROUNDS} rounds", "tool_loop")

    def _served(self, request: ChatRequest, usage: Usage, error: str, started: float, **stream_times) -> None:
        self.telemetry.request_served(
            self.provider.name,
            self._model_label(request.model),
            usage.response_model,
            error,
            time.perf_counter() - started,
            served=self.provider.models,
            **stream_times,
        )

    def complete(self, request: ChatRequest, started: float, tenant: str = DEFAULT_TENANT) -> dict:
        """A non-streaming chat.completion object; `tenant` is the caller's tenant label."""
        usage = Usage()
        try:
            if request.tool_names() & SERVER_TOOLS.keys():
                _, completion = self._run_tool_rounds(request, usage, tenant)
                self._served(request, usage, NO_ERROR, started)
            else:  # one provider call: it and the request are recorded in one pass
                completion = self._complete_once(request, request.messages, usage, tenant, started)
        except ApiError as exc:
            self._served(request, usage, error_type(exc.status), started)
            raise
        message: dict = {"role": "assistant", "content": completion.text or None}
        if completion.tool_calls:
            message["tool_calls"] = [_tool_call(c) for c in completion.tool_calls]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": usage.response_model or request.model,
            "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason}],
            "usage": usage.as_dict(),
        }

    def stream(
        self,
        request: ChatRequest,
        started: float,
        response_complete: Callable[[], object] | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> Iterator[bytes]:
        """Server-Sent Events: role chunk, content chunks, finish chunk, usage chunk, [DONE].

        `response_complete` (promfork's ``environ["promfork.response_complete"]``, when
        present) is called right before the final chunk ([DONE], or an error event) is
        yielded: the request is counted then, so a client that got the whole stream
        always finds it counted even if the worker dies before the server closes it.
        Its GenAI metrics are recorded before that too, for the same reason.
        """
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        usage = Usage()

        def chunk(delta: dict, finish: str | None = None, with_usage: bool = False) -> bytes:
            choices = [] if with_usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
            model = usage.response_model or request.model
            body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
            body["choices"] = choices
            if with_usage:
                body["usage"] = usage.as_dict()
            return sse(body)

        def final(data: bytes) -> bytes:
            if response_complete is not None:
                response_complete()
            return data

        with self.telemetry.stream_open(self.provider.name):
            yield chunk({"role": "assistant", "content": ""})
            if request.tool_names() & SERVER_TOOLS.keys():
                # Tool rounds need whole answers; the final answer is then sent as chunks.
                try:
                    _, completion = self._run_tool_rounds(request, usage, tenant)
                except ApiError as exc:
                    self._served(request, usage, error_type(exc.status), started)
                    yield final(sse(exc.body()))
                    return
                try:
                    if completion.text:
                        yield chunk({"content": completion.text})
                    yield chunk({}, completion.finish_reason)
                    yield chunk({}, with_usage=True)
                except GeneratorExit:
                    self._aborted(request, usage, started)
                    raise
                self._served(request, usage, NO_ERROR, started)
                yield final(sse("[DONE]"))
                return
            yield from self._relay(request, usage, tenant, started, chunk, final)

    def _relay(self, request: ChatRequest, usage: Usage, tenant: str, started: float, chunk, final) -> Iterator[bytes]:
        """Relay the provider's stream, recording TTFT, time per output token and the call's usage."""
        provider, model = self.provider.name, self._model_label(request.model)
        called = time.perf_counter()
        first_token: float | None = None
        last: StreamDelta | None = None
        done = False
        try:
            for delta in self.provider.stream(request, request.messages):
                if delta.text:
                    if first_token is None:
                        first_token = time.perf_counter()
                    yield chunk({"content": delta.text})
                if delta.finish_reason is not None:
                    last, ended = delta, time.perf_counter()
                    usage.add(delta)
                    if delta.tool_calls:
                        yield chunk(
                            {"tool_calls": [dict(index=i, **_tool_call(c)) for i, c in enumerate(delta.tool_calls)]}
                        )
                    yield chunk({}, delta.finish_reason)
            if last is None:
                raise ProviderError(502, "the provider's stream ended without usage", "upstream_error")
            yield chunk({}, with_usage=True)
            # Counted once the usage chunk is handed to the server: a client that
            # left before it never learnt these tokens either.
            done = True
            ttft = tpot = None
            if first_token is not None:
                ttft = first_token - started
                if usage.completion_tokens >= 2:
                    tpot = (ended - first_token) / (usage.completion_tokens - 1)
            self.telemetry.call_succeeded(
                provider, model, last, tenant, ended - called, self.provider.models, time.perf_counter() - started,
                ttft, tpot,
            )  # fmt: skip
            yield final(sse("[DONE]"))
        except ProviderError as exc:
            error = error_type(exc.status)
            self.telemetry.call_failed(provider, model, error, time.perf_counter() - called)
            self._served(request, usage, error, started)
            yield final(sse(exc.body()))
        except GeneratorExit:
            if not done:  # the client went away mid-stream
                self.telemetry.call_failed(provider, model, CANCELLED, time.perf_counter() - called)
                self._aborted(request, usage, started)
            raise

    def _aborted(self, request: ChatRequest, usage: Usage, started: float) -> None:
        self._served(request, usage, CANCELLED, started)
        self.telemetry.stream_aborted(self.provider.name, self._model_label(request.model))
