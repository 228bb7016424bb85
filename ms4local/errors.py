"""Typed errors of the runtime; the CLI maps each to a one-line message (ms4local/cli/errors.py)."""

from __future__ import annotations


class Ms4localError(Exception):
    """Base class for every runtime error raised on purpose."""


class ModelLoadError(Ms4localError):
    """llama.cpp could not load the model file; the message carries llama.cpp's own reason."""


class ContextError(Ms4localError):
    """The inference context could not be created, or the prompt does not fit in it."""


class PromptError(Ms4localError):
    """The conversation cannot be rendered with the model's chat template."""


class OptionsError(Ms4localError):
    """Engine options that cannot work: a malformed value, or a combination llama.cpp would refuse."""


class PlacementError(ModelLoadError):
    """A model that does not fit the memory of every device and host given, together (`--fit`):
    it could not load, and the sizes say why before llama.cpp allocates anything."""


class EvalError(Ms4localError):
    """An evaluation that cannot run as asked: a text too short for the context, no text at all."""


class VocabMismatchError(EvalError):
    """The model and the reference do not share a vocabulary, so their distributions cannot be compared."""


class ImageError(Ms4localError):
    """An image that cannot be used: missing, unreadable, empty, not an image, truncated, too small
    or too large, or an image sent to a model without its vision projector."""


class HubError(Ms4localError):
    """A Hugging Face Hub name (`org/repo[:QUANT]`) that cannot be resolved or fetched."""


class HubNameError(HubError):
    """Text that is neither an existing path nor a well-formed `org/repo[:QUANT]` name."""


class HubNotFoundError(HubError):
    """The repository, its revision, or the asked quant is not on the Hub (HTTP 404, or a name
    that matches no file of the repo)."""


class HubAccessError(HubError):
    """The Hub refused access: a gated or private repo, no token or a rejected one (HTTP 401/403)."""


class HubNetworkError(HubError):
    """The Hub cannot be reached (no network, DNS, refused connection, a download that keeps failing)."""


class HubOfflineError(HubError):
    """HF_HUB_OFFLINE=1 forbids the network and the name is not (completely) in the local cache."""


class DiskSpaceError(HubError):
    """Too little free space for a download; raised before a byte is written."""


class Ms4localNotice(UserWarning):
    """A remark the user should see once, not an error (e.g. a vocabulary tokenized by llama.cpp's
    tokenizer); the CLI prints it as one `note:` line on stderr."""


class RpcError(Ms4localError):
    """An RPC server that cannot be used: a malformed endpoint, one that cannot be reached or speaks
    another protocol version, one lost while in use, or a build without the RPC backend. `endpoint`
    names the server when there is one."""

    def __init__(self, message: str, *, endpoint: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.reason = reason or message  # the fault alone, without the endpoint and the advice
