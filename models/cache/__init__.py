"""Feature caches: the Skip-Cache store of frozen-backbone outputs."""
