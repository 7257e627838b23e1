"""An elastic job's hosts as horovodrun has them (launchers/elastic.py): the discovery script run through a shell,
a host that leaves its output, fixed --hosts, --min-np held, --reset-limit counted by the launcher, and a failed
host left out for a cooldown that grows. Horovod's own elastic tests run against the same launcher too (see
docs/elastic.md); these are the project's."""
from __future__ import annotations

import re
import sys

import pytest

from launchers.config import UsageError, parse_args
from launchers.elastic import HostState, run_discovery
from launchers.launch import main as launch_main
from tests.dist_harness import run_command
from tests.test_elastic import ENV, LAUNCH, WORKER, _check_resets_resume_from_the_last_commit, _commits, _final

HOROVOD_FAILED = "Horovod detected that one or more processes exited with non-zero status"


def test_discovery_script_runs_through_a_shell(tmp_path):
    script = tmp_path / "hosts.sh"
    script.write_text("echo localhost:2\necho 127.0.0.1\n")  # no #!: a shell runs it, as under horovodrun
    script.chmod(0o755)
    assert run_discovery(str(script), default_slots=3, timeout=10) == {"localhost": 2, "127.0.0.1": 3}
    assert run_discovery(f"{script} | head -n 1", default_slots=1, timeout=10) == {"localhost": 2}
    failing = tmp_path / "failing.sh"
    failing.write_text("echo no hosts for you >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with status 3: no hosts for you"):
        run_discovery(str(failing), default_slots=1, timeout=10)


def test_a_failing_discovery_script_stops_the_job_at_once(tmp_path, capsys):
    script = tmp_path / "hosts.sh"
    script.write_text("exit 1\n")
    script.chmod(0o755)
    assert launch_main(["--min-np", "1", "--host-discovery-script", str(script), sys.executable, "-c", "pass"]) == 1
    assert f"the host discovery script '{script}' failed: exited with status 1" in capsys.readouterr().err


def test_blacklist_cooldown_grows_and_ends():
    # horovodrun's cooldown: the n-th time a host is left out, MIN * 2^n + U(0, MIN) seconds, within [MIN, MAX].
    host = HostState(failures=1)
    host.blacklist((2, 100), now=0.0)
    assert host.blacklisted and 4.0 <= host.cooldown_end <= 6.0
    assert not host.resurrected(now=3.9) and host.resurrected(now=6.0)
    first_end = host.cooldown_end
    host.blacklist((2, 100), now=1.0)  # still cooling down: the cooldown is not started again
    assert host.cooldown_end == first_end and host.times_left_out == 1
    host.whitelist()
    assert not host.blacklisted and host.failures == 0
    host.blacklist((2, 100), now=10.0)
    assert 18.0 <= host.cooldown_end <= 20.0  # the second time: twice as long
    capped = HostState()
    capped.blacklist((1, 2), now=0.0)
    assert capped.cooldown_end == 2.0  # at most MAX
    forever = HostState()
    forever.blacklist(None, now=0.0)
    assert forever.blacklisted and not forever.resurrected(now=1e9)  # no range: left out for good


