"""Typed errors users can act on. Every error the library raises on bad input is one of these."""


def shown(value: object, limit: int = 100) -> str:
    """A caller's value quoted for an error message: short, and always encodable as UTF-8 (a
    lone surrogate in a path would otherwise break the JSON body or log line carrying it)."""
    text = repr(value[:limit] if isinstance(value, str) else value)
    text = text if len(text) <= limit + 2 else text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Qwen2VLError(Exception):
    """Base class for every error qwen2vl raises on bad input or bad files.

    `param` names the input at fault where one is known (e.g. "temperature" or
    "messages[0].content[1].min_pixels") and `code` is a stable machine-readable reason; the
    server passes both on in its error body.
    """

    def __init__(self, message: str = "", *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class ConfigError(Qwen2VLError, ValueError):
    """A config.json (or a config dataclass) has an unknown or inconsistent value."""


class CheckpointError(Qwen2VLError):
    """A checkpoint directory is missing files, has broken files, or does not match the config."""


class MediaError(Qwen2VLError, ValueError):
    """An image or video could not be read, is refused, or is out of bounds."""


class TokenizerError(Qwen2VLError):
    """Tokenizer files are missing or inconsistent."""


class MessageError(Qwen2VLError, ValueError):
    """A chat message list is malformed (unknown part type, missing media, bad roles, ...)."""


class ToolCallError(Qwen2VLError, ValueError):
    """Generated text holds a tool call that cannot be parsed."""


class SamplingError(Qwen2VLError, ValueError):
    """A sampling setting is out of range; `param` names it (e.g. "temperature")."""
