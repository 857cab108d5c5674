"""Training: the trainer and its parts: phases, objectives, state, records, loggers, telemetry, throughput
(docs/architecture.md, "The rooms" and "One training step")."""
