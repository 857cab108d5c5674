"""The real side's feature cache (docs/architecture.md, "Evaluation"): its key (a hash of the shard manifest, N,
the resolution and the extractor's identity), the safety check of torch-fidelity's cache files before torch-fidelity
unpickles them, and the JSON sidecar that says what a key stands for. bench.eval.metrics (evaluations) and
bench.eval.realstats (`bench eval stats`) share it, so both read and write the same cache files."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sys
from pathlib import Path

from bench import rundir
from bench.data.shards import manifest_hash
from bench.eval.safeload import first_line, load_weights


def real_cache_key(shards_spec, num_real: int, resolution: int, extractor_id: str) -> str:
    """Cache key of the real side's features: a hash of the shard manifest, N, the resolution and
    the extractor's identity (its name and weights)."""
    ident = {"manifest": manifest_hash(shards_spec), "num_real": int(num_real), "resolution": int(resolution),
             "extractor": extractor_id, "order": "seed0", "version": 1}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def check_real_cache(cache_dir: Path, key: str) -> None:
    """torch-fidelity reads its cache with weights_only=False: each real-statistics file of this key is
    first read here with weights_only=True (safeload); a damaged or foreign one is removed with a one-line
    warning, and torch-fidelity rebuilds it."""
    for path in sorted(Path(cache_dir).glob(f"real-{key}*.pt")):
        try:
            load_weights(path)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged or hostile file
            print(f"warning: real-statistics cache {path} is unreadable ({first_line(exc)}); rebuilding it",
                  file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)


def write_sidecar(cache_dir: Path, key: str, ident: dict) -> None:
    sidecar = cache_dir / f"real-{key}.json"
    if not sidecar.exists():
        rundir.atomic_write(sidecar, json.dumps({
            "key": key, **ident,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, indent=2))
