"""The scaling model's cost formulas against hand-computed values, the alpha-beta fit on synthetic measurements,
and the timeline renderer on a small trace (benchmarks/cost_model.py, benchmarks/scaling.py)."""
import json
import random

import pytest

from benchmarks import cost_model as cm

LINK = cm.Link(alpha=1e-4, bandwidth=1e9)


def test_ring_and_tree_allreduce_match_hand_computed_times():
    # ring: 2(p-1)/p n/B + 2(p-1) alpha = 2*3/4 * 0.1 s + 6 * 1e-4 s
    assert cm.ring_allreduce_s(1e8, 4, LINK) == pytest.approx(0.15 + 6e-4, rel=1e-12)
    assert cm.ring_allreduce_s(1e8, 2, LINK) == pytest.approx(0.1 + 2e-4, rel=1e-12)
    # tree: 2 ceil(log2 p) (alpha + n/B): p = 4 -> 4 steps, p = 5 -> 6 steps
    assert cm.tree_allreduce_s(1e8, 4, LINK) == pytest.approx(4 * (1e-4 + 0.1), rel=1e-12)
    assert cm.tree_allreduce_s(1e8, 5, LINK) == pytest.approx(6 * (1e-4 + 0.1), rel=1e-12)
    assert cm.ring_allreduce_s(1e8, 1, LINK) == cm.tree_allreduce_s(1e8, 1, LINK) == 0.0
    assert cm.allgather_s(1e6, 3, LINK) == pytest.approx(2 * (1e-4 + 1e-3), rel=1e-12)


def test_bucketed_allreduce_hides_behind_backward():
    work = cm.Workload("m", 1e8, compute_s=1.0, backward_share=0.6, buckets=4)
    comm = cm.allreduce_comm_s(work, 4, LINK)
    assert comm == pytest.approx(4 * cm.ring_allreduce_s(2.5e7, 4, LINK), rel=1e-12)  # 0.15 + 24 alpha
    # window 0.6 * (1 - 1/4) = 0.45 s > comm: only the last bucket (comm / 4) is exposed
    assert cm.step_s("allreduce_ring", work, 4, LINK) == pytest.approx(1.0 + comm / 4, rel=1e-12)
    # no overlap: everything is exposed
    assert cm.step_s("allreduce_ring", work, 4, LINK, overlap=0.0) == pytest.approx(1.0 + comm, rel=1e-12)
    # half the window: comm - 0.225 s, or the last bucket if larger
    assert cm.exposed_s(comm, work, 0.5) == pytest.approx(max(comm / 4, comm - 0.225), rel=1e-12)


def test_parameter_server_frameworks_match_hand_computed_times():
    work = cm.Workload("m", 1e8, compute_s=1.0)
    # Sandblaster, 4 workers, 2 servers: each server link carries 2 workers' 0.1 s each way, + push and pull alpha
    assert cm.step_s("sandblaster", work, 4, LINK, servers=2, server_update_s=0.01) == pytest.approx(
        1.0 + 2e-4 + 0.2 + 0.2 + 0.01, rel=1e-12)
    # as many servers as workers: each worker's own link is the limit
    assert cm.step_s("sandblaster", work, 4, LINK, servers=8) == pytest.approx(1.0 + 2e-4 + 0.2, rel=1e-12)
    # Downpour, 8 workers in 2 groups of 4, 1 server: ring inside the group, then 2 groups on one server link
    assert cm.step_s("downpour", work, 8, LINK, groups=2, servers=1) == pytest.approx(
        1.0 + cm.ring_allreduce_s(1e8, 4, LINK) + 2e-4 + 0.4, rel=1e-12)
    # Hogwild, 4 groups, sync every 5 steps: 3/4 of the parameters each way (deltas out + values in, as a master
    # the others' deltas in + answers out), fp16 halving the deltas
    assert cm.step_s("hogwild", work, 4, LINK, sync_freq=5) == pytest.approx(
        1.0 + (0.75 * 2e8 / 1e9 + 2e-4) / 5, rel=1e-12)
    assert cm.step_s("hogwild", work, 4, LINK, sync_freq=1, compression="fp16") == pytest.approx(
        1.0 + 0.75 * 1.5e8 / 1e9 + 2e-4, rel=1e-12)


