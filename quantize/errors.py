"""Typed errors of the converter.

The library never prints or exits: it raises one of these, and the CLI turns each into a one-line
message and an exit code (see `ms4local/cli/errors.py`). Every message says what is wrong *and*
what to do next, because it is the only thing the user will see.
"""

from __future__ import annotations


class QuantizeError(Exception):
    """Base class for every error the converter raises on purpose."""


class ConfigError(QuantizeError):
    """config.json is missing, malformed, or contradicts itself."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint is a model this converter does not know."""


class CheckpointError(QuantizeError):
    """The weight files are missing, truncated, or do not match their index or the config."""


class MissingTensorError(CheckpointError):
    """A tensor the architecture needs is not in the checkpoint."""


class ShapeError(CheckpointError):
    """A tensor's shape contradicts the config."""


class VocabError(QuantizeError):
    """The tokenizer files are missing or cannot be turned into a GGUF vocabulary."""


class OutputError(QuantizeError):
    """The output cannot be written (exists, unwritable directory, disk full)."""


class UnsupportedTypeError(QuantizeError):
    """The requested output type is not one the converter can write."""
