"""Gradient averaging in buckets overlapped with backward (bench/train/gradsync.py), on two real gloo
processes: the averaged gradients against an independent computation, the phase rules (accumulation
syncs once, a frozen net is not reduced, a post-sync backward is not reduced), and the records."""
import os
from pathlib import Path

import pytest
import torch

from bench.train.gradsync import GradSync, _union_seconds, make_buckets, step_record


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def _data(rank: int, micro: int):
    g = torch.Generator().manual_seed(100 * rank + micro)
    return torch.randn(4, 3, 6, 6, generator=g)


def _phase(G, D, sync, rank, accumulate, extra_backward):
    """A G phase: D frozen, `accumulate` micro-batches, the sync armed for the last one; then a weight-only
    penalty whose backward runs after the sync (it must stay local, like the sigma0 penalty)."""
    D.requires_grad_(False)
    sync.begin()
    for i in range(accumulate):
        if i == accumulate - 1:
            sync.arm()
        loss = D(G(_data(rank, i))).square().mean() / accumulate
        loss.backward()
    launched_in_backward = sum(b.launched for b in sync.buckets)
    sync.finish()
    D.requires_grad_(True)
    if extra_backward:
        (G.a.weight.square().sum() * (rank + 1)).backward()
    return launched_in_backward


def _worker(rank, init_file, out_dir, mode):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    G, D = _Net(), _Net()
    G.head = torch.nn.Linear(8, 3 * 6 * 6)  # G: image -> image (a stand-in; only the gradient flow matters)
    G.forward = lambda x: G.head(torch.relu(G.b(torch.relu(G.a(x)))).mean((2, 3))).view(-1, 3, 6, 6)
    sync = GradSync(G, 2, mode, bucket_mb=0.001)  # ~1 KiB: several buckets
    launched = _phase(G, D, sync, rank, accumulate=2, extra_backward=True)
    grads = {n: p.grad.clone() for n, p in G.named_parameters()}
    d_grads = [p.grad for p in D.parameters()]
    torch.save({"grads": grads, "launched": launched, "buckets": len(sync.buckets), "d_grads": d_grads,
                "stats": sync.take_stats()}, f"{out_dir}/{mode}-{rank}.pt")
    dist.barrier()
    os._exit(0)  # skip gloo's teardown, which can abort when the peer exits first


def _expected(rank: int) -> dict:
    """The same phase on one process: the mean over both ranks' micro-batches, then this rank's penalty."""
    torch.manual_seed(0)
    G, D = _Net(), _Net()
    G.head = torch.nn.Linear(8, 3 * 6 * 6)
    G.forward = lambda x: G.head(torch.relu(G.b(torch.relu(G.a(x)))).mean((2, 3))).view(-1, 3, 6, 6)
    D.requires_grad_(False)
    for r in (0, 1):
        for i in range(2):
            (D(G(_data(r, i))).square().mean() / 2 / 2).backward()
    (G.a.weight.square().sum() * (rank + 1)).backward()
    return {n: p.grad.clone() for n, p in G.named_parameters()}


@pytest.mark.parametrize("mode", ["overlap", "flat"])
def test_two_ranks_average_like_one_process(tmp_path, mode):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), mode), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got, want = torch.load(tmp_path / f"{mode}-{rank}.pt", weights_only=False), _expected(rank)
        for name, g in want.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-6, msg=f"{mode} rank {rank} {name}")
        assert all(g is None for g in got["d_grads"]), "the frozen D must get no gradient and no reduction"
        stats = got["stats"]
        # and the extras: 2 flags, 2 ranks' times, a reached-flag per parameter
        n_bytes = sum(g.numel() * 4 for g in want.values()) + (2 + 2 + len(want)) * 4
        assert stats.bytes == n_bytes and stats.phases == 1
        assert stats.comm_s > 0 and 0 <= stats.exposed_s
        if mode == "overlap":
            # buckets complete during the last backward: all of them are in flight before finish() is called
            assert got["buckets"] >= 3 and got["launched"] == got["buckets"]
        else:
            assert got["buckets"] == 1 and stats.exposed_s == stats.comm_s


