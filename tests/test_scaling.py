"""bench/scaling.py, the multi-node model: its formula against hand computations and its limits, and one
real 2-process gloo all-reduce that ties its communication time to a measurement (scripts/scaling_check.py)."""
import dataclasses
import math
import sys

import pytest

from bench import scaling
from bench.scaling import ScalingInputs
from conftest import ROOT

# 1e12 FLOP on a 100 TFLOP/s device at 50% MFU: T_compute = 20 ms. 1 GB of gradients per step.
BASE = ScalingInputs(flop_per_step=1e12, peak_tflops=100.0, grad_bytes=1e9, nodes=4, gpus_per_node=8,
                     link_gbps=100.0, mfu=0.5, intra_gbytes_per_s=200.0, latency_s=1e-5, calls=4)


def test_ring_allreduce_bytes():
    assert scaling.ring_bytes(1000, 1) == 0
    assert scaling.ring_bytes(1000, 2) == 1000  # each sends half twice: reduce-scatter + all-gather
    assert scaling.ring_bytes(1000, 4) == 1500
    assert scaling.ring_bytes(1000, 256) == pytest.approx(2 * 1000 * 255 / 256)


def test_times_against_hand_computation():
    assert scaling.t_compute(BASE) == pytest.approx(1e12 / (100e12 * 0.5)) == pytest.approx(0.02)
    # intra: 2 x 7/8 x 1 GB at 200 GB/s = 8.75 ms, + 4 calls x 2 x 7 hops x 10 us = 0.56 ms
    intra = 2 * 7 / 8 * 1e9 / 200e9 + 4 * 2 * 7 * 1e-5
    # inter: 2 x 3/4 x 1 GB over 100 Gb/s = 12.5 GB/s = 120 ms, + 4 x 2 x 3 x 10 us = 0.24 ms
    inter = 2 * 3 / 4 * 1e9 / 12.5e9 + 4 * 2 * 3 * 1e-5
    assert scaling.t_intra(BASE) == pytest.approx(intra)
    assert scaling.t_inter(BASE) == pytest.approx(inter)
    assert scaling.t_comm(BASE) == pytest.approx(intra + inter)
    assert scaling.efficiency(BASE) == pytest.approx(0.02 / (0.02 + intra + inter))


def test_one_node_is_intra_node_only_and_one_gpu_costs_nothing():
    one_node = dataclasses.replace(BASE, nodes=1)
    assert scaling.t_inter(one_node) == 0
    assert scaling.t_comm(one_node) == pytest.approx(2 * 7 / 8 * 1e9 / 200e9 + 4 * 2 * 7 * 1e-5)
    # the link does not matter inside a node
    assert scaling.t_comm(dataclasses.replace(one_node, link_gbps=1.0)) == scaling.t_comm(one_node)
    one_gpu = dataclasses.replace(BASE, nodes=1, gpus_per_node=1)
    assert scaling.t_comm(one_gpu) == 0 and scaling.efficiency(one_gpu) == 1.0
    # one GPU per node: a flat ring over the nodes' links
    flat = dataclasses.replace(BASE, gpus_per_node=1)
    assert scaling.t_intra(flat) == 0
    assert scaling.t_comm(flat) == pytest.approx(2 * 3 / 4 * 1e9 / 12.5e9 + 4 * 2 * 3 * 1e-5)


def test_infinite_bandwidth_and_no_latency_scale_perfectly():
    ideal = dataclasses.replace(BASE, link_gbps=math.inf, intra_gbytes_per_s=math.inf, latency_s=0.0, nodes=32)
    assert scaling.t_comm(ideal) == 0 and scaling.efficiency(ideal) == 1.0


