"""What a stand-in loader raises once every check before reading weights has passed."""


class Loading(Exception):
    """Raised by a stand-in loader: every check passed and the weights were about to be read."""
