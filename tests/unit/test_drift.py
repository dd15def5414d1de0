"""Drift monitoring without Ray: training profiles and their bins, PSI/KS against scipy, the
rolling window, the monitor spec and the `kiln monitor` text."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats
from scipy.special import rel_entr

from kiln.errors import DataError, SpecError
from kiln.inference.serve_spec import validate_serve_spec
from kiln.monitor import (
    Binner,
    Profile,
    RollingCounts,
    Thresholds,
    drift_report,
    ks_binned,
    merge_profiles,
    profile_table,
    psi,
)
from kiln.monitor.client import MonitorError, format_report, parse_window, split_ref
from kiln.monitor.drift import proportions
from kiln.monitor.profile import (
    FeatureProfile,
    category_counts,
    merge_sketches,
    numeric_values,
    skeleton,
    sketch_table,
    with_counts,
)


def _counts(profile: Profile, table: pa.Table) -> dict[str, np.ndarray]:
    binner = Binner(profile)
    return dict(zip(profile.names, binner.split(binner.count(table)), strict=True))


# ---- profiles and bins ---------------------------------------------------------------------------


def test_numeric_bins_hold_roughly_equal_shares_of_continuous_training_data() -> None:
    values = np.random.default_rng(0).normal(5.0, 2.0, 20_000)
    profile = profile_table(pa.table({"x": values}), numeric=["x"], bins=10)
    x = profile.feature("x")
    assert x.edges[0] == values.min() and x.edges[-1] == values.max()
    assert x.count == 20_000 and x.missing == 0
    assert x.mean == pytest.approx(values.mean()) and x.std == pytest.approx(values.std())
    inner = np.asarray(x.counts[2:-1]) / 20_000  # (e0, e1] .. (e9, e10]
    assert len(inner) == 10 and np.all(np.abs(inner - 0.1) < 0.01), inner
    assert x.counts[0] == 0 and x.counts[-1] == 0  # nothing outside the training range


def test_constant_and_near_constant_features_keep_their_point_masses_apart() -> None:
    table = pa.table({"c": np.full(1000, 3.0), "z": np.r_[np.zeros(990), np.ones(10)]})
    profile = profile_table(table, numeric=["c", "z"])
    c, z = profile.feature("c"), profile.feature("z")
    assert c.edges == [3.0] and c.counts == [0, 1000, 0]  # below, equal, above
    assert z.edges == [0.0, 1.0] and z.counts == [0, 990, 10, 0]
    live = pa.table({"c": [2.0, 3.0, 4.0, 9.0], "z": [0.0, 0.5, 1.0, 7.0]})
    counts = _counts(profile, live)
    assert counts["c"].tolist() == [1, 1, 2, 0]  # ... and the missing bin
    assert counts["z"].tolist() == [0, 1, 2, 1, 0]


def test_missing_values_and_values_outside_the_training_range() -> None:
    profile = profile_table(pa.table({"x": np.arange(100.0)}), numeric=["x"], bins=4)
    live = pa.table({"x": pa.array([None, float("nan"), float("inf"), -5.0, 0.0, 50.0, 500.0])})
    counts = _counts(profile, live)["x"]
    assert counts[-1] == 3  # null, NaN and inf are missing, as preprocessing treats them
    assert counts[0] == 1 and counts[-2] == 1  # below 0, above 99
    assert counts.sum() == 7


def _per_value_bins(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """The bins one value at a time (a binary search each), missing last: the reference."""
    present = values[np.isfinite(values)]
    if not edges:
        return np.asarray([present.size, values.size - present.size])
    index = np.searchsorted(np.asarray(edges), present, side="left") + 1
    index[present < edges[0]] = 0
    return np.append(np.bincount(index, minlength=len(edges) + 2), values.size - present.size)


EDGES = [[], [3.0], [0.0, 1.0], [float(e) for e in np.linspace(-2, 2, 11)]]


@pytest.mark.parametrize("rows", [1, 7, 3000])  # one broadcast comparison / a pass per edge
def test_numeric_counts_match_binning_each_value(rows: int) -> None:
    rng = np.random.default_rng(rows)
    special = [np.nan, np.inf, -np.inf, 1e300, -1e300, 3.0, 0.0, 1.0, -2.0, 2.0]
    columns = {}
    for j, edges in enumerate(EDGES):
        values = np.r_[special, rng.choice(edges or [0.0], rows), rng.normal(size=rows)]
        columns[f"x{j}"] = rng.permutation(values)[:rows]
    columns["x4"] = np.clip(columns["x3"], -1e30, 1e30).astype(np.float32)  # widened exactly
    columns["x5"] = np.where(columns["x2"] > 0.5, None, columns["x2"])  # nulls: to_tensor path
    table = pa.table(columns)
    features = [
        FeatureProfile(name, "numeric", 0, 0, [0] * (len(edges) + 2 if edges else 1), edges)
        for name, edges in zip(columns, [*EDGES, EDGES[3], EDGES[2]], strict=True)
    ]
    binner = Binner(Profile(rows=0, features=features))
    counts = binner.split(binner.count(table))
    for feature, got in zip(features, counts, strict=True):
        values = numeric_values(table.column(feature.name), feature.name)
        expected = _per_value_bins(values, feature.edges)
        assert got.tolist() == expected.tolist(), feature.name
        assert got.sum() == rows


def test_number_columns_of_every_kind_bin_alike() -> None:
    profile = profile_table(pa.table({"x": [0.0, 1.0, 2.0, 3.0]}), numeric=["x"], bins=2)
    binner = Binner(profile.__class__(rows=4, features=[profile.features[0]]))
    expected = binner.count(pa.table({"x": [0.0, 1.0, 3.0, None, 7.0]})).tolist()
    kinds = [
        pa.array([0, 1, 3, None, 7], pa.int32()),
        pa.array([False, True, None, None, None]),
        pa.array([0, 1, 3, None, 7], pa.decimal128(5, 1)),
        pa.array([0.0, 1.0, 3.0, None, 7.0]).dictionary_encode(),
    ]
    for column in kinds:
        got = binner.count(pa.table({"x": column})).tolist()
        if pa.types.is_boolean(column.type):
            assert sum(got) == 5 and got[-1] == 3, got
        else:
            assert got == expected, column.type
    with pytest.raises(DataError, match="numeric column 'x' has type string"):
        binner.count(pa.table({"x": ["a", "b"]}))


def test_category_counts_read_values_as_strings_like_preprocessing() -> None:
    categories = pa.array(["red", "1", "true"], pa.string())
    words = pa.array(["red", "blue", None, "red", "", "true"])
    assert category_counts(words, categories).tolist() == [2, 0, 1, 2, 1]
    numbers = pa.array([1, 2, None, 1])  # int 1 reads as the category "1"
    assert category_counts(numbers, categories).tolist() == [0, 2, 0, 1, 1]
    coded = pa.array(["red", "red", None, "x"]).dictionary_encode()
    assert category_counts(coded, categories).tolist() == [2, 0, 0, 1, 1]
    flags = pa.chunked_array([[True, False], [None]])
    assert category_counts(flags, categories).tolist() == [0, 0, 1, 1, 1]


def test_categorical_top_k_and_other() -> None:
    colors = ["red"] * 50 + ["blue"] * 30 + ["green"] * 15 + ["pink"] * 5 + [None] * 4
    profile = profile_table(pa.table({"color": colors}), numeric=[], categorical=["color"], top_k=2)
    color = profile.feature("color")
    assert color.categories == ["red", "blue"] and color.counts == [50, 30, 20]
    assert color.missing == 4
    counts = _counts(profile, pa.table({"color": ["blue", "teal", None, "red", "red"]}))
    assert counts["color"].tolist() == [2, 1, 1, 1]


def test_profile_json_round_trip() -> None:
    table = pa.table({"x": np.arange(50.0), "k": ["a", "b"] * 25})
    profile = profile_table(table, numeric=["x"], categorical=["k"])
    again = Profile.from_dict(profile.to_dict())
    assert again.to_dict() == profile.to_dict()
    assert np.array_equal(Binner(again).count(table), Binner(profile).count(table))


def test_merged_sketches_of_shards_give_the_bins_of_the_whole() -> None:
    rng = np.random.default_rng(1)
    values = np.r_[rng.exponential(3.0, 6000), rng.normal(20, 1, 4000)]
    rng.shuffle(values)
    shards = [pa.table({"x": part}) for part in np.array_split(values, 7)]
    merged = merge_sketches([sketch_table(s, ["x"], []) for s in shards])
    whole = sketch_table(pa.table({"x": values}), ["x"], [])
    assert merged["numeric"]["x"]["n"] == 10_000
    assert merged["numeric"]["x"]["mean"] == pytest.approx(values.mean())
    assert merged["numeric"]["x"]["m2"] == pytest.approx(whole["numeric"]["x"]["m2"])
    # The mixture quantiles of the shards are close to the quantiles of all the values.
    levels = np.linspace(0, 1, 101)[5:-5]
    got = np.interp(levels, np.linspace(0, 1, 101), merged["numeric"]["x"]["q"])
    expected = np.quantile(values, levels)
    assert np.max(np.abs(stats.percentileofscore(values, got) / 100 - levels)) < 0.02
    assert np.all(np.isfinite(expected))
    # Bin counts from the streamed path: exact for the merged edges, roughly equal shares.
    profile = skeleton(merged, bins=10)
    profile = with_counts(profile, sum(Binner(profile).count(s) for s in shards))
    inner = np.asarray(profile.feature("x").counts[2:-1]) / 10_000
    assert np.all(np.abs(inner - 0.1) < 0.02), inner


def _with_edges_of(whole: Profile, table: pa.Table) -> Profile:
    """`table`'s profile on the bins of `whole` (e.g. one shard of the training data)."""
    part = Profile.from_dict(whole.to_dict())
    part.rows = table.num_rows
    counts = Binner(part).split(Binner(part).count(table))
    for item, bins in zip(part.features, counts, strict=True):
        values = table.column(item.name).to_numpy()
        item.counts, item.missing, item.count = bins[:-1].tolist(), int(bins[-1]), len(values)
        item.mean, item.std = float(values.mean()), float(values.std())
    return part


