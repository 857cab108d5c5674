"""Evaluation of trained generators (docs/architecture.md, "Evaluation").

    errors      EvalError, ClassifierError (a leaf: imports nothing from bench)
    sampling    uint8 images, class grids, truncated latents, standing statistics, interpolation sheets
    classifier  the domain classifier: training, loading, the torch-fidelity feature extractor
    features    torch-fidelity's inputs: images, G as a sampler, the extractors' settings
    stats       the float64 Frechet distance (with its imaginary residue) and density / coverage
    metrics     EvalSettings, compute_metrics, evaluate_generator, evals.jsonl records, the table
    runs        `bench eval` and `bench truncation` on a run directory, and the checkpoint they pick

Nothing here imports bench.train: training imports sampling and metrics, never the other way round.
"""
