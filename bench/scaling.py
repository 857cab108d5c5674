"""Multi-node on paper: the weak-scaling efficiency a model should reach on N GPUs, from its FLOP per step,
the gradient bytes all-reduced per step and the overlap achieved. Torch-free: `bench inspect` feeds it the
counts and prints the projection. The model and every assumption in it: docs/architecture.md, "Throughput"."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

GBIT = 1e9 / 8  # bytes per second in one Gb/s
DEFAULT_MFU = 0.4  # assumed achieved model-FLOPs utilisation of the projected device
DEFAULT_INTRA_GBYTES = 300.0  # NVLink-class intra-node bandwidth, GB/s per direction
DEFAULT_LATENCY_S = 5e-6  # per ring hop
BACKWARD_SHARE = 2.0 / 3.0  # share of a step's compute that is backward
PROJECTION_DEVICE = "H100"  # the device assumed when none is present
PROJECTION_GPUS = (8, 64, 256)
PROJECTION_LINKS_GBPS = (100.0, 400.0)


@dataclass(frozen=True)
class ScalingInputs:
    """One model on one cluster shape (docs/architecture.md, "Throughput", says what each input assumes)."""
    flop_per_step: float  # FLOP per optimiser step (one G step) per device
    peak_tflops: float  # dense peak of the device, TFLOP/s
    grad_bytes: float  # bytes all-reduced per step: 4 x (d_steps x D params + G params)
    nodes: int = 1
    gpus_per_node: int = 8
    link_gbps: float = 100.0  # the node's inter-node bandwidth, Gb/s
    mfu: float = DEFAULT_MFU  # assumed achieved fraction of the peak
    intra_gbytes_per_s: float = DEFAULT_INTRA_GBYTES  # intra-node bandwidth, GB/s
    latency_s: float = DEFAULT_LATENCY_S  # per ring hop
    calls: int = 4  # all-reduce calls per step: 2 x (d_steps + 1)
    overlap: float = 0.0  # share of T_backward that communication can hide behind (sync_inputs)

    def __post_init__(self):
        positive = {"flop_per_step": self.flop_per_step, "peak_tflops": self.peak_tflops, "mfu": self.mfu,
                    "link_gbps": self.link_gbps, "intra_gbytes_per_s": self.intra_gbytes_per_s}
        for k, v in positive.items():
            if not v > 0:
                raise ValueError(f"{k}={v!r} must be > 0")
        if self.nodes < 1 or self.gpus_per_node < 1 or self.calls < 0 or self.grad_bytes < 0 or self.latency_s < 0:
            raise ValueError("nodes and gpus_per_node must be >= 1; calls, grad_bytes and latency_s >= 0")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"overlap={self.overlap!r} must be in [0, 1]")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


AUTO_BUCKETS = 8  # dist.bucket_mb=null: about this many buckets per net ...
AUTO_MIN_MB, AUTO_MAX_MB = 0.25, 25.0  # ... each between these sizes (25 MiB: DDP's default bucket)


def auto_bucket_mb(net_bytes: float) -> float:
    """dist.bucket_mb=null (bench/train/gradsync.py): an eighth of a net's gradient bytes, in [0.25, 25] MiB."""
    return min(AUTO_MAX_MB, max(AUTO_MIN_MB, net_bytes / AUTO_BUCKETS / 2**20))


def sync_inputs(grad_sync: str, bucket_mb, d_bytes: float, g_bytes: float, d_steps: int) -> tuple[float, int]:
    """(overlap, all-reduce calls per step) of `dist.grad_sync` with buckets of `bucket_mb` MiB (None:
    `auto_bucket_mb` per net), for phases of `d_bytes` (each of the d_steps D phases) and `g_bytes` (the G
    phase) of gradients. The phase's non-finite and stop agreements ride in its last bucket: no calls of their own."""
    phases = [d_bytes] * d_steps + [g_bytes]
    if grad_sync == "flat":
        return 0.0, len(phases)

    def cap(b: float) -> float:
        return (bucket_mb if bucket_mb is not None else auto_bucket_mb(b)) * 2**20
    buckets = [max(1, math.ceil(b / cap(b))) for b in phases]
    total = sum(phases)
    overlap = sum(b * (1 - 1 / n) for b, n in zip(phases, buckets)) / total if total else 0.0
    return overlap, sum(buckets)


def ring_bytes(nbytes: float, ranks: int) -> float:
    """Bytes each member of a ring all-reduce over `ranks` sends (and receives): 2 (p-1)/p x B."""
    return 2.0 * (ranks - 1) / ranks * nbytes


def t_compute(x: ScalingInputs) -> float:
    return x.flop_per_step / (x.peak_tflops * 1e12 * x.mfu)


