"""Package fixtures: a tiny exported model package (owned by the deployment work)."""
