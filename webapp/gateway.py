"""Chat completion orchestration: provider calls, server-side tool rounds, OpenAI response shapes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from webapp.providers import Completion, Provider, ProviderError
from webapp.schema import ApiError, ChatRequest
from webapp.telemetry import LLMTelemetry
from webapp.tools import SERVER_TOOLS, ToolFailed

MAX_TOOL_ROUNDS = 4


@dataclass
class Usage:
    """Token usage summed over every provider call made for one client request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


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

    def check_model(self, request: ChatRequest) -> None:
        """Raise a 404 in OpenAI's shape when the provider does not serve the model."""
        if request.model not in self.provider.models:
            self.telemetry.call_finished(self.provider.name, "other", "model_not_found", None)
            raise ApiError(
                404,
                f"The model '{request.model[:100]}' does not exist; this gateway serves: "
                + ", ".join(sorted(self.provider.models)),
                "model_not_found",
                "model",
            )

    def _complete_once(self, request: ChatRequest, messages: list[dict], usage: Usage) -> Completion:
        model = self._model_label(request.model)
        started = time.perf_counter()
        try:
            completion = self.provider.complete(request, messages)
        except ProviderError as exc:
            status = "timeout" if exc.status == 504 else "error"
            self.telemetry.call_finished(self.provider.name, model, status, time.perf_counter() - started)
            raise
        self.telemetry.call_succeeded(
            self.provider.name,
            model,
            time.perf_counter() - started,
            completion.prompt_tokens,
            completion.completion_tokens,
        )
        usage.add(completion.prompt_tokens, completion.completion_tokens)
        return completion

    def _run_tool_rounds(self, request: ChatRequest, usage: Usage) -> tuple[list[dict], Completion]:
        """Call the provider, running server-side tools it asks for, until it answers."""
        messages = list(request.messages)
        for _ in range(MAX_TOOL_ROUNDS):
            completion = self._complete_once(request, messages, usage)
            calls = [c for c in completion.tool_calls if c.name in SERVER_TOOLS]
            if not calls or len(calls) != len(completion.tool_calls):
                return messages, completion
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                        for c in calls
                    ],
                }
            )
            for call in calls:
                try:
                    result, status = SERVER_TOOLS[call.name](call.arguments), "ok"
                except ToolFailed as exc:
                    result, status = f"error: {exc}", "error"
                self.telemetry.tool_executed(call.name, status)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        raise ApiError(502, f"the model kept calling tools after {MAX_TOOL_ROUNDS} rounds", "tool_loop")

    def complete(self, request: ChatRequest) -> dict:
        """A non-streaming chat.completion object."""
        usage = Usage()
        _, completion = self._run_tool_rounds(request, usage)
        message: dict = {"role": "assistant", "content": completion.text or None}
        if completion.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in completion.tool_calls
            ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason}],
            "usage": usage.as_dict(),
        }

    def stream(self, request: ChatRequest, response_complete: Callable[[], object] | None = None) -> Iterator[bytes]:
        """Server-Sent Events: role chunk, content chunks, finish chunk, usage chunk, [DONE].

        `response_complete` (promfork's ``environ["promfork.response_complete"]``, when
        present) is called right before the final chunk ([DONE], or an error event) is
        yielded: the request is counted then, so a client that got the whole stream
        always finds it counted even if the worker dies before the server closes it.
        """
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
            choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": request.model}
            body["choices"] = choices
            if usage is not None:
                body["usage"] = usage
            return sse(body)

        def final(data: bytes) -> bytes:
            if response_complete is not None:
                response_complete()
            return data

        provider, model = self.provider.name, self._model_label(request.model)
        with self.telemetry.stream_open(provider):
            yield chunk({"role": "assistant", "content": ""})
            usage = Usage()
            if request.tool_names() & SERVER_TOOLS.keys():
                # Tool rounds need whole answers; the final answer is then sent as chunks.
                try:
                    _, completion = self._run_tool_rounds(request, usage)
                except ApiError as exc:
                    yield final(sse(exc.body()))
                    return
                if completion.text:
                    yield chunk({"content": completion.text})
                yield chunk({}, completion.finish_reason)
                yield chunk({}, usage=usage.as_dict())
                yield final(sse("[DONE]"))
                return
            started = time.perf_counter()
            status = "cancelled"  # stays so if the client goes away mid-stream (GeneratorExit)
            first = True
            try:
                for delta in self.provider.stream(request, request.messages):
                    if delta.text:
                        if first:
                            self.telemetry.first_token(provider, model, time.perf_counter() - started)
                            first = False
                        yield chunk({"content": delta.text})
                    if delta.finish_reason is not None:
                        usage.add(delta.prompt_tokens or 0, delta.completion_tokens or 0)
                        yield chunk({}, delta.finish_reason)
                yield chunk({}, usage=usage.as_dict())
                # Counted once the usage chunk is handed to the server: a client that
                # left before it never learnt these tokens either.
                status = "ok"
                self.telemetry.usage(provider, model, usage.prompt_tokens, usage.completion_tokens)
                yield final(sse("[DONE]"))
            except ProviderError as exc:
                status = "timeout" if exc.status == 504 else "error"
                yield final(sse(exc.body()))
            finally:
                self.telemetry.call_finished(provider, model, status, time.perf_counter() - started)
