import math

import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.models.crops import crop_boxes


def _bilinear(img, y, x):
    c, h, w = img.shape
    if y < -1 or y > h or x < -1 or x > w:
        return torch.zeros(c, dtype=img.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x1]
            + ly * (1 - lx) * img[:, y1, x0] + ly * lx * img[:, y1, x1])


def _naive(img, box, out_h, out_w):
    """roi_align(aligned=True, sampling_ratio adaptive) by explicit loops."""
    x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
    bh, bw = (y1 - y0) / out_h, (x1 - x0) / out_w
    ry, rx = math.ceil((y1 - y0) / out_h), math.ceil((x1 - x0) / out_w)
    out = torch.zeros(img.shape[0], out_h, out_w, dtype=img.dtype)
    for i in range(out_h):
        for j in range(out_w):
            acc = torch.zeros(img.shape[0], dtype=img.dtype)
            for a in range(ry):
                for b in range(rx):
                    acc += _bilinear(img, y0 + i * bh + (a + 0.5) * bh / ry, x0 + j * bw + (b + 0.5) * bw / rx)
            out[:, i, j] = acc / (ry * rx)
    return out


def test_against_naive_up_and_down():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 12, 15, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[2.0, 3.0, 7.0, 6.0], [0.0, 0.0, 15.0, 12.0], [1.3, 2.7, 13.9, 11.2], [-1.0, -2.0, 4.0, 5.0]],
                         dtype=torch.float64)
    for size in (6, (3, 4)):
        out = crop_boxes(img[None], [boxes], size)
        h, w = (size, size) if isinstance(size, int) else size
        for k, box in enumerate(boxes):
            torch.testing.assert_close(out[k], _naive(img, box, h, w))


def test_whole_image_upsampling_equals_interpolate():
    img = torch.rand(1, 3, 10, 14, dtype=torch.float64)
    out = crop_boxes(img, [torch.tensor([[0.0, 0.0, 14.0, 10.0]], dtype=torch.float64)], (40, 56))
    torch.testing.assert_close(out, F.interpolate(img, size=(40, 56), mode="bilinear", align_corners=False))


def test_list_of_sizes_equals_one_call_per_image_and_keeps_order():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 20, 30, generator=g), torch.rand(3, 16, 16, generator=g), torch.rand(3, 20, 30, generator=g)]
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 9.0], [5.0, 2.0, 25.0, 18.0]]), torch.zeros(0, 4),
             torch.tensor([[0.0, 0.0, 16.0, 16.0]])]
    out = crop_boxes(images, boxes, 8)
    assert out.shape == (3, 3, 8, 8)
    one = [crop_boxes([im], [b], 8) for im, b in zip(images, boxes)]
    torch.testing.assert_close(out, torch.cat(one))
    torch.testing.assert_close(crop_boxes(torch.stack([images[0], images[2]]), [boxes[0], boxes[2]], 8),
                               torch.cat([one[0], one[2]]))


def test_empty_and_dtypes():
    img = torch.rand(2, 3, 8, 8)
    assert crop_boxes(img, [torch.zeros(0, 4), torch.zeros(0, 4)], 4).shape == (0, 3, 4, 4)
    half = crop_boxes(img.half(), [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)], 4)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), crop_boxes(img, [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)], 4),
                               atol=2e-3, rtol=0)


def test_gradcheck():
    img = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    boxes = [torch.tensor([[0.5, 1.0, 5.5, 4.0], [2.0, 2.0, 7.0, 6.0]], dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda x: crop_boxes(x, boxes, 3), (img,))


def test_errors():
    img = torch.rand(1, 3, 8, 8)
    with pytest.raises(ShapeError, match="one Tensor"):
        crop_boxes(img, [], 4)
    with pytest.raises(InvalidArgumentError, match="size"):
        crop_boxes(img, [torch.zeros(1, 4)], 0)
    with pytest.raises(ShapeError, match="boxes"):
        crop_boxes(img, [torch.zeros(1, 5)], 4)
    with pytest.raises(ShapeError, match="channel"):
        crop_boxes([img[0], img[0, :1]], [torch.zeros(1, 4), torch.zeros(1, 4)], 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_follows_the_device():
    img = torch.rand(1, 3, 8, 8, device="cuda")
    assert crop_boxes(img, [torch.tensor([[0.0, 0.0, 4.0, 4.0]], device="cuda")], 4).is_cuda