def test_compression_scales_the_bytes():
    assert cm.compression_ratio(None) == cm.compression_ratio("none") == 1.0
    assert cm.compression_ratio("fp16") == cm.compression_ratio("bf16") == 0.5
    assert cm.compression_ratio(("topk", 0.01)) == pytest.approx(0.02)  # value + int32 index per element
    work = cm.Workload("m", 1e8, compute_s=1.0)
    # top-k is gathered: every worker receives the other p-1 workers' selections
    assert cm.allreduce_comm_s(work, 4, LINK, compression=("topk", 0.01)) == pytest.approx(
        3 * (1e-4 + 2e6 / 1e9), rel=1e-12)
    with pytest.raises(ValueError, match="unknown compression"):
        cm.compression_ratio("int8")


@pytest.mark.parametrize("framework", ["allreduce_ring", "allreduce_tree", "hogwild"])
def test_efficiency_is_one_alone(framework):
    work = cm.Workload("m", 1e8, compute_s=0.1, buckets=4)
    assert cm.efficiency(framework, work, 1, LINK) == 1.0


@pytest.mark.parametrize("framework", cm.FRAMEWORKS)
def test_efficiency_grows_with_link_speed_and_falls_with_workers(framework):
    work = cm.Workload("m", 1e8, compute_s=0.1, buckets=4)
    options = {"servers": 4, "groups": 8} if framework in ("sandblaster", "downpour") else {}
    by_speed = [cm.efficiency(framework, work, 64, cm.Link.gbit(g, 20e-6), **options) for g in (10, 25, 100, 400)]
    assert all(a < b for a, b in zip(by_speed, by_speed[1:])), by_speed
    assert all(0 < e <= 1 for e in by_speed)
    if framework != "hogwild":  # hogwild's bytes per process approach n as p grows: flat, not falling
        by_workers = [cm.efficiency(framework, work, p, cm.Link.gbit(10, 20e-6), **options) for p in (8, 64, 512)]
        assert by_workers[0] > by_workers[-1], by_workers


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="bandwidth"):
        cm.Link(1e-5, 0)
    with pytest.raises(ValueError, match="workers"):
        cm.ring_allreduce_s(1e6, 0, LINK)
    with pytest.raises(ValueError, match="unknown framework 'ps'"):
        cm.step_s("ps", cm.Workload("m", 1e6, 0.1), 2, LINK)
    with pytest.raises(ValueError, match="cannot form 3 equal worker groups"):
        cm.step_s("downpour", cm.Workload("m", 1e6, 0.1), 4, LINK, groups=3)
    with pytest.raises(ValueError, match="compute_s"):
        cm.Workload("m", 1e6, 0.0)


def test_fit_recovers_alpha_and_bandwidth():
    alpha, bandwidth = 57e-6, 1.3e9
    truth = cm.Link(alpha, bandwidth)
    sizes = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]
    exact = [(n, p, cm.ring_allreduce_s(n, p, truth)) for n in sizes for p in (2, 3, 4)]
    link = cm.fit_link(exact)
    assert link.alpha == pytest.approx(alpha, rel=1e-6) and link.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    tree = cm.fit_link([(n, p, cm.tree_allreduce_s(n, p, truth)) for n in sizes for p in (2, 4, 8)], "tree")
    assert tree.alpha == pytest.approx(alpha, rel=1e-6) and tree.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    p2p = cm.fit_link([(n, alpha + n / bandwidth) for n in sizes], "p2p")
    assert p2p.alpha == pytest.approx(alpha, rel=1e-6) and p2p.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    # 3% multiplicative noise, as on a loaded machine: still within 10%
    rng = random.Random(0)
    noisy = [(n, p, t * (1 + rng.uniform(-0.03, 0.03))) for n, p, t in exact * 3]
    link = cm.fit_link(noisy)
    assert link.alpha == pytest.approx(alpha, rel=0.1) and link.bandwidth == pytest.approx(bandwidth, rel=0.1)
    with pytest.raises(ValueError, match="at least 2 measurements"):
        cm.fit_link([(1 << 20, 2, 1e-3)])


