"""horovodrun's own flags in singa-launch: tuning, autotune, timeline, stall check, library and logging options,
and its YAML --config-file. They set the HOROVOD_* variables of every process exactly as horovodrun's
`config_parser.set_env_from_args` does (Horovod 0.28), so that a job moves from `horovodrun` to `singa-launch` by
changing the command's name.

What singa_dist does with them: HOROVOD_FUSION_THRESHOLD is AllReduce's default bucket size, the stall check's
variables drive the ranks' stall warning and HOROVOD_STALL_SHUTDOWN_TIME_SECONDS the job's collective timeout, the
timeline variables start the timeline at init(). A flag with no effect here is still accepted and its variable
set; `--verbose` says in one line why it changes nothing (`notes`).

Flags that are other spellings of singa-launch's own (-p, -i, --network-interfaces, --min-num-proc, ...) are
declared with those in launchers/config.py; this module holds the rest. Errors are ValueErrors: config.py
turns them into its one-line usage errors.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "FATAL")  # horovodrun's --log-level choices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """horovodrun's flags that singa-launch has no other spelling of. Each defaults to None: a value the command
    line does not give may come from --config-file."""
    g = parser.add_argument_group("horovodrun's flags (the same meaning here; see docs/launcher.md)")
    g.add_argument("--config-file", metavar="FILE.yaml",
                   help="horovodrun's YAML file of parameters (params, autotune, timeline, stall_check, "
                        "library_options, logging, controller); flags on the command line win")
    g.add_argument("--output-filename", metavar="DIR",
                   help="each process's stdout and stderr also go to DIR/rank.<rank>/stdout and stderr (horovodrun's "
                        "layout; with --mpi, mpirun's own --output-filename)")
    g.add_argument("--verbose", action="store_true", help="print the plan and what each flag does here")
    g.add_argument("--start-timeout", type=int, metavar="SECONDS",
                   help="seconds the checks before the start may take: every remote host's ssh answer "
                        "(default HOROVOD_START_TIMEOUT, else 15)")
    g.add_argument("-cb", "--check-build", action=_CheckBuild, nargs=0,
                   help="print which frameworks, controllers and tensor operations this installation has, and exit")
    g.add_argument("--disable-cache", action="store_true", help="accepted: singa-launch caches no checks")
    g.add_argument("-prefix-timestamp", "--prefix-output-with-timestamp", dest="prefix_output_with_timestamp",
                   action="store_true", help="put the time in front of every output line on the console")
    g.add_argument("--jsrun", action="store_true", help=argparse.SUPPRESS)  # refused with a reason in config.py
    g.add_argument("--tcp", action="store_true", help="NCCL over TCP sockets only (NCCL_IB_DISABLE=1)")
    g.add_argument("--binding-args", metavar="ARGS", help="with --mpi: Open MPI's binding options instead of "
                                                          "--bind-to none")

    t = parser.add_argument_group("horovodrun's tuning, timeline, stall check, library and logging flags "
                                  "(HOROVOD_* variables of every process)")
    t.add_argument("--fusion-threshold-mb", type=int, metavar="MB",
                   help="AllReduce's bucket size when the script gives none (HOROVOD_FUSION_THRESHOLD, bytes); 0: a "
                        "bucket per tensor")
    t.add_argument("--cycle-time-ms", type=float, metavar="MS", help="HOROVOD_CYCLE_TIME")
    t.add_argument("--cache-capacity", type=int, help="HOROVOD_CACHE_CAPACITY")
    for name in ("hierarchical-allreduce", "hierarchical-allgather", "torus-allreduce"):
        pair = t.add_mutually_exclusive_group()
        pair.add_argument(f"--{name}", action="store_const", const=True, default=None,
                          help=f"HOROVOD_{name.upper().replace('-', '_')}=1")
        pair.add_argument(f"--no-{name}", dest=name.replace("-", "_"), action="store_const", const=False,
                          help=argparse.SUPPRESS)
    t.add_argument("--no-autotune", dest="autotune", action="store_const", const=False, help=argparse.SUPPRESS)
    t.add_argument("--autotune-log-file", help="HOROVOD_AUTOTUNE_LOG (with --autotune)")
    for name in ("warmup-samples", "steps-per-sample", "bayes-opt-max-samples"):
        t.add_argument(f"--autotune-{name}", type=int, help=f"HOROVOD_AUTOTUNE_{name.upper().replace('-', '_')}")
    t.add_argument("--autotune-gaussian-process-noise", type=float, help="HOROVOD_AUTOTUNE_GAUSSIAN_PROCESS_NOISE")
    t.add_argument("--timeline-filename", metavar="FILE.json",
                   help="horovodrun's --timeline: HOROVOD_TIMELINE, and the job's timeline as with --timeline")
    cycles = t.add_mutually_exclusive_group()
    cycles.add_argument("--timeline-mark-cycles", action="store_const", const=True, default=None,
                        help="an instant event on the timeline at every optimizer step (HOROVOD_TIMELINE_MARK_CYCLES)")
    cycles.add_argument("--no-timeline-mark-cycles", dest="timeline_mark_cycles", action="store_const", const=False,
                        help=argparse.SUPPRESS)
    stall = t.add_mutually_exclusive_group()
    stall.add_argument("--no-stall-check", action="store_const", const=True, default=None,
                       help="no warning about ranks that stall (HOROVOD_STALL_CHECK_DISABLE=1)")
    stall.add_argument("--stall-check", dest="no_stall_check", action="store_const", const=False,
                       help=argparse.SUPPRESS)
    t.add_argument("--stall-check-warning-time-seconds", type=int, metavar="S",
                   help="seconds until a rank's wait for others is reported (HOROVOD_STALL_CHECK_TIME_SECONDS)")
    t.add_argument("--stall-check-shutdown-time-seconds", type=int, metavar="S",
                   help="seconds until a stalled job stops (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS): the collective "
                        "timeout unless SINGA_TIMEOUT is set")
    threads = t.add_mutually_exclusive_group()
    threads.add_argument("--mpi-threads-disable", action="store_const", const=True, default=None,
                         help="HOROVOD_MPI_THREADS_DISABLE=1")
    threads.add_argument("--no-mpi-threads-disable", dest="mpi_threads_disable", action="store_const", const=False,
                         help=argparse.SUPPRESS)
    t.add_argument("--num-nccl-streams", type=int, help="HOROVOD_NUM_NCCL_STREAMS")
    t.add_argument("--thread-affinity", type=int, help="HOROVOD_THREAD_AFFINITY")
    t.add_argument("--gloo-timeout-seconds", type=int, help="HOROVOD_GLOO_TIMEOUT_SECONDS")
    t.add_argument("--log-level", choices=LOG_LEVELS,
                   help="HOROVOD_LOG_LEVEL, and the level of this launcher's own log")
    stamp = t.add_mutually_exclusive_group()
    stamp.add_argument("--log-with-timestamp", action="store_const", const=True, default=None, help=argparse.SUPPRESS)
    stamp.add_argument("--log-without-timestamp", dest="log_with_timestamp", action="store_const", const=False,
                       help="HOROVOD_LOG_HIDE_TIME=1")
    # (horovodrun's deprecated spellings of the two above)
    stamp.add_argument("--log-hide-timestamp", dest="log_with_timestamp", action="store_const", const=False,
                       help=argparse.SUPPRESS)
    stamp.add_argument("--no-log-hide-timestamp", dest="log_with_timestamp", action="store_const", const=True,
                       help=argparse.SUPPRESS)


class _CheckBuild(argparse.Action):
    """horovodrun's -cb: its table, for what runs the collectives here (torch.distributed; mpirun starts jobs
    only), then exit as --version does."""

    def __call__(self, parser, namespace, values, option_string=None):
        import shutil

        import torch
        import torch.distributed as dist
        beside = os.path.join(os.path.dirname(sys.executable), "mpirun")  # (where the mpi extra installs it)
        mpi = shutil.which("mpirun") is not None or os.path.exists(beside)
        sections = {"Frameworks": [("TensorFlow", False), ("PyTorch", True), ("MXNet", False)],
                    "Controllers": [("MPI", mpi), ("Gloo", dist.is_gloo_available())],
                    "Tensor Operations": [("NCCL", dist.is_nccl_available()), ("DDL", False), ("CCL", False),
                                          ("MPI", False), ("Gloo", dist.is_gloo_available())]}
        print(f"singa-launch (horovodrun's --check-build), torch {torch.__version__}:")
        for title, items in sections.items():
            print(f"\n    Available {title}:")
            for name, ok in items:
                print(f"        [{'X' if ok else ' '}] {name}")
        parser.exit(0)


# --config-file: its sections and keys (config_parser.set_args_from_config), each the flag's destination.
_SECTIONS = {
    "params": {k: k for k in ("fusion_threshold_mb", "cycle_time_ms", "cache_capacity", "hierarchical_allreduce",
                              "hierarchical_allgather", "torus_allreduce")},
    "autotune": {"enabled": "autotune", **{k: "autotune_" + k for k in (
        "log_file", "warmup_samples", "steps_per_sample", "bayes_opt_max_samples", "gaussian_process_noise")}},
    "timeline": {"filename": "timeline_filename", "mark_cycles": "timeline_mark_cycles"},
    "stall_check": {"enabled": "no_stall_check", "warning_time_seconds": "stall_check_warning_time_seconds",
                    "shutdown_time_seconds": "stall_check_shutdown_time_seconds"},
    "library_options": {k: k for k in ("mpi_threads_disable", "num_nccl_streams", "thread_affinity",
                                       "gloo_timeout_seconds")},
    "logging": {"level": "log_level", "with_timestamp": "log_with_timestamp"},
}


def apply_config_file(args: argparse.Namespace) -> None:
    """horovodrun's --config-file: each key sets its flag where the command line did not (as horovodrun, whatever
    the order). A key horovodrun does not know is ignored, as there, with a warning."""
    path = args.config_file
    if path is None:
        return
    try:
        import yaml
    except ImportError:
        raise ValueError("--config-file needs PyYAML (pip install pyyaml)") from None
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"--config-file: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config-file {path} is not YAML: {' '.join(str(exc).split())}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"--config-file {path} must hold a mapping of sections, got {type(config).__name__}")
    for section, values in config.items():
        if section == "controller":
            controller = str(values).lower()
            if controller not in ("gloo", "mpi"):
                raise ValueError(f"--config-file {path}: no such controller supported: {values!r} (gloo or mpi)")
            if not args.gloo and not args.mpi:
                setattr(args, controller, True)
            continue
        keys = _SECTIONS.get(section)
        if keys is None or not isinstance(values, dict):
            _ignored(path, section)
            continue
        for key, value in values.items():
            dest = keys.get(key)
            if dest is None:
                _ignored(path, f"{section}.{key}")
            elif value is not None and getattr(args, dest) is None:
                # stall_check.enabled is the flag --no-stall-check turned round
                setattr(args, dest, (not value if isinstance(value, bool) else value)
                        if dest == "no_stall_check" else value)


def _ignored(path: str, key: str) -> None:
    print(f"singa-launch: --config-file {path}: ignoring {key!r}, which horovodrun does not read either",
          file=sys.stderr)


@dataclass
class HorovodKnobs:
    """The values of horovodrun's tuning, autotune, timeline, stall-check, library and logging flags (None: not
    given), checked as horovodrun checks them, and the HOROVOD_* variables they give every process (`env`)."""

    fusion_threshold_mb: int | None = None
    cycle_time_ms: float | None = None
    cache_capacity: int | None = None
    hierarchical_allreduce: bool | None = None
    hierarchical_allgather: bool | None = None
    torus_allreduce: bool | None = None
    autotune: bool | None = None
    autotune_log_file: str | None = None
    autotune_warmup_samples: int | None = None
    autotune_steps_per_sample: int | None = None
    autotune_bayes_opt_max_samples: int | None = None
    autotune_gaussian_process_noise: float | None = None
    timeline_filename: str | None = None  # absolute: the processes may run elsewhere
    timeline_mark_cycles: bool | None = None
    no_stall_check: bool | None = None
    stall_check_warning_time_seconds: int | None = None
    stall_check_shutdown_time_seconds: int | None = None
    mpi_threads_disable: bool | None = None
    num_nccl_streams: int | None = None
    tcp: bool = False
    thread_affinity: int | None = None
    gloo_timeout_seconds: int | None = None
    log_level: str | None = None
    log_with_timestamp: bool | None = None

    def __post_init__(self):
        kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}
        words = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string"}
        for f in fields(self):
            value = getattr(self, f.name)
            kind = f.type.split(" |")[0]
            if value is None:
                continue
            if not isinstance(value, kinds[kind]) or (kind != "bool" and isinstance(value, bool)):
                raise ValueError(f"{_flag(f.name)} wants {words[kind]}, got {value!r}")
            if kind in ("int", "float") and value < 0:  # (horovodrun's validate_config_args)
                raise ValueError(f"{_flag(f.name)} must be 0 or more, got {value}")
        noise = self.autotune_gaussian_process_noise
        if noise is not None and noise > 1:
            raise ValueError(f"--autotune-gaussian-process-noise must lie in [0, 1], got {noise}")
        if self.log_level is not None:
            if self.log_level.upper() not in LOG_LEVELS:
                raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
            self.log_level = self.log_level.upper()

    def env(self) -> dict[str, str]:
        """What horovodrun's set_env_from_args writes for these values."""
        env: dict[str, str] = {}

        def put(name, value, how=str):
            if value is not None:
                env[name] = how(value)
        on = lambda v: "1" if v else "0"  # noqa: E731
        put("HOROVOD_FUSION_THRESHOLD", self.fusion_threshold_mb, lambda mb: str(mb * 1024 * 1024))
        put("HOROVOD_CYCLE_TIME", self.cycle_time_ms)
        put("HOROVOD_CACHE_CAPACITY", self.cache_capacity)
        put("HOROVOD_HIERARCHICAL_ALLREDUCE", self.hierarchical_allreduce, on)
        put("HOROVOD_HIERARCHICAL_ALLGATHER", self.hierarchical_allgather, on)
        put("HOROVOD_TORUS_ALLREDUCE", self.torus_allreduce, on)
        if self.autotune:
            put("HOROVOD_AUTOTUNE", self.autotune, on)
            put("HOROVOD_AUTOTUNE_LOG", self.autotune_log_file)
            put("HOROVOD_AUTOTUNE_WARMUP_SAMPLES", self.autotune_warmup_samples)
            put("HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE", self.autotune_steps_per_sample)
            put("HOROVOD_AUTOTUNE_BAYES_OPT_MAX_SAMPLES", self.autotune_bayes_opt_max_samples)
            put("HOROVOD_AUTOTUNE_GAUSSIAN_PROCESS_NOISE", self.autotune_gaussian_process_noise)
        if self.timeline_filename:
            put("HOROVOD_TIMELINE", self.timeline_filename)
            put("HOROVOD_TIMELINE_MARK_CYCLES", self.timeline_mark_cycles, on)
        put("HOROVOD_STALL_CHECK_DISABLE", self.no_stall_check, on)
        put("HOROVOD_STALL_CHECK_TIME_SECONDS", self.stall_check_warning_time_seconds)
        put("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", self.stall_check_shutdown_time_seconds)
        put("HOROVOD_MPI_THREADS_DISABLE", self.mpi_threads_disable, on)
        put("HOROVOD_NUM_NCCL_STREAMS", self.num_nccl_streams)
        put("NCCL_IB_DISABLE", 1 if self.tcp else None)
        put("HOROVOD_THREAD_AFFINITY", self.thread_affinity)
        put("HOROVOD_GLOO_TIMEOUT_SECONDS", self.gloo_timeout_seconds)
        put("HOROVOD_LOG_LEVEL", self.log_level)
        put("HOROVOD_LOG_HIDE_TIME", self.log_with_timestamp, lambda v: "0" if v else "1")
        return env

    def notes(self, strategy: str) -> list[str]:
        """One line for each value given that changes nothing in this job, saying why (printed with --verbose)."""
        said = []
        if self.fusion_threshold_mb is not None and strategy != "allreduce":
            said.append(f"--fusion-threshold-mb: no effect with --strategy {strategy}: only allreduce fuses "
                        "gradients into buckets")
        elif self.fusion_threshold_mb is not None and self.autotune:
            said.append("--fusion-threshold-mb holds AllReduce's bucket size: --autotune does not tune it (as "
                        "Horovod's autotune holds what was set)")
        none = {
            "cache_capacity": "the ranks' agreement on a collective keeps every signature it has seen, with no "
                              "capacity to set",
            "hierarchical_allreduce": "torch.distributed (Gloo, NCCL) picks the reduction's algorithm; the "
                                      "result is the same",
            "hierarchical_allgather": "torch.distributed (Gloo, NCCL) picks the gather's algorithm",
            "torus_allreduce": "torch.distributed (Gloo, NCCL) picks the reduction's algorithm; the result is the "
                               "same",
            "mpi_threads_disable": "singa_dist uses MPI (mpi4py) only to share the rendezvous address under "
                                   "mpirun, from one thread",
            "num_nccl_streams": "torch's NCCL process group manages its own streams",
            "thread_affinity": "there is no background thread to pin: collectives run on torch's threads",
            "gloo_timeout_seconds": "the collectives' timeout is SINGA_TIMEOUT (or "
                                    "--stall-check-shutdown-time-seconds)",
        }
        for name, why in none.items():
            if getattr(self, name) is not None:
                said.append(f"{_flag(name)}: no effect: {why}")
        tuned = [n for n in ("autotune_log_file", "autotune_warmup_samples", "autotune_steps_per_sample",
                             "autotune_bayes_opt_max_samples", "autotune_gaussian_process_noise")
                 if getattr(self, n) is not None]
        if tuned:
            said.append(f"{', '.join(map(_flag, tuned))}: no effect: --autotune here tries AllReduce's fixed "
                        "candidate sizes in turn (no Bayesian optimisation) and rank 0 prints its choice"
                        + ("" if self.autotune else "; and --autotune is not on"))
        if self.timeline_mark_cycles and not self.timeline_filename:
            said.append("--timeline-mark-cycles: no effect without --timeline-filename (as in horovodrun)")
        if self.log_with_timestamp is not None:
            said.append("--log-without-timestamp/--log-with-timestamp: no effect: singa_dist prints its messages "
                        "without a time (HOROVOD_LOG_HIDE_TIME is set all the same)")
        if self.log_level is not None:
            said.append(f"--log-level {self.log_level}: sets this launcher's log level and HOROVOD_LOG_LEVEL; "
                        "singa_dist itself prints what it has to say at any level")
        shutdown, warning = self.stall_check_shutdown_time_seconds, self.stall_check_warning_time_seconds
        if shutdown and not self.no_stall_check:
            if shutdown < (60 if warning is None else warning):
                said.append(f"--stall-check-shutdown-time-seconds {shutdown}: no effect: below the warning time, so "
                            "the job never stops for a stall (as in Horovod)")
            else:
                said.append(f"--stall-check-shutdown-time-seconds {shutdown}: a collective that waits {shutdown} s "
                            "for a rank ends the job (the collective timeout, unless SINGA_TIMEOUT is set)")
        return said


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def knobs_from_args(args: argparse.Namespace, timeline: str | None) -> HorovodKnobs:
    """The knobs the parsed flags (and --config-file) give; `timeline`: the timeline's absolute path when it was
    asked for by horovodrun's --timeline-filename."""
    values = {f.name: getattr(args, f.name) for f in fields(HorovodKnobs) if f.name not in ("timeline_filename",)}
    return HorovodKnobs(**values, timeline_filename=timeline)


