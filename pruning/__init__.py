"""`vlm.pruning`: visual-token pruners (TowerHooks) and their registry."""
