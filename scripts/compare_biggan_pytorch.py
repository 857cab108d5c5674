"""gan-bench's training step against BigGAN-PyTorch's own classes, on the same BigGAN, in one process.

    python scripts/compare_biggan_pytorch.py --bgp PATH/TO/BigGAN-PyTorch [--batch 64] [--precision bf16]
        [--steps 10] [--rounds 3] ['model.attn=[]' model.ch=... (gan-bench overrides on model=biggan)]

PATH holds BigGAN-PyTorch's BigGAN.py and layers.py (any clone; nothing is downloaded). Its Generator and
Discriminator are built at gan-bench's width, resolution, latent, shared embedding, hierarchy and attention
(the parameter counts must agree, or nothing is compared: at 32x32 its D puts attention after each of its
four blocks at 16x16, gan-bench's one, so compare there with 'model.attn=[]'). They train the way its
train_fns.GAN_training_function does at one D step: D on [G(z); x] in one batch with G under no_grad, the
hinge loss, each net's Adam from its own constructor, the other net's grads toggled off, then an EMA copy
of G. With --precision bf16 its step runs under bf16 autocast (its code has fp16 paths only) in its own
contiguous format (its spectral norm views each weight as a matrix, which channels_last forbids).
gan-bench's side is `bench throughput`'s timed step (loop.train_step on fake data). The two alternate
window by window, so a passing neighbour slows both; the medians, their ratio, the FLOP per step (one
count for both: the nets are the same) and each side's MFU against the measured peak print as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _import_bgp(path: Path):
    """BigGAN.py and layers.py from the user's clone. They import `sync_batchnorm` at the top, used only
    with cross_replica / mybn (off here); without the package, a stand-in module answers that import."""
    if not (path / "BigGAN.py").is_file() or not (path / "layers.py").is_file():
        raise SystemExit(f"--bgp={path}: BigGAN.py and layers.py expected there (a BigGAN-PyTorch clone)")
    sys.path.insert(0, str(path))
    try:
        import sync_batchnorm  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("sync_batchnorm")
        stand_in.SynchronizedBatchNorm2d = torch.nn.BatchNorm2d
        sys.modules["sync_batchnorm"] = stand_in
    import BigGAN  # noqa: E402

    return BigGAN


class TheirStep:
    """BigGAN-PyTorch's training step (train_fns.GAN_training_function, num_D_steps=1, no accumulation)."""

    def __init__(self, BigGAN, mcfg, n_classes: int, res: int, batch: int, precision: str, lrs, betas, eps):
        attn = "_".join(str(a) for a in mcfg.attn) or "0"
        g_kw = dict(G_ch=mcfg.ch, dim_z=mcfg.z_dim, resolution=res, G_attn=attn, n_classes=n_classes,
                    G_shared=True, shared_dim=mcfg.shared_dim, hier=bool(mcfg.hier), G_lr=lrs[0], G_B1=betas[0],
                    G_B2=betas[1], adam_eps=eps, G_init=mcfg.init)
        d_kw = dict(D_ch=mcfg.d_ch, resolution=res, D_attn=attn, n_classes=n_classes, D_lr=lrs[1], D_B1=betas[0],
                    D_B2=betas[1], adam_eps=eps, D_init=mcfg.init)
        self.G, self.D = BigGAN.Generator(**g_kw), BigGAN.Discriminator(**d_kw)
        self.G_ema = BigGAN.Generator(**{**g_kw, "skip_init": True, "no_optim": True})
        self.G_ema.load_state_dict(self.G.state_dict())
        gen = torch.Generator().manual_seed(0)
        self.x = torch.rand(batch, 3, res, res, generator=gen).mul_(2).sub_(1)
        self.y = torch.randint(0, n_classes, (batch,), generator=gen)
        self.batch, self.dim_z = batch, mcfg.z_dim
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None

    def _ctx(self):
        return self.autocast() if self.autocast else contextlib.nullcontext()

    @staticmethod
    def _toggle(net, on: bool) -> None:
        for p in net.parameters():
            p.requires_grad = on

    def step(self) -> None:
        G, D, B = self.G, self.D, self.batch
        self._toggle(D, True), self._toggle(G, False)
        D.optim.zero_grad()
        z = torch.randn(B, self.dim_z)
        with self._ctx():
            with torch.no_grad():
                fake = G(z, G.shared(self.y))
            out = D(torch.cat([fake, self.x]), torch.cat([self.y, self.y])).float()
            d_fake, d_real = torch.split(out, [B, B])
            loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        loss.backward()
        D.optim.step()
        self._toggle(D, False), self._toggle(G, True)
        G.optim.zero_grad()
        z = torch.randn(B, self.dim_z)
        with self._ctx():
            loss = -D(G(z, G.shared(self.y)), self.y).float().mean()
        loss.backward()
        G.optim.step()
        with torch.no_grad():  # utils.ema.update: target = target * decay + source * (1 - decay), key by key
            src, tgt = G.state_dict(), self.G_ema.state_dict()
            for k in src:
                tgt[k].copy_(tgt[k] * 0.999 + src[k] * (1 - 0.999))


