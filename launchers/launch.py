"""singa-launch: start a distributed job on this machine, on several hosts, or through mpirun.

    singa-launch -np 4 python train.py                          # 4 local workers (AllReduce)
    singa-launch -np 4 --strategy downpour --worker-groups 2 --servers 2 train.py
    singa-launch --hosts h1:2,h2:2 python train.py              # every host over ssh
    singa-launch --nnodes 2 --node-rank 0 --master-addr h1 -np 4 python train.py   # per node, as torchrun
    singa-launch --mpi -np 4 python train.py                    # through mpirun
    singa-launch -np 3 --min-np 2 --max-np 4 python train.py    # elastic (singa_dist.elastic)

See docs/launcher.md for every flag and the environment each process gets.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys

from .lifeline import take_secret_from_stdin
from .stopping import StopSignals, stopped_line

# horovodrun's --log-level names as Python's levels (TRACE: everything)
LOG_LEVELS = {"TRACE": 1, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
              "ERROR": logging.ERROR, "FATAL": logging.CRITICAL}


def _print_local_plan(cfg) -> None:
    print(f"# node {cfg.node_rank} of {cfg.nnodes} (this host): {cfg.local_nprocs} processes, "
          f"master {cfg.master_addr}:{cfg.master_port}")
    for spec in cfg.node_plan():
        print(f"  [{spec.label}] " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(spec.env.items()))
              + " " + shlex.join(spec.argv))


def _verbose(cfg) -> None:
    """--verbose (horovodrun's): what the flags given do not do here, then what runs where, on stderr."""
    for note in cfg.notes:
        print(f"singa-launch: {note}", file=sys.stderr)
    if cfg.mpi or cfg.dry_run or cfg.elastic is not None:
        return  # (mpirun's command is printed by run_mpi; a dry run prints the plan anyway)
    with contextlib.redirect_stdout(sys.stderr):
        if cfg.hosts:
            from .ssh import print_plan
            print_plan(cfg)
        else:
            _print_local_plan(cfg)
    sys.stderr.flush()


def main(argv: list[str] | None = None, signals: StopSignals | None = None) -> int:
    """singa-launch with `argv`; `signals`: the stop signals recorded since the command started (the console's)."""
    signals = signals if signals is not None else StopSignals()
    take_secret_from_stdin()  # a node's launcher that --hosts started over ssh
    from .config import UsageError, parse_args, python_with_torch
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        cfg.command, replaced = python_with_torch(cfg.command)
        if replaced:
            print(f"singa-launch: {replaced}", file=sys.stderr)
        if cfg.horovod.log_level:  # as horovodrun, the launcher's own log takes the level too
            logging.basicConfig(level=LOG_LEVELS[cfg.horovod.log_level])
        if cfg.verbose:
            _verbose(cfg)
        if signals.received:  # while torch loaded or the flags were read
            print(stopped_line(signals.first), file=sys.stderr)
            return 128 + signals.first
        if not cfg.dry_run:
            note = cfg.ensure_secret()
            if note:
                print(f"singa-launch: {note}", file=sys.stderr)
        if cfg.mpi or cfg.hosts or (cfg.elastic is not None and not cfg.dry_run):
            signals.restore()  # these take signals their own way
        if cfg.mpi:
            from .mpi import run_mpi
            return _merge_timeline(cfg, run_mpi(cfg))
        if cfg.hosts:
            from .ssh import run_hosts
            return _merge_timeline(cfg, run_hosts(cfg))
        if cfg.elastic is not None and not cfg.dry_run:
            from .elastic import run_elastic
            return run_elastic(cfg)
        if cfg.dry_run:
            if cfg.rank_from_rendezvous:
                print(f"# this node's rank comes from the c10d rendezvous at {cfg.master_addr}:{cfg.master_port}; "
                      "shown as node 0")
            _print_local_plan(cfg)
            return 0
    except UsageError as exc:
        print(f"singa-launch: error: {exc}", file=sys.stderr)
        return 2
    if cfg.rank_from_rendezvous:
        from .watchdog import take_node_rank
        signals.restore()  # a Ctrl-C ends the wait for node 0 at once (KeyboardInterrupt, see console())
        try:
            cfg.node_rank = take_node_rank(cfg.master_addr, cfg.master_port, cfg.nnodes, cfg.run_id,
                                           cfg.rendezvous_timeout)
        except OSError as exc:
            print(f"singa-launch: {exc}", file=sys.stderr)
            return 1
        print(f"singa-launch: node {cfg.node_rank} of {cfg.nnodes} (c10d rendezvous at {cfg.master_addr}:"
              f"{cfg.master_port})", file=sys.stderr)
    from .local import run_node
    return _merge_timeline(cfg, run_node(cfg, signals))


def _merge_timeline(cfg, status: int) -> int:
    """--timeline: rank 0 merges every process's part when the job ends well; after a failure the parts are still
    there, and node 0's launcher merges them (what each process recorded up to its last second)."""
    if cfg.timeline and cfg.node_rank == 0 and not cfg.dry_run:
        from singa_dist.timeline import merge, parts_of
        if parts_of(cfg.timeline):
            try:
                spans = merge(cfg.timeline)
                print(f"singa-launch: timeline of the job ({spans} spans) written to {cfg.timeline}", file=sys.stderr)
            except OSError as exc:
                print(f"singa-launch: could not write the timeline {cfg.timeline}: {exc}", file=sys.stderr)
    return status


def console() -> None:
    """The singa-launch command: main(), then out without the interpreter's teardown, which takes about 0.4 s here
    (torch's modules) and which the end of every job would wait for. Everything main() wrote is closed by then.
    A Ctrl-C before the job has started (while torch loads, say) ends with one line too, as one after."""
    signals = StopSignals()
    signals.install()  # before torch loads (see launchers.stopping)
    try:
        code = main(signals=signals)
    except KeyboardInterrupt:  # where Python's handler is back: elastic jobs, the wait for node 0's rendezvous
        print(stopped_line(signal.SIGINT), file=sys.stderr)
        code = 128 + signal.SIGINT
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
