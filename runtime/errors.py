"""The errors a caller of the engine may catch by type (the server maps them to HTTP codes)."""


class PromptTooLongError(ValueError):
    """The prompt, or its pictures counted from their headers, does not fit the KV cache."""


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue holds ``max_queue`` requests (HTTP 429)."""


class MemoryBudgetError(ValueError):
    """What ``memory_budget`` cannot hold: the checkpoint at load (naming the part), or one request's
    pictures (``qvl.runtime.plan``)."""