def test_timeline_renderer_draws_one_row_per_process(tmp_path):
    import matplotlib.image

    from benchmarks.scaling import KIND_COLOURS, render_timeline

    events = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "rank 0"}},
              {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "rank 1"}}]
    for pid in (0, 1):
        events += [{"ph": "X", "cat": "forward", "name": "forward", "pid": pid, "tid": 0, "ts": 1000, "dur": 4000},
                   {"ph": "X", "cat": "backward", "name": "backward", "pid": pid, "tid": 0, "ts": 5000, "dur": 6000},
                   {"ph": "X", "cat": "comm", "name": "allreduce b0", "pid": pid, "tid": 1, "ts": 8000,
                    "dur": 5000},
                   {"ph": "i", "name": "step", "pid": pid, "tid": 0, "ts": 13000}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    png = tmp_path / "timeline.png"
    assert render_timeline(trace, png, dpi=60) == 6
    image = matplotlib.image.imread(png)[..., :3]
    assert image.shape[0] > 50 and image.shape[1] > 500
    for kind in ("forward", "backward", "comm"):  # every kind's colour is on the picture
        rgb = [int(KIND_COLOURS[kind][i:i + 2], 16) / 255 for i in (1, 3, 5)]
        close = (abs(image - rgb).max(axis=-1) < 0.02).sum()
        assert close > 50, (kind, close)
    assert render_timeline(trace, tmp_path / "first.png", max_ms=3, dpi=30) == 2  # the forward spans only
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"traceEvents": events[:2]}))
    with pytest.raises(ValueError, match="no complete"):
        render_timeline(empty, tmp_path / "empty.png")


def test_contention_shares_the_cores_out_evenly():
    assert cm.contention(1, 2) == cm.contention(2, 2) == 1.0  # a core each
    assert cm.contention(3, 2) == 1.5 and cm.contention(4, 2) == 2.0 and cm.contention(5, 4) == 1.25
    with pytest.raises(ValueError, match="cores"):
        cm.contention(2, 0)


def test_a_server_takes_every_push_in_turn():
    work = cm.Workload("m", 1e8, compute_s=1.0)
    # 3 workers, 1 server, 5 ms of server CPU per push: the step waits for all 3 pushes' 15 ms, beside the link's
    # 2 alpha + 3 x 0.1 s each way
    assert cm.step_s("sandblaster", work, 3, LINK, servers=1, server_push_s=5e-3) == pytest.approx(
        1.0 + 2e-4 + 0.3 + 0.3 + 0.015, rel=1e-12)
    # Downpour with 4 single-worker groups on 2 servers: 2 pushes per server
    assert cm.step_s("downpour", work, 4, LINK, servers=2, groups=4, server_push_s=5e-3) == pytest.approx(
        1.0 + 2e-4 + 0.2 + 0.2 + 0.01, rel=1e-12)


def test_fit_overhead_is_non_negative_and_relative_to_the_step():
    # Exact: 10 us per tensor, 1 ns per byte; rows (tensors, bytes) = (200, 4e5) and (8, 1.6e7)
    excess = [200 * 1e-5 + 4e5 * 1e-9, 8 * 1e-5 + 1.6e7 * 1e-9]
    per_tensor, per_byte = cm.fit_overhead([(200, 4e5), (8, 1.6e7)], excess, [0.01, 0.05])
    assert per_tensor == pytest.approx(1e-5, rel=1e-9) and per_byte == pytest.approx(1e-9, rel=1e-9)
    # The large model over-predicted already (excess -2 ms of a 50 ms step): the per-byte term would be negative,
    # so it is dropped and the per-tensor term fitted alone, weighted by 1/step: minimise
    # ((200c - 0.0024)/0.01)^2 + ((8c + 0.002)/0.05)^2
    #   -> c = (200*0.0024/1e-4 - 8*0.002/2.5e-3) / (200^2/1e-4 + 8^2/2.5e-3)
    c = (200 * 0.0024 / 1e-4 - 8 * 0.002 / 2.5e-3) / (200 ** 2 / 1e-4 + 8 ** 2 / 2.5e-3)
    per_tensor, per_byte = cm.fit_overhead([(200, 4e5), (8, 1.6e7)], [0.0024, -0.002], [0.01, 0.05])
    assert per_byte == 0.0 and per_tensor == pytest.approx(c, rel=1e-9) and c > 1e-5  # not zeroed by the -2 ms
    with pytest.raises(ValueError, match="measured_s must be positive"):
        cm.fit_overhead([(1, 1)], [0.0], [0.0])


