"""Adapter that serves OpenAI chat and embedding requests through the Gemini API.

It calls the generativelanguage v1beta methods generateContent, streamGenerateContent
and batchEmbedContents. ``to_gemini_request`` and ``from_gemini_response`` translate
the bodies, and ``translate_gemini_stream`` turns streamed responses into OpenAI chunks.
"""

from __future__ import annotations

import base64
import math
import mimetypes
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from workers.adapters.base import UpstreamResult, UpstreamStatusError, UpstreamUnreachable
from workers.adapters.translate_common import (
    ChunkBuilder,
    ServerSentEvent,
    UntranslatableRequest,
    assistant_message,
    completion_body,
    content_parts,
    content_text,
    decode_arguments,
    first_error_object,
    function_tool_call,
    function_tools,
    invalid_response_error,
    iter_sse,
    json_text,
    load_event_json,
    max_output_tokens,
    named_tool_choice,
    parse_data_url,
    post_json,
    raise_for_status,
    response_format_schema,
    stop_sequences,
    upstream_call,
)
from workers.upstream_http import HttpClient

# Media type of an image URL whose extension names no image type.
DEFAULT_IMAGE_MIME_TYPE = "image/jpeg"

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}

TOOL_CHOICE_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}

# OpenAI request fields copied into generationConfig under Gemini's name.
GENERATION_FIELDS = {
    "temperature": "temperature",
    "top_p": "topP",
    "n": "candidateCount",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "top_logprobs": "logprobs",
}

# JSON Schema keywords that Gemini's Schema object does not define and rejects as
# unknown fields. $defs and definitions go too, after their $ref uses are inlined.
REJECTED_SCHEMA_KEYS = frozenset(
    {"$schema", "$id", "$comment", "$defs", "definitions", "additionalProperties"}
)

# Characters per token that Google's token guide gives for Gemini models, used to
# estimate embedding usage because batchEmbedContents reports none.
CHARACTERS_PER_TOKEN = 4


def unsupported_parameters(body: dict[str, Any]) -> list[str]:
    """Return the OpenAI parameters in ``body`` that Gemini cannot honour.

    Gemini has no logit bias and no switch that turns off parallel function calls.
    """
    names = []
    if body.get("logit_bias"):
        names.append("logit_bias")
    if body.get("parallel_tool_calls") is False:
        names.append("parallel_tool_calls")
    return names


# --- Request --------------------------------------------------------------------------


