"""qvl: a lean, quantized edge runtime for Qwen2-VL."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# A CPU decode step is ~200 short multi-threaded kernels with single-threaded glue between them.
# With libgomp's default spin its worker threads fall asleep in those gaps and waking them costs
# more than the gap (a 2B int4 step is ~15% faster with 3M spins); OMP_WAIT_POLICY=active would
# spin always and keep the cores busy while the engine idles. OpenMP reads this
# once, when torch loads it, so it applies when qvl is imported first (the CLI, the benchmarks);
# a user's own setting wins.
if "torch" not in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "3000000")


def load(path, **options):
    """Load a Qwen2-VL checkpoint directory; ``options`` are :class:`qvl.LoadOptions`'s fields."""
    from qvl.runtime.engine import load as _load

    return _load(path, **options)


# The public names load lazily, so that importing qvl sets the OpenMP spin above before torch loads.
_LAZY = {
    "Engine": "qvl.runtime.engine", "LoadOptions": "qvl.runtime.options", "SamplingParams": "qvl.runtime.sampler",
    "Stats": "qvl.runtime.sequence", "Handle": "qvl.runtime.sequence", "QueueFullError": "qvl.runtime.errors",
    "PromptTooLongError": "qvl.runtime.errors", "Session": "qvl.runtime.session",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qvl' has no attribute {name!r}")


__all__ = ["load", "__version__", *_LAZY]