def test_elastic_flags_as_horovodrun_has_them(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text("pass\n")
    train = [sys.executable, str(script)]
    fixed = parse_args(["-np", "2", "-H", "localhost:2,127.0.0.1:2", "--min-num-proc", "2"] + train).elastic
    assert fixed.fixed_hosts == {"localhost": 2, "127.0.0.1": 2} and fixed.max_np == 4
    assert fixed.host_failures == 1  # a host whose worker failed is left out, as horovodrun leaves it out
    discovered = parse_args(["-np", "3", "--host-discovery-script", "x.sh",
                             "--blacklist-cooldown-range", "1", "2"] + train).elastic
    assert discovered.min_np == 3 and discovered.cooldown_range == (1, 2)  # --min-np defaults to -np
    assert discovered.host_failures == 1
    local = parse_args(["-np", "3", "--max-np", "4"] + train).elastic
    assert local.min_np == 3 and local.host_failures == 3 and local.elastic_timeout == 600.0
    monkeypatch.setenv("HOROVOD_ELASTIC_TIMEOUT", "7")
    assert parse_args(["-np", "2", "--min-np", "1"] + train).elastic.elastic_timeout == 7.0
    assert parse_args(["-np", "2", "--min-np", "1", "--elastic-timeout", "9"] + train).elastic.elastic_timeout == 9.0
    for args, reason in [
        (["-np", "2", "-H", "localhost:2", "--min-np", "1"], "needs at least 2 hosts"),
        (["-np", "2", "--min-np", "1", "--blacklist-cooldown-range", "0", "5"], "1 <= MIN <= MAX <= 3600"),
        (["-np", "2", "-H", "a:1,b:1", "--min-np", "1", "--host-discovery-script", "x.sh"], "give one of them"),
    ]:
        with pytest.raises(UsageError, match=re.escape(reason)):
            parse_args(args + train)


def test_host_gone_from_discovery_leaves_at_the_next_commit(tmp_path):
    # 3 workers: 2 on localhost, 1 on 127.0.0.1. At epoch 1, batch 2 rank 0 creates the flag, and the discovery
    # script (without #!) then prints localhost alone: worker 2 leaves at the next commit with the others' consent,
    # nobody rolls back, and its end is no failure of the job.
    flag = tmp_path / "shrink"
    script = tmp_path / "hosts.sh"
    script.write_text(f"if [ -e {flag} ]; then echo localhost:2; else echo localhost:2; echo 127.0.0.1:1; fi\n")
    script.chmod(0o755)
    r = run_command(LAUNCH + ["-np", "3", "--min-np", "2", "--max-np", "3", "--host-discovery-script", str(script),
                              "--discovery-interval", "0.2"] + WORKER +
                    ["--epochs", "3", "--sleep", "0.02", "--touch-at", f"1:2:{flag}"], timeout=240, env=ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "host 127.0.0.1 is gone from the host discovery script's output: worker(s) 2 leave the job" in r.stderr, out
    assert "going on without it" not in r.stderr and "after losing some" not in r.stderr, out
    final = _final(r.stdout)
    assert final["size"] == 2 and final["resets"] == 1, final
    commits = _commits(r.stdout)
    assert commits[0][3] == 3 and commits[-1][3] == 2, commits
    steps = [c[2] for c in commits]
    assert steps == sorted(steps), steps  # no rollback: the workers left at a commit, all together
    _check_resets_resume_from_the_last_commit(r.stdout)


def test_below_min_np_the_job_waits_for_workers_then_fails():
    # -np 2 --min-np 2: worker 1 dies and no host offers another slot. The survivor must not train alone: the job
    # waits --elastic-timeout seconds, then fails saying so.
    r = run_command(LAUNCH + ["-np", "2", "--min-np", "2", "--max-np", "3", "--elastic-timeout", "3"] + WORKER +
                    ["--epochs", "3", "--die", "1:0:2"], timeout=120, env=ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "1 worker(s) left, fewer than --min-np 2: waiting up to 3 s for hosts to offer more" in r.stderr, out
    assert "job failed: 1 worker(s) left, fewer than --min-np 2, for 3 s (worker 1 on localhost was killed" in \
        r.stderr, out
    assert "final accuracy" not in r.stdout and all(c[3] == 2 for c in _commits(r.stdout)), out
    assert r.seconds < 60, r.seconds


def test_reset_limit_is_counted_by_the_launcher():
    # --reset-limit 0: the first change of workers (a failure here; hosts added or removed alike) ends the job with
    # horovodrun's message.
    r = run_command(LAUNCH + ["-np", "2", "--min-np", "1", "--max-np", "2", "--reset-limit", "0"] + WORKER +
                    ["--epochs", "2", "--die", "1:0:2"], timeout=120, env=ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Horovod was shutdown because number of resets during elastic job exceeded limit: 0" in r.stderr, out
    assert "final accuracy" not in r.stdout, out


def test_every_worker_failing_ends_the_job_with_horovods_words():
    r = run_command(LAUNCH + ["-np", "2", "-H", "localhost:1,127.0.0.1:1", "--min-np", "1", sys.executable, "-c",
                              "raise SystemExit(3)"], timeout=120, env=ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "job failed: every worker stopped" in r.stderr and HOROVOD_FAILED in r.stderr, out
    assert re.search(r"Process name: (localhost|127\.0\.0\.1)\[0\] Exit code: 3", r.stderr), out


@pytest.mark.slow
def test_fixed_hosts_leave_a_failed_host_out_for_its_cooldown():
    # -H with --min-np (fault tolerance without discovery): worker 1, on 127.0.0.1, dies; its host is left out for
    # 1 s (--blacklist-cooldown-range 1 1), the job goes on with worker 0, then a new worker on 127.0.0.1 joins.
    r = run_command(LAUNCH + ["-np", "2", "-H", "localhost:1,127.0.0.1:1", "--min-np", "1", "--max-np", "2",
                              "--blacklist-cooldown-range", "1", "1", "--discovery-interval", "0.2"] + WORKER +
                    ["--epochs", "4", "--sleep", "0.05", "--die", "1:0:6"], timeout=240, env=ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert ("worker 1 on 127.0.0.1 was killed by signal SIGKILL (9); going on without it; host 127.0.0.1 failed "
            "1 time(s): leaving it out of the job for 1.0 s") in r.stderr, out
    assert "host 127.0.0.1's cooldown is over: it may take workers again" in r.stderr, out
    assert "1 new worker(s) on 127.0.0.1: they join at the next commit" in r.stderr, out
    final = _final(r.stdout)
    assert final["size"] == 2 and final["resets"] == 2, final
    assert 1 in [c[3] for c in _commits(r.stdout)], out  # worker 0 trained alone for a while
    _check_resets_resume_from_the_last_commit(r.stdout)
