"""The error every config check raises, naming the key to change (no other trainer import, so
every config module can use it)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config error at '{key}': {message}")
        self.key = key


def check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)
