"""LightningDataModules, one per data family; each has an embedded default that works offline."""