def _world(framework, workers, compute_ms, step_ms):
    return {"framework": framework, "workers": workers, "network": "loopback", "repeat": 0,
            "compute_ms": {"m": [compute_ms]}, "step_ms": {"m": [step_ms]}, "buckets": {"m": 1}}


def test_measured_worlds_charge_contention_and_server_pushes():
    from benchmarks.scaling import predict_measured

    # A 1e6-byte model of 10 tensors, all backward (forward 0): no overlap on loopback anyway.
    alone = {"m": {"step_ms": 10.0, "forward_ms": 0.0, "tensors": 10, "param_bytes": 1e6}}
    gloo, rpc = cm.Link(1e-3, 1e9), cm.Link(2e-3, 1e9)
    links = {"cores": 2, "gloo": gloo, "rpc": rpc,
             "overhead": {("loopback", fw): (1e-4, 1e-9) for fw in ("allreduce", "sandblaster", "hogwild")}}
    # The CPU overhead per unit: 10 tensors * 0.1 ms + 1e6 bytes * 1 ns = 2 ms
    # AllReduce, 4 ranks on 2 cores (contention 2): the copies at half the bandwidth, and each of the 6 ring steps
    # waits for a core twice as long as alpha, which covers its chunk: max(2 * 1 ms, 1 ms + 0.25e6 / 0.5e9) = 2 ms,
    # 12 ms in all; the overhead at contention 2: 4 ms
    row, = predict_measured(_world("allreduce", 4, 20.0, 40.0), alone, links)
    assert row["predicted_ms"] == pytest.approx(20 + 12 + 4, rel=1e-9) and row["overhead_scale"] == 2.0
    assert row["error"] == pytest.approx(36 / 40 - 1, rel=1e-9) and not row["fit_point"]
    # Sandblaster, 3 workers and 1 server (4 processes, but the workers wait while the server works): the RPC link
    # as swept, 3 pushes in turn: 2 alpha + 3 * (1 ms out + 1 ms back) + 3 * 1 ms of tensors' handling per push,
    # and 1 ms of byte work once per step (the one update, the workers' own copies)
    row, = predict_measured(_world("sandblaster", 3, 15.0, 30.0), alone, links)
    assert row["predicted_ms"] == pytest.approx(15 + 4 + 6 + 3 + 1, rel=1e-9)
    assert row["overhead_scale"] == 3.0 and row["byte_scale"] == 1.0
    # Hogwild, 3 processes, sync every 2 steps: the transfers are waits, at the swept bandwidth:
    # (2/3 * 2e6 / 1e9 + 2 * 2e-3) / 2 = 2/3 + 2 ms; the per-tensor overhead on the 2/3 of the slices not mastered
    # at contention 1.5: 10 * 0.1 ms * 1.0 = 1 ms; the per-byte one on the whole replica at contention 1.5:
    # 1e6 * 1 ns * 1.5 = 1.5 ms
    row, = predict_measured(_world("hogwild", 3, 12.0, 30.0), alone, links)
    assert row["predicted_ms"] == pytest.approx(12 + 2 / 3 + 2 + 1 + 1.5, rel=1e-9)
    assert row["overhead_scale"] == pytest.approx(1.0) and row["byte_scale"] == 1.5
    # A world whose fit world is missing is left out
    assert predict_measured(_world("downpour", 3, 12.0, 30.0), alone, {"cores": 2, "overhead": {}}) == []