def test_merge_profiles_of_shards_equals_the_profile_of_the_whole() -> None:
    rng = np.random.default_rng(2)
    table = pa.table({"x": rng.normal(0, 1, 2000)})
    whole = profile_table(table, numeric=["x"])
    shards = [_with_edges_of(whole, table.slice(0, 700)), _with_edges_of(whole, table.slice(700))]
    merged = merge_profiles(shards)
    assert merged.rows == 2000
    assert merged.feature("x").counts == whole.feature("x").counts
    assert merged.feature("x").mean == pytest.approx(whole.feature("x").mean)
    assert merged.feature("x").std == pytest.approx(whole.feature("x").std)
    other = profile_table(pa.table({"x": rng.normal(5, 1, 100)}), numeric=["x"])
    with pytest.raises(DataError, match="different features or bins"):
        merge_profiles([whole, other])


# ---- PSI and KS ----------------------------------------------------------------------------------


def test_psi_matches_the_symmetric_kl_divergence_of_smoothed_shares() -> None:
    expected = np.array([100, 200, 300, 0, 400])
    actual = np.array([120, 150, 330, 5, 395])
    e, a = proportions(expected), proportions(actual)
    reference = float(np.sum(rel_entr(a, e) + rel_entr(e, a)))  # PSI = KL(a||e) + KL(e||a)
    assert psi(expected, actual) == pytest.approx(reference)
    assert psi(expected, expected) == pytest.approx(0.0)
    assert np.isfinite(psi(np.array([10, 0]), np.array([0, 10])))