def resolve(args: argparse.Namespace) -> None:
    """Fold horovodrun's spellings into singa-launch's own arguments, right after parsing: --config-file's
    values, --timeline-filename (--timeline), --output-filename (--log-dir in horovodrun's layout, shown on the
    console too), the interfaces of --network-interface(s), --start-timeout (or HOROVOD_START_TIMEOUT)."""
    apply_config_file(args)
    if args.jsrun:
        raise ValueError("--jsrun: LSF's jsrun is not available here: start the job with --mpi (mpirun), --hosts "
                         "(ssh) or on each node with --nnodes")
    if args.timeline_filename is not None:
        if args.timeline not in (None, args.timeline_filename):
            raise ValueError("--timeline and --timeline-filename name different files: give one of them")
        args.timeline = args.timeline_filename
    if args.output_filename is not None:
        if args.log_dir is not None:
            raise ValueError("give --log-dir or --output-filename (horovodrun's), not both")
        if not args.output_filename:
            raise ValueError("--output-filename wants a folder name, got an empty one")
        if not args.mpi:  # (mpirun writes the files itself)
            args.log_dir, args.tee = args.output_filename, args.tee or 3
    if args.network_interface is not None:  # each may be a comma-separated list (--network-interfaces)
        names = [n.strip() for item in args.network_interface for n in item.split(",") if n.strip()]
        if not names:
            raise ValueError("--network-interface(s) names no interface")
        args.network_interface = ",".join(dict.fromkeys(names))
    if not args.start_timeout:  # (horovodrun takes 0 as not given too)
        text = os.environ.get("HOROVOD_START_TIMEOUT", "").strip()
        if text and not text.isdigit():
            raise ValueError(f"HOROVOD_START_TIMEOUT must be a number of seconds, got {text!r}")
        args.start_timeout = int(text) if text and int(text) else None
    elif args.start_timeout < 0:
        raise ValueError(f"--start-timeout must be a number of seconds above 0, got {args.start_timeout}")


def notes(args: argparse.Namespace, knobs: HorovodKnobs, remote_hosts: bool) -> list[str]:
    """What --verbose says of the flags given that change nothing here, and why."""
    said = knobs.notes(args.strategy)
    if args.disable_cache:
        said.append("--disable-cache: no effect: singa-launch caches no checks; it checks the hosts every time")
    if args.start_timeout and not remote_hosts:
        said.append(f"--start-timeout {args.start_timeout}: no effect: it bounds the ssh checks of remote hosts, and "
                    "this job has none")
    if args.prefix_output_with_timestamp and (args.min_np is not None or args.max_np is not None
                                              or args.host_discovery_script):
        said.append("--prefix-output-with-timestamp: no effect on an elastic job's output (each line carries its "
                    "worker's id only)")
    if args.binding_args and not args.mpi:
        said.append("--binding-args: no effect without --mpi: the processes are not bound to cores")
    return said