def test_the_overhead_is_fitted_at_the_2_worker_worlds_only():
    from benchmarks.scaling import fit_links, predict_measured

    alone = {"a": {"step_ms": 10.0, "forward_ms": 0.0, "tensors": 200, "param_bytes": 4e5},
             "b": {"step_ms": 10.0, "forward_ms": 0.0, "tensors": 8, "param_bytes": 1.6e7}}
    gloo = cm.Link(1e-3, 1e9)
    sweep = [(n, 2, cm.ring_allreduce_s(n, 2, gloo)) for n in (4096, 1 << 20, 16 << 20)]
    per_tensor, per_byte = 2e-5, 5e-10

    def world(p, extra_ms=0.0):  # measured steps: the model's own, plus extra_ms in the 4-rank world
        w = {"framework": "allreduce", "workers": p, "network": "loopback", "repeat": 0,
             "sweep": sweep if p == 2 else [],
             "compute_ms": {"a": [10.0], "b": [10.0]}, "buckets": {"a": 1, "b": 1}, "step_ms": {}}
        for kind in ("a", "b"):
            f = cm.contention(p, 2)
            t = 10e-3 + cm.ring_allreduce_s(alone[kind]["param_bytes"], p, cm.Link(gloo.alpha, gloo.bandwidth / f),
                                            hop_contention=f)
            t += f * (per_tensor * alone[kind]["tensors"] + per_byte * alone[kind]["param_bytes"])
            w["step_ms"][kind] = [t * 1e3 + extra_ms]
        return w

    links = fit_links([world(2), world(4, extra_ms=50.0)], alone, 2)
    assert links["gloo"].alpha == pytest.approx(1e-3, rel=1e-6)
    assert links["gloo"].bandwidth == pytest.approx(1e9, rel=1e-6)
    got = links["overhead"]["loopback", "allreduce"]
    assert got == pytest.approx((per_tensor, per_byte), rel=1e-6)  # the 4-rank world's extra 50 ms is not fitted
    rows = predict_measured(world(4), alone, links)
    assert [r["error"] for r in rows] == pytest.approx([0.0, 0.0], abs=1e-9)


def test_a_ring_step_waits_for_its_receivers_core():
    # Latency-bound, 4 ranks at twice the sweep's contention: each of the 6 steps max(2 * 0.1 ms, 0.1 ms + 1e5 / 4
    # bytes at 1 GB/s = 0.125 ms) = 0.2 ms
    assert cm.ring_allreduce_s(1e5, 4, LINK, hop_contention=2.0) == pytest.approx(6 * 2e-4, rel=1e-12)
    # Bandwidth-bound: the wait hides behind the 25 ms chunk, 6 * (0.1 + 25) ms as without contention
    assert cm.ring_allreduce_s(1e8, 4, LINK, hop_contention=2.0) == pytest.approx(6 * (1e-4 + 0.025), rel=1e-12)
    assert cm.ring_allreduce_s(1e8, 4, LINK, hop_contention=1.0) == pytest.approx(0.15 + 6e-4, rel=1e-12)
    with pytest.raises(ValueError, match="hop_contention"):
        cm.ring_allreduce_s(1e5, 4, LINK, hop_contention=0.5)