def test_binned_ks_equals_scipy_when_every_value_has_its_own_bin() -> None:
    rng = np.random.default_rng(3)
    train = rng.integers(0, 17, 5000).astype(float)
    live = np.clip(rng.integers(0, 17, 800) + rng.integers(0, 3, 800), 0, 20).astype(float)
    profile = profile_table(pa.table({"px": train}), numeric=["px"], bins=40)
    assert len(profile.feature("px").edges) == 17  # 0..16: one bin per value
    counts = _counts(profile, pa.table({"px": live}))["px"]
    got = ks_binned(np.asarray(profile.feature("px").counts), counts[:-1])
    assert got == pytest.approx(stats.ks_2samp(train, live).statistic)


def test_binned_ks_is_close_to_scipy_on_continuous_data_and_never_above_it() -> None:
    rng = np.random.default_rng(4)
    train, live = rng.normal(0, 1, 5000), rng.normal(0.3, 1, 2000)
    profile = profile_table(pa.table({"x": train}), numeric=["x"], bins=20)
    counts = _counts(profile, pa.table({"x": live}))["x"]
    got = ks_binned(np.asarray(profile.feature("x").counts), counts[:-1])
    exact = stats.ks_2samp(train, live).statistic
    assert got <= exact + 1e-12 and exact - got < 0.03


