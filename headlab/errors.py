"""headlab's errors: each names the problem and what is accepted instead."""


class HeadlabError(Exception):
    """Base class of every error headlab raises on purpose."""


class ModelNotFoundError(HeadlabError, LookupError):
    """An unknown bundled name, a missing folder, or a missing weights package."""


class UnsupportedModelError(HeadlabError, TypeError):
    """A model headlab has no adapter for."""


class HeadIndexError(HeadlabError, IndexError):
    """A layer or head index out of range."""


class PromptError(HeadlabError, ValueError):
    """An empty prompt, a prompt longer than the model's context, or malformed token ids."""


class EditError(HeadlabError, ValueError):
    """An edit that cannot be applied (wrong head, missing reference batch, nested conflict)."""


class WeightsError(HeadlabError, ValueError):
    """A model folder whose weights do not match its config (missing, unexpected or wrongly shaped tensors)."""
