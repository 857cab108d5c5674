"""Evaluation of trained generators: sampling, the domain classifier, torch-fidelity's inputs, the float64
statistics, the metrics and their records, `bench eval` / `bench truncation`, the watcher (docs/architecture.md,
"The rooms" and "Evaluation"). Nothing here imports bench.train: training imports eval, never the other way round."""