def _count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bgp", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="gan-bench overrides added to model=biggan (e.g. model.ch=64)")
    a = ap.parse_args()
    BigGAN = _import_bgp(a.bgp)

    from bench import device as bdevice
    from bench.config import compose, prepare
    from bench.train.loop import flop_per_step, setup
    from bench.train.throughput import benchmark, steps_only

    overrides = ["model=biggan", f"train.batch_size={a.batch}", f"train.precision={a.precision}",
                 "throughput.data=fake", *a.overrides]
    cfg = steps_only(prepare(compose(overrides)))
    run, state = setup(cfg, Path(tempfile.mkdtemp(prefix="gan-bench-vs-bgp-")), quiet=True)
    m, t = cfg.model, cfg.train
    with contextlib.redirect_stdout(sys.stderr):  # its constructors print their parameter counts
        theirs = TheirStep(BigGAN, m, run.n_data_classes, int(cfg.data.resolution), a.batch, a.precision,
                           (t.g_lr, t.d_lr), tuple(t.betas), t.eps)
    counts = {"ours": {"G": _count(state.G), "D": _count(state.D)},
              "BigGAN-PyTorch": {"G": _count(theirs.G), "D": _count(theirs.D)}}
    if counts["ours"] != counts["BigGAN-PyTorch"]:
        raise SystemExit(f"the nets differ: parameter counts {counts}; not the same BigGAN, nothing compared")
    flops = flop_per_step(run, state)

    def time_theirs(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            theirs.step()
        return n * a.batch / (time.perf_counter() - t0)

    benchmark(run, state, a.warmup, 1)  # burn-in, both sides
    time_theirs(a.warmup)
    ours_w, theirs_w = [], []
    for r in range(a.rounds):
        ours_w.append(benchmark(run, state, 0, a.steps)["img_per_s"])
        theirs_w.append(time_theirs(a.steps))
        print(f"round {r + 1}/{a.rounds}: gan-bench {ours_w[-1]:.1f} img/s, BigGAN-PyTorch {theirs_w[-1]:.1f} img/s",
              file=sys.stderr, flush=True)
    peak, source = bdevice.peak_tflops(run.device, a.precision)
    ours, bgp = statistics.median(ours_w), statistics.median(theirs_w)
    tflops = {k: flops * v / a.batch / 1e12 for k, v in (("ours", ours), ("BigGAN-PyTorch", bgp))}
    out = {"batch": a.batch, "precision": a.precision, "resolution": int(cfg.data.resolution), "ch": m.ch,
           "threads": torch.get_num_threads(), "param_counts": counts, "GFLOP_per_step": flops / 1e9,
           "img_per_s_windows": {"ours": [round(v, 2) for v in ours_w],
                                 "BigGAN-PyTorch": [round(v, 2) for v in theirs_w]},
           "img_per_s": {"ours": round(ours, 2), "BigGAN-PyTorch": round(bgp, 2)}, "ratio": round(ours / bgp, 3),
           "peak_tflops": peak, "peak_source": source,
           "mfu": {k: round(v / peak, 3) for k, v in tflops.items()}}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
