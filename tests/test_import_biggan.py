"""`bench import biggan-pytorch`: BigGAN-PyTorch's state dicts as a run directory whose EMA G, sampled in eval mode,
reproduces BigGAN-PyTorch's own G (--use_ema --G_eval_mode) to float32 rounding. The fixture
tests/fixtures/biggan_pytorch_tiny.pt was made with BigGAN-PyTorch's classes (tests/fixtures/README.md)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import rundir
from bench.cli import main
from bench.eval import export
from bench.eval import runs as R
from bench.importer import their_to_ours

FIXTURES = Path(__file__).parent / "fixtures"
# the fixtures' G_ch=4, D_ch=4, resolution 64, attention at 16, shared_dim 16, 10 classes; dim_z 20 (BigGAN: 5
# chunks of 4) and 16 (BigGAN-deep, G_depth = D_depth = 2)
SMALL = ["model.ch=4", "model.d_ch=4", "model.z_dim=20", "model.shared_dim=16", "model.attn=[16]",
         "model.n_classes=10", "data.resolution=64"]
CASES = {"biggan_128": ("biggan_pytorch_tiny.pt", SMALL),
         "biggan_deep_128": ("biggan_deep_pytorch_tiny.pt", [*SMALL[:2], "model.z_dim=16", *SMALL[3:]])}


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURES / CASES["biggan_128"][0], weights_only=True)


@pytest.fixture()
def files(fixture, tmp_path):
    g, d = tmp_path / "G_ema.pth", tmp_path / "D.pth"
    torch.save(fixture["G_state"], g)
    torch.save(fixture["D_state"], d)
    return g, d


def imported(files, tmp_path, *extra, model="biggan_128"):
    g, d = files
    out = tmp_path / "imported"
    assert main(["import", "biggan-pytorch", f"weights={g}", f"g={g}", f"d={d}", f"model={model}",
                 f"out={out}", *CASES[model][1], *extra]) == 0
    return out


@pytest.mark.parametrize("model", list(CASES))
def test_imported_G_reproduces_biggan_pytorch_in_eval_mode(model, tmp_path, capsys, one_thread):
    fixture = torch.load(FIXTURES / CASES[model][0], weights_only=True)
    g, d = tmp_path / "G_ema.pth", tmp_path / "D.pth"
    torch.save(fixture["G_state"], g)
    torch.save(fixture["D_state"], d)
    out = imported((g, d), tmp_path, model=model)
    record = json.loads(capsys.readouterr().out)
    assert record["source"] == "biggan-pytorch" and record["model"] == model
    info = rundir.read_json(out / rundir.RUN_JSON)
    assert info["imported_from"]["files"]["weights"]["sha256"] and info["n_classes"] == 10
    run = R.load_run(out, which="last", device="cpu")
    G = run["G"]
    assert not G.training and run["step"] == 0 and run["resolution"] == 64
    with torch.no_grad():
        x = G.float()(fixture["z"], fixture["y"])
    levels = (x - fixture["x"]).abs().max().item() * 127.5  # in 8-bit pixel levels
    print(f"{model}: largest difference to BigGAN-PyTorch's G: {levels:.3g} pixel levels "
          f"({(x - fixture['x']).abs().max().item():.3g} in [-1, 1])")
    assert levels < 1e-3  # float32 rounding (different summation orders), far below one level
    as_uint8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731 - as bench sample rounds them
    assert (as_uint8(x) - as_uint8(fixture["x"])).abs().max() <= 1  # a value at a .5 boundary may round apart
    assert (as_uint8(x) != as_uint8(fixture["x"])).float().mean() < 1e-3
    # D too: its logits on those images
    from bench.eval.safeload import load_weights
    from bench import models

    state = load_weights(out / rundir.CHECKPOINTS / "ckpt-0000000.pt")
    _, D = models.build(state["config"]["model"], 64, 10)
    assert state["config"]["model"]["family"] == ("biggan_deep" if "deep" in model else "biggan")
    D.load_state_dict(state["D"])
    with torch.no_grad():
        logits = D.eval()(fixture["x"], fixture["y"])
    assert torch.allclose(logits, fixture["D_logits"], rtol=1e-4, atol=1e-4), (logits, fixture["D_logits"])


def test_bench_sample_reads_the_imported_run(files, tmp_path, capsys, fixture):
    out = imported(files, tmp_path, "model.sn_eps=1e-6")
    npz = tmp_path / "s.npz"
    assert main(["sample", f"run={out}", "n=4", f"out={npz}", "class=3", "eval.precision=fp32"]) == 0
    a = export.load_npz(npz)
    assert a["x"].shape == (4, 64, 64, 3) and (a["y"] == 3).all()


def test_name_mapping():
    assert their_to_ours("blocks.3.0.bn1.stored_mean", 1) == "blocks.3.bn1.bn.running_mean"
    assert their_to_ours("blocks.3.1.theta.u0", 1) == "attn.3.theta.u0"
    assert their_to_ours("blocks.5.1.gamma", 2) == "attn.2.gamma"  # deep: after the stage's last block
    assert their_to_ours("output_layer.0.gain", 1) == "out_bn.weight"
    assert their_to_ours("output_layer.0.stored_var", 1) == "out_bn.running_var"
    assert their_to_ours("output_layer.2.u0", 1) == "out_conv.u0"
    assert their_to_ours("input_conv.weight", 2) == "stem.weight"
    assert their_to_ours("blocks.1.1.conv1.weight", 2, nested=True) == "blocks.3.conv1.weight"  # deep D: stages
    assert their_to_ours("blocks.1.2.gamma", 2, nested=True) == "attn.1.gamma"


def test_unknown_and_missing_keys_are_one_line(fixture, tmp_path, capsys):
    state = dict(fixture["G_state"])
    state["blocks.9.0.conv1.weight"] = torch.zeros(1)
    del state["linear.bias"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    rc = main(["import", "biggan-pytorch", f"weights={path}", "model=biggan_128", f"out={tmp_path / 'o'}", *SMALL])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(err) == 1, err
    assert "1 keys with no gan-bench counterpart: blocks.9.0.conv1.weight" in err[0]
    assert "1 gan-bench keys not in the file: linear.bias" in err[0] and str(path) in err[0]
    assert not (tmp_path / "o").exists()
    # the wrong width: shapes named
    torch.save(fixture["G_state"], path)
    assert main(["import", "biggan-pytorch", f"weights={path}", "model=biggan_128", f"out={tmp_path / 'o'}",
                 *SMALL[1:], "model.ch=8"]) == 2
    assert "linear.weight has shape (1024, 4), linear.weight of model needs (2048, 4)" in capsys.readouterr().err
    assert main(["import", "biggan-pytorch", f"weights={path}", "model=sagan", f"out={tmp_path / 'o'}"]) == 2
    assert "model='sagan': choose one of biggan_128, biggan_deep_128, biggan_deep_256" in capsys.readouterr().err
    assert main(["import", "biggan-pytorch", f"weights={path}", "model=biggan_128", f"out={tmp_path / 'o'}",
                 "train.steps=3"]) == 2
    assert "unknown key 'train.steps'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
