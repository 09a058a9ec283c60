"""``hybridstitch.testbed.quality_report``: the quality benchmark's records, front, table and plot."""

import pytest

from hybridstitch.testbed.quality_report import markdown, pareto_front, plot, refreshes_per_image, row_record, versus
from hybridstitch.trace import StepRecord, Trace


def _per_seed(seed, wall, modelled, fd, dist, psnr=30.0, n=10):
    return dict(seed=seed, samples=n, wall_seconds=wall, modelled_seconds=modelled, fd=fd, accuracy=0.9,
                feature_distance=dist, psnr=psnr)


LARGE = dict(per_seed=[_per_seed(0, 10.0, 9.0, 40.0, 0.0, 100.0), _per_seed(1, 12.0, 9.0, 42.0, 0.0, 100.0)])


def _record(name, per_seed, hooks=None, table="1"):
    return row_record(name, name, table, dict(per_seed=per_seed), LARGE, 50.0, {}, hooks, [4.0], {"large": 4}, 0.0)


def test_row_record_pairs_speedups_by_seed_and_reports_the_spread():
    r = _record("x", [_per_seed(0, 5.0, 3.0, 50.0, 6.0), _per_seed(1, 4.0, 6.0, 54.0, 8.0)])
    assert r["samples"] == 20 and r["seeds"] == [0, 1]
    assert r["fd_mean"] == pytest.approx(52.0) and r["fd_std"] == pytest.approx(2.0)
    assert r["dist_to_large"] == pytest.approx(7.0) and r["dist_std"] == pytest.approx(1.0)
    assert r["speedup_measured"] == pytest.approx(22.0 / 9.0)  # totals of the same seeds
    assert r["speedup_measured_std"] == pytest.approx(0.5)  # per-seed ratios 2.0 and 3.0
    assert r["speedup_modelled"] == pytest.approx(2.0)
    # a row run on seed 1 only is compared with large-only's seed 1, not with its mean
    one = _record("y", [_per_seed(1, 6.0, 4.5, 50.0, 6.0)])
    assert one["speedup_measured"] == pytest.approx(2.0) and one["fd_std"] == 0.0
    hooked = _record("pab", [_per_seed(0, 8.0, 9.0, 41.0, 1.0)], hooks="large + PAB")
    assert hooked["speedup_modelled"] is None and hooked["modelled_ms_per_image"] is None


def test_pareto_front_keeps_the_rows_nothing_beats_on_both_axes():
    rows = [dict(method="large", speedup_measured=1.0, dist_to_large=0.0),
            dict(method="a", speedup_measured=1.5, dist_to_large=6.0),
            dict(method="b", speedup_measured=1.4, dist_to_large=7.0),  # beaten by a on both
            dict(method="c", speedup_measured=2.0, dist_to_large=8.0),
            dict(method="d", speedup_measured=2.0, dist_to_large=9.0),  # same speed as c, farther
            dict(method="e", speedup_measured=None, dist_to_large=1.0)]  # no value: not on the front
    assert pareto_front(rows) == ["large", "a", "c"]
    rows[1]["speedup_modelled"], rows[3]["speedup_modelled"], rows[4]["speedup_modelled"] = 3.0, 4.0, 1.2
    assert pareto_front(rows, x="speedup_modelled") == ["a", "c"]  # rows without the key are left out; d is beaten


def test_refreshes_count_full_large_steps_inside_a_masked_stage():
    def trace(kinds):
        steps = [StepRecord(step=i, timestep=0.0, sigma=0.0, stage=st, stage_kind=k, d=None) for i, (st, k) in enumerate(kinds)]
        return Trace(config={"method": "hybridstitch"}, num_steps=len(kinds), height=8, width=8, batch=1, backend="eager", steps=steps)

    a = trace([(1, "large"), (1, "large"), (2, "masked"), (2, "large"), (2, "masked"), (2, "large"), (3, "small")])
    b = trace([(1, "large"), (2, "masked"), (3, "small")])
    assert refreshes_per_image([a, b]) == pytest.approx(1.0)
    tstitch = trace([(1, "small"), (2, "large"), (2, "large")])
    tstitch.config = {"method": "t-stitch"}
    assert refreshes_per_image([tstitch]) == 0.0  # its large stage is no refresh
    assert refreshes_per_image([]) == 0.0


def test_markdown_and_plot_show_every_row_and_the_front():
    rows = [_record("large", LARGE["per_seed"]), _record("t-stitch", [_per_seed(0, 7.0, 6.0, 50.0, 6.0)]),
            _record("pab", [_per_seed(0, 8.0, 9.0, 41.0, 1.0)], hooks="large + PAB", table="hook")]
    report = dict(date="2026-12-02", machine="test", settings=dict(seeds=[0, 1], samples_per_seed=10, steps=20,
                                                                     guidance_scale=1.25, batch_size=10),
                  per_call_seconds=dict(large=1.0, small=0.1, large_masked={"0.3": 0.4}), fd_reference="ref",
                  rows=rows, hooks={"pab": "large + PAB"}, front_measured=pareto_front(rows),
                  front_modelled=pareto_front(rows, x="speedup_modelled"),
                  real_fd_floor={"10": dict(disjoint_mean=90.0, disjoint_std=9.0, vs_reference_mean=40.0, vs_reference_std=4.0)},
                  seconds=1.0)
    md = markdown(report)
    assert "| 1 | t-stitch | t-stitch | 10 |" in md and "| hook | pab | pab | 10 |" in md
    assert "Pareto front, distance to large vs measured speed-up: large, pab, t-stitch." in md
    assert "| 10 | 90.0 ± 9.0 | 40.0 ± 4.0 |" in md
    assert plot(report)[:4] == b"\x89PNG"


def test_versus_pairs_each_hybridstitch_row_with_tstitch_by_seed():
    tstitch = _record("t-stitch", [_per_seed(0, 5.0, 5.0, 50.0, 6.0), _per_seed(1, 6.0, 6.0, 50.0, 6.0)])
    rows = [_record("large", LARGE["per_seed"]), tstitch,
            # closer on seed 0 only, but closer on average; faster on both seeds
            _record("hs", [_per_seed(0, 4.0, 4.0, 50.0, 4.0), _per_seed(1, 5.0, 5.0, 50.0, 7.0)], table="fresh"),
            # closer on both seeds, slower
            _record("slow", [_per_seed(0, 9.0, 9.0, 50.0, 5.0), _per_seed(1, 9.0, 9.0, 50.0, 5.0)], table="1"),
            _record("pab", [_per_seed(0, 1.0, 1.0, 50.0, 1.0)], hooks="large + PAB", table="hook")]  # not HybridStitch
    vs = {v["method"]: v for v in versus(rows)}
    assert set(vs) == {"hs", "slow"}
    assert vs["hs"]["dist_delta"] == pytest.approx(-0.5) and vs["hs"]["seeds_closer"] == 1 and vs["hs"]["seeds_faster"] == 2
    assert vs["hs"]["beats"] and vs["hs"]["speedup_ratio"] == pytest.approx(11.0 / 9.0)
    assert vs["slow"]["seeds_closer"] == 2 and vs["slow"]["seeds_faster"] == 0 and not vs["slow"]["beats"]
    # modelled: t-stitch 18/11, hs 18/9 (faster), slow 18/18 (slower)
    assert vs["hs"]["modelled_ratio"] == pytest.approx(11.0 / 9.0) and vs["hs"]["beats_modelled"]
    assert not vs["slow"]["beats_modelled"]
    assert versus([r for r in rows if r["method"] != "t-stitch"]) == []
