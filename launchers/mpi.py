"""--mpi: run the job through the installed mpirun (Open MPI, or MPICH and its relatives).

mpirun starts the ranks and numbers them; `singa_dist.init()` reads OMPI_COMM_WORLD_* or PMI_*. The
launcher only adds the job's environment (topology, strategy, threads, rendezvous address) and passes it
through: Open MPI takes `-x NAME` per variable, MPICH's Hydra `-genvlist NAME,NAME`. Separate servers
run as a second application context (`: -np S python -m singa_dist.ps`). Every rank runs inside
`python -m launchers.tag_output`, which prefixes its output lines with the rank as the local launcher does
(`[0]`, servers `[s0]`): mpirun's own tagging options differ by MPI and show MPI's own format.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from singa_dist.environment import SECRET_VARIABLE

from .config import LaunchConfig, UsageError, _cores

OPENMPI, MPICH = "openmpi", "mpich"
# The per-process variables mpirun itself provides; the launcher's values would be wrong for all but one rank.
_PER_PROCESS = ("SINGA_PROC_RANK", "SINGA_PROC_WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "ROLE_NAME", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS")


def find_mpirun() -> str:
    # The `mpi` extra installs mpirun beside this Python, which may not be on PATH.
    for candidate in (os.path.join(os.path.dirname(sys.executable), "mpirun"), shutil.which("mpirun")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise UsageError("--mpi: no mpirun found (pip install 'singa[mpi]', or put an MPI's mpirun on PATH)")


def mpi_flavor(version_text: str) -> str:
    """Open MPI or MPICH (Intel MPI and MVAPICH use MPICH's Hydra and its options), from `mpirun --version`."""
    text = version_text.lower()
    if "open mpi" in text or "open-mpi" in text or "openrte" in text:
        return OPENMPI
    if any(name in text for name in ("hydra", "mpich", "intel(r) mpi", "mvapich")):
        return MPICH
    raise UsageError(f"--mpi: cannot tell which MPI this mpirun is from its --version: {version_text.strip()[:80]!r}")


def detect_flavor(mpirun: str) -> str:
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"--mpi: {mpirun} --version failed: {exc}") from None
    return mpi_flavor(out.stdout + out.stderr)


def mpi_env(cfg: LaunchConfig) -> dict[str, str]:
    """The variables every rank gets: the launcher's job-wide environment, without the per-process ones."""
    env = {k: v for k, v in cfg.common_env().items() if k not in _PER_PROCESS}
    if cfg.hosts:
        # Several hosts: rank 0 picks its own address and port and shares them through mpi4py (see runtime.py).
        env.pop("MASTER_ADDR", None)
        env.pop("MASTER_PORT", None)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PATH"):
        if name in os.environ:
            env.setdefault(name, os.environ[name])
    return env


def tagged(command: list[str], nworkers: int, timestamp: bool = False) -> list[str]:
    """`command` run through the wrapper that prefixes every output line with the rank ([0], [s0], ...), and the
    time before it with `timestamp` (--prefix-output-with-timestamp)."""
    return [sys.executable, "-m", "launchers.tag_output", "--workers", str(nworkers),
            *(["--timestamp"] if timestamp else []), "--", *command]


def ssh_options(cfg: LaunchConfig) -> str:
    """-p/--ssh-port and -i/--ssh-identity-file for mpirun's own ssh to the hosts (as horovodrun passes them)."""
    return shlex.join([*(["-p", str(cfg.ssh_port)] if cfg.ssh_port else []),
                       *(["-i", cfg.ssh_identity] if cfg.ssh_identity else [])])


def mpirun_command(cfg: LaunchConfig, flavor: str, mpirun: str, env_names: list[str],
                   as_root: bool | None = None) -> list[str]:
    topo = cfg.topology
    nservers = topo.nprocs - topo.nworkers
    if as_root is None:
        as_root = os.geteuid() == 0
    hosts = ",".join(f"{h.name}:{h.slots}" for h in cfg.hosts)
    ssh, out = ssh_options(cfg), cfg.output_filename
    workers = tagged(cfg.command, topo.nworkers, cfg.timestamp_output)
    servers = tagged(cfg.server_command(), topo.nworkers, cfg.timestamp_output)
    if flavor == OPENMPI:
        cmd = [mpirun]
        if as_root:
            cmd.append("--allow-run-as-root")
        if not cfg.hosts and topo.nprocs > _cores():
            cmd.append("--oversubscribe")  # one node: Open MPI's slots are its cores
        # each rank's intra-op threads must not share one core, unless horovodrun's --binding-args say otherwise
        cmd += cfg.binding_args or ["--bind-to", "none"]
        if ssh:
            cmd += ["-mca", "plm_rsh_args", ssh]
        if out:  # horovodrun's --output-filename under Open MPI is mpirun's own
            cmd += ["--output-filename", out]
        if hosts:  # a --hostfile too, read by singa-launch: its forms need not match this MPI's hostfile syntax
            cmd += ["-H", hosts]
        for name in env_names:
            cmd += ["-x", name]
        cmd += cfg.mpi_args
        cmd += ["-np", str(topo.nworkers), *workers]
        if nservers:
            cmd += [":", "-np", str(nservers), *servers]
        return cmd
    cmd = [mpirun, "-genvlist", ",".join(env_names)]
    if hosts:
        cmd += ["-hosts", hosts]
    if ssh:
        cmd += ["-bootstrap", "ssh", "-bootstrap-exec-args", ssh]
    if out:  # a file per rank and stream (Hydra makes no folders; singa-launch makes this one)
        cmd += ["-outfile-pattern", os.path.join(out, "rank.%r.stdout"),
                "-errfile-pattern", os.path.join(out, "rank.%r.stderr")]
    cmd += cfg.mpi_args
    cmd += ["-n", str(topo.nworkers), *workers]
    if nservers:
        cmd += [":", "-n", str(nservers), *servers]
    return cmd


def run_mpi(cfg: LaunchConfig) -> int:
    mpirun = find_mpirun()
    flavor = detect_flavor(mpirun)
    env = mpi_env(cfg)
    # The job's secret by name only: mpirun hands its value to the ranks from this environment.
    secret = [SECRET_VARIABLE] if os.environ.get(SECRET_VARIABLE) else []
    command = mpirun_command(cfg, flavor, mpirun, sorted(env) + secret)
    if cfg.dry_run:
        print(f"# {flavor} mpirun, {cfg.topology.nprocs} processes:")
        print("  " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())))
        print("  " + shlex.join(command))
        return 0
    if cfg.verbose:
        print("singa-launch: " + shlex.join(command), file=sys.stderr)
    if cfg.output_filename:
        os.makedirs(cfg.output_filename, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # mpirun takes over this process: it owns the ranks, forwards signals and stops the job on a failure.
    os.execve(mpirun, command, {**os.environ, **env})
