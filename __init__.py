"""qvl: a lean, quantized edge runtime for Qwen2-VL."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a Qwen2-VL checkpoint directory; see :func:`qvl.runtime.engine.load`."""
    from qvl.runtime.engine import load as _load

    return _load(path, **kwargs)


__all__ = ["load", "__version__"]
