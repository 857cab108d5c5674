"""Data for gan-bench: the shard format, the built-in dataset, writing shard sets (from the built-in set, an image
folder or other projects' files), manifests and the built-in shard cache, and the read pipeline
(docs/architecture.md, "The rooms")."""