def to_gemini_request(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Translate an OpenAI chat completion body into a GenerateContentRequest.

    ``upstream_model`` is not part of the body, because Gemini takes the model in the
    URL. Raises UntranslatableRequest for content Gemini cannot take, such as audio.
    """
    system_parts, contents = _convert_messages(body.get("messages"))
    request: dict[str, Any] = {}
    if system_parts:
        request["systemInstruction"] = {"parts": system_parts}
    request["contents"] = contents

    tools = function_tools(body)
    if tools:
        declarations = [_function_declaration(tool["function"]) for tool in tools]
        request["tools"] = [{"functionDeclarations": declarations}]
        tool_config = _tool_config(body.get("tool_choice"))
        if tool_config is not None:
            request["toolConfig"] = tool_config

    generation_config = _generation_config(body)
    if generation_config:
        request["generationConfig"] = generation_config
    return request


def _convert_messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the systemInstruction parts and the contents of an OpenAI message list."""
    if not isinstance(messages, list) or not messages:
        raise UntranslatableRequest("messages must be a non-empty list.")
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    # Gemini names the function in each functionResponse, and OpenAI tool messages
    # carry only the call id, so the names come from the earlier assistant calls.
    call_names: dict[str, str] = {}
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system += [_part(part) for part in content_parts(message.get("content"))]
        elif role == "user":
            parts = [_part(part) for part in content_parts(message.get("content"))]
            contents.append({"role": "user", "parts": parts})
        elif role == "assistant":
            parts = _assistant_parts(message, call_names)
            if parts:
                contents.append({"role": "model", "parts": parts})
        elif role == "tool":
            _append_function_response(contents, message, call_names)
        else:
            raise UntranslatableRequest(
                f"messages[{position}].role {role!r} cannot be sent to Gemini; use system, "
                "developer, user, assistant or tool."
            )
    return system, contents


def _part(part: dict[str, Any]) -> dict[str, Any]:
    """Translate one OpenAI content part into a Gemini Part."""
    kind = part.get("type")
    if kind == "text":
        return {"text": str(part.get("text", ""))}
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise UntranslatableRequest("An image_url part needs an image_url object with a url.")
        data_url = parse_data_url(url)
        if data_url is not None:
            return {"inlineData": {"mimeType": data_url[0], "data": data_url[1]}}
        if url.startswith(("https://", "http://")):
            return {"fileData": {"mimeType": _image_mime_type(url), "fileUri": url}}
        raise UntranslatableRequest("An image URL must be an http(s) URL or a base64 data URL.")
    if kind == "file":
        file = part.get("file")
        file_data = file.get("file_data") if isinstance(file, dict) else None
        data_url = parse_data_url(file_data) if isinstance(file_data, str) else None
        if data_url is None:
            raise UntranslatableRequest(
                "A file part can be sent to Gemini only with file_data as a base64 data URL."
            )
        return {"inlineData": {"mimeType": data_url[0], "data": data_url[1]}}
    raise UntranslatableRequest(f"Content parts of type {kind!r} cannot be sent to Gemini.")


def _image_mime_type(url: str) -> str:
    guessed, _ = mimetypes.guess_type(urlsplit(url).path)
    if guessed and guessed.startswith("image/"):
        return guessed
    return DEFAULT_IMAGE_MIME_TYPE


def _assistant_parts(message: dict[str, Any], call_names: dict[str, str]) -> list[dict[str, Any]]:
    parts = [
        _part(part)
        for part in content_parts(message.get("content"))
        if part.get("type") != "text" or part.get("text")
    ]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UntranslatableRequest("Each assistant tool call needs a function with a name.")
        name = function["name"]
        if call.get("id"):
            call_names[call["id"]] = name
        function_call = {"name": name, "args": decode_arguments(function.get("arguments"), name)}
        converted: dict[str, Any] = {"functionCall": function_call}
        signature = _thought_signature(call)
        if signature:
            converted["thoughtSignature"] = signature
        parts.append(converted)
    return parts


def _thought_signature(call: dict[str, Any]) -> str | None:
    """Return the Gemini thought signature that an earlier response attached to a call.

    Gemini 3 models reject a function call in the current turn without the signature
    they sent with it. It travels in ``extra_content.google.thought_signature``, the
    field Google's own OpenAI-compatible endpoint uses.
    """
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) else None


def _append_function_response(
    contents: list[dict[str, Any]], message: dict[str, Any], call_names: dict[str, str]
) -> None:
    """Add a tool message as a functionResponse part, merging consecutive ones into one turn.

    Gemini expects the responses to all calls of a model turn in the next user turn.
    """
    call_id = message.get("tool_call_id")
    name = call_names.get(call_id) or message.get("name")
    if not name:
        raise UntranslatableRequest(
            f"The tool message for call {call_id!r} matches no earlier assistant tool call, "
            "so the function name that Gemini needs is unknown."
        )
    part = {"functionResponse": {"name": name, "response": _function_response(message)}}
    previous = contents[-1] if contents else None
    if (
        previous is not None
        and previous["role"] == "user"
        and all("functionResponse" in item for item in previous["parts"])
    ):
        previous["parts"].append(part)
    else:
        contents.append({"role": "user", "parts": [part]})


def _function_response(message: dict[str, Any]) -> dict[str, Any]:
    """Return the response object of a tool message.

    Gemini needs a JSON object, so a JSON object result is sent as is, and any other
    result, JSON or not, is wrapped as ``{"content": value}``.
    """
    content = message.get("content")
    text = content if isinstance(content, str) else content_text(content)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"content": text}
    return value if isinstance(value, dict) else {"content": value}


def _function_declaration(function: dict[str, Any]) -> dict[str, Any]:
    declaration: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        declaration["description"] = function["description"]
    parameters = function.get("parameters")
    # Gemini rejects an OBJECT schema with no properties, which OpenAI clients send for
    # functions without arguments, so such functions get no parameters at all.
    if isinstance(parameters, dict) and (
        parameters.get("properties") or parameters.get("type") not in (None, "object")
    ):
        declaration["parameters"] = to_gemini_schema(parameters)
    return declaration