def test_a_shifted_feature_is_over_threshold_and_the_others_are_not() -> None:
    rng = np.random.default_rng(5)
    train = pa.table({"a": rng.normal(0, 1, 4000), "b": rng.normal(10, 3, 4000)})
    profile = profile_table(train, numeric=["a", "b"])
    live = {"a": rng.normal(0, 1, 1000), "b": rng.normal(10, 3, 1000) + 3 * 3}
    report = drift_report(profile, Binner(profile).count(pa.table(live)), Thresholds())
    assert report["over"] == ["b"] and report["samples"] == 1000
    b, a = report["features"]
    assert (b["name"], a["name"]) == ("b", "a")  # drifted first
    assert b["psi"] > 2 and b["ks"] > 0.8 and a["psi"] < 0.05 and a["ks"] < 0.06
    assert report["verdict"].startswith("DRIFT: 1 of 2 features over threshold (b)")


def test_thresholds_per_feature_and_the_minimum_sample_count() -> None:
    rng = np.random.default_rng(6)
    profile = profile_table(pa.table({"a": rng.normal(0, 1, 4000)}), numeric=["a"])
    live = Binner(profile).count(pa.table({"a": rng.normal(0.5, 1, 500)}))
    assert drift_report(profile, live, Thresholds())["over"] == ["a"]
    loose = Thresholds(features={"a": (5.0, 0.9)})
    assert drift_report(profile, live, loose)["over"] == []
    few = drift_report(profile, live, Thresholds(min_samples=1000))
    assert few["over"] == [] and few["verdict"].startswith("too few inputs")
    empty = drift_report(profile, np.zeros_like(live), Thresholds())
    assert empty["samples"] == 0 and "no inputs" in empty["verdict"]


# ---- rolling window ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_rolling_counts_expire_and_memory_stays_bounded() -> None:
    clock = Clock()
    window = RollingCounts(3, bucket_s=60, retention_s=600, clock=clock)
    window.add(np.array([1, 0, 0]))
    clock.now += 120
    window.add(np.array([0, 2, 0]))
    assert window.total(60).tolist() == [0, 2, 0]
    assert window.total(600).tolist() == [1, 2, 0]
    for _ in range(10_000):  # a week of minutes of traffic
        clock.now += 60
        window.add(np.array([0, 0, 1]))
    assert len(window) <= window.max_buckets == 11
    assert window.total(600).tolist() == [0, 0, len(window)]
    window.add(np.array([5, 5, 5]), when=clock.now - 3600)  # older than retention: ignored
    assert window.total(600)[0] == 0
    clock.now += 700
    assert window.total(600).tolist() == [0, 0, 0] and len(window) == 0


# ---- spec and CLI text ---------------------------------------------------------------------------


def test_monitor_spec_defaults_overrides_and_errors() -> None:
    spec = validate_serve_spec(
        {
            "models": [
                {"ref": "a", "monitor": {"psi_threshold": 0.5, "features": {"x": {"ks": 0.3}}}},
                {"ref": "b", "monitor": {"enabled": False}},
            ],
            "monitor": {"ks_threshold": 0.2, "window_s": 600},
        }
    )
    enabled, thresholds = spec.monitor.for_model(spec.models[0].monitor)
    assert enabled and thresholds.of("x") == (0.5, 0.3) and thresholds.of("y") == (0.5, 0.2)
    assert spec.monitor.for_model(spec.models[1].monitor)[0] is False
    with pytest.raises(SpecError, match="window_s"):
        validate_serve_spec({"models": [{"ref": "a"}], "monitor": {"window_s": 10**9}})
    with pytest.raises(SpecError, match="monitor"):
        validate_serve_spec({"models": [{"ref": "a"}], "monitor": {"psi": 1}})


