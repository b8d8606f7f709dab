"""Adversarial tests for fewsight.geometry.pad_targets (list of dicts or padded [B, M, 5])."""

from __future__ import annotations

import pytest
import torch

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError
from fewsight.geometry import PaddedTargets, match, pad_targets


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}


def test_ragged_list():
    targets = [
        target([[0, 0, 4, 4], [1, 1, 5, 5]], [2, 0]),
        target([], []),
        target([[2, 2, 6, 6], [3, 3, 9, 9], [0, 0, 1, 1]], [1, 1, 3]),
    ]
    t = pad_targets(targets)
    assert isinstance(t, PaddedTargets)
    assert t.boxes.shape == (3, 3, 4) and t.labels.shape == (3, 3) and t.valid.shape == (3, 3)
    assert t.boxes.dtype == torch.float32 and t.labels.dtype == torch.long and t.valid.dtype == torch.bool
    assert t.labels.tolist() == [[2, 0, -1], [-1, -1, -1], [1, 1, 3]]
    assert t.valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    for b, tt in enumerate(targets):
        n = len(tt["labels"])
        assert torch.equal(t.boxes[b, :n], tt["boxes"])
        assert torch.equal(t.labels[b, :n], tt["labels"])
    assert (t.boxes[~t.valid] == 0).all()  # padding is finite zeros


def test_all_empty_and_single_image_and_empty_list():
    t = pad_targets([target([], []), target([], [])])
    assert t.boxes.shape == (2, 0, 4) and t.labels.shape == (2, 0) and t.valid.shape == (2, 0)
    m = match(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), t.boxes, t.valid)  # feeds straight into match
    assert m.indices.tolist() == [[-1], [-1]]
    t = pad_targets([target([[0, 0, 4, 4]], [7])])
    assert t.boxes.tolist() == [[[0.0, 0.0, 4.0, 4.0]]] and t.labels.tolist() == [[7]] and t.valid.tolist() == [[True]]
    t = pad_targets([])
    assert t.boxes.shape == (0, 0, 4) and t.labels.shape == (0, 0)
    t = pad_targets((target([[0, 0, 4, 4]], [1]),))  # a tuple is a sequence too
    assert t.labels.tolist() == [[1]]


def test_list_dtype_and_int_labels_and_negative_labels():
    targets = [
        {"boxes": torch.tensor([[0, 0, 4, 4], [1, 1, 2, 2]], dtype=torch.int64), "labels": torch.tensor([1, -1], dtype=torch.int32)},
        {"boxes": torch.tensor([[0.5, 0.5, 4.5, 4.5]], dtype=torch.float64), "labels": torch.tensor([-3])},
    ]
    t = pad_targets(targets, dtype=torch.float64)
    assert t.boxes.dtype == torch.float64 and t.labels.dtype == torch.long
    assert t.labels.tolist() == [[1, -1], [-1, -1]]  # negative labels become invalid -1 rows
    assert t.valid.tolist() == [[True, False], [False, False]]
    assert t.boxes[1, 0].tolist() == [0.5, 0.5, 4.5, 4.5]


def test_padded_tensor_form():
    x = torch.tensor(
        [
            [[0, 0, 4, 4, 2], [1, 1, 5, 5, 0], [9e9, float("nan"), -1, 3, -1]],
            [[-1, -1, -1, -1, -1], [-1, -1, -1, -1, -1], [-1, -1, -1, -1, -1]],
            [[2, 2, 6, 6, 1.0000001], [0, 0, 1, 1, 2.9999], [3, 3, 9, 9, -1]],
        ],
        dtype=torch.float32,
    )
    t = pad_targets(x)
    assert t.boxes.shape == (3, 3, 4)
    assert t.labels.tolist() == [[2, 0, -1], [-1, -1, -1], [1, 3, -1]]
    assert t.valid.tolist() == [[True, True, False], [False, False, False], [True, True, False]]
    assert torch.equal(t.boxes[t.valid], x[..., :4][t.valid])
    # padded rows with garbage never match anything
    m = match(torch.tensor([[0.0, 0.0, 4.0, 4.0], [3.0, 3.0, 9.0, 9.0]]), t.boxes, t.valid)
    assert m.indices.tolist() == [[0, -1], [-1, -1], [-1, -1]]  # row 2 of image 2 equals anchor 1 but has label -1