def _tool_config(tool_choice: Any) -> dict[str, Any] | None:
    if tool_choice is None:
        return None
    if isinstance(tool_choice, str):
        mode = TOOL_CHOICE_MODES.get(tool_choice)
        if mode is None:
            raise UntranslatableRequest(f"tool_choice {tool_choice!r} is not supported.")
        return {"functionCallingConfig": {"mode": mode}}
    name = named_tool_choice(tool_choice)
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    limit = max_output_tokens(body)
    if limit is not None:
        config["maxOutputTokens"] = limit
    for openai_name, gemini_name in GENERATION_FIELDS.items():
        if body.get(openai_name) is not None:
            config[gemini_name] = body[openai_name]
    stop = stop_sequences(body)
    if stop:
        config["stopSequences"] = stop
    if body.get("logprobs"):
        config["responseLogprobs"] = True
    kind, schema = response_format_schema(body)
    if kind is not None:
        config["responseMimeType"] = "application/json"
    if schema is not None:
        config["responseSchema"] = to_gemini_schema(schema)
    return config


def to_gemini_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of a JSON schema that Gemini's Schema object accepts.

    Local ``$ref`` pointers into ``$defs`` or ``definitions`` are inlined, keywords in
    REJECTED_SCHEMA_KEYS are removed at every level, ``oneOf`` becomes ``anyOf``, and a
    type list with ``"null"`` becomes one type plus ``nullable``. Raises
    UntranslatableRequest for a recursive or non-local ``$ref``, which Gemini cannot
    express. NOTE: other keywords pass through unchanged, and Gemini rejects those it
    does not know with a 400.
    """
    definitions = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    return _clean_schema(schema, definitions, ())


def _clean_schema(schema: Any, definitions: dict[str, Any], expanding: tuple[str, ...]) -> Any:
    if not isinstance(schema, dict):
        return schema
    reference = schema.get("$ref")
    if isinstance(reference, str):
        name = reference.rpartition("/")[2]
        local = reference.startswith(("#/$defs/", "#/definitions/"))
        if not local or name not in definitions:
            raise UntranslatableRequest(f"The schema reference {reference!r} cannot be resolved.")
        if name in expanding:
            raise UntranslatableRequest(
                f"The schema refers to {reference!r} recursively, which Gemini cannot express."
            )
        siblings = {key: value for key, value in schema.items() if key != "$ref"}
        return _clean_schema({**definitions[name], **siblings}, definitions, (*expanding, name))

    cleaned: dict[str, Any] = {}
    for key, value in schema.items():
        if key in REJECTED_SCHEMA_KEYS:
            continue
        if key == "properties" and isinstance(value, dict):
            # Property names are not keywords, so only their schemas are cleaned.
            cleaned[key] = {
                name: _clean_schema(sub, definitions, expanding) for name, sub in value.items()
            }
        elif key in ("anyOf", "oneOf", "allOf") and isinstance(value, list):
            target = "anyOf" if key == "oneOf" else key
            cleaned[target] = [_clean_schema(sub, definitions, expanding) for sub in value]
        elif key == "items":
            cleaned[key] = _clean_schema(value, definitions, expanding)
        elif key == "type" and isinstance(value, list):
            _set_type_list(cleaned, value)
        else:
            cleaned[key] = value
    return cleaned


def _set_type_list(cleaned: dict[str, Any], types: list[Any]) -> None:
    concrete = [kind for kind in types if kind != "null"]
    if "null" in types:
        cleaned["nullable"] = True
    if len(concrete) == 1:
        cleaned["type"] = concrete[0]
    elif concrete:
        cleaned["anyOf"] = [{"type": kind} for kind in concrete]


# --- Response -------------------------------------------------------------------------


def openai_usage(metadata: dict[str, Any]) -> dict[str, Any]:
    """Translate Gemini usageMetadata into OpenAI usage.

    Thinking tokens are billed as output, so they count as completion tokens and are
    also reported as reasoning_tokens. promptTokenCount already includes the cached
    tokens. Tokens of built-in tool prompts (toolUsePromptTokenCount) count as prompt.
    """
    prompt_tokens = int(metadata.get("promptTokenCount") or 0)
    prompt_tokens += int(metadata.get("toolUsePromptTokenCount") or 0)
    thoughts = int(metadata.get("thoughtsTokenCount") or 0)
    completion_tokens = int(metadata.get("candidatesTokenCount") or 0) + thoughts
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": int(metadata.get("cachedContentTokenCount") or 0)
        },
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def from_gemini_response(data: dict[str, Any], public_model: str) -> dict[str, Any]:
    """Translate a GenerateContentResponse into an OpenAI ``chat.completion`` object.

    Each candidate becomes a choice. A prompt that Gemini blocked, which has no
    candidates, becomes one empty choice with finish_reason content_filter. Raises
    UpstreamStatusError (502) for a response with neither candidates nor a block reason.
    """
    response_id = data.get("responseId") or uuid.uuid4().hex
    candidates = data.get("candidates") or []
    if not candidates:
        if not (data.get("promptFeedback") or {}).get("blockReason"):
            raise invalid_response_error("Gemini returned no candidates and no block reason.")
        choices = [_choice(0, "", [], "content_filter", None)]
    else:
        choices = []
        call_ids = _CallIds(response_id)
        for candidate in candidates:
            texts, tool_calls = _candidate_output(candidate, call_ids)
            text = "".join(texts) if texts or not tool_calls else None
            finish_reason = _finish_reason(candidate.get("finishReason"), bool(tool_calls))
            logprobs = _logprobs(candidate)
            choices.append(
                _choice(candidate.get("index", 0), text, tool_calls, finish_reason, logprobs)
            )
        choices.sort(key=lambda choice: choice["index"])
    usage = openai_usage(data.get("usageMetadata") or {})
    return completion_body(f"chatcmpl-{response_id}", public_model, choices, usage)


def _choice(
    index: int,
    text: str | None,
    tool_calls: list[dict[str, Any]],
    finish_reason: str,
    logprobs: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "index": index,
        "message": assistant_message(text, tool_calls),
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


@dataclass
class _CallIds:
    """Tool call ids of one response: Gemini's own id, else ``call_<response id>_<n>``.

    The response id keeps the ids unique across the turns of a conversation.
    """

    response_id: str
    count: int = 0

    def next_id(self, function_call: dict[str, Any]) -> str:
        self.count += 1
        return function_call.get("id") or f"call_{self.response_id}_{self.count - 1}"


def _candidate_output(
    candidate: dict[str, Any], call_ids: _CallIds
) -> tuple[list[str], list[dict[str, Any]]]:
    """Return the reply texts and OpenAI tool calls of a candidate's parts.

    Thought summaries (parts with ``thought: true``) are left out of the reply.
    """
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            tool_calls.append(_tool_call(part, call_ids))
    return texts, tool_calls


def _tool_call(part: dict[str, Any], call_ids: _CallIds) -> dict[str, Any]:
    function_call = part["functionCall"]
    arguments = json_text(function_call.get("args") or {})
    call = function_tool_call(call_ids.next_id(function_call), function_call["name"], arguments)
    if part.get("thoughtSignature"):
        call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return call


def _finish_reason(reason: str | None, called_tools: bool) -> str:
    finish_reason = FINISH_REASONS.get(reason or "", "stop")
    if finish_reason == "stop" and called_tools:
        return "tool_calls"
    return finish_reason


def _logprobs(candidate: dict[str, Any]) -> dict[str, Any] | None:
    """Translate a candidate's logprobsResult into an OpenAI choice's logprobs."""
    result = candidate.get("logprobsResult")
    if not isinstance(result, dict):
        return None
    top_candidates = result.get("topCandidates") or []
    content = []
    for position, chosen in enumerate(result.get("chosenCandidates") or []):
        alternatives = []
        if position < len(top_candidates):
            alternatives = top_candidates[position].get("candidates") or []
        entry = _token_logprob(chosen)
        entry["top_logprobs"] = [_token_logprob(alternative) for alternative in alternatives]
        content.append(entry)
    return {"content": content, "refusal": None}


def _token_logprob(candidate: dict[str, Any]) -> dict[str, Any]:
    token = str(candidate.get("token", ""))
    return {
        "token": token,
        "logprob": float(candidate.get("logProbability", 0.0)),
        "bytes": list(token.encode()),
    }


# --- Errors ---------------------------------------------------------------------------


def parse_error(payload: Any) -> tuple[str | None, str | None, float | None]:
    """Read the message, code and retry delay of a Google API error body.

    The code is ``context_length_exceeded`` for a prompt over the model's input limit,
    as OpenAI names it, and Google's status name (such as RESOURCE_EXHAUSTED) otherwise.
    The retry delay comes from a google.rpc.RetryInfo detail.
    """
    error = first_error_object(payload)
    message = error.get("message")
    code = error.get("status")
    if isinstance(message, str) and "exceeds the maximum number of tokens" in message:
        code = "context_length_exceeded"
    retry_after_s = None
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            retry_after_s = _duration_seconds(detail.get("retryDelay"))
    return message, code, retry_after_s


def _duration_seconds(value: Any) -> float | None:
    """Parse a protobuf Duration in JSON form, such as ``"7s"`` or ``"0.5s"``."""
    if not isinstance(value, str) or not value.endswith("s"):
        return None
    try:
        return max(0.0, float(value[:-1]))
    except ValueError:
        return None


def stream_error(payload: Any) -> UpstreamStatusError:
    """Return the exception for an error object sent inside a started stream."""
    message, code, retry_after_s = parse_error(payload)
    status = first_error_object(payload).get("code")
    return UpstreamStatusError(
        message or "Gemini reported an error inside the stream.",
        status_code=status if isinstance(status, int) and 400 <= status <= 599 else 500,
        code=code,
        retry_after_s=retry_after_s,
    )


# --- Calls ----------------------------------------------------------------------------


def _headers(api_key: str | None) -> dict[str, str]:
    # The key goes in a header and never in the URL, where logs and error messages
    # could show it.
    headers = {"content-type": "application/json"}
    if api_key:
        headers["x-goog-api-key"] = api_key
    return headers


def _model_url(base_url: str, upstream_model: str, method: str) -> str:
    return f"{base_url}/models/{upstream_model.removeprefix('models/')}:{method}"


def chat_completion(
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    upstream_model: str,
    public_model: str,
    timeout_s: float,
) -> UpstreamResult:
    """Call ``models/{upstream_model}:generateContent`` and return an OpenAI completion."""
    request = to_gemini_request(body, upstream_model)
    status_code, data = post_json(
        client,
        _model_url(base_url, upstream_model, "generateContent"),
        _headers(api_key),
        request,
        timeout_s,
        parse_error,
    )
    try:
        completion = from_gemini_response(data, public_model)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise invalid_response_error(
            f"Gemini returned a generateContent response that could not be read: {exc!r}"
        ) from exc
    usage = completion["usage"]
    return UpstreamResult(
        body=completion,
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        status_code=status_code,
    )


def stream_chat_completion(
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    upstream_model: str,
    public_model: str,
    timeout_s: float,
) -> Iterator[dict[str, Any]]:
    """Stream ``models/{upstream_model}:streamGenerateContent?alt=sse`` as OpenAI chunks.

    ``timeout_s`` applies to each read, not to the whole stream. Raises UpstreamError
    subclasses, also while iterating.
    """
    request = to_gemini_request(body, upstream_model)
    with upstream_call(timeout_s):
        with client.stream(
            "POST",
            _model_url(base_url, upstream_model, "streamGenerateContent"),
            params={"alt": "sse"},
            headers={**_headers(api_key), "accept": "text/event-stream"},
            content=orjson.dumps(request),
            timeout=timeout_s,
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise_for_status(response, parse_error)
            yield from translate_gemini_stream(iter_sse(response.iter_bytes()), public_model)


# --- Stream ---------------------------------------------------------------------------


@dataclass
class _CandidateState:
    tool_count: int = 0
    finished: bool = False


def translate_gemini_stream(
    events: Iterable[ServerSentEvent], public_model: str
) -> Iterator[dict[str, Any]]:
    """Translate streamed GenerateContentResponse events into OpenAI chunks.

    Each candidate index becomes a choice index. The first chunk of a choice carries
    the assistant role, text parts become content deltas, and each functionCall part
    an opening tool_calls delta plus one with all its arguments. A chunk with the finish
    reason ends each choice, and a usage chunk from the last usageMetadata ends the
    stream.

    Raises UpstreamStatusError for an error object in the stream and
    UpstreamUnreachable when the stream ends before every candidate finished.
    """
    builder: ChunkBuilder | None = None
    call_ids: _CallIds | None = None
    states: dict[int, _CandidateState] = {}
    usage_metadata: dict[str, Any] = {}
    blocked = False
    for event in events:
        payload = load_event_json(event.data)
        if not isinstance(payload, dict):
            continue
        if "error" in payload:
            raise stream_error(payload)
        if builder is None or call_ids is None:
            response_id = payload.get("responseId") or uuid.uuid4().hex
            builder = ChunkBuilder(public_model, f"chatcmpl-{response_id}")
            call_ids = _CallIds(response_id)
        usage_metadata = payload.get("usageMetadata") or usage_metadata
        candidates = payload.get("candidates") or []
        if not candidates and (payload.get("promptFeedback") or {}).get("blockReason"):
            blocked = True
            yield builder.role_chunk()
            yield builder.chunk({}, finish_reason="content_filter")
            continue
        for candidate in candidates:
            yield from _candidate_chunks(builder, call_ids, states, candidate)
    if builder is None:
        raise UpstreamUnreachable("The Gemini stream ended before its first response.")
    if not blocked and (not states or not all(state.finished for state in states.values())):
        raise UpstreamUnreachable("The Gemini stream ended before every candidate finished.")
    yield builder.usage_chunk(openai_usage(usage_metadata))


def _candidate_chunks(
    builder: ChunkBuilder,
    call_ids: _CallIds,
    states: dict[int, _CandidateState],
    candidate: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    index = candidate.get("index", 0)
    state = states.get(index)
    if state is None:
        state = states[index] = _CandidateState()
        yield builder.role_chunk(index)
    logprobs = _logprobs(candidate)
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):
            continue
        if isinstance(part.get("text"), str) and part["text"]:
            yield builder.chunk({"content": part["text"]}, index, logprobs=logprobs)
            logprobs = None
        elif isinstance(part.get("functionCall"), dict):
            call = _tool_call(part, call_ids)
            extra = {"extra_content": call["extra_content"]} if "extra_content" in call else None
            function = call["function"]
            yield from builder.tool_call_chunks(
                state.tool_count, call["id"], function["name"], function["arguments"], index, extra
            )
            state.tool_count += 1
    if candidate.get("finishReason"):
        state.finished = True
        finish_reason = _finish_reason(candidate["finishReason"], state.tool_count > 0)
        yield builder.chunk({}, index, finish_reason=finish_reason)


# --- Embeddings -----------------------------------------------------------------------


def to_gemini_embedding_request(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Translate an OpenAI embeddings body into a BatchEmbedContentsRequest.

    Each input string becomes one request. Raises UntranslatableRequest for token id
    inputs, which Gemini cannot take.
    """
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise UntranslatableRequest(
            "Gemini embeddings need input as a string or a non-empty list of strings; "
            "token id arrays are not supported."
        )
    model = f"models/{upstream_model.removeprefix('models/')}"
    requests = []
    for text in inputs:
        item: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
        if body.get("dimensions") is not None:
            item["outputDimensionality"] = body["dimensions"]
        requests.append(item)
    return {"requests": requests}


