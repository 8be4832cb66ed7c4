"""An OpenAI-compatible upstream provider (OpenAI, vLLM, llama.cpp server, ...), stdlib HTTP only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from webapp.providers.base import Completion, ProviderError, StreamDelta, ToolCall
from webapp.schema import ChatRequest
from webapp.settings import GatewaySettings


class OpenAIProvider:
    """Forwards chat completions to OPENAI_BASE_URL and reports the upstream's usage."""

    name = "openai"

    def __init__(self, settings: GatewaySettings) -> None:
        self.url = settings.openai_base_url + "/chat/completions"
        self.api_key = settings.openai_api_key
        self.timeout = settings.upstream_timeout_s
        self.models = frozenset(settings.openai_models)

    def _post(self, body: dict):
        data = json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 (http(s) checked at start)
            self.url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 (http(s) checked at start)
        except urllib.error.HTTPError as exc:
            message = _upstream_message(exc)
            status = exc.code if exc.code in (400, 401, 403, 404, 429) else 502
            raise ProviderError(status, f"upstream answered {exc.code}: {message}", "upstream_error") from None
        except TimeoutError:
            raise ProviderError(504, "upstream did not answer in time", "upstream_timeout") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ProviderError(502, f"upstream unreachable: {exc}", "upstream_unreachable") from None

    def complete(self, request: ChatRequest, messages: list[dict]) -> Completion:
        """One upstream call, returning its text, tool calls and usage."""
        with self._post({**request.raw, "messages": messages, "stream": False}) as resp:
            try:
                payload = json.load(resp)
                choice = payload["choices"][0]
                message = choice["message"]
                usage = payload["usage"]
                calls = tuple(
                    ToolCall(c["id"], c["function"]["name"], c["function"].get("arguments", ""))
                    for c in message.get("tool_calls") or ()
                )
                return Completion(
                    message.get("content") or "",
                    int(usage["prompt_tokens"]),
                    int(usage["completion_tokens"]),
                    choice.get("finish_reason") or "stop",
                    calls,
                    str(payload.get("model") or ""),
                    *usage_details(usage),
                )
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise ProviderError(502, f"upstream sent a malformed completion: {exc!r}", "upstream_error") from None

    def stream(self, request: ChatRequest, messages: list[dict]) -> Iterator[StreamDelta]:
        """Relay upstream Server-Sent Events as deltas; usage comes from the upstream's last chunk."""
        body = {**request.raw, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        finish = None
        usage = None
        response_model = ""
        with self._post(body) as resp:
            for raw_line in resp:
                line = raw_line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise ProviderError(502, "upstream sent a malformed stream chunk", "upstream_error") from None
                response_model = str(chunk.get("model") or response_model)
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield StreamDelta(text=text)
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage") or usage
        if not usage:
            raise ProviderError(502, "upstream stream ended without usage", "upstream_error")
        try:
            cached, reasoning = usage_details(usage)
            prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(502, f"upstream sent malformed usage: {exc!r}", "upstream_error") from None
        yield StreamDelta(
            finish_reason=finish or "stop",
            prompt_tokens=prompt,
            completion_tokens=completion,
            response_model=response_model,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
        )


def usage_details(usage: dict) -> tuple[int, int]:
    """(cached prompt tokens, reasoning tokens) from OpenAI's usage details; 0 for what is not reported."""
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return int(prompt_details.get("cached_tokens") or 0), int(completion_details.get("reasoning_tokens") or 0)


def _upstream_message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.load(exc)["error"]["message"]
    except Exception:
        return exc.reason or "error"
