"""Your own model and configs without a fork (docs/architecture.md, "Your own model without a fork"): a package
written here (a tiny G / D pair) and a config folder with model/mine.yaml, found through GAN_BENCH_CONFIG_PATH
or hydra.searchpath, trained by the real `bench train`; the one-line errors for what a user gets wrong."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.config import ConfigError, check_group_choices, compose, validate
from bench.models import ModelConfigError

ROOT = Path(__file__).resolve().parent.parent
PKG = "tinynets_ext"  # the user's package (a name no other test module uses)

NETS = '''
import math
from torch import nn


class Generator(nn.Module):
    def __init__(self, z_dim, width, resolution, n_classes):
        super().__init__()
        self.z_dim, self.resolution, self.n_classes = z_dim, resolution, n_classes
        self.embed = nn.Embedding(n_classes, z_dim)
        ups = []
        for _ in range(int(math.log2(resolution // 4))):
            ups += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(nn.Linear(z_dim, width * 16), nn.Unflatten(1, (width, 4, 4)), *ups,
                                 nn.Conv2d(width, 3, 3, padding=1), nn.Tanh())

    def forward(self, z, y):
        return self.net(z * self.embed(y))


class Discriminator(nn.Module):
    def __init__(self, width, resolution, n_classes, flat=True):
        super().__init__()
        downs, c = [], 3
        for _ in range(int(math.log2(resolution // 4))):
            downs += [nn.Conv2d(c, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = width
        self.features = nn.Sequential(*downs, nn.Flatten())
        self.out = nn.Linear(width * 16, 1)
        self.embed = nn.Embedding(n_classes, width * 16)
        self.flat = flat

    def forward(self, x, y):
        h = self.features(x)
        logits = self.out(h) + (self.embed(y) * h).sum(1, keepdim=True)  # projection discriminator
        return logits.squeeze(1) if self.flat else logits


def build(cfg, resolution, n_classes):
    return (Generator(cfg["z_dim"], cfg["width"], resolution, n_classes),
            Discriminator(cfg["width"], resolution, n_classes))


def build_one(cfg, resolution, n_classes):
    return Generator(cfg["z_dim"], cfg["width"], resolution, n_classes)


def build_no_z_dim(cfg, resolution, n_classes):
    G, D = build(cfg, resolution, n_classes)
    del G.z_dim
    return G, D


def build_column_logits(cfg, resolution, n_classes):
    return (Generator(cfg["z_dim"], cfg["width"], resolution, n_classes),
            Discriminator(cfg["width"], resolution, n_classes, flat=False))
'''
LOSSES = '''
import torch

from bench.train.objectives import Loss

SEEN = []  # the margin each after_d_step call read from the loss config it was given


def least_squares(cfg):
    """LSGAN (Mao et al. 2017) with the margin of the user's own key loss.margin."""
    m = float(cfg["margin"])
    return Loss(d=lambda real, fake: ((real - m) ** 2).mean() + ((fake + m) ** 2).mean(),
                g=lambda fake: ((fake - m) ** 2).mean(),
                after_d_step=lambda D, loss_cfg: SEEN.append(loss_cfg["margin"]))


def not_a_loss(cfg):
    return "hinge"


class SGDMomentum(torch.optim.SGD):
    def __init__(self, params, lr):
        super().__init__(params, lr=lr, momentum=0.9)


class NotAnOptimizer:
    pass
