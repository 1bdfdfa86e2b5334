"""netsvc tests (trial)."""
