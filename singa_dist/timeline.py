"""The timeline: where each process of the job spends its time, as a Chrome trace (Horovod's timeline).

Each process records spans in memory while `on` is true and appends them to its own part file, `FILE.part<N>`
(N: the process's number in the job, servers included), at least once a second and when it stops. A part is
lines: a JSON header, JSON definitions of each lane and of each kind of span (name, category, tensor) when first
used, and one short line of numbers per span ("lane start duration kind;"), cheap to write on the training
thread; a part cut short by a crash loses at most its last line. `merge(FILE)` turns the parts into
one trace-event file that Perfetto and chrome://tracing load: `{"traceEvents": [...]}` with one process track
per rank and per parameter server (pid = process number, named "rank 0", "server 0", ...) and one thread track
per lane ("training loop", one per gradient bucket, one per collective's name, ...). The runtime starts and stops
recording and has process 0 merge the parts (`singa_dist.start_timeline`); this module only records and writes.

Recording is off by default and costs nothing then: each call site checks the module flag once,

    t0 = timeline.now() if timeline.on else 0
    ...                                   # the work
    if t0:
        timeline.span("gather", t0, tensor=bucket.description)

and nothing is allocated. Times are `time.perf_counter_ns()`, written as wall-clock time (the offset between the
two clocks is measured when recording starts), so the tracks of processes on one host line up.

Parts that a job which did not end normally left behind are merged by `singa-launch --timeline` when the job
ends, or by `merge(FILE)`.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import threading
import time

import torch

on = False  # the one flag every call site checks
now = time.perf_counter_ns

MAIN = "training loop"  # the lane of what the training loop itself does (forward, backward, step, waits)
FLUSH_EVENTS = 10_000  # events kept in memory before they are appended to the part file
FLUSH_EVERY_NS = 1_000_000_000  # ...and at the end of an optimizer step, when the last write is older than this

# (name, cat, lane, t0 ns, t1 ns or -1 for an instant, tensor or None); appended from any thread
_events: list = []
_lock = threading.Lock()  # one writer at a time


class _Recording:
    def __init__(self, path: str, proc: int, name: str, token: str, mark_cycles: bool):
        self.path, self.proc, self.name, self.token = path, proc, name, token
        self.mark_cycles = mark_cycles
        self.part = part_path(path, proc)
        self.offset_ns = time.time_ns() - now()  # wall clock = perf_counter + offset
        self.lanes: dict[str, int] = {}  # lane -> its number in the part (the trace's tid)
        self.kinds: dict[tuple, int] = {}  # (name, cat, tensor) -> its number in the part
        # Readable by the job's user only, as every file of the job (docs/security.md).
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        self.file = os.fdopen(fd, "w")
        self.file.write(json.dumps({"singa_timeline": 1, "proc": proc, "name": name, "token": token}) + "\n")
        self.file.flush()


_recording: _Recording | None = None
_flushed_at = 0  # now() at the last flush


def part_path(path: str, proc: int) -> str:
    return f"{path}.part{proc}"


def span(name: str, t0: int, lane: str = MAIN, tensor: str | None = None, cat: str | None = None) -> None:
    """A span from `t0` (a `now()` reading) to now, in `lane`; `tensor` names what it worked on."""
    _events.append((name, cat or name, lane, t0, now(), tensor))
    if len(_events) >= FLUSH_EVENTS:
        flush()


def record(name: str, t0: int, t1: int, lane: str = MAIN, tensor: str | None = None, cat: str | None = None) -> None:
    """A span from `t0` to `t1` (both `now()` readings)."""
    _events.append((name, cat or name, lane, t0, t1, tensor))
    if len(_events) >= FLUSH_EVENTS:
        flush()


class CommSpan:
    """The communication of one tensor or bucket, in a lane of its own: from when it was started to when this process
    first saw its work completed (`poll()`, called where the training loop passes often: every gradient hook, every
    wait), or when the wait for it returned. (A callback on the work's future would be exact, but it runs on the
    communication thread and holds that thread until it gets the GIL, delaying the next bucket's all-reduce.)"""

    __slots__ = ("name", "tensor", "t0", "t1", "works")

    def __init__(self, handle, tensor: str, name: str = "allreduce"):
        self.name, self.tensor = name, tensor
        self.t0, self.t1 = now(), 0
        self.works = handle.works() if handle is not None else []
        if self.works:
            _in_flight.append(self)

    def done(self) -> None:
        """The wait for the communication has returned."""
        if not self.t1:
            self.t1 = now()
            if self in _in_flight:
                _in_flight.remove(self)
        record(self.name, self.t0, self.t1, lane=self.tensor, tensor=self.tensor, cat="comm")


_in_flight: list[CommSpan] = []  # oldest first: one group's works complete in the order they were started


def poll() -> None:
    """Note when communication in flight has completed."""
    while _in_flight:
        span = _in_flight[0]
        for work in span.works:
            if not work.is_completed():
                return
        span.t1 = now()
        del _in_flight[0]


def step_done(t0: int) -> None:
    """The optimizer step that began at `t0` has ended: its span. What was recorded reaches the part file at least
    once a second, so that a process killed outright loses at most its last second."""
    t1 = now()
    _events.append(("step", "step", MAIN, t0, t1, None))
    if t1 - _flushed_at > FLUSH_EVERY_NS or len(_events) >= FLUSH_EVENTS:
        flush()


def instant(name: str, lane: str = MAIN) -> None:
    _events.append((name, name, lane, now(), -1, None))


def mark_cycles() -> bool:
    """Horovod's mark_cycles: an instant event at the start of every optimizer step."""
    return _recording is not None and _recording.mark_cycles


def buffered() -> int:
    """Events recorded and not yet written."""
    return len(_events)


def active_path() -> str | None:
    """The file this process records for, or None."""
    return _recording.path if _recording is not None else None


def check_writable(path: str) -> None:
    """Raise OSError (naming the file) unless a timeline can be written at `path`."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"the timeline {path} is a directory: name a file (e.g. {os.path.join(path, 'timeline.json')})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write the timeline {path}: the folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".timeline-check-"):
            pass
    except OSError as exc:
        raise PermissionError(f"cannot write the timeline {path}: {folder} is not writable ({exc.strerror})") from None


def start(path: str, proc: int, name: str, token: str = "", mark_cycles: bool = False) -> None:
    """Begin recording this process's spans for the timeline `path` (this process's part is started afresh)."""
    global _recording, on
    stop()
    _events.clear()
    _in_flight.clear()
    _recording = _Recording(path, proc, name, token, mark_cycles)
    _forward.attach()
    on = True


def stop() -> str | None:
    """Stop recording and write what is left to this process's part; the path recorded for, or None."""
    global _recording, on
    if _recording is None:
        return None
    on = False
    _forward.detach()
    flush()
    with _lock:
        rec, _recording = _recording, None
        try:
            rec.file.close()
        except OSError:
            pass
    return rec.path