def _unused_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = _Net()
    net.head.unused = torch.nn.Parameter(torch.zeros(5))  # the head's last: the first bucket in reverse order
    sync = GradSync(net, 2, "overlap", bucket_mb=0.001)
    for step in range(2):  # warned once, not every step
        net.zero_grad(set_to_none=True)
        sync.begin()
        sync.arm()
        net(_data(rank, step)).square().mean().backward()
        launched = sum(b.launched for b in sync.buckets)
        sync.finish()
    torch.save({"grads": {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
                "launched": launched, "warned": sync.warned}, f"{out_dir}/unused-{rank}.pt")
    dist.barrier()
    os._exit(0)


def test_a_parameter_without_gradient_holds_the_buckets_and_is_named_once(tmp_path, capfd):
    """Correct gradients still, but the overlap is lost: rank 0 says so once, naming the parameter."""
    import torch.multiprocessing as mp

    mp.start_processes(_unused_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"unused-{r}.pt", weights_only=False) for r in (0, 1)]
    torch.manual_seed(0)
    ref = _Net()
    ref.head.unused = torch.nn.Parameter(torch.zeros(5))
    for r in (0, 1):  # the mean over both ranks' last step
        (ref(_data(r, 1)).square().mean() / 2).backward()
    for r in (0, 1):
        assert got[r]["launched"] == 0 and got[r]["warned"]  # every bucket waits behind the first
        assert set(got[r]["grads"]) == {n for n, p in ref.named_parameters() if p.grad is not None}
        for name, g in got[r]["grads"].items():
            torch.testing.assert_close(g, dict(ref.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)
    err = capfd.readouterr().err
    assert err.count("dist.grad_sync=overlap") == 1 and "head.unused got no gradient" in err and "none hidden" in err, err


def test_buckets_follow_reverse_order_and_size():
    net = _Net()
    params = list(net.parameters())
    buckets = make_buckets(params, bucket_bytes=8 * 8 * 9 * 4)  # exactly b.weight's size
    flat = [p for b in buckets for p in b]
    assert flat == list(reversed(params))
    for b in buckets:  # no bucket over the cap unless it is one parameter on its own
        assert len(b) == 1 or sum(p.numel() * 4 for p in b) <= 8 * 8 * 9 * 4
    net.head.requires_grad_(False)
    assert all(p is not net.head.weight for b in make_buckets(list(net.parameters()), 1 << 20) for p in b)


def test_single_process_and_records():
    net = _Net()
    sync = GradSync(net, 1, "overlap")
    assert sync.buckets == [] and sync._handles == []
    net(torch.randn(2, 3, 6, 6)).sum().backward()
    before = [p.grad.clone() for p in net.parameters()]
    sync.finish()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters()))
    assert _union_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    rec = step_record(type(sync.stats)(bytes=400, comm_s=0.010, exposed_s=0.0025, phases=2))
    assert rec == pytest.approx({"time/allreduce_ms": 10.0, "time/allreduce_exposed_ms": 2.5,
                                 "comm/hidden_frac": 0.75, "comm/bytes_per_step": 400.0, "time/peer_wait_ms": 0.0})
    nan = step_record(type(sync.stats)(bytes=400, comm_s=float("nan"), exposed_s=0.002, phases=2))  # CUDA: no span
    assert nan["time/allreduce_exposed_ms"] == pytest.approx(2.0) and nan["comm/hidden_frac"] != nan["comm/hidden_frac"]
    with pytest.raises(ValueError, match="dist.grad_sync='ddp'"):
        GradSync(net, 2, "ddp")


