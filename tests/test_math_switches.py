"""train.fused_optim, train.tf32 and train.cudnn_benchmark (issue 25): the optimiser's kernels follow the switch, a
fused or foreach step moves the weights as torch's loop over tensors does, a resume keeps the run's own choice
over the checkpoint's, run.json and `bench throughput` record what took effect, and a bad value is one line."""
import json

import pytest
import torch

from bench import device as bdevice
from bench.cli import main
from conftest import TINY

CPU = torch.device("cpu")


def test_the_switch_picks_the_kernels():
    assert bdevice.optimizer_impl("true", torch.optim.Adam, CPU) == {"fused": True}  # torch has a fused CPU Adam
    assert bdevice.optimizer_impl("true", torch.optim.RMSprop, CPU) == {"foreach": True}  # no fused RMSprop
    assert bdevice.optimizer_impl("false", torch.optim.Adam, CPU) == {"foreach": False}
    assert bdevice.optimizer_impl("auto", torch.optim.Adam, torch.device("cuda")) == {"fused": True}
    auto = bdevice.optimizer_impl("auto", torch.optim.Adam, CPU)
    assert auto == ({"fused": True} if bdevice.CPU_FUSED_DEFAULT else {"foreach": False})
    assert [bdevice.impl_name(k) for k in ({"fused": True}, {"foreach": True}, {"foreach": False})] == \
        ["fused", "foreach", "loop"]


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_fused_and_foreach_steps_move_the_weights_as_the_loop_does(optimizer):
    """Twenty steps of each kernel on the same weights and gradients (fp32) end within float rounding."""
    from bench.config import compose
    from bench.train.objectives import make_optimizer

    ends = {}
    for choice in ("true", "false"):
        cfg = compose([f"train.fused_optim={choice}", f"train.optimizer={optimizer}"])
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
        net(torch.zeros(1, 3, 8, 8))
        opt = make_optimizer(cfg.train, net.parameters(), 1e-2, CPU)
        start = torch.cat([p.detach().flatten() for p in net.parameters()])
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            opt.zero_grad()
            net(torch.randn(4, 3, 8, 8, generator=gen)).square().mean().backward()
            opt.step()
        ends[choice] = torch.cat([p.detach().flatten() for p in net.parameters()])
        assert (ends[choice] - start).abs().max() > 1e-3  # the steps moved the weights
    torch.testing.assert_close(ends["true"], ends["false"], rtol=1e-5, atol=1e-6)


def test_run_json_records_the_kernels_and_a_resume_keeps_its_own(tmp_path, tiny_shards):
    run = tmp_path / "run"
    base = ["train", f"data.shards={tiny_shards}", f"run.dir={run}", *TINY, "train.batch_size=4",
            "train.ckpt_every=2", "train.precision=fp32"]
    assert main([*base, "train.steps=2", "train.fused_optim=true", "train.tf32=true",
                 "train.cudnn_benchmark=true"]) == 0
    facts = json.loads((run / "run.json").read_text())
    # on a CPU TF32 and cuDNN's benchmark do not exist: recorded as not in effect
    assert (facts["optimizer_impl"], facts["tf32"], facts["cudnn_benchmark"]) == ("fused", False, False)

    from bench.config import compose, validate
    from bench.train.loop import setup

    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.batch_size=4", "train.steps=4",
                            "train.fused_optim=false", "train.precision=fp32"]))
    _, t = setup(cfg, tmp_path / "other", quiet=True)
    t.load_state_dict(torch.load(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=False))
    for opt in t.opt.values():  # the checkpoint's fused=True does not come back with its state
        assert all(not g.get("fused") and g.get("foreach") is False for g in opt.param_groups)
        assert opt.state  # the moments did


@pytest.mark.parametrize("override,needle", [
    ("train.fused_optim=sometimes", "train.fused_optim"),
    ("train.tf32=yes please", "train.tf32"),
    ("train.cudnn_benchmark=maybe", "train.cudnn_benchmark"),
])
def test_a_bad_switch_is_one_line(tmp_path, capsys, tiny_shards, override, needle):
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={tmp_path / 'r'}", *TINY, override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_fused_only_where_torch_has_the_kernel():
    """Adagrad's fused kernel exists on a CPU only; a class of the user's own gets foreach if it takes it, else its
    own defaults, recorded as "its own"."""
    class Mine(torch.optim.SGD):
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)

    assert bdevice.optimizer_impl("true", torch.optim.Adagrad, CPU) == {"fused": True}
    assert bdevice.optimizer_impl("true", torch.optim.Adagrad, torch.device("cuda")) == {"foreach": True}
    assert bdevice.optimizer_impl("true", Mine, CPU) == {} and bdevice.optimizer_impl("false", Mine, CPU) == {}
    opt = Mine([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert bdevice.impl_name({k: v for k, v in opt.defaults.items() if k not in ("fused", "foreach")}) == "its own"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_compiled_run_matches_eager(tmp_path, tiny_shards, precision):
    """train.compile=default (torch.compile of G and D, traced by the aot_eager backend here: the inductor's code
    generation takes minutes on a CPU and is measured by `bench throughput`, README "Throughput"): 10 steps end on
    the weights of the eager run within the precision's rounding, with spectral norm's power iteration, the EMA
    and the checkpoints as in eager; run.json records the compile."""
    def run(name, *extra):
        d = tmp_path / name
        assert main(["train", f"data.shards={tiny_shards}", f"run.dir={d}", *TINY, "train.steps=10",
                     "train.batch_size=4", f"train.precision={precision}", "train.ckpt_every=5", *extra]) == 0
        return d, torch.load(d / "checkpoints" / "ckpt-0000010.pt", weights_only=False)

    eager_dir, eager = run("eager")
    comp_dir, comp = run("compiled", "train.compile=default", "train.compile_backend=aot_eager")
    tol = {"fp32": 1e-4, "bf16": 5e-2}[precision]
    for net in ("G", "D", "G_ema"):
        assert eager[net].keys() == comp[net].keys()  # the same state dict: no _orig_mod. prefix in checkpoints
        for k, v in eager[net].items():
            if v.is_floating_point():
                torch.testing.assert_close(comp[net][k], v, rtol=tol, atol=tol, msg=f"{net}.{k}")
    facts = json.loads((comp_dir / "run.json").read_text())
    assert facts["compile"] == "default" and facts["compile_backend"] == "aot_eager"
    assert facts["compile_s"] > 0 and facts["compile_graphs"] >= 2 and facts["compile_graph_breaks"] == 0
    assert json.loads((eager_dir / "run.json").read_text())["compile"] == "false"
    # it resumes from its checkpoint like any run
    assert main(["train", f"data.shards={tiny_shards}", f"run.dir={comp_dir}", *TINY, "train.steps=12",
                 "train.batch_size=4", f"train.precision={precision}", "train.ckpt_every=5", "train.compile=default",
                 "train.compile_backend=aot_eager"]) == 0
    assert json.loads((comp_dir / "summary.json").read_text())["steps"] == 12


def test_compile_refuses_a_gradient_penalty_in_one_line(tmp_path, capsys, tiny_shards):
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={tmp_path / 'r'}", *TINY, "train.compile=default",
               "reg.r1_gamma=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "train.compile=default cannot train with reg.r1_gamma=1" in err[0]
    assert not (tmp_path / "r").exists()
