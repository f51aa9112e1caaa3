"""Request parsing and validation for the Gemini wire format."""

from typing import Any

from simulator.content import (
    TOOLS_AUTO,
    TOOLS_NAMED,
    TOOLS_NONE,
    TOOLS_REQUIRED,
    ReplyRequest,
    ToolSpec,
)
from simulator.formats.common import invalid, json_text, optional_int, string_list
from simulator.tokens import (
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    count_tokens,
)

MEDIA_PARTS = ("inlineData", "fileData")
# Events end with CRLF CRLF, which SSE allows, so that clients whose parser only
# accepts LF line ends fail here.


def parse_generate_request(body: dict, model: str) -> tuple[ReplyRequest, int]:
    """Check a generateContent request and return its reply request and prompt tokens."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified")
    texts: list[str] = []
    prompt_tokens = REPLY_PRIMING_TOKENS
    system = body.get("systemInstruction")
    if system is not None:
        system_texts, media = content_texts(system, "systemInstruction")
        texts.extend(system_texts)
        prompt_tokens += _content_tokens(system_texts, media)
    last_user_text = ""
    for position, content in enumerate(contents):
        turn_texts, media = content_texts(content, f"contents[{position}]")
        texts.extend(turn_texts)
        prompt_tokens += _content_tokens(turn_texts, media)
        if content.get("role", "user") == "user":
            last_user_text = "\n".join(turn_texts)

    last = contents[-1]
    last_parts = last.get("parts") or []
    ends_with_user_turn = last.get("role", "user") == "user" and not any(
        isinstance(part, dict) and "functionResponse" in part for part in last_parts
    )
    config = body.get("generationConfig") or {}
    if not isinstance(config, dict):
        raise invalid("Invalid value at 'generation_config': expected an object.")
    json_object = config.get("responseMimeType") == "application/json"
    schema = config.get("responseSchema") or config.get("responseJsonSchema")
    tools = parse_tools(body.get("tools"))
    tool_mode, tool_name = parse_tool_config(body.get("toolConfig"), tools)
    reply_request = ReplyRequest(
        model=model,
        texts=texts,
        last_user_text=last_user_text,
        ends_with_user_turn=ends_with_user_turn,
        max_tokens=optional_int(
            config, "maxOutputTokens", 1, label="generationConfig.maxOutputTokens"
        ),
        stop=string_list(
            config.get("stopSequences"), "generationConfig.stopSequences", max_items=5
        ),
        n=optional_int(config, "candidateCount", 1, 8, label="generationConfig.candidateCount")
        or 1,
        json_object=json_object,
        json_schema=schema if json_object and schema else None,
        tools=tools,
        tool_mode=tool_mode,
        tool_name=tool_name,
    )
    return reply_request, prompt_tokens


def _content_tokens(texts: list[str], media: int) -> int:
    return (
        MESSAGE_OVERHEAD_TOKENS + sum(count_tokens(text) for text in texts) + media * IMAGE_TOKENS
    )


def content_texts(content: Any, label: str) -> tuple[list[str], int]:
    """Return the texts of one Content object and its number of media parts."""
    if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
        raise invalid(f"Invalid value at '{label}': expected an object with a parts list.")
    texts = []
    media = 0
    for part in content["parts"]:
        if not isinstance(part, dict):
            raise invalid(f"Invalid value at '{label}.parts': each part must be an object.")
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif any(key in part for key in MEDIA_PARTS):
            media += 1
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            texts += [str(call.get("name", "")), json_text(call.get("args", {}))]
        elif isinstance(part.get("functionResponse"), dict):
            response = part["functionResponse"]
            texts += [str(response.get("name", "")), json_text(response.get("response", {}))]
    return texts, media


def parse_tools(value: Any) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("Invalid value at 'tools': expected a list.")
    tools = []
    for tool in value:
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        for declaration in declarations or []:
            if not isinstance(declaration, dict) or not isinstance(declaration.get("name"), str):
                raise invalid("Invalid value at 'tools.function_declarations': name is required.")
            schema = declaration.get("parameters") or declaration.get("parametersJsonSchema")
            tools.append(ToolSpec(declaration["name"], schema or {"type": "object"}))
    return tools


def parse_tool_config(value: Any, tools: list[ToolSpec]) -> tuple[str, str | None]:
    settings = value.get("functionCallingConfig") if isinstance(value, dict) else None
    if not isinstance(settings, dict):
        return TOOLS_AUTO, None
    mode = str(settings.get("mode", "AUTO")).upper()
    if mode == "NONE":
        return TOOLS_NONE, None
    allowed = settings.get("allowedFunctionNames")
    if mode in ("ANY", "VALIDATED") and isinstance(allowed, list) and allowed:
        if allowed[0] not in {tool.name for tool in tools}:
            raise invalid(f"Function {allowed[0]!r} in allowedFunctionNames is not declared.")
        return TOOLS_NAMED, allowed[0]
    return (TOOLS_REQUIRED if mode == "ANY" else TOOLS_AUTO), None
