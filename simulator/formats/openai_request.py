"""Request parsing and validation for the OpenAI wire format."""

from typing import Any

from simulator.content import (
    TOOLS_AUTO,
    TOOLS_NAMED,
    TOOLS_NONE,
    TOOLS_REQUIRED,
    ReplyRequest,
    ToolSpec,
)
from simulator.formats.common import invalid, optional_int, string_list
from simulator.tokens import (
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    count_tokens,
)

MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_chat_request(body: dict, model: str) -> tuple[ReplyRequest, int]:
    """Check the chat request and return its reply request and prompt token count."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid(
            "Missing required parameter: 'messages' must be a non-empty array.", "messages"
        )
    texts: list[str] = []
    prompt_tokens = REPLY_PRIMING_TOKENS
    last_user_text = ""
    for position, message in enumerate(messages):
        label = f"messages[{position}]"
        if not isinstance(message, dict):
            raise invalid(f"Invalid type for '{label}': expected an object.", label)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise invalid(
                f"Invalid value for '{label}.role': {role!r}. Supported values are: "
                f"{', '.join(sorted(MESSAGE_ROLES))}.",
                f"{label}.role",
            )
        message_texts, media_parts = _message_texts(message, label)
        texts.extend(message_texts)
        prompt_tokens += MESSAGE_OVERHEAD_TOKENS + media_parts * IMAGE_TOKENS
        prompt_tokens += sum(count_tokens(text) for text in message_texts)
        if role == "user":
            last_user_text = "\n".join(message_texts)

    max_tokens = optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", 1)
    tools = parse_tools(body.get("tools"))
    tool_mode, tool_name = parse_tool_choice(body.get("tool_choice"), tools)
    json_object, json_schema = parse_response_format(body.get("response_format"))
    reply_request = ReplyRequest(
        model=model,
        texts=texts,
        last_user_text=last_user_text,
        ends_with_user_turn=messages[-1].get("role") == "user",
        max_tokens=max_tokens,
        stop=string_list(body.get("stop"), "stop", max_items=4),
        n=optional_int(body, "n", 1, 128) or 1,
        json_object=json_object,
        json_schema=json_schema,
        tools=tools,
        tool_mode=tool_mode,
        tool_name=tool_name,
        parallel_tool_calls=body.get("parallel_tool_calls") is True,
    )
    return reply_request, prompt_tokens


def _message_texts(message: dict, label: str) -> tuple[list[str], int]:
    """Return the texts of one message and its number of media parts."""
    texts = []
    media_parts = 0
    content = message.get("content")
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                raise invalid(f"Invalid type for '{label}.content': parts must be objects.", label)
            part_type = part.get("type")
            if part_type == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part_type == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            elif part_type in ("image_url", "input_audio", "file"):
                media_parts += 1
            else:
                raise invalid(
                    f"Invalid value for '{label}.content': unsupported part type {part_type!r}.",
                    f"{label}.content",
                )
    elif content is not None:
        raise invalid(
            f"Invalid type for '{label}.content': expected a string or an array of parts.",
            f"{label}.content",
        )
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts.append(str(function.get("name", "")))
            texts.append(str(function.get("arguments", "")))
    return texts, media_parts


def parse_tools(value: Any) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("Invalid type for 'tools': expected an array.", "tools")
    tools = []
    for position, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(
                f"Invalid value for 'tools[{position}]': expected a function with a name.",
                f"tools[{position}]",
            )
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        tools.append(ToolSpec(function["name"], parameters))
    return tools


def parse_tool_choice(value: Any, tools: list[ToolSpec]) -> tuple[str, str | None]:
    if value is None:
        return TOOLS_AUTO, None
    if not tools:
        raise invalid(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
            "are specified.",
            "tool_choice",
        )
    if value in (TOOLS_NONE, TOOLS_AUTO, TOOLS_REQUIRED):
        return value, None
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise invalid(
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}.",
            "tool_choice",
        )
    if name not in {tool.name for tool in tools}:
        raise invalid(
            f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.",
            "tool_choice",
        )
    return TOOLS_NAMED, name


def parse_response_format(value: Any) -> tuple[bool, Any]:
    """Return whether the reply is a JSON object and the JSON schema it follows, if any."""
    if value is None:
        return False, None
    format_type = value.get("type") if isinstance(value, dict) else None
    if format_type == "text":
        return False, None
    if format_type == "json_object":
        return True, None
    if format_type == "json_schema":
        definition = value.get("json_schema")
        if not isinstance(definition, dict) or not isinstance(definition.get("name"), str):
            raise invalid(
                "Missing required parameter: 'response_format.json_schema.name'.",
                "response_format.json_schema",
            )
        return True, definition.get("schema") or {"type": "object", "properties": {}}
    raise invalid(
        f"Invalid value for 'response_format.type': {format_type!r}. Supported values are: "
        "'text', 'json_object' and 'json_schema'.",
        "response_format.type",
    )


def parse_embedding_inputs(value: Any) -> tuple[list[str], int]:
    """Return the input texts and their token count.

    Token-id arrays are embedded by their decimal text and count one token per id.
    """
    message = (
        "Invalid value for 'input': expected a non-empty string, an array of strings, "
        "an array of token ids or an array of token id arrays."
    )
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid(message, "input")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        value = [value]
    texts = []
    tokens = 0
    for item in value:
        if isinstance(item, str) and item:
            texts.append(item)
            tokens += count_tokens(item)
        elif isinstance(item, list) and item and all(isinstance(i, int) for i in item):
            texts.append(" ".join(str(token) for token in item))
            tokens += len(item)
        else:
            raise invalid(message, "input")
    return texts, tokens
