"""slurm/local-cluster/up.sh and down.sh: the nodes they create and remove, and never taking over, stopping or
cancelling the jobs of a Slurm they did not start.

Most tests run the scripts against the local cluster of tests/test_slurm.py (the one up.sh runs with
its default SLURM_LOCAL_ROOT, started here when none answers) without disturbing it: with another
SLURM_LOCAL_ROOT that cluster is someone else's. The takeover (--replace-existing) and a two-node
cluster's whole life run in namespaces of their own (unshare: processes, network, /etc/slurm, /run,
/etc/hosts), where a second cluster cannot meet the first.
"""
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import slurm_answers
from train_cli_worker import REPO_ROOT

UP = os.path.join(REPO_ROOT, "slurm", "local-cluster", "up.sh")
DOWN = os.path.join(REPO_ROOT, "slurm", "local-cluster", "down.sh")
DEFAULT_ROOT = Path("/tmp/slurm-local")
CONF = Path("/etc/slurm/slurm.conf")

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]


def _daemons() -> dict:
    """{pid: name} of the slurmctld and the slurmd(s) that up.sh started with its default root (slurmd.pid, or
    slurmd-<node>.pid for each node); {} unless a slurmctld and a slurmd run."""
    pids = {}
    for pid_file in DEFAULT_ROOT.glob("slurm*.pid"):
        name = pid_file.stem.split("-")[0]
        try:
            pid = pid_file.read_text().strip()
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                pids[pid] = name
        except OSError:
            pass
    return pids if {"slurmctld", "slurmd"} <= set(pids.values()) else {}


