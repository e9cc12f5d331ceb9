"""Data: the built-in fictitious-entity benchmark, loaders for real data, tokenization and collation."""
