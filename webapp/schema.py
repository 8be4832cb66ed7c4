"""Validation of chat completion requests against OpenAI's API, with OpenAI-shaped errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Every request parameter of OpenAI's chat completions API. A field outside this
# set is a client bug (a typo, or an API this gateway does not speak).
KNOWN_FIELDS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop",
        "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty",
        "logit_bias", "logprobs", "top_logprobs", "user", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "seed", "functions", "function_call",
        "service_tier", "store", "metadata", "modalities", "audio", "prediction",
        "reasoning_effort", "web_search_options", "verbosity", "prompt_cache_key",
        "safety_identifier", "prompt_cache_retention",
    }
)  # fmt: skip
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "api_error")

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, code: str = "invalid_value", param: str | None = None) -> ApiError:
    return ApiError(400, message, code, param)


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    max_tokens: int | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = None
    raw: dict[str, Any] = field(default_factory=dict)

    def tool_names(self) -> set[str]:
        """Names of the function tools the client offered."""
        return {t["function"]["name"] for t in self.tools}


def message_text(message: dict[str, Any]) -> str:
    """The text of a message's content, joining text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _check_number(body: dict, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(f"'{name}' must be a number from {low:g} to {high:g}", param=name)


def _check_positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"'{name}' must be a positive integer", param=name)
    return value


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of message objects", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"'{where}.role' must be one of: {', '.join(sorted(ROLES))}", param=f"{where}.role")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue
        if not isinstance(content, str | list):
            raise _bad(f"'{where}.content' must be a string or an array of content parts", param=f"{where}.content")
        parts_ok = isinstance(content, str) or all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
        )
        if not parts_ok:
            raise _bad(f"'{where}.content' parts must be objects with a 'type'", param=f"{where}.content")
    return messages


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        if not named or tool.get("type") != "function":
            raise _bad(f"'tools[{i}]' must be a function tool with a name", param=f"tools[{i}]")
    return tools


def parse_chat_request(raw_body: bytes) -> ChatRequest:
    """Parse and validate a request body; raise ApiError (400) naming the first problem."""
    if not raw_body.strip():
        raise _bad("request body is empty; send a JSON object with 'model' and 'messages'", "invalid_json")
    try:
        body = json.loads(raw_body)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", "invalid_json")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _bad(f"unknown parameter '{unknown[0]}'", "unknown_parameter", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string", "missing_required_parameter", "model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", param="stream_options")
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    _check_number(body, "presence_penalty", -2, 2)
    _check_number(body, "frequency_penalty", -2, 2)
    n = _check_positive_int(body, "n")
    if n not in (None, 1):
        raise _bad("'n' greater than 1 is not supported by this gateway", "unsupported_value", "n")
    max_tokens = _check_positive_int(body, "max_completion_tokens") or _check_positive_int(body, "max_tokens")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string", param="user")
    return ChatRequest(
        model=model,
        messages=_check_messages(body.get("messages")),
        stream=bool(stream),
        max_tokens=max_tokens,
        tools=_check_tools(body.get("tools")),
        tool_choice=body.get("tool_choice"),
        raw=body,
    )
