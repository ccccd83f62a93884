import json
import math

import pytest

from depthcut import BlockScores, DepthcutError, Protect


def make(values, name="ppl"):
    return BlockScores({name: values}, len(values))


def test_heuristic_protects_first_four_and_last_two():
    s = make([float(v) for v in range(10)])  # block 0 least important by value
    assert s.ranking("ppl") == [4, 5, 6, 7]
    assert s.select("ppl", 2) == [4, 5]
    assert s.ranking("ppl", Protect.none())[:2] == [0, 1]
    assert s.select("ppl", 3, Protect(1, 1)) == [1, 2, 3]


def test_ranking_orders_by_score_then_index_and_selects_in_block_order():
    s = make([9, 9, 9, 9, 5.0, 1.0, 3.0, 1.0, 9, 9])
    assert s.ranking("ppl") == [5, 7, 6, 4]
    assert s.select("ppl", 3) == [5, 6, 7]


def test_nan_scores_rank_last():
    s = make([0, 0, 0, 0, float("nan"), 2.0, 1.0, 0, 0, 0])
    assert s.ranking("ppl") == [7, 6, 5, 4]


def test_removing_too_many_blocks_is_an_error():
    s = make([1.0] * 10)
    with pytest.raises(DepthcutError, match="cannot remove 5 blocks.*4 may be pruned"):
        s.select("ppl", 5)
    with pytest.raises(DepthcutError):
        s.select("ppl", 0)


def test_angular_window_selects_a_contiguous_prunable_run():
    s = BlockScores({"angular3": [0.1, 0.5, 0.5, 0.5, 0.4, 0.2, 0.3, 0.9]}, 10)
    # starts 0..3 touch protected blocks; start 5 (blocks 5..7) is the best prunable window
    assert s.select("angular3", 3) == [5, 6, 7]
    with pytest.raises(DepthcutError, match="exactly 3"):
        s.select("angular3", 2)


def test_json_round_trip_and_png(tmp_path):
    s = BlockScores({"ppl": [3.0, 1.0, 2.0, 4.0, 5.0, 1.5, 2.5, 9.0], "taylor": [1.0] * 8}, 8, {"seconds": 1.0})
    path = s.save_json(tmp_path / "scores.json")
    data = json.loads(path.read_text())
    assert data["ranking"]["ppl"] == [5, 4]
    back = BlockScores.load_json(path)
    assert back.scores == s.scores and back.num_blocks == 8
    png = s.plot(tmp_path / "scores.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_bad_scores_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DepthcutError, match="not a depthcut scores file"):
        BlockScores.load_json(tmp_path / "x.json")
    with pytest.raises(DepthcutError, match="not found"):
        BlockScores.load_json(tmp_path / "missing.json")


def test_unknown_criterion_is_named():
    with pytest.raises(DepthcutError, match="no 'bi' scores"):
        make([1.0] * 8)["bi"]
    assert math.isfinite(make([1.0] * 8)["ppl"][0])


def test_non_finite_scores_are_saved_as_null_and_rank_last(tmp_path):
    inf, nan = float("inf"), float("nan")
    s = BlockScores({"ppl": [0.0, 0.0, 0.0, 0.0, inf, 2.0, -inf, nan, 1.0, 0.0]}, 10,
                    {"taylor_ppl_estimate_spearman": nan, "iterative": {"ppl_after_each": [inf]}})
    path = s.save_json(tmp_path / "scores.json")
    data = json.loads(path.read_text())
    assert data["scores"]["ppl"][4:8] == [None, 2.0, None, None] and "null" in data
    assert data["meta"] == {"taylor_ppl_estimate_spearman": None, "iterative": {"ppl_after_each": [None]}}
    back = BlockScores.load_json(path)
    assert all(math.isnan(v) for v in back["ppl"][4:8:2]) and back["ppl"][5] == 2.0
    assert back.ranking("ppl") == s.ranking("ppl") == data["ranking"]["ppl"] == [5, 4, 6, 7]
    s.plot(tmp_path / "scores.png")


@pytest.mark.parametrize("scores", [{"ppl": ["a"] * 8}, {"ppl": [1.0] * 7}, {"ppl": [True] * 8}, {"ppl": 3}])
def test_score_values_are_checked_when_read(tmp_path, scores):
    (tmp_path / "s.json").write_text(json.dumps({"num_blocks": 8, "scores": scores}))
    with pytest.raises(DepthcutError, match="not a depthcut scores file"):
        BlockScores.load_json(tmp_path / "s.json")


def test_bad_angular_name_and_negative_protection():
    with pytest.raises(DepthcutError, match="unknown criterion 'angularx'"):
        BlockScores({"angularx": [1.0]}, 4).ranking("angularx")
    with pytest.raises(DepthcutError, match="cannot be negative"):
        Protect(-1, 2)
