"""Live metrics: steps/s, samples/s, the share of time spent waiting on communication, bytes per step and the
parameter servers' staleness, measured on every worker, printed and written as CSV by rank 0.

Each `DistributedOptimizer` has a `Meter`. Off (the default) it only counts steps (an integer added to per step),
and the strategies count their bytes as they always do: `strategy.stats()` then gives those totals and leaves the
rates None. On (`singa-launch --metrics SECONDS`, `SINGA_METRICS=SECONDS`, or `DistributedOptimizer(...,
metrics=SECONDS)`), the meter also reads the clock at the end of every step, counts the samples that go through
the model's forward, and every SECONDS closes a window: the rates over it become what `stats()` returns and, on rank
0, a printed line (`[singa metrics] step 200: ...`) and a CSV row (`SINGA_METRICS_FILE`, which `singa-launch
--log-dir DIR` sets to `DIR/metrics.csv`).

Waiting is measured where the timeline measures its "wait" spans (a collective's `Handle.wait()` that finds the
work unfinished, the parameter servers' answers): those places check the module flag `on` and add the time they
were blocked to `wait_ns`, the process's total. Nothing is allocated on those paths.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time

import torch

on = False  # some meter measures: the waits below count (one flag check where they happen)
now = time.perf_counter_ns
_timed = 0  # meters measuring now
wait_ns = 0  # time this process spent blocked on communication while `on`

VARIABLE = "SINGA_METRICS"  # seconds between reports
FILE_VARIABLE = "SINGA_METRICS_FILE"  # the CSV rank 0 appends a row to at every report
PREFIX = "[singa metrics]"
COLUMNS = ("time", "strategy", "step", "window_s", "steps_per_s", "samples_per_s", "comm_wait_fraction",
           "bytes_sent_per_step", "bytes_received_per_step", "staleness_mean", "staleness_max")


def waited(t0: int) -> None:
    """The caller was blocked on communication since `t0` (a `now()` reading)."""
    global wait_ns
    wait_ns += now() - t0


def parse_interval(value, what: str) -> float | None:
    """Seconds between reports from a flag, a variable or an argument; None, "", 0 and False: off."""
    if value is None or value is False or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} wants a number of seconds between reports, got {value!r}") from None
    if seconds == 0:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} wants a number of seconds above 0 between reports, got {value!r}")
    return seconds


def interval_from_environment() -> float | None:
    return parse_interval(os.environ.get(VARIABLE), VARIABLE)


class _Samples:
    """Counts the samples of the model's forward passes: the first module called that holds one of the optimizer's
    parameters (the user's model, outermost) gets a forward pre-hook that adds the first dimension of its first
    tensor argument, when gradients are on (evaluation under no_grad is not training). Until the model is found a
    global pre-hook looks for it; it goes as soon as it has, so that other modules keep torch's fast call path."""

    def __init__(self, meter: "Meter", params):
        self.meter = meter
        self.ids = {id(p) for p in params if p.requires_grad}
        self.hook = None
        self.finder = torch.nn.modules.module.register_module_forward_pre_hook(self._find)

    def _find(self, module, args) -> None:
        if not any(id(p) in self.ids for p in module.parameters()):
            return
        self.finder.remove()
        self.finder = None
        self.hook = module.register_forward_pre_hook(self._count, with_kwargs=True)
        self._count(module, args, {})  # this call's own pre-hooks were chosen before this one existed

    def _count(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                if value.dim():
                    self.meter.samples += value.shape[0]
                return

    def remove(self) -> None:
        for handle in (self.finder, self.hook):
            if handle is not None:
                handle.remove()
        self.finder = self.hook = None


class Meter:
    """The steps of one optimizer, and over each window of `interval` seconds their rates.

    source: the strategy; it gives `name`, `traffic()` (bytes sent and received since set-up) and
    `staleness_log()` (the versions behind of each update it pushed, or None when it has no servers).
    report: this process prints the windows and writes them to the CSV (rank 0)."""

    def __init__(self, source, interval: float | None = None, *, params=(), passes: int = 1, report: bool = False,
                 path: str | None = None, out=None):
        self.source = source
        self.interval = interval
        self.timed = interval is not None
        self.passes = passes
        self.steps = 0  # optimizer steps finished (kept on or off)
        self.samples = 0
        self.batch_size: int | None = None
        self.report = report and self.timed
        self.out = out
        self.file = None
        self._samples = None
        self.last: dict | None = None  # the last window closed
        self._start_window(now(), wait_ns)
        if self.timed:
            _count_timed(+1)
            self.report_at = self.t0 + int(interval * 1e9)
            self._samples = _Samples(self, params)
            if self.report and path:
                self.file = _open_csv(path)

    def _start_window(self, t: int, waits: int) -> None:
        self.t0, self.t_end, self.wait0 = t, t, waits
        self.steps0, self.samples0 = self.steps, self.samples
        self.sent0, self.received0 = self.source.traffic()
        log = self.source.staleness_log()
        self.stale0 = len(log) if log is not None else 0

    def set_batch_size(self, n: int) -> None:
        """Samples per backward pass on this worker: samples/s counts these instead of the forward passes'."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"set_batch_size wants a positive whole number of samples, got {n!r}")
        self.batch_size = n
        if self._samples is not None:
            self._samples.remove()
            self._samples = None

    def step_done(self) -> None:
        """The end of an optimizer step, when timed (the optimizer has counted it in `steps`)."""
        t = now()
        self.t_end = t
        if self.batch_size is not None:
            self.samples += self.batch_size * self.passes
        if t >= self.report_at:
            self.last = self._window()
            self._start_window(t, wait_ns)
            self.report_at = t + int(self.interval * 1e9)
            if self.report:
                self.write(self.last)

    def _window(self) -> dict:
        """The rates over the current window (its end: the latest step's end)."""
        steps = self.steps - self.steps0
        sent, received = self.source.traffic()
        log = self.source.staleness_log()
        stale = log[self.stale0:] if log is not None else None
        out = {"steps_in_window": steps,
               "bytes_sent_per_step": (sent - self.sent0) / steps if steps else None,
               "bytes_received_per_step": (received - self.received0) / steps if steps else None,
               "staleness_mean": (sum(stale) / len(stale)) if stale else None,
               "staleness_max": max(stale) if stale else None,
               "window_s": None, "steps_per_s": None, "samples_per_s": None, "comm_wait_fraction": None}
        if self.timed and steps:
            seconds = (self.t_end - self.t0) / 1e9
            out["window_s"] = seconds
            if seconds > 0:
                out["steps_per_s"] = steps / seconds
                counted = self.samples - self.samples0
                out["samples_per_s"] = counted / seconds if counted else None
                # Waits end before the step that follows them does, so the share stays within [0, 1].
                out["comm_wait_fraction"] = min(1.0, max(0.0, (wait_ns - self.wait0) / (self.t_end - self.t0)))
        return out

    def stats(self) -> dict:
        sent, received = self.source.traffic()
        out = {"strategy": self.source.name, "metrics_interval_s": self.interval, "steps": self.steps,
               "samples": self.samples if self.interval is not None else None,
               "bytes_sent": sent, "bytes_received": received}
        window = self._window() if self.steps > self.steps0 or self.last is None else self.last
        out.update(window)
        return out

    def write(self, window: dict) -> None:
        """Print the window (rank 0's stdout) and append it to the CSV."""
        line = f"{PREFIX} {self.source.name} step {self.steps}: {_fmt(window['steps_per_s'], '.1f')} steps/s"
        if window["samples_per_s"] is not None:
            line += f", {window['samples_per_s']:.0f} samples/s"
        line += f", comm wait {_fmt(window['comm_wait_fraction'], '.0%')}"
        line += f", sent {_bytes(window['bytes_sent_per_step'])}/step"
        line += f", recv {_bytes(window['bytes_received_per_step'])}/step"
        if window["staleness_mean"] is not None:
            line += f", staleness {window['staleness_mean']:.2f} (max {window['staleness_max']})"
        print(line, file=self.out or sys.stdout, flush=True)
        if self.file is not None:
            row = {"time": f"{time.time():.3f}", "strategy": self.source.name, "step": self.steps, **window}
            try:
                csv.writer(self.file).writerow(["" if row[c] is None else row[c] for c in COLUMNS])
                self.file.flush()
            except (OSError, ValueError):  # the disk is full or the file went: the training goes on
                pass

    def close(self) -> None:
        """A last report of the steps since the last one (shutdown() calls this), and no more measuring."""
        if self._samples is not None:
            self._samples.remove()
            self._samples = None
        if self.timed and self.steps > self.steps0:
            self.last = self._window()
            self._start_window(self.t_end, wait_ns)
            if self.report:
                self.write(self.last)
        if self.timed:
            _count_timed(-1)
            self.timed = False
        self.report = False
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


def _count_timed(change: int) -> None:
    global on, _timed
    _timed += change
    on = _timed > 0


def _open_csv(path: str):
    """The CSV, opened to append (a restarted job adds to it), with the header when it is new."""
    try:  # a new file is readable by the job's user only, as every file of the job (docs/security.md)
        f = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", newline="")
    except OSError as exc:
        raise OSError(f"cannot write the metrics file {path} ({FILE_VARIABLE}): {exc.strerror}") from None
    if f.tell() == 0:
        csv.writer(f).writerow(COLUMNS)
        f.flush()
    return f


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
