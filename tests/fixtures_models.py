"""Model fixtures: a tiny trained run (owned by the training work)."""
