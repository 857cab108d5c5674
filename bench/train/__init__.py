"""Training: the trainer and its parts (docs/architecture.md, "The rooms").

trainer     Trainer: set-up, the short run() loop, ticks, evaluation and sample grids
phases      Phase (net, optimiser, scaler, step function, hooks) and the runner of one phase
objectives  the losses (each owns its specifics), penalties, GANObjective
state       checkpoints (save, rotate, best, load newest), non-finite steps and rollbacks, EMA
records     the run directory's records: metrics.jsonl, TensorBoard, run.json, summary.json
telemetry   report(name, value), the per-tick Collector, timing, FLOP counting, collapse detection
throughput  `bench throughput`
"""
