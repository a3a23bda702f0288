"""The shared boundary checks name the argument, the expectation and what was received."""

import pytest
import torch

from mmkernels import _validate as v


def test_stacked_tensor_is_returned_without_copy():
    x = torch.randn(5, 3, 4).transpose(0, 1)  # [M=3, B=5, C=4], non-contiguous
    out = v.as_stacked(x, "logits", ndim=2)
    assert out.data_ptr() == x.data_ptr() and out.stride() == x.stride()


def test_list_is_stacked_modality_first():
    xs = [torch.full((2, 3), float(i)) for i in range(3)]
    out = v.as_stacked(xs, "logits", ndim=2)
    assert out.shape == (3, 2, 3) and torch.equal(out[2], xs[2])


@pytest.mark.parametrize("m", [1, 9])
def test_number_of_modalities_is_bounded(m):
    with pytest.raises(ValueError, match=rf"len\(logits\).*between 2 and 8, got {m}"):
        v.as_stacked([torch.zeros(2, 3)] * m, "logits")


def test_mismatched_batch_names_the_modality():
    with pytest.raises(ValueError, match=r"logits\[1\] has batch size 3 but logits\[0\] has 2"):
        v.as_stacked([torch.zeros(2, 4), torch.zeros(3, 4)], "logits")


def test_integer_features_are_rejected():
    with pytest.raises(TypeError, match=r"feats\[0\] must be a floating tensor.*torch.int64"):
        v.check_same([torch.zeros(2, dtype=torch.long), torch.zeros(2)], "feats")


def test_wrong_dims_and_types():
    with pytest.raises(ValueError, match=r"with 3 dims, got shape \(2, 3\)"):
        v.as_stacked(torch.zeros(2, 3), "logits", ndim=2)
    with pytest.raises(TypeError, match="list of M tensors or one stacked tensor, got int"):
        v.as_stacked(3, "logits")


def test_labels_checks():
    with pytest.raises(TypeError, match=r"labels must be an integer.*torch.float32"):
        v.check_labels(torch.zeros(4), 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"labels must have shape \[4\].*got shape \(3,\)"):
        v.check_labels(torch.zeros(3, dtype=torch.long), 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="labels is on cpu but the logits are on meta"):
        v.check_labels(torch.zeros(4, dtype=torch.long), 4, torch.device("meta"))


def test_scalar_checks():
    with pytest.raises(ValueError, match="alpha must be a non-negative number, got -1"):
        v.check_nonneg(-1, "alpha")
    with pytest.raises(ValueError, match=r"rescale must be one of \('official', 'none'\), got 'x'"):
        v.check_choice("x", ("official", "none"), "rescale")
