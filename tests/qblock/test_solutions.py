"""The solutions JSON (``qblock solve --json``): one writer, one reader, and both consumers agree."""

import json

import pytest

import qblock
from qblock._solutions import SolutionsFileError, read_solutions_file, solutions_payload


def _write(tmp_path, payload):
    path = tmp_path / "sols.json"
    path.write_text(json.dumps(payload))
    return path


def test_round_trip_keeps_rank_order(tmp_path):
    p = qblock.random_problem(10, 3, seed=2)
    ss = qblock.solve(p, "exact", num_solutions=4)
    sols = read_solutions_file(_write(tmp_path, solutions_payload(p, ss)))
    assert sols.num_blocks == 10 and sols.num_remove == 3
    assert sols.removed == [p.removed_blocks(s) for s in ss.samples()]


def test_validate_and_prune_pick_by_rank_not_list_position(tmp_path):
    from qblock.cli.prune import removed_from_solutions
    from qblock.validate.runner import read_solutions

    # written out of order: rank 2 first
    path = _write(tmp_path, {"num_blocks": 6, "num_remove": 2, "solutions": [
        {"rank": 2, "energy": 0.5, "removed": [4, 5]},
        {"rank": 1, "energy": 0.1, "removed": [1, 0]},
    ]})
    m, sets = read_solutions(path)
    assert m == 2 and sets == [[0, 1], [4, 5]]
    assert removed_from_solutions(str(path), 1) == ([0, 1], 6)
    assert removed_from_solutions(str(path), 2) == ([4, 5], 6)


@pytest.mark.parametrize("content, fragment", [
    ("[1, 2]", "no \"solutions\" list"),
    ('{"solutions": [5]}', "no \"solutions\" list"),
    ("\x00\x01binary", "not JSON"),
    ('{"solutions": [{"rank": 1, "removed": [1.5]}]}', "whole block numbers"),
])
def test_foreign_files_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "sols.json"
    path.write_text(content)
    with pytest.raises(SolutionsFileError, match=fragment) as exc:
        read_solutions_file(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(SolutionsFileError, match="not found"):
        read_solutions_file(tmp_path / "missing.json")


def test_a_result_with_an_unknown_gap_is_strict_json():
    import json

    p = qblock.random_problem(8, 2, seed=0)
    ss = qblock.solve(p, "exact", num_solutions=3)
    ss.info.update(gap=float("inf"), bounds=[1.0, float("nan")])  # as a search stopped by its time limit reports
    payload = json.loads(json.dumps(solutions_payload(p, ss), allow_nan=False))
    assert payload["info"]["gap"] is None and payload["info"]["bounds"] == [1.0, None]