'''
LSGAN = f"_target_: {PKG}.losses.least_squares\nname: lsgan\nmargin: 1.0\n"
MINE = f"# my own nets\n_target_: {PKG}.nets.build\nfamily: mine\nz_dim: 16\nwidth: 8\n"


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user's package (on sys.path) and config folder (GAN_BENCH_CONFIG_PATH), both outside the checkout."""
    pkg = tmp_path / "pkg" / PKG
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "mine.yaml").write_text(MINE)
    (pkg / "losses.py").write_text(LOSSES)
    (conf / "loss").mkdir()
    (conf / "loss" / "lsgan.yaml").write_text(LSGAN)
    for m in [m for m in sys.modules if m.split(".")[0] == PKG]:
        del sys.modules[m]
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setenv("GAN_BENCH_CONFIG_PATH", str(conf))
    yield tmp_path
    for m in [m for m in sys.modules if m.split(".")[0] == PKG]:
        del sys.modules[m]


def test_own_model_trains_through_the_cli(user):
    """`bench train model=mine` in a subprocess, from a folder outside the checkout: the run completes, and its
    checkpoint holds the user's nets (their state dicts load strictly into freshly built ones)."""
    run = user / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user / "pkg"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "GAN_BENCH_CONFIG_PATH": str(user / "conf")}
    out = subprocess.run([sys.executable, "-m", "bench.cli", "train", "model=mine", "train.steps=10",
                          "data.resolution=16", "data.num_samples=200", "data.num_workers=0", "train.batch_size=8",
                          "train.precision=fp32", "train.tick_every=1", "ema.start=0", "eval.final=false",
                          f"run.dir={run}"],
                         cwd=user, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training mine at 16x16" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 10, summary
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor([r["loss/D"], r["loss/G"]])).all() for r in rows)
    ckpt = run / "checkpoints" / "ckpt-0000010.pt"
    assert ckpt.is_file(), sorted(p.name for p in (run / "checkpoints").iterdir())

    from bench.eval.safeload import load_weights
    nets = __import__(f"{PKG}.nets", fromlist=["build"])
    G, D = nets.build({"z_dim": 16, "width": 8}, 16, 10)
    state = load_weights(ckpt)
    G.load_state_dict(state["G"])  # strict: exactly the user's parameters
    D.load_state_dict(state["D"])
    fresh = nets.build({"z_dim": 16, "width": 8}, 16, 10)[0]
    assert any(not torch.equal(a, b) for a, b in zip(G.state_dict().values(), fresh.state_dict().values()))
    saved = (run / "config.yaml").read_text()
    assert f"_target_: {PKG}.nets.build" in saved and "width: 8" in saved


def test_a_typo_lists_gan_benchs_options_and_the_users(user, monkeypatch):
    with pytest.raises(ConfigError) as err:
        check_group_choices(["model=mien"])
    msg = str(err.value)
    assert "\n" not in msg and "'mien'" in msg and "biggan" in msg and "dcgan" in msg
    assert f"in {user / 'conf'}: mine" in msg
    check_group_choices(["model=mine"])  # no error
    monkeypatch.delenv("GAN_BENCH_CONFIG_PATH")
    with pytest.raises(ConfigError, match="not available") as err:
        check_group_choices(["model=mine"])
    assert "mine" not in str(err.value).split("choose one of:")[1]


def test_the_folders_come_from_hydra_searchpath_too(user, monkeypatch):
    monkeypatch.delenv("GAN_BENCH_CONFIG_PATH")
    cfg = validate(compose(["model=mine", f"hydra.searchpath=[file://{user / 'conf'}]", "data.resolution=16"]))
    assert cfg.model._target_ == f"{PKG}.nets.build" and cfg.model.width == 8 and cfg.model.family == "mine"


def test_several_folders_in_path_order(user, monkeypatch):
    """GAN_BENCH_CONFIG_PATH=DIR1:DIR2: an option in either is selectable, the first folder's copy wins."""
    second = user / "conf2"
    (second / "model").mkdir(parents=True)
    (second / "model" / "mine.yaml").write_text(MINE.replace("width: 8", "width: 4"))
    (second / "model" / "theirs.yaml").write_text(MINE.replace("family: mine", "family: theirs"))
    monkeypatch.setenv("GAN_BENCH_CONFIG_PATH", os.pathsep.join([str(user / "conf"), str(second)]))
    assert compose(["model=mine"]).model.width == 8
    assert compose(["model=theirs"]).model.family == "theirs"


def test_a_users_option_named_like_a_built_in_one_is_refused(user):
    (user / "conf" / "model" / "dcgan.yaml").write_text(MINE)
    with pytest.raises(ConfigError, match=r"model='dcgan': your .*/model/dcgan.yaml has the name of gan-bench's own"):
        compose(["model=dcgan"])


def test_a_missing_config_folder_is_one_line(user, monkeypatch):
    monkeypatch.setenv("GAN_BENCH_CONFIG_PATH", str(user / "nowhere"))
    with pytest.raises(ConfigError, match=r"^GAN_BENCH_CONFIG_PATH: '.*nowhere' is not a folder"):
        compose(["model=biggan"])


@pytest.mark.parametrize("yaml, error, needle", [
    ("_target_: {pkg}.nets.build\nz_dim: 16\nwidth: 8\n", ConfigError,
     "model.family='biggan' with model._target_={pkg}.nets.build: set model.family to a name of your own"),
    ("_target_: build\nfamily: x\n", ConfigError, "model._target_='build' is not valid; use the dotted path"),
    ("_target_: nosuchpkg.nets.build\nfamily: x\n", ModelConfigError,
     "model._target_='nosuchpkg.nets.build': no module named 'nosuchpkg'; put your package on PYTHONPATH"),
    ("_target_: {pkg}.nets.nothing\nfamily: x\n", ModelConfigError, "module '{pkg}.nets' has no 'nothing'"),
    ("_target_: {pkg}.nets.build_one\nfamily: x\nz_dim: 16\nwidth: 8\n", ModelConfigError,
     "returned Generator; it must return (G, D), two torch.nn.Modules"),
    ("_target_: {pkg}.nets.build_no_z_dim\nfamily: x\nz_dim: 16\nwidth: 8\n", ModelConfigError,
     "its G needs the integer attribute(s) z_dim"),
    ("_target_: {pkg}.nets.build_column_logits\nfamily: x\nz_dim: 16\nwidth: 8\n", ModelConfigError,
     "D(x, y) gave (2, 1) for 2 images; it must give logits of shape (2,)"),
])
def test_a_broken_own_model_is_one_line_before_anything_runs(user, yaml, error, needle):
    (user / "conf" / "model" / "broken.yaml").write_text(yaml.format(pkg=PKG))
    with pytest.raises(error) as err:
        validate(compose(["model=broken", "data.resolution=16"]))
    assert needle.format(pkg=PKG) in str(err.value) and "\n" not in str(err.value)


def test_a_wrong_resolution_is_caught_by_the_shape_probe(user):
    """G built for 16 but asked for 32 by a builder that ignores `resolution`: the probe says so."""
    (user / "pkg" / PKG / "fixed.py").write_text(
        f"from {PKG}.nets import build as _b\n\ndef build(cfg, resolution, n_classes):\n"
        "    G, D = _b(cfg, 16, n_classes)\n    G.resolution = resolution\n    return G, D\n")
    (user / "conf" / "model" / "fixed.yaml").write_text(MINE.replace(".nets.build", ".fixed.build"))
    with pytest.raises(ModelConfigError, match=r"G\(z, y\) gave \(2, 3, 16, 16\) for 2 samples; it must give "
                                               r"\(2, 3, 32, 32\)"):
        validate(compose(["model=fixed", "data.resolution=32"]))


def test_own_loss_and_optimiser_train_through_the_cli(user, tiny_shards):
    """loss=lsgan (the user's config folder: loss._target_ and a key of their own, loss.margin) and
    train.optimizer=<package.module.Class>: `bench train` runs them, and the trainer holds exactly those."""
    from bench.cli import main
    from bench.train.loop import setup
    from conftest import TINY

    opt = f"train.optimizer={PKG}.losses.SGDMomentum"
    run = user / "run"
    assert main(["train", *TINY, f"data.shards={tiny_shards}", "loss=lsgan", "loss.margin=0.5", opt,
                 "train.steps=3", "train.batch_size=4", "train.precision=fp32", f"run.dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    saved = (run / "config.yaml").read_text()
    assert f"_target_: {PKG}.losses.least_squares" in saved and "margin: 0.5" in saved
    state = torch.load(run / "checkpoints" / "ckpt-0000003.pt", weights_only=False)
    assert all("momentum_buffer" in s for s in state["opt_D"]["state"].values())  # SGD's state, not Adam's

    cfg = validate(compose([*TINY, f"data.shards={tiny_shards}", "loss=lsgan", opt]))
    _, t = setup(cfg, user / "other", quiet=True)
    assert type(t.opt["G"]).__name__ == "SGDMomentum" and t.opt["G"].defaults["momentum"] == 0.9
    on_target = t.objective.loss.d(torch.tensor([1.0]), torch.tensor([-1.0]))
    assert on_target.item() == 0.0 and t.objective.loss.g(torch.tensor([1.0])).item() == 0.0  # margin 1
    t.objective.after_d_step()[0]()  # the loss's own hook is given the loss config with the user's own keys
    assert sys.modules[f"{PKG}.losses"].SEEN[-1] == 1.0


@pytest.mark.parametrize("overrides,needle", [
    (["loss=lsgan", f"loss._target_={PKG}.losses.not_a_loss"], "returned str; it must return a bench.train"),
    (["loss=lsgan", "loss._target_=nowhere_pkg.losses.make"], "no module named 'nowhere_pkg'"),
    (["loss=lsgan", "loss.name=hinge"], "loss.name='hinge' with loss._target_"),
    ([f"train.optimizer={PKG}.losses.NotAnOptimizer"], "is not a torch.optim.Optimizer subclass"),
    (["train.optimizer=sgd"], "train.optimizer='sgd' is not valid"),
])
def test_a_broken_own_loss_or_optimiser_is_one_line(user, tiny_shards, capsys, overrides, needle):
    from bench.cli import main
    from conftest import TINY

    rc = main(["train", *TINY, f"data.shards={tiny_shards}", *overrides, f"run.dir={user / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (user / "r" / "metrics.jsonl").exists()


def test_a_new_builtin_loss_is_one_registration_and_its_yaml(tmp_path, monkeypatch, tiny_shards):
    """What adding a loss to gan-bench takes, counted: one `LOSSES.register(name, Loss(...))` (a line beside the
    others in bench/train/objectives.py) and configs/loss/<name>.yaml (here in a config folder of its own). Nothing
    else: the config's choices, the error lines and training all read the registry."""
    from bench.cli import main
    from bench.registry import LOSSES
    from bench.train.objectives import Loss
    from conftest import TINY

    calls = {"d": 0, "g": 0}

    def d_lsq(real, fake):
        calls["d"] += 1
        return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean()

    def g_lsq(fake):
        calls["g"] += 1
        return 0.5 * ((fake - 1) ** 2).mean()

    with pytest.raises(ConfigError, match="loss='lsq' is not valid; choose one of: hinge, ns"):
        validate(compose(["loss=hinge", "loss.name=lsq"]))
    monkeypatch.setitem(LOSSES._parts, "lsq", Loss(d_lsq, g_lsq))  # place 1 (undone after the test)
    conf = tmp_path / "conf" / "loss"
    conf.mkdir(parents=True)
    (conf / "lsq.yaml").write_text("name: lsq\n")  # place 2
    monkeypatch.setenv("GAN_BENCH_CONFIG_PATH", str(tmp_path / "conf"))
    run = tmp_path / "run"
    assert main(["train", *TINY, f"data.shards={tiny_shards}", "loss=lsq", "train.steps=2", "train.batch_size=4",
                 "train.precision=fp32", f"run.dir={run}"]) == 0
    assert "name: lsq" in (run / "config.yaml").read_text()
    assert calls == {"d": 2, "g": 2}  # one D and one G phase per step: the registered loss is what trained
