"""What a stand-in loader raises once every check before reading weights has passed."""


class Loading(Exception):
    """Raised by a stand-in loader: every check passed and the weights were about to be read."""


def stop_at_load(monkeypatch, target: str) -> dict:
    """Replace the loader at `target` by one that records its dtype and device, then raises
    Loading; returns the record."""
    asked: dict = {}

    def load(path, dtype, device, **kwargs):
        asked.update(dtype=dtype, device=device)
        raise Loading

    monkeypatch.setattr(target, load)
    return asked
