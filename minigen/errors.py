"""The errors a user can fix. Each message is one line naming the cause and the fix; the CLIs print
it as `error: ...` and exit with status 2 (minigen/cli.py)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A model configuration minigen cannot run."""


class LoadError(ValueError):
    """A model that cannot be loaded (missing, corrupt or unsupported files)."""


class ContextOverflowError(ValueError):
    """A sequence would not fit into the model's context or the allocated cache."""


class MemoryBudgetError(ValueError):
    """What a run needs does not fit the GPU memory budget (--gpu-memory) or the host's RAM."""
