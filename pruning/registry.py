"""The pruner registry (``vlm.pruning.available()``, ``vlm.pruning.create(name)``)."""

from vlm.registry import Registry

PRUNERS: Registry = Registry("pruner", "vlm.pruning.aliases")
register = PRUNERS.register
