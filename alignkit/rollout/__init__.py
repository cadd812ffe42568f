"""Generation from a policy (batched, KV-cached) and reward sources."""
