"""Typed errors users can act on. Every error the library raises on bad input is one of these."""


class Qwen2VLError(Exception):
    """Base class for every error qwen2vl raises on bad input or bad files."""


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
