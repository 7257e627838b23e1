"""--hosts / --hostfile: start one singa-launch per host over ssh, each running its share of the job.

Every host runs `python -m launchers.launch --node-rank i ...` (the per-node launcher, as with --nnodes),
so rank prefixes, failure reports and restarts work the same on every host. The job's secret (SINGA_SECRET) is
the first line each node's launcher reads from its input, never part of the command. This launcher watches the
ssh connections: when one node fails it closes the others' stdin (their launchers stop their processes
on end of input) and ends their sessions.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from singa_dist.environment import (AUTOTUNE_VARIABLE, SECRET_VARIABLE, SERVER_CHECKPOINT_DIR_VARIABLE,
                                    SERVER_CHECKPOINT_EVERY_VARIABLE)

from .config import LaunchConfig, UsageError, forwarded_env
from .lifeline import SECRET_FROM_STDIN, die_with_parent
from .local import POLL_S, describe_exit, say

REACH_TIMEOUT_S = 15.0


def is_local(host: str) -> bool:
    """True for this machine's own names and addresses: it is started without ssh."""
    if host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        with socket.socket() as s:
            s.bind((host, 0))  # only an address of this machine can be bound
        return True
    except OSError:
        return False


def ssh_argv(cfg: LaunchConfig, host: str, remote_command: str) -> list[str]:
    argv = [*cfg.ssh_command, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "ConnectTimeout=10"]
    if cfg.ssh_port:
        argv += ["-p", str(cfg.ssh_port)]
    if cfg.ssh_identity:
        argv += ["-i", cfg.ssh_identity]
    return argv + [host, remote_command]


def node_command(cfg: LaunchConfig, node: int) -> str:
    """The shell command that runs node `node`'s launcher on its host (same directory, same Python)."""
    env = forwarded_env()
    env.update(cfg.extra_env)
    env[SECRET_FROM_STDIN] = "1"  # the job's secret: the first line run_hosts writes to its input
    args = [sys.executable, "-m", "launchers.launch",
            "--node-slots", ",".join(map(str, cfg.node_procs)), "--node-rank", str(node),
            "--master-addr", cfg.master_addr, "--master-port", str(cfg.master_port),
            "--topology-json", cfg.topology.to_json(), "--max-restarts", str(cfg.max_restarts),
            "--grace-period", str(cfg.grace_period), "--exit-on-stdin-close"]
    if cfg.output_filename:  # horovodrun's layout of the files
        args += ["--output-filename", cfg.output_filename, "--tee", str(cfg.tee)]
    elif cfg.log_dir:
        args += ["--log-dir", cfg.log_dir, "--tee", str(cfg.tee)]
    if cfg.timestamp_output:
        args.append("--prefix-output-with-timestamp")
    if cfg.omp_num_threads:
        args += ["--omp-num-threads", str(cfg.omp_num_threads)]
    if cfg.network_interface:
        args += ["--network-interface", cfg.network_interface]
    if cfg.timeline:
        args += ["--timeline", cfg.timeline]
    if cfg.metrics is not None:
        args += ["--metrics", f"{cfg.metrics:g}"]
    # The variables of flags the node's launcher is not given (--autotune, the servers' checkpoints, horovodrun's
    # knobs, --rdzv-id), then -x's.
    job = cfg.common_env()
    passed = {name: job[name] for name in (AUTOTUNE_VARIABLE, SERVER_CHECKPOINT_DIR_VARIABLE,
                                            SERVER_CHECKPOINT_EVERY_VARIABLE, "TORCHELASTIC_RUN_ID") if name in job}
    for name, value in {**passed, **cfg.horovod.env(), **cfg.extra_env}.items():
        args += ["-x", f"{name}={value}"]
    args += ["--", *cfg.command]
    env_words = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    return f"cd {shlex.quote(os.getcwd())} && exec env {' '.join(env_words)} {shlex.join(args)}"


def host_argv(cfg: LaunchConfig, node: int) -> list[str]:
    host = cfg.hosts[node].name
    command = node_command(cfg, node)
    return ["sh", "-c", command] if is_local(host) else ssh_argv(cfg, host, command)


def check_reachable(cfg: LaunchConfig) -> None:
    """Every remote host must answer over ssh before anything starts (exit 2 otherwise)."""
    remote = [h.name for h in cfg.hosts if not is_local(h.name)]
    probes = {h: subprocess.Popen(ssh_argv(cfg, h, "true"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True) for h in remote}
    limit = cfg.start_timeout or REACH_TIMEOUT_S  # horovodrun's --start-timeout bounds its checks too
    deadline = time.monotonic() + limit
    bad = []
    for host, proc in probes.items():
        try:
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            if proc.returncode != 0:
                reason = (err.strip().splitlines() or [f"ssh exited with status {proc.returncode}"])[-1]
                bad.append(f"{host} ({reason})")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            bad.append(f"{host} (no answer within {limit:.0f}s)")
    if bad:
        raise UsageError(f"unreachable host(s): {', '.join(bad)}")


def print_plan(cfg: LaunchConfig) -> None:
    for node, host in enumerate(cfg.hosts):
        how = "local" if is_local(host.name) else "ssh"
        print(f"# host {host.name} (node {node}, {cfg.node_procs[node]} processes, {how}):")
        print("  " + shlex.join(host_argv(cfg, node)))
        for spec in cfg.node_plan(node):
            print(f"  [{spec.label}] " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(spec.env.items()))
                  + " " + shlex.join(spec.argv))


def _stop_signal(signum, frame):
    raise _Stop(signum)


class _Stop(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def run_hosts(cfg: LaunchConfig) -> int:
    if cfg.dry_run:
        print_plan(cfg)
        return 0
    check_reachable(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop_signal)
    procs = []
    status, stop_signal = 0, None
    try:
        for node in range(cfg.nnodes):
            # The ssh client dies with this launcher; its node's launcher then sees its stdin close and stops.
            procs.append(subprocess.Popen(host_argv(cfg, node), stdin=subprocess.PIPE, start_new_session=True,
                                          preexec_fn=die_with_parent))
            try:
                procs[-1].stdin.write(os.environ.get(SECRET_VARIABLE, "").encode() + b"\n")
                procs[-1].stdin.flush()
            except OSError:  # it ended already: the loop below reports it
                pass
        while True:
            codes = [p.poll() for p in procs]
            failed = [(n, c) for n, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                node, status = failed[0]
                say(f"node {node} (host {cfg.hosts[node].name}) {describe_exit(status)}; stopping the other nodes")
                break
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    except _Stop as exc:
        stop_signal = exc.signum
    _stop_nodes(procs, cfg.grace_period)
    if stop_signal is not None:
        return 128 + stop_signal
    return status if status > 0 else 128 - status


def _stop_nodes(procs: list[subprocess.Popen], grace: float) -> None:
    """End of input tells each node's launcher to stop its processes; SIGTERM, then SIGKILL, its session."""
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
    deadline = time.monotonic() + grace + 2.0  # the remote launcher has its own grace period
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.05))
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGTERM:
            threading.Event().wait(min(grace, 1.0))
    for p in procs:
        p.wait()