def flush() -> None:
    """Append the recorded events to this process's part file."""
    global _flushed_at
    _flushed_at = now()
    with _lock:
        rec = _recording
        batch = _events[:]
        del _events[:len(batch)]  # (events appended meanwhile by other threads stay)
        if rec is None or not batch:
            return
        lines = []
        lanes, kinds, offset = rec.lanes, rec.kinds, rec.offset_ns
        for name, cat, lane, t0, t1, tensor in batch:
            tid = lanes.get(lane)
            if tid is None:
                tid = lanes[lane] = len(lanes)
                lines.append(json.dumps({"lane": tid, "name": lane}))
            key = (name, cat, tensor)
            k = kinds.get(key)
            if k is None:
                k = kinds[key] = len(kinds)
                lines.append(json.dumps({"kind": k, "name": name if tensor is None else f"{name} {tensor}",
                                         "cat": cat, "tensor": tensor}))
            # An event: lane, start (ns of wall-clock time), duration (ns; -1: an instant), kind; ";" ends it, so
            # that a line cut short by a crash is known.
            lines.append(f"{tid} {t0 + offset} {t1 - t0 if t1 >= 0 else -1} {k};")
        try:
            rec.file.write("\n".join(lines) + "\n")
            rec.file.flush()
        except (OSError, ValueError):  # the disk is full or the file went: the training goes on
            pass


# --------------------------------------------------------------------------------------------------------------
# Forward spans: the outermost module with trainable parameters that is called after recording starts (the
# user's model) gets a forward pre-hook and a forward hook. Until it is found, global module hooks look for it;
# they are removed as soon as it is, so that other modules keep torch's fast call path.

