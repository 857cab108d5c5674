"""bench/args.py: the one argument grammar of every command (values read as Hydra reads them, config keys passed
through, every bad argument one line naming the command, the key, the value and the keys allowed)."""
import pytest

from bench import args as A
from bench.errors import UsageError

TABLE = {"run": A.TEXT, "n": A.integer(1), "psi": A.PSI_LIST, "once": A.FLAG, "poll": A.seconds(strict=True),
         "which": A.WHICH, "source": A.choice("shapes", "folder"), "one": A.PSI}


def parse(*argv, **kw):
    return A.parse_kv(list(argv), TABLE, "demo", **kw)


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert len(text.splitlines()) == 1, text
    return text


@pytest.mark.parametrize("written", ["psi=[0.5,1.0]", "psi=[0.5, 1.0]", "psi=[ 0.5 ,1.0 ]", "psi=[5e-1,1]"])
def test_lists_are_read_as_hydra_reads_them(written):
    known, overrides = parse(written)
    assert known == {"psi": [0.5, 1.0]} and overrides == []


def test_values_of_every_kind():
    known, _ = parse("run=/tmp/r-1_2.3", "n=12", "psi=[0.25,off,null]", "once=true", "poll=0.5", "which=last",
                     "source=folder", "one=off")
    assert known == {"run": "/tmp/r-1_2.3", "n": 12, "psi": [0.25, None, None], "once": True, "poll": 0.5,
                     "which": "last", "source": "folder", "one": "off"}
    assert parse("psi=0.7")[0]["psi"] == [0.7]  # one value is a list of one
    assert parse("one=0.5")[0]["one"] == 0.5
    assert parse("once=no")[0]["once"] is False and parse("once=1")[0]["once"] is True
    assert parse("which=12")[0]["which"] == "12"


def test_quoting_follows_hydra():
    assert parse("run='/tmp/my run'")[0]["run"] == "/tmp/my run"
    assert parse('run="/tmp/a,b"')[0]["run"] == "/tmp/a,b"  # a quoted comma is no sweep
    assert parse(r"run=/tmp/a\,b")[0]["run"] == "/tmp/a,b"
    # a path keeps what was written where Hydra would read a number, or cannot read it at all
    assert parse("run=1e3")[0]["run"] == "1e3"
    assert parse("run=007")[0]["run"] == "007"
    assert parse("run=~/runs/x")[0]["run"] == "~/runs/x"
    assert parse("run=/tmp/a=b")[0]["run"] == "/tmp/a=b"
    # a quoted list is a string, as in Hydra: not a list of numbers
    with pytest.raises(UsageError) as e:
        parse("psi='[0.5, 1.0]'")
    assert "psi=\"'[0.5, 1.0]'\" is not valid" in one_line(e)


def test_dotted_config_keys_pass_through_unchanged():
    known, overrides = parse("run=/r", "eval.num_samples=100", "data.shards=/s", "eval.psi_sweep=[0.5, 1.0]",
                             passthrough=("eval.*", "data.shards"))
    assert known == {"run": "/r"}
    assert overrides == ["eval.num_samples=100", "data.shards=/s", "eval.psi_sweep=[0.5, 1.0]"]
    with pytest.raises(UsageError) as e:  # a group the command does not take is an unknown key
        parse("run=/r", "data.resolution=32", passthrough=("eval.*", "data.shards"))
    assert "unknown key 'data.resolution'" in one_line(e)


def test_any_passes_every_hydra_override_and_flags_are_switches():
    known, overrides = A.parse_kv(["-m", "model=sagan", "+experiment=x", "~eval", "train.steps=2,4"], {}, "train",
                                  passthrough=A.ANY, flags=("-m", "--multirun"))
    assert known == {"-m": True} and overrides == ["model=sagan", "+experiment=x", "~eval", "train.steps=2,4"]


def test_an_unknown_key_is_one_line_with_command_key_value_and_allowed_keys():
    with pytest.raises(UsageError) as e:
        parse("run=/r", "colour=red", passthrough=("eval.*",))
    line = one_line(e)
    assert line.startswith("bench demo: ")
    assert "unknown key 'colour'" in line and "'colour=red' is not a valid argument" in line
    assert "valid keys: run, n, psi, once, poll, which, source, one, eval.*" in line


def test_a_bare_word_is_an_error_unless_the_command_takes_one(tmp_path):
    with pytest.raises(UsageError) as e:
        parse("oops")
    assert "'oops' is not key=value" in one_line(e) and "valid keys: run" in one_line(e)
    odd = tmp_path / "a=b"
    odd.mkdir()
    known, _ = parse("somewhere", str(odd), "n=2", positional="DIR")
    assert known == {"DIR": ["somewhere", str(odd)], "n": 2}


@pytest.mark.parametrize("written, words", [
    ("n=0", ["n='0' is not valid", "use an integer >= 1"]),
    ("n=2.5", ["n='2.5'", "integer"]),
    ("n=abc", ["n='abc'", "integer"]),
    ("n=true", ["n='true'", "integer"]),
    ("poll=0", ["poll='0' is not valid", "> 0"]),
    ("poll=soon", ["poll='soon'", "seconds"]),
    ("poll=inf", ["poll='inf'", "seconds"]),
    ("once=maybe", ["once='maybe'", "true or false"]),
    ("psi=[0.5,abc]", ["psi='[0.5,abc]'", "'abc' is not a positive number"]),
    ("psi=[-1]", ["psi='[-1]'", "-1"]),
    ("psi=[]", ["psi='[]'", "give the truncation values"]),
    ("one=-1", ["one='-1'", "positive number, or off"]),
    ("which=-3", ["which='-3'", ">= 0"]),
    ("which=", ["which=''", "best, last"]),
    ("source=lmdb", ["source='lmdb'", "choose one of: shapes, folder"]),
    ("n=1,2", ["n='1,2'", "not a sweep"]),
    ("run=a,b", ["run='a,b'", "not a sweep"]),
    ("run=[a,b]", ["run='[a,b]'", "not a list"]),
    ("psi=[0.5,1.0", ["psi='[0.5,1.0'", "Hydra's override grammar"]),
])
def test_a_bad_value_names_the_key_and_the_value(written, words):
    with pytest.raises(UsageError) as e:
        parse(written)
    line = one_line(e)
    assert line.startswith("bench demo: ") and all(w in line for w in words), line


def test_required_keys_aliases_and_the_last_value_wins():
    with pytest.raises(UsageError) as e:
        parse("n=2", required={"run": "DIR (a run directory)"})
    assert one_line(e) == "bench demo needs run=DIR (a run directory)"
    known, _ = parse("count=3", "n=4", aliases={"count": "n"})
    assert known == {"n": 4}
    with pytest.raises(UsageError) as e:  # an alias's bad value is named as written
        parse("count=0", aliases={"count": "n"})
    assert "count='0' is not valid" in one_line(e)


def test_the_grammar_imports_neither_hydra_nor_torch():
    import subprocess
    import sys

    code = ("import sys, bench.args; "
            "print(sorted(m for m in ('torch', 'hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