def embeddings(
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    upstream_model: str,
    public_model: str,
    timeout_s: float,
) -> UpstreamResult:
    """Call ``models/{upstream_model}:batchEmbedContents`` and return an OpenAI list.

    prompt_tokens is usageMetadata.promptTokenCount when the response has it. The
    Gemini API documents no usage for this method, so otherwise it is an estimate of
    one token per CHARACTERS_PER_TOKEN characters of input.
    """
    request = to_gemini_embedding_request(body, upstream_model)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise UntranslatableRequest(
            f"encoding_format {encoding!r} is not supported; use float or base64."
        )
    status_code, data = post_json(
        client,
        _model_url(base_url, upstream_model, "batchEmbedContents"),
        _headers(api_key),
        request,
        timeout_s,
        parse_error,
    )
    try:
        vectors = [list(item["values"]) for item in data["embeddings"]]
    except (KeyError, TypeError) as exc:
        raise invalid_response_error(
            "Gemini returned a batchEmbedContents response without embedding values."
        ) from exc
    if len(vectors) != len(request["requests"]):
        raise invalid_response_error(
            f"Gemini returned {len(vectors)} embeddings for {len(request['requests'])} inputs."
        )
    prompt_tokens = _embedding_prompt_tokens(data, request)
    result = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _encode(vector, encoding)}
            for index, vector in enumerate(vectors)
        ],
        "model": public_model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return UpstreamResult(
        body=result, prompt_tokens=prompt_tokens, completion_tokens=0, status_code=status_code
    )


def _embedding_prompt_tokens(data: dict[str, Any], request: dict[str, Any]) -> int:
    reported = (data.get("usageMetadata") or {}).get("promptTokenCount")
    if reported is not None:
        return int(reported)
    # NOTE: an estimate, so billed embedding tokens can differ from Google's count.
    return sum(
        math.ceil(len(item["content"]["parts"][0]["text"]) / CHARACTERS_PER_TOKEN)
        for item in request["requests"]
    )


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """Return the vector as floats, or as base64 of little-endian float32 like OpenAI."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
