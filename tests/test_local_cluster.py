"""slurm/local-cluster.sh must never harm a machine with a real Slurm: it refuses to run beside one,
keeps everything in its private directory, tags what it adds to the hosts file, and `uninstall`
reverts it. These tests point the script at a private directory, hosts file and "system" config
under tmp_path, so they never touch the machine's own files or the running test cluster."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "slurm" / "local-cluster.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("slurmctld") is None or shutil.which("munged") is None,
                                reason="needs root and Debian's slurm/munge packages (as in CI)")


def _script(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "GAN_BENCH_SLURM_DIR": str(tmp_path / "prefix"),
         "SLURM_LOCAL_HOSTS_FILE": str(tmp_path / "hosts"),
         "SLURM_LOCAL_SYSTEM_CONF": str(tmp_path / "system-slurm.conf"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=e)


def test_refuses_beside_a_real_slurm_conf(tmp_path):
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    (tmp_path / "system-slurm.conf").write_text("ClusterName=production\n")
    out = _script(tmp_path, "install")
    assert out.returncode == 1
    assert "has a real Slurm" in out.stderr and str(tmp_path / "system-slurm.conf") in out.stderr
    assert not (tmp_path / "prefix").exists()                       # nothing written
    assert (tmp_path / "hosts").read_text() == "127.0.0.1 localhost\n"
    assert (tmp_path / "system-slurm.conf").read_text() == "ClusterName=production\n"


def test_refuses_beside_a_foreign_slurmctld(tmp_path):
    fake = tmp_path / "slurmctld"  # a process whose command name is slurmctld, not named by our pidfiles
    shutil.copy("/bin/sleep", fake)
    (tmp_path / "hosts").write_text("")
    proc = subprocess.Popen([str(fake), "3600"])  # outlives a slow install; killed below
    try:
        assert _script(tmp_path, "install").returncode == 0
        out = _script(tmp_path, "start")
        assert out.returncode == 1
        assert "daemons that this script did not start are running" in out.stderr
        assert f"slurmctld (pid {proc.pid})" in out.stderr
        assert not (tmp_path / "prefix" / "munge" / "munged.pid").exists()  # nothing was started
        assert proc.poll() is None  # and it was left alone
        out = _script(tmp_path, "stop")  # stop signals only what its pidfiles name
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        _script(tmp_path, "uninstall")


def test_install_stays_private_and_uninstall_reverts_it(tmp_path):
    hosts = tmp_path / "hosts"
    before = "127.0.0.1 localhost\n10.0.0.5 fileserver\n"
    hosts.write_text(before)
    out = _script(tmp_path, "install")
    assert out.returncode == 0, out.stderr
    prefix = tmp_path / "prefix"
    conf = (prefix / "etc" / "slurm.conf").read_text()
    assert f"socket={prefix}/munge/munge.socket" in conf and f"SlurmctldPidFile={prefix}/run/" in conf
    assert "/etc/slurm" not in conf and "/etc/munge" not in conf and "/run/munge" not in conf
    added = [l for l in hosts.read_text().splitlines() if l not in before.splitlines()]
    assert added and all(l.startswith("127.0.0.1 n1 n2") and l.endswith("# gan-bench-local-cluster") for l in added)
    assert _script(tmp_path, "install").returncode == 0   # idempotent: no second hosts line
    assert hosts.read_text().count("gan-bench-local-cluster") == 1
    env = _script(tmp_path, "env").stdout.strip()
    assert env == f"export SLURM_CONF={prefix}/etc/slurm.conf"

    out = _script(tmp_path, "uninstall")
    assert out.returncode == 0, out.stderr
    assert hosts.read_text() == before
    assert not prefix.exists()


def test_uninstall_removes_an_old_versions_system_conf_only_if_ours(tmp_path):
    (tmp_path / "hosts").write_text("")
    sysconf = tmp_path / "system-slurm.conf"
    sysconf.write_text("# Written by gan-bench slurm/local-cluster.sh: two nodes on one host, for tests.\n")
    assert _script(tmp_path, "uninstall").returncode == 0
    assert not sysconf.exists()
    sysconf.write_text("ClusterName=production\n")
    assert _script(tmp_path, "uninstall").returncode == 0
    assert sysconf.read_text() == "ClusterName=production\n"


def test_a_directory_it_did_not_make_is_never_used_or_deleted(tmp_path):
    (tmp_path / "hosts").write_text("")
    own = tmp_path / "prefix"
    own.mkdir()
    (own / "thesis.tex").write_text("years of work")
    out = _script(tmp_path, "install")
    assert out.returncode == 1 and "was not made by this script" in out.stderr
    assert _script(tmp_path, "uninstall").returncode == 0
    assert (own / "thesis.tex").read_text() == "years of work"