def _agree_worker(rank, init_file, out_dir, mode):
    """Three phases on two ranks: rank 1's loss goes non-finite in the second, rank 0 asks to stop in the third,
    rank 1 computes 1 s longer in the first. Between phases the optimiser drops the gradients (set_to_none)."""
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = _Net().to(memory_format=torch.channels_last)
    sync = GradSync(net, 2, mode, bucket_mb=0.001, rank=rank)
    flats = [b.flat.data_ptr() for b in sync.buckets]
    out = {"agreed": [], "peer_wait": [], "views": []}
    for phase in range(3):
        net.zero_grad(set_to_none=True)
        sync.begin()
        for i in range(2):
            loss = net(_data(rank, i)).square().mean()
            if phase == 1 and rank == 1 and i == 0:
                loss = loss * float("nan")
            if phase == 0 and rank == 1:
                time.sleep(0.5)
            if i == 1:
                sync.arm(stop=phase == 2 and rank == 0)
            sync.note_loss(loss)
            loss.backward()
        agreed = sync.finish()
        out["agreed"].append((agreed.nonfinite, agreed.stop))
        out["peer_wait"].append(sync.take_stats().peer_wait_s)
        # every gradient is a view into its bucket's persistent buffer, with its parameter's strides
        out["views"].append(all(any(p.grad.data_ptr() == v.data_ptr() and p.grad.stride() == p.stride()
                                    for b in sync.buckets for v in b.views) for p in net.parameters()))
    out["same_buffers"] = flats == [b.flat.data_ptr() for b in sync.buckets]
    out["grads"] = {n: p.grad.clone() for n, p in net.named_parameters()}
    torch.save(out, f"{out_dir}/agree-{mode}-{rank}.pt")
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("mode", ["overlap", "flat"])
def test_the_skip_and_the_stop_travel_with_the_gradients(tmp_path, mode):
    """Agreed: a non-finite loss on one rank, or a stop request on one, reaches every rank through the gradient
    all-reduce itself (no collective of its own), and each rank learns how long it waited for the slower."""
    import torch.multiprocessing as mp

    mp.start_processes(_agree_worker, args=(str(tmp_path / "init"), str(tmp_path), mode), nprocs=2,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"agree-{mode}-{r}.pt", weights_only=False) for r in (0, 1)]
    for r in (0, 1):
        assert got[r]["agreed"] == [(False, False), (True, False), (False, True)], (r, got[r]["agreed"])
        assert all(got[r]["views"]) and got[r]["same_buffers"]
    assert got[0]["peer_wait"][0] >= 0.5  # rank 0 waited for rank 1's two sleeps (1 s; a busy machine blurs it)
    assert got[1]["peer_wait"][0] < got[0]["peer_wait"][0] - 0.5
    torch.manual_seed(0)
    ref = _Net()
    for r in (0, 1):  # the last phase: the mean over both ranks' two micro-batches
        for i in range(2):
            (ref(_data(r, i)).square().mean() / 2).backward()
    for name, p in ref.named_parameters():
        for r in (0, 1):
            torch.testing.assert_close(got[r]["grads"][name], p.grad, rtol=1e-5, atol=1e-6)


def _partial_worker(rank, init_file, out_dir):
    """A parameter only rank 1's backward reaches (data-dependent use, as a user's own model may have), and a
    transposed (dense, non-contiguous) weight."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = _Net()
    net.extra = torch.nn.Parameter(torch.ones(3))
    net.tw = torch.nn.Parameter(torch.randn(3, 4).t())  # shape (4, 3), strides (1, 4)
    sync = GradSync(net, 2, "overlap", bucket_mb=0.001, rank=rank)
    sync.begin()
    sync.arm()
    loss = net(_data(rank, 0)).square().mean() + net.tw.square().sum() * (rank + 1)
    if rank == 1:
        loss = loss + net.extra.sum() * 4.0
    loss.backward()
    sync.finish()
    torch.save({"extra": None if net.extra.grad is None else net.extra.grad.clone(),
                "tw": net.tw.grad.clone(), "tw_stride": net.tw.grad.stride()}, f"{out_dir}/partial-{rank}.pt")
    dist.barrier()
    os._exit(0)


def test_a_parameter_reached_on_one_rank_only_keeps_the_mean_on_every_rank(tmp_path):
    """Which parameters a phase reached is agreed with the gradients: a rank whose backward missed one still steps
    it with the mean (dropping it there would part the ranks' weights). A transposed weight's gradient view keeps its
    strides (a fused optimiser walks both as flat memory)."""
    import torch.multiprocessing as mp

    mp.start_processes(_partial_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"partial-{r}.pt", weights_only=False) for r in (0, 1)]
    for r in (0, 1):
        torch.testing.assert_close(got[r]["extra"], torch.full((3,), 2.0))  # (0 + 4) / 2
        assert got[r]["tw_stride"] == (1, 4)
    torch.manual_seed(0)
    _Net()
    tw = torch.randn(3, 4).t()
    torch.testing.assert_close(got[0]["tw"], tw * 3.0)  # d/dw of w^2 (1 + 2) / 2 = 3 w
    torch.testing.assert_close(got[0]["tw"], got[1]["tw"])
