"""Two hosts on one machine: network namespaces joined by a veth pair, each with its own address.

`singa-launch --nnodes 2` in each namespace, and `--hosts` with an ssh stand-in that runs the node's
command inside the other namespace, must train to the same parameters as a 4-process run on one host.
"""
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

from tests.dist_harness import kill_session, run_command
from tests.test_launch import ENV, LAUNCH, RANK_SCRIPT, TRAIN_SCRIPT, _pids_gone

SUBNET = f"10.231.{os.getpid() % 200 + 20}"
ADDR = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2"}

SSH_STAND_IN = """#!/bin/sh
# ssh [-o option]... [-p port] [-i identity] host command: runs the command in the host's network namespace.
while [ $# -gt 0 ]; do
    case "$1" in -o|-p|-i) shift 2 ;; *) break ;; esac
done
host="$1"; shift
case "$host" in
    {a}) ns={ns_a} ;;
    {b}) ns={ns_b} ;;
    *) echo "ssh: Could not resolve hostname $host: Name or service not known" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" sh -c "$*"
"""


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def namespaces():
    """Namespaces {'a': name, 'b': name} whose interface sg0 carries ADDR['a'] and ADDR['b']."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to make network namespaces")
    tag = str(os.getpid())[-6:]
    names = {"a": f"singa_a{tag}", "b": f"singa_b{tag}"}
    made = []
    try:
        for side, ns in names.items():
            out = _ip("netns", "add", ns)
            if out.returncode != 0:
                pytest.skip(f"cannot make network namespaces here: {out.stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", f"sga{tag}", "type", "veth", "peer", "name", f"sgb{tag}"),
                 ("link", "set", f"sga{tag}", "netns", names["a"]),
                 ("link", "set", f"sgb{tag}", "netns", names["b"])]
        for side, dev in (("a", f"sga{tag}"), ("b", f"sgb{tag}")):
            ns = names[side]
            steps += [("-n", ns, "link", "set", dev, "name", "sg0"),
                      ("-n", ns, "addr", "add", f"{ADDR[side]}/24", "dev", "sg0"),
                      ("-n", ns, "link", "set", "sg0", "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            out = _ip(*step)
            if out.returncode != 0:
                pytest.skip(f"cannot join the namespaces with a veth pair (ip {' '.join(step)}): {out.stderr.strip()}")
        yield names
    finally:
        for ns in made:
            # Processes this test started inside the namespace, if any survived a failure.
            for pid in _ip("netns", "pids", ns).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Parameters after training with 4 processes on one host."""
    folder = tmp_path_factory.mktemp("reference")
    script = folder / "train.py"
    script.write_text(TRAIN_SCRIPT)
    res = run_command(LAUNCH + ["-np", "4", str(script)], timeout=180,
                      env={**ENV, "PARAMS_OUT": str(folder / "params.pt"), "EPOCHS": "2"})
    assert res.returncode == 0, res.stdout + res.stderr
    return torch.load(folder / "params.pt")


def _assert_same_params(path, reference):
    params = torch.load(path)
    for key in reference:
        torch.testing.assert_close(params[key], reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spelling", ["node-rank", pytest.param("c10d", marks=pytest.mark.slow)])
def test_two_nodes_with_nnodes(namespaces, reference, tmp_path, spelling):
    # node-rank: each node's rank given; c10d: torchrun's command line, the same on both nodes, node b started
    # first: host a holds the rendezvous endpoint and is node 0 whatever the order.
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, **ENV, "PARAMS_OUT": str(tmp_path / "params.pt"), "EPOCHS": "2"}
    procs = []
    try:
        for node, side in enumerate("ab") if spelling == "node-rank" else ((1, "b"), (0, "a")):
            where = (["--node-rank", str(node), "--master-addr", ADDR["a"], "--master-port", "29512", "-np", "4"]
                     if spelling == "node-rank" else
                     ["--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint={ADDR['a']}:29512"])
            cmd = ["ip", "netns", "exec", namespaces[side], *LAUNCH, "--nnodes", "2", *where,
                   "--network-interface", "sg0", str(script)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
            if spelling == "c10d":
                time.sleep(1.0)
        if spelling == "c10d":
            procs.reverse()  # a, then b
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            kill_session(p.pid)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    assert re.search(r"^\[0\] ACCURACY", outs[0][0], re.M), outs[0][0]
    assert "[2]" not in outs[0][0] and "[0]" not in outs[1][0]  # ranks 2 and 3 ran on the second host
    _assert_same_params(tmp_path / "params.pt", reference)


def _ssh_stand_in(folder, namespaces):
    ssh = folder / "ssh"
    ssh.write_text(SSH_STAND_IN.format(a=ADDR["a"], b=ADDR["b"], ns_a=namespaces["a"], ns_b=namespaces["b"]))
    ssh.chmod(0o755)
    return ssh


def test_two_hosts_over_ssh(namespaces, reference, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    ssh = _ssh_stand_in(tmp_path, namespaces)
    env = {**ENV, "PARAMS_OUT": str(tmp_path / "params.pt"), "EPOCHS": "2"}
    hosts = f"{ADDR['a']}:2,{ADDR['b']}:2"
    res = run_command(["ip", "netns", "exec", namespaces["a"], *LAUNCH, "--hosts", hosts, "--ssh-command", str(ssh),
                       "--network-interface", "sg0", str(script)], timeout=180, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^\[0\] ACCURACY", res.stdout, re.M), res.stdout
    _assert_same_params(tmp_path / "params.pt", reference)

    # A host that does not answer stops the launch before anything starts.
    res = run_command(["ip", "netns", "exec", namespaces["a"], *LAUNCH, "--hosts", f"{ADDR['a']}:2,10.9.9.9:2",
                       "--ssh-command", str(ssh), str(script)], timeout=60, env=env)
    assert res.returncode == 2
    assert res.stderr.startswith("singa-launch: error: unreachable host(s): 10.9.9.9 (ssh: Could not resolve")


def test_failure_on_one_host_stops_the_other(namespaces, tmp_path):
    """Rank 1 (first host) exits with status 3: the second host's ranks are stopped through the ssh link."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    ssh = _ssh_stand_in(tmp_path, namespaces)
    res = run_command(["ip", "netns", "exec", namespaces["a"], *LAUNCH, "--hosts", f"{ADDR['a']}:2,{ADDR['b']}:2",
                       "--ssh-command", str(ssh), str(script), str(tmp_path), "exit3"], timeout=60, env=ENV)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "[3] hello from rank 3 of 4 local 1/2" in res.stdout
    assert "singa-launch: job failed: rank 1 exited with status 3" in res.stderr
    assert f"node 0 (host {ADDR['a']}) exited with status 3; stopping the other nodes" in res.stderr
    assert len(list(tmp_path.glob("pid*"))) == 4
    assert _pids_gone(str(tmp_path)), "a rank on the second host outlived the job"