def test_overlap_hides_communication_up_to_the_backward():
    tc = scaling.t_compute(BASE)
    tb = 2 / 3 * tc
    comm_small = dataclasses.replace(BASE, nodes=1, overlap=1.0)  # 9.3 ms < T_backward 13.3 ms: all hidden
    assert scaling.t_comm(comm_small) < tb
    assert scaling.exposed(comm_small) == 0 and scaling.efficiency(comm_small) == 1.0
    full = dataclasses.replace(BASE, overlap=1.0)  # 129 ms: only T_backward of it is hidden
    assert scaling.exposed(full) == pytest.approx(scaling.t_comm(BASE) - tb)
    assert scaling.efficiency(full) == pytest.approx(tc / (tc + scaling.t_comm(BASE) - tb))
    half = dataclasses.replace(BASE, overlap=0.5)
    assert scaling.exposed(half) == pytest.approx(scaling.t_comm(BASE) - 0.5 * tb)
    assert scaling.exposed(BASE) == scaling.t_comm(BASE)  # overlap 0 (today): everything is exposed


def test_efficiency_falls_with_nodes_and_rises_with_bandwidth():
    effs = [scaling.efficiency(dataclasses.replace(BASE, nodes=n)) for n in (1, 2, 4, 8, 32, 128)]
    assert all(a > b for a, b in zip(effs, effs[1:]))
    links = [scaling.efficiency(dataclasses.replace(BASE, link_gbps=g)) for g in (25, 100, 400, 1600)]
    assert all(a < b for a, b in zip(links, links[1:]))
    intra = [scaling.efficiency(dataclasses.replace(BASE, intra_gbytes_per_s=g)) for g in (50, 200, 800)]
    assert all(a < b for a, b in zip(intra, intra[1:]))


def test_projection_shapes_and_device():
    out = scaling.projection(BASE, (2, 4, 200.0), grid_per_node=8)
    assert out["profile"]["gpus"] == 8 and out["profile"]["link_gbps"] == 200.0
    shapes = [(r["gpus"], r["nodes"], r["gpus_per_node"], r["link_gbps"]) for r in out["grid"]]
    assert shapes == [(8, 1, 8, 100.0), (8, 1, 8, 400.0), (64, 8, 8, 100.0), (64, 8, 8, 400.0),
                      (256, 32, 8, 100.0), (256, 32, 8, 400.0)]
    # on one node of 8 the link does not matter
    assert out["grid"][0]["efficiency"] == out["grid"][1]["efficiency"]
    assert scaling.shape_for(4, 8) == (1, 4)
    table = {"H100": {"bf16": 989.0}, "A100": {"bf16": 312.0, "fp32": 19.5}}
    assert scaling.pick_device(None, table, "fp32") == ("H100 (assumed: no known GPU present)", 989.0, "bf16")
    assert scaling.pick_device("NVIDIA A100-SXM4-80GB", table, "bf16") == ("NVIDIA A100-SXM4-80GB", 312.0, "bf16")
    with pytest.raises(ValueError, match="overlap"):
        dataclasses.replace(BASE, overlap=1.5)