def test_a_token_bucket_lets_its_burst_through_unshaped():
    from benchmarks.scaling import tbf_burst_bytes

    assert tbf_burst_bytes(1000) == 1250 * 1024  # 10 ms of 1 Gbit/s, in tc's 1024-byte kb
    assert tbf_burst_bytes(10) == 64 * 1024  # never under 64 kb
    bucket = cm.Link(alpha=1e-4, bandwidth=1e9, burst=1e6)
    # 4 ranks, 1e6 bytes, 1 s of compute (the bucket refills): each link carries 1.5e6 bytes, 1e6 of them in the
    # burst, so the ring pays the rate for 1/3 of them: 6 * (0.1 ms + 1e6 / 3 / 4 / 1e9 s) = 0.6 + 0.5 ms
    work = cm.Workload("m", 1e6, compute_s=1.0)
    assert cm.allreduce_comm_s(work, 4, bucket) == pytest.approx(6e-4 + 5e-4, rel=1e-12)
    # 0.2 ms of compute refills 0.2 MB of the bucket: 1.3e6 of the 1.5e6 bytes pay, 6 * (0.1 + 1.3e6/1.5e6/4) ms
    short = cm.Workload("m", 1e6, compute_s=2e-4)
    assert cm.allreduce_comm_s(short, 4, bucket) == pytest.approx(6 * (1e-4 + 1.3e6 / 1.5 / 4 / 1e9), rel=1e-12)
    # More than the burst: 1e8 bytes, the link carries 1.5e8, 1.49e8 pay the rate
    big = cm.Workload("m", 1e8, compute_s=1.0)
    assert cm.allreduce_comm_s(big, 4, bucket) == pytest.approx(6e-4 + 1.49e8 / 1e9, rel=1e-12)
    assert cm.allreduce_comm_s(big, 4, LINK) == pytest.approx(6e-4 + 0.15, rel=1e-12)  # no bucket
    with pytest.raises(ValueError, match="burst"):
        cm.Link(alpha=1e-4, bandwidth=1e9, burst=-1.0)


def test_the_shaped_sweep_is_fitted_beyond_the_burst():
    from benchmarks.scaling import SWEEP_BLOCK, SWEEP_BYTES, fit_links, tbf_burst_bytes

    assert cm.shaped_share(1.5e6, 1e6) == pytest.approx(1 / 3, rel=1e-12)
    assert cm.shaped_share(1e5, 1e6) == 0.0 and cm.shaped_share(0.0, 1e6) == 1.0
    # 2 ranks at 1 Gbit/s: a block of 5 all-reduces starts with 1.28 MB of tokens, 256 000 bytes per all-reduce
    # unshaped; the rest at 125 MB/s after 2 alpha of 1 ms: 4 KiB and 64 KiB take 2 ms, 1 MiB 2 ms + 792 576 bytes
    burst = tbf_burst_bytes(1000)
    sweep = [(n, 2, 2e-3 + max(0, n - burst / SWEEP_BLOCK) / 1.25e8) for n in SWEEP_BYTES]
    assert sweep[2][2] == pytest.approx(2e-3 + 792576 / 1.25e8, rel=1e-12)
    alone = {"m": {"step_ms": 10.0, "forward_ms": 0.0, "tensors": 10, "param_bytes": 1e6}}
    world = {"framework": "allreduce", "workers": 2, "network": "shaped", "repeat": 0, "sweep": sweep,
             "compute_ms": {"m": [10.0]}, "step_ms": {"m": [20.0]}, "buckets": {"m": 1}}
    shaped = fit_links([world], alone, 2, rate_mbit=1000)["shaped"]
    assert shaped.alpha == pytest.approx(1e-3, rel=1e-6) and shaped.bandwidth == pytest.approx(1.25e8, rel=1e-6)
    assert shaped.burst == burst
    # Without the bucket taken into account, the 1 MiB block's burst would pass for bandwidth
    assert fit_links([world], alone, 2)["shaped"].bandwidth > 1.3e8