class _Forward:
    def __init__(self):
        self.finder = None  # the global pre-hook's handle while looking for the model
        self.hooks = []  # the model's own hooks
        self.t0 = 0

    def attach(self) -> None:
        self.detach()
        self.finder = torch.nn.modules.module.register_module_forward_pre_hook(self._find)

    def detach(self) -> None:
        if self.finder is not None:
            self.finder.remove()
            self.finder = None
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.t0 = 0

    def _find(self, module, args) -> None:
        # The first module called is the outermost one; one without trainable parameters (a loss) is not the model.
        if not any(p.requires_grad for p in module.parameters()):
            return
        self.finder.remove()
        self.finder = None
        self.hooks = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]
        self.t0 = now() if on else 0  # this call's own pre-hook has run already

    def _pre(self, module, args) -> None:
        self.t0 = now() if on else 0

    def _post(self, module, args, output) -> None:
        t0, self.t0 = self.t0, 0
        if t0 and on:
            span("forward", t0, tensor=type(module).__name__)


_forward = _Forward()


# --------------------------------------------------------------------------------------------------------------
# Merging the parts into one trace

_PART = re.compile(r"\.part(\d+)$")


def parts_of(path: str) -> dict[int, str]:
    """The part files of the timeline `path`, by process number."""
    found = {}
    for name in glob.glob(glob.escape(path) + ".part*"):
        m = _PART.search(name)
        if m:
            found[int(m.group(1))] = name
    return found


def _read_part(name: str) -> tuple[dict | None, list[dict]]:
    """A part's header and its events, as trace events (times still in ns of wall-clock time)."""
    header, events, lanes, kinds = None, [], {}, {}
    try:
        with open(name) as f:
            for line in f:
                if not line.endswith(";\n") and not line.startswith("{"):
                    continue  # an event cut short when its process died
                if line.startswith("{"):
                    try:
                        item = json.loads(line)
                    except ValueError:
                        continue
                    if header is None:
                        if item.get("singa_timeline") != 1:
                            return None, []
                        header = item
                    elif "lane" in item:
                        lanes[item["lane"]] = item["name"]
                        events.append({"name": "thread_name", "ph": "M", "tid": item["lane"], "ts": 0,
                                       "args": {"name": item["name"]}})
                        events.append({"name": "thread_sort_index", "ph": "M", "tid": item["lane"], "ts": 0,
                                       "args": {"sort_index": item["lane"]}})
                    elif "kind" in item:
                        kinds[item["kind"]] = item
                    continue
                try:
                    tid, ts, dur, k = (int(v) for v in line[:-2].split())
                    kind = kinds[k]
                except (ValueError, KeyError):
                    continue
                event = {"name": kind["name"], "cat": kind["cat"], "ph": "X" if dur >= 0 else "i", "tid": tid,
                         "ts": ts}
                if dur >= 0:
                    event["dur"] = dur
                    if kind["tensor"] is not None:
                        event["args"] = {"tensor": kind["tensor"]}
                else:
                    event["s"] = "t"
                events.append(event)
    except OSError:
        return None, []
    return header, events


def merge(path: str, token: str | None = None, remove_parts: bool = True) -> int:
    """Write the trace of the parts of `path` into `path` (atomically); return the number of its span events.

    token: take only the parts of that recording (a job's processes share one; parts of another job with the
    same file name are left alone); None: the token of the most recently written part. remove_parts: delete the
    parts that were merged."""
    found = parts_of(path)
    read = {proc: _read_part(name) for proc, name in sorted(found.items())}
    read = {proc: (h, ev) for proc, (h, ev) in read.items() if h is not None}
    if not read:
        return 0
    if token is None:
        newest = max(read, key=lambda p: os.path.getmtime(found[p]) if os.path.exists(found[p]) else 0)
        token = read[newest][0]["token"]
    read = {proc: (h, ev) for proc, (h, ev) in read.items() if h["token"] == token}
    starts = [e["ts"] for _, ev in read.values() for e in ev if e["ph"] != "M"]
    base = min(starts) if starts else 0
    out, spans = [], 0
    for proc, (header, events) in sorted(read.items()):
        out.append({"name": "process_name", "ph": "M", "pid": proc, "tid": 0, "ts": 0, "args": {"name": header["name"]}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": proc, "tid": 0, "ts": 0,
                    "args": {"sort_index": proc}})
        for e in events:
            e["pid"] = proc
            if e["ph"] != "M":
                e["ts"] = (e["ts"] - base) / 1000.0  # ns of wall-clock time -> us since the first event
                if "dur" in e:
                    e["dur"] = e["dur"] / 1000.0
                spans += 1
            out.append(e)
    trace = {"traceEvents": out, "displayTimeUnit": "ms",
             "otherData": {"producer": "singa_dist", "start_unix_us": base / 1000.0}}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".timeline-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(trace, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if remove_parts:
        for proc in read:
            try:
                os.unlink(found[proc])
            except OSError:
                pass
    return spans