def test_list_and_tensor_forms_agree():
    targets = [target([[0, 0, 4, 4], [1, 1, 5, 5]], [2, 0]), target([[2, 2, 6, 6]], [1])]
    x = torch.tensor([[[0, 0, 4, 4, 2], [1, 1, 5, 5, 0]], [[2, 2, 6, 6, 1], [0, 0, 0, 0, -1]]], dtype=torch.float32)
    a, b = pad_targets(targets), pad_targets(x)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.valid, b.valid)
    assert torch.equal(a.boxes[a.valid], b.boxes[b.valid])


def test_tensor_form_dtype_conversion():
    x = torch.tensor([[[0, 0, 4, 4, 1]]], dtype=torch.float64)
    t = pad_targets(x)
    assert t.boxes.dtype == torch.float32
    assert pad_targets(x, dtype=torch.float64).boxes.dtype == torch.float64
    assert pad_targets(x.half()).labels.tolist() == [[1]]


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ShapeError) as e:
        pad_targets(torch.zeros(2, 3, 4))
    assert "targets" in str(e.value) and "(2, 3, 4)" in str(e.value) and "5]" in str(e.value)
    with pytest.raises(ShapeError):
        pad_targets(torch.zeros(3, 5))
    with pytest.raises(DTypeError, match="targets"):
        pad_targets(torch.zeros(1, 2, 5, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="targets"):
        pad_targets({"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(InvalidArgumentError, match="targets"):
        pad_targets(42)
    with pytest.raises(InvalidArgumentError) as e:
        pad_targets([target([[0, 0, 1, 1]], [0]), {"boxes": torch.zeros(1, 4)}])
    assert "targets[1]" in str(e.value)
    with pytest.raises(ShapeError) as e:
        pad_targets([{"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.long)}])
    assert "targets[0]['boxes']" in str(e.value) and "(2, 5)" in str(e.value)
    with pytest.raises(ShapeError) as e:
        pad_targets([{"boxes": torch.zeros(4), "labels": torch.zeros(1, dtype=torch.long)}])
    assert "(4,)" in str(e.value)
    with pytest.raises(ShapeError) as e:
        pad_targets([{"boxes": torch.zeros(2, 4), "labels": torch.zeros(3, dtype=torch.long)}])
    assert "targets[0]['labels']" in str(e.value) and "(3,)" in str(e.value)
    with pytest.raises(DTypeError) as e:
        pad_targets([{"boxes": torch.zeros(2, 4), "labels": torch.zeros(2)}])
    assert "targets[0]['labels']" in str(e.value) and "float32" in str(e.value)
    for err in (ShapeError, DTypeError, InvalidArgumentError):
        assert issubclass(err, (ValueError, TypeError))


def test_non_tensor_boxes_in_list_are_converted_or_raise_fewsight_error():
    # a plain Python list of boxes is converted at the boundary (integer boxes promoted to float) ...
    t = pad_targets([{"boxes": [[0, 0, 1, 1]], "labels": [0]}])
    assert t.boxes.dtype == torch.float32 and t.boxes.tolist() == [[[0.0, 0.0, 1.0, 1.0]]] and t.labels.tolist() == [[0]]
    # ... and what cannot become a tensor is a typed error naming the argument
    with pytest.raises((DTypeError, ShapeError, InvalidArgumentError)) as e:
        pad_targets([{"boxes": "0 0 1 1", "labels": torch.tensor([0])}])
    assert "targets[0]['boxes']" in str(e.value)