def test_sandblaster_pays_its_byte_work_once_per_step_and_its_tensors_per_push():
    from benchmarks.scaling import fit_links, predict_measured

    # 2 models (200 tensors of 4e5 bytes in all; 8 tensors of 1.6e7 bytes), RPC link alpha 1 ms, 1 GB/s, and
    # 20 us per tensor per push, 1 ns per byte per step. 2 workers, compute 10 ms:
    #   a: 10 + 2 + 2 * 0.8 + 2 * 4 + 0.4 = 22.0 ms; b: 10 + 2 + 2 * 32 + 2 * 0.16 + 16 = 92.32 ms
    # 3 workers: a: 10 + 2 + 3 * 0.8 + 3 * 4 + 0.4 = 26.8 ms; b: 10 + 2 + 3 * 32 + 3 * 0.16 + 16 = 124.48 ms
    # (charged per push, b's 16 ms would be 24: 132.48 ms)
    alone = {"a": {"step_ms": 10.0, "forward_ms": 0.0, "tensors": 200, "param_bytes": 4e5},
             "b": {"step_ms": 10.0, "forward_ms": 0.0, "tensors": 8, "param_bytes": 1.6e7}}
    sweep = [(n, 1e-3 + n / 1e9) for n in (4096, 1 << 20, 16 << 20)]

    def world(p, a_ms, b_ms):
        return {"framework": "sandblaster", "workers": p, "network": "loopback", "repeat": 0,
                "sweep": sweep if p == 2 else [], "compute_ms": {"a": [10.0], "b": [10.0]},
                "buckets": {"a": 1, "b": 1}, "step_ms": {"a": [a_ms], "b": [b_ms]}}

    links = fit_links([world(2, 22.0, 92.32)], alone, 2)
    assert links["rpc"].alpha == pytest.approx(1e-3, rel=1e-6) and links["rpc"].bandwidth == pytest.approx(1e9)
    assert links["overhead"]["loopback", "sandblaster"] == pytest.approx((2e-5, 1e-9), rel=1e-6)
    a, b = predict_measured(world(3, 26.8, 124.48), alone, links)
    assert a["predicted_ms"] == pytest.approx(26.8, rel=1e-6) and b["predicted_ms"] == pytest.approx(124.48, rel=1e-6)
    assert (a["overhead_scale"], a["byte_scale"]) == (3.0, 1.0)


def test_a_synchronous_step_waits_for_the_slowest_workers_compute():
    from benchmarks.scaling import predict_measured, synchronous_compute_ms

    # 3 workers, 3 repetitions: rank 0 has a core to itself (4.5 ms), the others share one (9 ms) or not.
    # Slowest per repetition: 9, 9.2, 5 -> median 9 ms (rank 0's median: 4.6 ms)
    world = {"framework": "allreduce", "workers": 3, "network": "loopback", "repeat": 0, "buckets": {"m": 1},
             "compute_ms": {"m": [4.5, 4.6, 4.7]}, "step_ms": {"m": [20.0]},
             "compute_ranks_ms": {"m": [[4.5, 4.6, 4.7], [9.0, 4.4, 5.0], [8.8, 9.2, 4.9]]}}
    assert synchronous_compute_ms(world, "m") == pytest.approx(9.0)
    # A run stored before every rank's compute was recorded: rank 0's median
    assert synchronous_compute_ms({**world, "compute_ranks_ms": {}}, "m") == pytest.approx(4.6)
    # In the prediction: AllReduce of 1e6 bytes on a 1 ms, 1 GB/s link at contention 1.5 (no overlap on loopback):
    # 4 ring steps of max(1.5 * 1 ms, 1 ms + 1e6 / 3 / (1e9 / 1.5) = 1.5 ms) = 6 ms, no CPU constants: 9 + 6 = 15 ms
    alone = {"m": {"step_ms": 4.5, "forward_ms": 0.0, "tensors": 10, "param_bytes": 1e6}}
    row, = predict_measured(world, alone, {"cores": 2, "gloo": cm.Link(1e-3, 1e9), "overhead": {}})
    assert row["compute_ms"] == pytest.approx(9.0) and row["predicted_ms"] == pytest.approx(15.0, rel=1e-9)
    # Hogwild is asynchronous: rank 0's own compute
    row, = predict_measured({**world, "framework": "hogwild"}, alone,
                            {"cores": 2, "rpc": cm.Link(1e-3, 1e9), "overhead": {}})
    assert row["compute_ms"] == pytest.approx(4.6)
    with pytest.raises(ValueError, match="differ in number"):
        synchronous_compute_ms({**world, "compute_ranks_ms": {"m": [[1.0], [1.0, 2.0]]}}, "m")