def _run(script, *args, **env):
    return subprocess.run(["bash", script, *args], env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cluster():
    """The PIDs of up.sh's running cluster, after the test as before it, and its config's bytes."""
    if os.geteuid() != 0:
        pytest.skip("slurm/local-cluster/up.sh needs root")
    started = False
    if not _daemons():
        if slurm_answers():
            pytest.skip("a Slurm cluster that slurm/local-cluster/up.sh did not start runs here")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("Slurm is not installed and there is no apt-get to install it")
        subprocess.run(["bash", UP], check=True, stdin=subprocess.DEVNULL, timeout=600)
        started = True
    pids, conf = _daemons(), CONF.read_bytes()
    yield pids
    try:
        assert _daemons() == pids and CONF.read_bytes() == conf and slurm_answers(), "the cluster was disturbed"
    finally:
        if started:
            subprocess.run(["bash", DOWN], check=False, stdin=subprocess.DEVNULL, timeout=300)


def test_up_refuses_a_cluster_it_did_not_start(cluster, tmp_path):
    root = tmp_path / "root"
    result = _run(UP, SLURM_LOCAL_ROOT=str(root))
    assert result.returncode == 1, result.stderr
    paragraph = result.stderr.strip()
    assert "\n" not in paragraph and paragraph.startswith("[slurm-up] ERROR: found a Slurm that up.sh did not start")
    for pid, name in cluster.items():
        assert f"{name} (pid {pid}) is running and no {root / name}*.pid names it" in paragraph
    assert "was not written by up.sh" not in paragraph  # the config is up.sh's, of another root
    assert "rerun with --replace-existing" in paragraph
    assert f"to stop it, run 'SLURM_LOCAL_ROOT={DEFAULT_ROOT} bash " in paragraph
    assert not root.exists(), "nothing was changed"


def test_up_refuses_a_config_it_did_not_write(cluster, tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=other\n")
    result = _run(UP, SLURM_LOCAL_ROOT=str(tmp_path / "root"), SLURM_LOCAL_CONF=str(conf))
    assert result.returncode == 1, result.stderr
    assert f"{conf} was not written by up.sh (it lacks the line '# managed by slurm/local-cluster/up.sh')" in (
        result.stderr)
    assert conf.read_text() == "ClusterName=other\n" and list(tmp_path.iterdir()) == [conf], "no backup, no state"


def test_up_again_is_a_quick_no_op(cluster):
    # up.sh rewrites a config that differs and restarts the daemons, forgetting their jobs: run it
    # only with the nodes and memory that the running cluster's config declares.
    marker = re.search(r"\(node=(\S+) cpus=(\d+) mem=(\d+)M root=(.*)\)$", CONF.read_text().splitlines()[0])
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    nodes = re.fullmatch(r"localci-node\[1-(\d+)\]", marker.group(1)) if marker else None
    if not marker or marker.group(2, 4) != (str(len(os.sched_getaffinity(0))), str(DEFAULT_ROOT)) or (
            marker.group(1) != host and not nodes):
        pytest.skip("the running cluster was set up for another host or CPU count: up.sh would restart it")
    started = time.monotonic()
    result = _run(UP, "--nodes", nodes.group(1) if nodes else "1", SLURM_LOCAL_MEM_MB=marker.group(3))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    for pid, name in cluster.items():
        assert re.search(rf"{name}( of \S+)? already running \(pid {pid}\)", result.stderr), result.stderr
    assert "wrote" not in result.stderr and "starting" not in result.stderr and "creating" not in result.stderr


def test_up_refuses_a_root_too_long_for_slurmds_sockets(tmp_path):
    root = tmp_path / ("r" * (100 - len(str(tmp_path))))
    for nodes in ("1", "2"):
        result = _run(UP, "--nodes", nodes, SLURM_LOCAL_ROOT=str(root))
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(f"[slurm-up] ERROR: SLURM_LOCAL_ROOT={root} is too long: slurmd's sockets "
                                        "under it would have paths of up to "), result.stderr
        assert "over the 107 of a Unix socket path; use a shorter folder. Nothing was changed." in result.stderr
    assert not root.exists()


def test_up_refuses_unknown_arguments():
    usage = f"usage: bash {UP} [--nodes N] [--replace-existing]"
    result = _run(UP, "--replace")
    assert (result.returncode, result.stderr) == (2, f"[slurm-up] unknown argument '--replace'; {usage}\n")
    for nodes in ("0", "65", "two", ""):
        result = _run(UP, "--nodes", nodes)
        assert (result.returncode, result.stderr) == (
            2, f"[slurm-up] --nodes must be a number from 1 to 64, not '{nodes}'; {usage}\n")


def test_down_with_another_root_leaves_the_cluster_and_its_jobs(cluster, tmp_path):
    job = subprocess.run(["sbatch", "--parsable", "--hold", "--output=/dev/null", "--wrap", "true"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        result = _run(DOWN, SLURM_LOCAL_ROOT=str(tmp_path / "root"))
        assert result.returncode == 0, result.stderr
        for pid, name in cluster.items():
            assert f"left alone, with its jobs: {name} (pid {pid})" in result.stderr
        assert "cancelling" not in result.stderr and "stopping" not in result.stderr
        # --purge would remove the packages the cluster runs on: refused (apt-get is a stand-in here).
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "apt-get").write_text(f"#!/bin/sh\ntouch {tmp_path}/apt-get-ran\n")
        (tmp_path / "bin" / "apt-get").chmod(0o755)
        result = _run(DOWN, "--purge", SLURM_LOCAL_ROOT=str(tmp_path / "root"),
                      PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
        assert result.returncode == 1
        assert "--purge would remove the packages those Slurm daemons run on; nothing was changed" in result.stderr
        assert not (tmp_path / "apt-get-ran").exists()
        state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        assert "JobState=PENDING" in state
    finally:
        subprocess.run(["scancel", job])


# Runs in new PID, network and mount namespaces: only its own processes are visible, Slurm's ports are
# its own, /etc/slurm is a tmpfs; munged is the machine's (its socket is a file). Slurm wants an address
# besides loopback (getaddrinfo with AI_ADDRCONFIG), hence the veth pair.
TAKEOVER = r"""
set -u
ip link set lo up && ip link add v0 type veth peer name v1 && ip addr add 10.254.0.1/24 dev v0 \
  && ip link set v0 up && ip link set v1 up && mount -t tmpfs tmpfs /etc/slurm || exit 77
printf 'ClusterName=other\n' >/etc/slurm/slurm.conf
cp /bin/sleep "$TMP/slurmctld"; "$TMP/slurmctld" 60 &
fake=$!; echo "fake slurmctld $fake"
bash "$UP"; echo "refused: $?"
bash "$UP" --replace-existing; echo "replaced: $?"
[ -d "/proc/$fake" ] || echo "fake slurmctld stopped"
ls /etc/slurm; cat /etc/slurm/slurm.conf.bak.*
scontrol ping
kill -9 "$(cat "$SLURM_LOCAL_ROOT/slurmctld.pid")" "$(cat "$SLURM_LOCAL_ROOT/slurmd.pid")"
bash "$UP"; echo "restarted: $?"
scontrol ping
bash "$DOWN"; echo "down: $?"
"""


def _run_in_namespaces_of_its_own(script: str, tmp_path: Path) -> str:
    """The output of bash ``script`` run in new PID, network and mount namespaces (skipped where they cannot be
    made), with UP, DOWN, TMP (``tmp_path``) and a SLURM_LOCAL_ROOT of its own; it exits 77 when its set-up fails."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("slurmctld") is None:
        pytest.skip("needs root, unshare and Slurm installed")
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
        pytest.skip("munged does not answer (up.sh would start one for the namespace)")
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    # Not under tmp_path, whose path is too long for slurmd's sockets under a pytest-xdist worker.
    root = tempfile.mkdtemp(prefix="slurm-local-test-")
    env.update({"UP": UP, "DOWN": DOWN, "TMP": str(tmp_path), "SLURM_LOCAL_ROOT": root, "SLURM_LOCAL_TIMEOUT": "15"})
    try:
        result = subprocess.run(["unshare", "--kill-child", "--pid", "--fork", "--mount-proc", "--net", "--mount",
                                 "bash", "-c", script], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=120)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if result.returncode == 77 or result.stderr.startswith("unshare: "):
        pytest.skip(f"no namespaces for a second cluster here: {result.stderr.strip()}")
    return result.stdout + result.stderr


def test_replace_existing_takes_over_in_namespaces_of_its_own(tmp_path):
    out = _run_in_namespaces_of_its_own(TAKEOVER, tmp_path)
    fake = re.search(r"fake slurmctld (\d+)", out).group(1)
    assert "refused: 1" in out and f"slurmctld (pid {fake}) is running" in out, out
    assert "/etc/slurm/slurm.conf was not written by up.sh" in out, out
    assert "replaced: 0" in out and "fake slurmctld stopped" in out, out
    assert re.search(r"slurm\.conf\.bak\.\d+\nClusterName=other\n", out), out  # the foreign config, kept
    assert len(re.findall(r"Slurmctld\(primary\) at \S+ is UP", out)) == 2, out
    assert "restarted: 0" in out and "down: 0" in out, out


# A two-node cluster from nothing and back, in new PID, network and mount namespaces: /run (but for munged's
# socket), /etc/slurm and /etc/hosts are private copies, so that the namespaces, bridge, host names and daemons
# that up.sh creates there meet nothing of this machine's, its running cluster included. "snapshot" is what
# up.sh --nodes 2 changes and down.sh must restore.
TWO_NODES = r"""
set -u
ip link set lo up && mkdir "$TMP/munge" && mount --bind /run/munge "$TMP/munge" && mount -t tmpfs tmpfs /run \
  && mkdir /run/munge && mount --bind "$TMP/munge" /run/munge && mount -t tmpfs tmpfs /etc/slurm \
  && cp /etc/hosts "$TMP/hosts" && mount --bind "$TMP/hosts" /etc/hosts || exit 77
snapshot() {
  ip -o link | cut -d: -f2-; ip -o addr; ip netns list; ls -a /run; cat /etc/hosts
  cut -d' ' -f5 /proc/self/mountinfo | sort; ps -e -o comm= | grep -E '^(slurm|munge)' | sort
}
ip link add slurmbr0 type bridge && { bash "$UP" --nodes 2; echo "refused: $?"; ip link del slurmbr0; }
snapshot >"$TMP/before"
bash "$UP" --nodes 2; echo "up: $?"
ip netns list
srun --nodes 2 --ntasks-per-node 1 sh -c 'echo "node $(hostname) rank $SLURM_PROCID"; ip -o -4 addr show eth0' | sort
srun --nodes 1 --nodelist localci-node2 getent hosts localci-node1
bash "$UP" --nodes 2 2>&1 | grep -c "already running"
# A node lost (as /run/netns is after a reboot, with its slurmd): up.sh creates it again
pid=$(cat "$SLURM_LOCAL_ROOT/slurmd-localci-node2.pid"); kill "$pid"
while grep -qs '^State:.[^Z]' "/proc/$pid/status"; do sleep 0.1; done
ip netns del localci-node2
bash "$UP" --nodes 2 2>&1 | grep -E "creating|starting"
srun --nodes 2 --ntasks-per-node 1 hostname | sort | tr '\n' ' '; echo
bash "$DOWN"; echo "down: $?"
snapshot >"$TMP/after"
diff "$TMP/before" "$TMP/after" && echo "as before"
"""


def test_two_nodes_up_and_down_leave_the_machine_as_it_was(tmp_path):
    out = _run_in_namespaces_of_its_own(TWO_NODES, tmp_path)
    assert "refused: 1" in out and ("cannot create 2 nodes: the network interface slurmbr0 exists, and up.sh did "
                                    "not create it. Nothing was changed.") in out, out
    assert "up: 0" in out and "ready: 2 node(s) localci-node[1-2]" in out, out
    assert {"localci-node1", "localci-node2"} <= set(re.findall(r"^(\S+) \(id: \d+\)$", out, flags=re.M)), out
    assert "node localci-node1 rank 0\nnode localci-node2 rank 1\n" in out, out
    assert len(re.findall(r"^\d+: eth0\s+inet 10\.231\.0\.1[12]/24 ", out, flags=re.M)) == 2, out
    assert re.search(r"^10\.231\.0\.11\s+localci-node1$", out, flags=re.M), out  # names resolve on every node
    assert "\n3\n" in out, out  # up.sh again: the controller and both slurmds already running
    assert ("[slurm-up] creating node localci-node2 at 10.231.0.12\n[slurm-up] starting slurmd of localci-node2\n"
            "localci-node1 localci-node2 \n") in out, out
    assert "down: 0" in out and "as before" in out, out