def test_window_and_ref_parsing() -> None:
    assert [parse_window(w) for w in ("90s", "15m", "1h", "2d", "30")] == [
        90,
        900,
        3600,
        172_800,
        30,
    ]
    with pytest.raises(MonitorError, match="--window"):
        parse_window("soon")
    assert split_ref("digits@production") == ("digits", None, "production")
    assert split_ref("digits:3") == ("digits", "3", None)


def test_format_report_marks_drifted_features_first() -> None:
    rng = np.random.default_rng(7)
    train = pa.table({"a": rng.normal(0, 1, 2000), "b": rng.normal(0, 1, 2000)})
    profile = profile_table(train, numeric=["a", "b"])
    live = pa.table({"a": rng.normal(0, 1, 500), "b": rng.normal(4, 1, 500)})
    report = drift_report(profile, Binner(profile).count(live), Thresholds())
    text = format_report(
        {"model": "m", "window": "1h", "versions": [{"version": "1", "ref": "m:1", **report}]}
    )
    lines = text.splitlines()
    assert lines[0] == "m version 1 (m:1), last 1h: 500 live inputs"
    assert lines[2].startswith("  !!b ") and lines[3].startswith("    a ")
    assert lines[-1].startswith("verdict: DRIFT: 1 of 2 features over threshold (b)")


def test_the_recorder_counts_watched_versions_per_time_bucket_and_keeps_no_rows() -> None:
    from kiln.monitor.spec import MonitorSpec
    from kiln.monitor.store import DriftRecorder

    rng = np.random.default_rng(8)
    table = pa.table({"a": rng.normal(0, 1, 300)})
    profile = profile_table(table, numeric=["a"])
    watched = {"model": "m", "version": "1", "ref": "m:1", "profile": profile.to_dict()}
    recorder = DriftRecorder(
        "app", MonitorSpec(bucket_s=3600), [{**watched, "thresholds": Thresholds().to_dict()}]
    )
    for _ in range(50):
        recorder.record("m", "1", table)
    recorder.record("m", "2", table)  # a version without a profile is not counted
    assert recorder.watches("m", "1") and not recorder.watches("m", "2")
    [(key, _), *more] = recorder._pending.items()
    assert not more and key[0].startswith("m:1:")
    assert recorder._pending[key].tolist() == (50 * Binner(profile).count(table)).tolist()


def test_the_recorder_counts_queued_request_rows_together_off_the_event_loop() -> None:
    import asyncio

    from kiln.monitor.spec import MonitorSpec
    from kiln.monitor.store import _COUNT_ROWS, DriftRecorder

    rng = np.random.default_rng(9)
    train = pa.table({"a": rng.normal(0, 1, 300), "c": rng.choice(["x", "y"], 300)})
    profile = profile_table(train, numeric=["a"], categorical=["c"])
    watched = {"model": "m", "version": "1", "ref": "m:1", "profile": profile.to_dict()}
    recorder = DriftRecorder(
        "app", MonitorSpec(bucket_s=3600), [{**watched, "thresholds": Thresholds().to_dict()}]
    )
    request = train.slice(0, 250)
    one = Binner(profile).count(request)

    async def serve_requests() -> None:
        batches = -(-_COUNT_ROWS // request.num_rows)
        for _ in range(batches - 1):
            recorder.schedule("m", "1", request)
        assert not recorder._counting and not recorder._pending  # queued, not counted yet
        recorder.schedule("m", "1", request)  # reaches _COUNT_ROWS: one count in a thread
        assert recorder._counting
        await asyncio.gather(*recorder._counting)
        [(_, counts)] = recorder._pending.items()
        assert counts.tolist() == (batches * one).tolist()
        recorder.schedule("m", "1", request)
        recorder.schedule("m", "2", request)  # not watched
        await recorder._count_queued()  # what a flush or a drift query does first
        [(_, counts)] = recorder._pending.items()
        assert counts.tolist() == ((batches + 1) * one).tolist()
        assert recorder._flusher is not None
        recorder._flusher.cancel()

    asyncio.run(serve_requests())