def test_model_predicts_a_measured_gloo_allreduce():
    """A real all-reduce between 2 local processes: latency from a 1-float message and bandwidth from a
    4 MB one give the model's alpha and beta; its T_comm for a 1 MB message (one call, one node of 2)
    must match that message's measured time within 3x either way. Each size's fastest of 15 calls is
    used: a neighbour on the cores (a CI run) only ever slows a call down."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import scaling_check

    small, mid, big = 4, 1 << 20, 4 << 20
    t = scaling_check.measure_allreduce([small, mid, big], reps=15, stat=min)  # min: the least disturbed
    alpha, beta = scaling_check.fit_ring((small, t[small]), (big, t[big]))
    assert alpha > 0 and beta > 0
    x = ScalingInputs(flop_per_step=1.0, peak_tflops=1.0, grad_bytes=mid, nodes=1, gpus_per_node=2,
                      intra_gbytes_per_s=beta / 1e9, latency_s=alpha, calls=1)
    predicted = scaling.t_comm(x)
    assert predicted == pytest.approx(2 * alpha + mid / beta)
    assert t[mid] / 3 < predicted < 3 * t[mid], (predicted, t)


def test_inspect_prints_the_projection(capsys):
    """`bench inspect`'s scaling section, against the counts it prints itself and the formula by hand."""
    from bench.cli import main
    from conftest import TINY

    args = [*TINY, "train.batch_size=4", "train.accumulate=2", "train.d_steps=2", "cluster.nodes=2",
            "cluster.gpus_per_node=4", "cluster.link_gbps=200", "dist.grad_sync=flat"]  # flat: overlap 0, 3 calls
    assert main(["inspect", *args]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    s, per_img = out["scaling"], out["GFLOP_per_image"]
    flop = (per_img["D_step"] * 2 + per_img["G_step"]) * 1e9 * 4 * 2
    nbytes = 4 * (2 * out["D_params"] + out["G_params"])
    assert s["flop_per_step_per_device"] == pytest.approx(flop, rel=1e-9)
    assert s["mfu_assumed"] == 0.4 and s["overlap"] == 0 and s["allreduce_calls_per_step"] == 3
    import torch

    if not torch.cuda.is_available():
        assert s["device"].startswith("H100") and s["peak_tflops"] == 989.0 and s["precision"] == "bf16"
    t_compute = flop / (s["peak_tflops"] * 1e12 * 0.4)
    p = s["profile"]
    assert (p["gpus"], p["nodes"], p["gpus_per_node"], p["link_gbps"]) == (8, 2, 4, 200.0)
    comm = (2 * 3 / 4 * nbytes / 300e9 + 3 * 2 * 3 * 5e-6) + (nbytes / 25e9 + 3 * 2 * 1 * 5e-6)
    assert p["bytes_per_step"] == nbytes and p["t_comm_ms"] == pytest.approx(1e3 * comm, rel=1e-3)
    assert p["t_compute_ms"] == pytest.approx(1e3 * t_compute, rel=1e-3)
    assert p["efficiency"] == pytest.approx(t_compute / (t_compute + comm), abs=1e-4)
    assert [(r["gpus"], r["nodes"], r["link_gbps"]) for r in s["grid"]] == [
        (8, 2, 100.0), (8, 2, 400.0), (64, 16, 100.0), (64, 16, 400.0), (256, 64, 100.0), (256, 64, 400.0)]


def test_link_bandwidth_must_be_positive():
    from bench.config import ConfigError, compose, validate

    with pytest.raises(ConfigError, match="cluster.link_gbps"):
        validate(compose(["cluster.link_gbps=0"]))


def test_sync_inputs_follow_the_buckets():
    mib = 2**20
    # flat: nothing hidden; one gradient all-reduce per phase (2 D phases + G), the agreements inside it
    assert scaling.sync_inputs("flat", 4.0, 10 * mib, 6 * mib, 2) == (0.0, 3)
    # overlap, 4 MiB buckets: D (10 MiB) in 3 buckets, G (6 MiB) in 2; by bytes: (2 x 10 x 2/3 + 6 x 1/2) / 26
    overlap, calls = scaling.sync_inputs("overlap", 4.0, 10 * mib, 6 * mib, 2)
    assert overlap == pytest.approx((2 * 10 * (2 / 3) + 6 * 0.5) / 26) and calls == 3 + 3 + 2
    # one bucket per phase hides nothing: communication starts only once the whole backward is done
    assert scaling.sync_inputs("overlap", 64.0, 10 * mib, 6 * mib, 1)[0] == 0.0
    # dist.bucket_mb=null: an eighth of each net's bytes within [0.25, 25] MiB: 8 buckets per phase here
    assert scaling.auto_bucket_mb(10 * mib) == 10 / 8 and scaling.auto_bucket_mb(1e12) == 25.0
    assert scaling.auto_bucket_mb(1000) == 0.25
    overlap, calls = scaling.sync_inputs("overlap", None, 10 * mib, 6 * mib, 2)
    assert overlap == pytest.approx(7 / 8) and calls == 3 * 8
