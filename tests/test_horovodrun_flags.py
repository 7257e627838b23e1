"""horovodrun's command line in singa-launch: every flag with horovodrun's spelling, the HOROVOD_* variables it gives
each process (as horovodrun's config_parser.set_env_from_args writes them), --config-file, --output-filename,
-p/-i in the ssh and mpirun commands, and what singa_dist does with the variables (AllReduce's bucket size, the
collective timeout, the timeline's cycle marks). One real 2-process run checks the environment as a whole."""
import json
import os
import sys
import textwrap

import pytest
import torch

from launchers import mpi
from launchers.config import UsageError, parse_args
from launchers.launch import main as launch_main
from tests.dist_harness import run_command

LAUNCH = [sys.executable, "-m", "launchers.launch"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENV_SCRIPT = textwrap.dedent("""
    import json, os, sys
    names = ("HOROVOD_", "NCCL_IB_DISABLE", "SINGA_TIMELINE")
    print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(names)}))
    print("to stderr", file=sys.stderr)
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "env.py"
    path.write_text(ENV_SCRIPT)
    return str(path)


def worker_env(args, script, rank=0):
    """The environment worker `rank` gets from singa-launch's plan for these flags."""
    return parse_args([*args, script]).node_plan()[rank].env


@pytest.mark.parametrize("args, expected", [
    (["--fusion-threshold-mb", "32"], {"HOROVOD_FUSION_THRESHOLD": str(32 * 1024 * 1024)}),
    (["--fusion-threshold-mb", "0"], {"HOROVOD_FUSION_THRESHOLD": "0"}),
    (["--cycle-time-ms", "2.5"], {"HOROVOD_CYCLE_TIME": "2.5"}),
    (["--cache-capacity", "512"], {"HOROVOD_CACHE_CAPACITY": "512"}),
    (["--hierarchical-allreduce", "--no-hierarchical-allgather", "--torus-allreduce"],
     {"HOROVOD_HIERARCHICAL_ALLREDUCE": "1", "HOROVOD_HIERARCHICAL_ALLGATHER": "0", "HOROVOD_TORUS_ALLREDUCE": "1"}),
    (["--autotune", "--autotune-log-file", "t.csv", "--autotune-warmup-samples", "3", "--autotune-steps-per-sample",
      "10", "--autotune-bayes-opt-max-samples", "20", "--autotune-gaussian-process-noise", "0.8"],
     {"HOROVOD_AUTOTUNE": "1", "SINGA_AUTOTUNE": "1", "HOROVOD_AUTOTUNE_LOG": "t.csv",
      "HOROVOD_AUTOTUNE_WARMUP_SAMPLES": "3", "HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE": "10",
      "HOROVOD_AUTOTUNE_BAYES_OPT_MAX_SAMPLES": "20", "HOROVOD_AUTOTUNE_GAUSSIAN_PROCESS_NOISE": "0.8"}),
    (["--autotune-log-file", "t.csv"], {"HOROVOD_AUTOTUNE_LOG": None}),  # only with --autotune, as horovodrun
    (["--timeline-mark-cycles"], {"HOROVOD_TIMELINE_MARK_CYCLES": None}),  # only with a timeline
    (["--no-stall-check", "--stall-check-warning-time-seconds", "30", "--stall-check-shutdown-time-seconds", "90"],
     {"HOROVOD_STALL_CHECK_DISABLE": "1", "HOROVOD_STALL_CHECK_TIME_SECONDS": "30",
      "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "90"}),
    (["--mpi-threads-disable", "--num-nccl-streams", "2", "--thread-affinity", "3", "--gloo-timeout-seconds", "40"],
     {"HOROVOD_MPI_THREADS_DISABLE": "1", "HOROVOD_NUM_NCCL_STREAMS": "2", "HOROVOD_THREAD_AFFINITY": "3",
      "HOROVOD_GLOO_TIMEOUT_SECONDS": "40"}),
    (["--tcp"], {"NCCL_IB_DISABLE": "1"}),
    (["--log-level", "DEBUG", "--log-without-timestamp"], {"HOROVOD_LOG_LEVEL": "DEBUG", "HOROVOD_LOG_HIDE_TIME": "1"}),
    ([], {"HOROVOD_FUSION_THRESHOLD": None, "HOROVOD_STALL_CHECK_DISABLE": None, "HOROVOD_CONTROLLER": "gloo",
          "HOROVOD_RANK": "0", "HOROVOD_SIZE": "2", "HOROVOD_HOSTNAME": "localhost"}),
])
def test_each_flag_sets_what_horovodrun_sets(args, expected, script):
    env = worker_env(["-np", "2", *args], script)
    assert {name: env.get(name) for name in expected} == expected


def test_timeline_filename_is_the_jobs_timeline(script, tmp_path):
    path = str(tmp_path / "tl.json")
    cfg = parse_args(["-np", "2", "--timeline-filename", path, "--timeline-mark-cycles", script])
    env = cfg.node_plan()[1].env
    assert cfg.timeline == path and env["SINGA_TIMELINE"] == path  # recorded and merged as with --timeline
    assert env["HOROVOD_TIMELINE"] == path and env["HOROVOD_TIMELINE_MARK_CYCLES"] == "1"
    with pytest.raises(UsageError, match="name different files"):
        parse_args(["-np", "2", "--timeline", str(tmp_path / "a.json"), "--timeline-filename", path, script])


def test_other_spellings_of_singa_launch_flags(script, tmp_path, monkeypatch):
    from launchers import config
    cfg = parse_args(["-np", "3", "--min-num-proc", "2", "--max-num-proc", "4", "--slots-per-host", "2",
                      "--host-discovery-script", script, script])
    assert (cfg.elastic.min_np, cfg.elastic.max_np, cfg.elastic.slots) == (2, 4, 2)
    assert cfg.common_env()["HOROVOD_ELASTIC"] == "1"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    cfg = parse_args(["-hostfile", str(hostfile), "-p", "2222", "-i", "/keys/id", script])
    assert (cfg.ssh_port, cfg.ssh_identity, cfg.topology.nworkers) == (2222, "/keys/id", 2)
    assert parse_args(["-np", "1", "--ssh-identity-file", "/k", script]).ssh_identity == "/k"
    # Several interfaces (--network-interfaces, or --network-interface repeated): Gloo and NCCL take the list.
    monkeypatch.setattr(config.socket, "if_nameindex", lambda: [(1, "lo"), (2, "eth9")])
    for args in (["--network-interfaces", "eth9,lo"], ["--network-interface", "eth9", "--network-interface", "lo"]):
        env = worker_env(["-np", "1", *args], script)
        assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == ("eth9,lo", "eth9,lo")
        assert env["TP_SOCKET_IFNAME"] == env["HOROVOD_GLOO_IFACE"] == "eth9"


def test_flags_without_effect_are_accepted_and_said_with_verbose(script, capsys):
    assert launch_main(["-np", "2", "--verbose", "--dry-run", "--disable-cache", "--start-timeout", "5",
                        "--cache-capacity", "0", "--hierarchical-allreduce", "--binding-args", "-bind-to core",
                        "--num-nccl-streams", "2", "--strategy", "downpour", "--servers", "1",
                        "--fusion-threshold-mb", "8", "--stall-check-shutdown-time-seconds", "30", script]) == 0
    err = capsys.readouterr().err
    for said in ("--disable-cache: no effect", "--start-timeout 5: no effect", "--cache-capacity: no effect",
                 "--hierarchical-allreduce: no effect", "--binding-args: no effect without --mpi",
                 "--num-nccl-streams: no effect", "--fusion-threshold-mb: no effect with --strategy downpour",
                 "--stall-check-shutdown-time-seconds 30: no effect: below the warning time"):
        assert f"singa-launch: {said}" in err, (said, err)
    assert launch_main(["-np", "2", "--dry-run", "--disable-cache", script]) == 0
    assert "no effect" not in capsys.readouterr().err  # said with --verbose only


def test_check_build_prints_horovodruns_table_and_exits(capsys):
    with pytest.raises(SystemExit) as stop:
        launch_main(["-cb"])  # no -np or program needed, as with horovodrun
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "[X] PyTorch" in out and "[X] Gloo" in out and "[ ] TensorFlow" in out, out


@pytest.mark.parametrize("args, reason", [
    (["--jsrun"], "LSF's jsrun is not available here"),
    (["--fusion-threshold-mb", "-1"], "--fusion-threshold-mb must be 0 or more, got -1"),
    (["--autotune-gaussian-process-noise", "1.5"], "must lie in [0, 1]"),
    (["--log-level", "LOUD"], "invalid choice"),
    (["--log-dir", "a", "--output-filename", "b"], "give --log-dir or --output-filename"),
    (["--config-file", "/nonexistent/horovod.yaml"], "cannot read /nonexistent/horovod.yaml"),
])
def test_bad_values_exit_2_with_a_reason(args, reason, script, capsys):
    assert launch_main(["-np", "2", *args, script]) == 2
    err = capsys.readouterr().err
    assert err.startswith("singa-launch: error: ") and reason in err and err.count("\n") == 1, err


def test_config_file_sets_what_its_keys_say_and_flags_win(script, tmp_path, capsys):
    conf = tmp_path / "horovod.yaml"
    conf.write_text(textwrap.dedent("""
        controller: mpi
        params: {fusion_threshold_mb: 32, cycle_time_ms: 10, hierarchical_allreduce: false}
        autotune: {enabled: true, warmup_samples: 2}
        timeline: {filename: tl.json, mark_cycles: true}
        stall_check: {enabled: false, warning_time_seconds: 30, shutdown_time_seconds: 120}
        library_options: {gloo_timeout_seconds: 40}
        logging: {level: warning, with_timestamp: true, colour: red}
    """))
    cfg = parse_args(["-np", "2", "--config-file", str(conf), "--fusion-threshold-mb", "4", "--gloo", script])
    assert "ignoring 'logging.colour'" in capsys.readouterr().err  # as horovodrun, an unknown key does nothing
    env = cfg.node_plan()[0].env
    assert not cfg.mpi  # --gloo on the command line wins over the file's controller
    assert env["HOROVOD_FUSION_THRESHOLD"] == str(4 * 1024 * 1024)  # so does a flag over the file's params
    assert (env["HOROVOD_CYCLE_TIME"], env["HOROVOD_HIERARCHICAL_ALLREDUCE"]) == ("10", "0")
    assert (env["HOROVOD_AUTOTUNE"], env["SINGA_AUTOTUNE"], env["HOROVOD_AUTOTUNE_WARMUP_SAMPLES"]) == ("1", "1", "2")
    assert env["HOROVOD_TIMELINE"] == os.path.abspath("tl.json") and env["HOROVOD_TIMELINE_MARK_CYCLES"] == "1"
    assert (env["HOROVOD_STALL_CHECK_DISABLE"], env["HOROVOD_STALL_CHECK_TIME_SECONDS"],
            env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]) == ("1", "30", "120")
    assert (env["HOROVOD_GLOO_TIMEOUT_SECONDS"], env["HOROVOD_LOG_LEVEL"], env["HOROVOD_LOG_HIDE_TIME"]) == (
        "40", "WARNING", "0")
    assert parse_args(["-np", "2", "--config-file", str(conf), script]).mpi  # the file's controller
    conf.write_text("params: {fusion_threshold_mb: many}\n")
    with pytest.raises(UsageError, match="--fusion-threshold-mb wants a whole number, got 'many'"):
        parse_args(["-np", "2", "--config-file", str(conf), script])
    conf.write_text("params: [unclosed\n")
    with pytest.raises(UsageError, match="is not YAML"):
        parse_args(["-np", "2", "--config-file", str(conf), script])


def test_ssh_and_mpirun_commands_carry_port_identity_and_output(script, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert launch_main(["--hosts", "localhost:1,node7:1", "-p", "2222", "-i", "/keys/id", "--output-filename", out,
                        "-prefix-timestamp", "--fusion-threshold-mb", "8", "--autotune", "--dry-run", script]) == 0
    lines = capsys.readouterr().out.splitlines()
    ssh = lines[lines.index("# host node7 (node 1, 1 processes, ssh):") + 1]
    assert ssh.startswith("  ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=10 -p 2222 -i "
                          "/keys/id node7 'cd "), ssh
    # The node's launcher is told what its processes need: the files' layout, the time stamps, the variables.
    for part in (f"--output-filename {out} --tee 3", "--prefix-output-with-timestamp",
                 f"-x HOROVOD_FUSION_THRESHOLD={8 * 1024 * 1024}", "-x SINGA_AUTOTUNE=1"):
        assert part in ssh, (part, ssh)

    cfg = parse_args(["--mpi", "-np", "2", "--hosts", "h1:1,h2:1", "-p", "2222", "-i", "/keys/id",
                      "--output-filename", out, "-prefix-timestamp", "--binding-args", "--bind-to core", script])
    tagged = [sys.executable, "-m", "launchers.tag_output", "--workers", "2", "--timestamp", "--",
              sys.executable, script]
    assert mpi.mpirun_command(cfg, mpi.OPENMPI, "mpirun", ["A"], as_root=False) == [
        "mpirun", "--bind-to", "core", "-mca", "plm_rsh_args", "-p 2222 -i /keys/id", "--output-filename", out,
        "-H", "h1:1,h2:1", "-x", "A", "-np", "2", *tagged]
    assert mpi.mpirun_command(cfg, mpi.MPICH, "mpiexec", ["A"]) == [
        "mpiexec", "-genvlist", "A", "-hosts", "h1:1,h2:1", "-bootstrap", "ssh", "-bootstrap-exec-args",
        "-p 2222 -i /keys/id", "-outfile-pattern", os.path.join(out, "rank.%r.stdout"),
        "-errfile-pattern", os.path.join(out, "rank.%r.stderr"), "-n", "2", *tagged]


def test_start_timeout_bounds_the_ssh_check(script, tmp_path, capsys):
    silent = tmp_path / "silent-ssh"
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(0o755)
    assert launch_main(["--hosts", "node7:1", "--ssh-command", str(silent), "--start-timeout", "1", script]) == 2
    assert "unreachable host(s): node7 (no answer within 1s)" in capsys.readouterr().err


def test_variables_reach_two_real_processes(script, tmp_path):
    """One real job: every variable horovodrun sets reaches both ranks; --output-filename writes horovodrun's
    files and the console still shows the output, time-stamped; --verbose prints the plan and the notes."""
    out, timeline = tmp_path / "out", str(tmp_path / "tl.json")
    res = run_command(LAUNCH + ["-np", "2", "--output-filename", str(out), "-prefix-timestamp", "--verbose",
                                "--disable-cache", "--fusion-threshold-mb", "0", "--cycle-time-ms", "2",
                                "--stall-check-warning-time-seconds", "20", "--stall-check-shutdown-time-seconds",
                                "45", "--timeline-filename", timeline, "--log-level", "INFO", "--tcp", script],
                      timeout=60, env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "# node 0 of 1 (this host): 2 processes" in res.stderr and "--disable-cache: no effect" in res.stderr
    for rank in (0, 1):
        stdout = (out / f"rank.{rank}" / "stdout").read_text()
        assert (out / f"rank.{rank}" / "stderr").read_text() == "to stderr\n"
        env = json.loads(stdout)
        assert env == {"HOROVOD_RANK": str(rank), "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": str(rank),
                       "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CROSS_RANK": "0", "HOROVOD_CROSS_SIZE": "1",
                       "HOROVOD_HOSTNAME": "localhost", "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
                       "HOROVOD_FUSION_THRESHOLD": "0", "HOROVOD_CYCLE_TIME": "2.0",
                       "HOROVOD_STALL_CHECK_TIME_SECONDS": "20", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "45",
                       "HOROVOD_TIMELINE": timeline, "SINGA_TIMELINE": timeline, "HOROVOD_LOG_LEVEL": "INFO",
                       "NCCL_IB_DISABLE": "1"}
        line = next(line for line in res.stdout.splitlines() if f"[{rank}] {{" in line)
        stamp, _, rest = line.partition(f"[{rank}] ")  # horovodrun's form: "Mon Jan  6 10:00:00 2025[0] ..."
        assert len(stamp.split()) == 5 and json.loads(rest) == env, line


# --------------------------------------------------------------------------------------------------------------
# What singa_dist does with the variables

def test_fusion_threshold_is_allreduces_default_bucket_size(monkeypatch):
    import singa_dist as sd
    from singa_dist.environment import AUTOTUNE_VARIABLE
    monkeypatch.delenv(AUTOTUNE_VARIABLE, raising=False)
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", str(8 * 1024 * 1024))
    assert sd.AllReduce().bucket_mb == 8.0
    assert sd.AllReduce(bucket_mb=2).bucket_mb == 2.0  # what the script gives wins
    assert sd.AllReduce(num_buckets=3).bucket_mb is None and sd.AllReduce(bucket_mb="auto").autotune
    monkeypatch.setenv(AUTOTUNE_VARIABLE, "1")  # --autotune holds a threshold given, as Horovod's autotune
    assert not sd.AllReduce().autotune and sd.AllReduce().bucket_mb == 8.0
    monkeypatch.delenv("HOROVOD_FUSION_THRESHOLD")
    assert sd.AllReduce().autotune
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="HOROVOD_FUSION_THRESHOLD"):
        sd.AllReduce()
    with pytest.raises(ValueError, match="bucket_mb must be 0 or more"):
        sd.AllReduce(bucket_mb=-1)


def test_stall_shutdown_time_applies_as_in_horovod(monkeypatch):
    from singa_dist.environment import stall_shutdown_s
    for name in ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "HOROVOD_STALL_CHECK_TIME_SECONDS",
                 "HOROVOD_STALL_CHECK_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    assert stall_shutdown_s() is None
    monkeypatch.setenv("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "90")
    assert stall_shutdown_s() == 90.0
    monkeypatch.setenv("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "45")
    assert stall_shutdown_s() is None  # below the warning time (60 by default): Horovod never shuts down
    monkeypatch.setenv("HOROVOD_STALL_CHECK_TIME_SECONDS", "20")
    assert stall_shutdown_s() == 45.0
    monkeypatch.setenv("HOROVOD_STALL_CHECK_DISABLE", "1")
    assert stall_shutdown_s() is None


def test_one_process_takes_the_timeout_buckets_and_cycle_marks_from_horovods_variables(monkeypatch, tmp_path):
    import singa_dist as sd
    from singa_dist import runtime, timeline
    monkeypatch.delenv("SINGA_TIMEOUT", raising=False)
    monkeypatch.delenv("SINGA_AUTOTUNE", raising=False)
    for name, value in {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "45", "HOROVOD_STALL_CHECK_TIME_SECONDS": "20",
                        "HOROVOD_FUSION_THRESHOLD": "0", "HOROVOD_TIMELINE": str(tmp_path / "tl.json"),
                        "HOROVOD_TIMELINE_MARK_CYCLES": "1"}.items():
        monkeypatch.setenv(name, value)
    sd.init()
    try:
        assert runtime.timeout_s() == 45.0 and timeline.mark_cycles()
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
        assert len(opt.strategy.buckets) == 4  # threshold 0: no fusion, a bucket per tensor
    finally:
        sd.shutdown()
    monkeypatch.setenv("SINGA_TIMEOUT", "7")  # SINGA_TIMEOUT wins
    monkeypatch.delenv("HOROVOD_TIMELINE")
    sd.init()
    try:
        assert runtime.timeout_s() == 7.0
    finally:
        sd.shutdown()
