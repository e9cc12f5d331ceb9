"""Cutting a split's items into spans of whole batches for eval.num_workers, and joining the outputs."""

import numpy as np

from ray_unlearn.eval.passes import batch_spans, cut, merge_outputs


def test_spans_are_whole_batches_in_order_and_cover_every_item():
    # 10 items in batches of 4: batches [0,4) [4,8) [8,10); 2 workers take 2 and 1 of them
    assert batch_spans(10, 4, 2) == [(0, 8), (8, 10)]
    assert batch_spans(10, 4, 3) == [(0, 4), (4, 8), (8, 10)]
    assert batch_spans(10, 4, 8) == [(0, 4), (4, 8), (8, 10)]  # no worker gets nothing to do
    assert batch_spans(12, 4, 2) == [(0, 8), (8, 12)]
    assert batch_spans(3, 4, 2) == [(0, 3)]
    assert batch_spans(0, 4, 2) == []
    assert batch_spans(7, 1, 1) == [(0, 7)]


def test_outputs_join_in_span_order():
    parts = [{"nll": np.array([1.0, 2.0]), "text": ["a", "b"], "z": [None, None]},
             {"nll": np.array([3.0]), "text": ["c"], "z": [None]}]
    joined = merge_outputs(parts)
    np.testing.assert_array_equal(joined["nll"], [1.0, 2.0, 3.0])
    assert joined["text"] == ["a", "b", "c"] and joined["z"] == [None] * 3
    assert merge_outputs([["x"], ["y", "z"]]) == ["x", "y", "z"]
    assert cut(["k1", "k2", "k3"], [(0, 2), (2, 3)]) == [["k1", "k2"], ["k3"]]
    assert cut(None, [(0, 2), (2, 3)]) == [None, None]
