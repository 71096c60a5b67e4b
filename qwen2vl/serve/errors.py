"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} + a status.

User mistakes are 4xx with a message that says what to change; 500 is only for our own bugs.
"""

from __future__ import annotations


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type_, param, code


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
        type_="authentication_error",
        code="invalid_api_key",
    )


def model_not_found(name: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model {name!r} does not exist; this server serves {served!r}",
        param="model",
        code="model_not_found",
    )


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is over {limit} bytes", code="request_too_large")


def queue_full(detail: str) -> APIError:
    return APIError(
        429,
        f"The server is at capacity ({detail}); retry later",
        type_="rate_limit_error",
        code="queue_full",
    )
