"""The prompt-learner registry (``vlm.prompts.available()``, ``vlm.prompts.create(name)``)."""

from vlm.registry import Registry

PROMPTS: Registry = Registry("prompt learner", "vlm.prompts.aliases")
register = PROMPTS.register
