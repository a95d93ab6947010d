"""Errors the server answers with, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import re

from pydantic import ValidationError

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
                 503: "server_error"}


class APIError(Exception):
    """An error that becomes an HTTP response with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _STATUS_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(error: ValidationError) -> APIError:
    """A pydantic error (wrong type, missing field) as a 400 naming the first bad field."""
    problems = error.errors(include_url=False)
    parts = []
    for problem in problems[:5]:
        where = _loc(problem.get("loc", ()))
        parts.append(f"{where}: {problem.get('msg', 'invalid')}" if where else problem.get("msg", "invalid"))
    param = _loc(problems[0].get("loc", ())) if problems else None
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return bad_request("Invalid request: " + "; ".join(parts) + more, param=param or None,
                       code="invalid_request_body")


def _loc(loc) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', without pydantic's union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_type_tag(str(part)):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _is_type_tag(part: str) -> bool:
    # pydantic names union members in locations, e.g. 'str', 'list[int]', 'function-after[...]'
    return bool(re.fullmatch(r"(str|int|float|bool|none|dict\[.*\]|list\[.*\]|function-\w+\[.*\]|"
                             r"literal\[.*\]|[A-Z]\w*)", part))


def engine_value_error(error: ValueError, field_names: dict[str, str], prompt_param: str) -> APIError:
    """A ValueError from SamplingParams or add_request as a 400; `param` is the request field it names."""
    message = str(error)
    # the field leads the message ("max_tokens must ...") or follows "invalid " ("invalid structured_outputs regex")
    first = re.match(r"(?:invalid )?([A-Za-z_][A-Za-z0-9_.]*)", message)
    param = None
    if first is not None and first.group(1).split(".")[0] in field_names:
        param = field_names[first.group(1).split(".")[0]]
    elif "prompt" in message or "context length" in message:
        param = prompt_param
    return bad_request(message, param=param)