def t_intra(x: ScalingInputs) -> float:
    """Intra-node reduce-scatter + all-gather of one step's bytes, latencies of every call included."""
    g = x.gpus_per_node
    return ring_bytes(x.grad_bytes, g) / (x.intra_gbytes_per_s * 1e9) + x.calls * 2 * (g - 1) * x.latency_s


def t_inter(x: ScalingInputs) -> float:
    """The inter-node ring over the nodes: 2 (n-1)/n x B over each node's link, plus its latencies."""
    n = x.nodes
    return ring_bytes(x.grad_bytes, n) / (x.link_gbps * GBIT) + x.calls * 2 * (n - 1) * x.latency_s


def t_comm(x: ScalingInputs) -> float:
    """Seconds of all-reduce per step (the hierarchical ring; 0 on one GPU)."""
    if x.gpus == 1:
        return 0.0
    return t_intra(x) + t_inter(x)


def exposed(x: ScalingInputs) -> float:
    """The communication the step waits for: what the backward cannot hide."""
    return max(0.0, t_comm(x) - x.overlap * BACKWARD_SHARE * t_compute(x))


def efficiency(x: ScalingInputs) -> float:
    """Weak-scaling efficiency: T_compute / (T_compute + exposed communication)."""
    tc = t_compute(x)
    return tc / (tc + exposed(x))


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def row(x: ScalingInputs) -> dict:
    """One line of the projection, times in ms (4 significant digits)."""
    inner = x.gpus > 1
    return {"gpus": x.gpus, "nodes": x.nodes, "gpus_per_node": x.gpus_per_node, "link_gbps": x.link_gbps,
            "efficiency": round(efficiency(x), 4),
            "efficiency_full_overlap": round(efficiency(replace(x, overlap=1.0)), 4),
            "t_compute_ms": _sig(1e3 * t_compute(x)), "t_comm_ms": _sig(1e3 * t_comm(x)),
            "t_intra_ms": _sig(1e3 * t_intra(x)) if inner else 0.0,
            "t_inter_ms": _sig(1e3 * t_inter(x)) if inner else 0.0,
            "bytes_per_step": x.grad_bytes, "inter_node_bytes_per_step": ring_bytes(x.grad_bytes, x.nodes)}


def shape_for(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for `gpus` GPUs on nodes of `gpus_per_node` (fewer GPUs: one node)."""
    per_node = max(1, min(gpus_per_node, gpus))
    return math.ceil(gpus / per_node), per_node


def pick_device(gpu_name, table: dict, precision: str) -> tuple[str, float, str]:
    """(device, peak TFLOP/s, precision) for the projection: the present GPU when the table knows it,
    else an H100 in bf16 (the GPU table of bench/device.py is passed in: this module imports no torch)."""
    if gpu_name:
        for key, peaks in table.items():
            if key in gpu_name and precision in peaks:
                return gpu_name, peaks[precision], precision
    return f"{PROJECTION_DEVICE} (assumed: no known GPU present)", table[PROJECTION_DEVICE]["bf16"], "bf16"


def projection(base: ScalingInputs, profile: tuple[int, int, float], grid_per_node: int = 8,
               gpus=PROJECTION_GPUS, links=PROJECTION_LINKS_GBPS) -> dict:
    """The profile's own shape (nodes, ranks per node, link Gb/s), then every count in `gpus` at every
    link in `links` on nodes of `grid_per_node` GPUs (the profile's GPUs per node; 8 when it has none)."""
    nodes, per_node, link = profile
    out = {"profile": row(replace(base, nodes=nodes, gpus_per_node=max(1, per_node), link_gbps=link)), "grid": []}
    for n in gpus:
        for gbps in links:
            n_nodes, g = shape_for(n, grid_per_node)
            out["grid"].append(row(replace(base, nodes=n_nodes, gpus_per_node=g, link_gbps=gbps)))
    return out


def assumptions(base: ScalingInputs, device: str, precision: str) -> dict:
    return {"device": device, "precision": precision, "peak_tflops": base.peak_tflops, "mfu_assumed": base.mfu,
            "intra_node_GB_per_s": base.intra_gbytes_per_s, "latency_s_per_hop": base.latency_s,
            "allreduce_calls_per_step": base.calls, "overlap": base.overlap,
            "backward_share": round(BACKWARD_SHARE, 4),
            "notes": "weak scaling (per-device batch fixed); hierarchical ring all-reduce; fp32 gradients; "
                     "overlap = the share of each phase's backward left once its first bucket is complete "
                     "(dist.grad_sync=overlap: 1 - 1/buckets; flat: 0); "
                     "efficiency = T_compute / (T_compute + max(0, T_comm - overlap x 2/3 T_compute)); "
                     "see bench/scaling.py"}
