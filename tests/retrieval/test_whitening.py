import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.retrieval import Whitening, learn_whitening, recall_at_k


def _data(n_classes=6, per_class=5, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g, dtype=torch.float64)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = centres[labels] + 0.3 * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    domains = torch.arange(per_class).repeat(n_classes) % 2
    return x, labels, domains


def _naive_cs(x, labels, domains=None):
    x = F.normalize(x, dim=1)
    d = x.shape[1]
    cs, count = torch.zeros(d, d, dtype=torch.float64), 0
    for c in labels.unique().tolist():
        rows = [i for i in range(len(x)) if labels[i] == c]
        if domains is None:
            m = sum(x[i] for i in rows) / len(rows)
            for i in rows:
                cs += torch.outer(x[i] - m, x[i] - m)
                count += 1
        else:
            for i in rows:
                for j in rows:
                    if domains[i] == 0 and domains[j] == 1:
                        cs += torch.outer(x[i] - x[j], x[i] - x[j])
                        count += 1
    return cs / count


@pytest.mark.parametrize("pairs", [False, True])
def test_against_naive_scatter(pairs):
    x, labels, domains = _data()
    w = learn_whitening(x, labels, domains=domains if pairs else None)
    cs = _naive_cs(x, labels, domains if pairs else None)
    p = w.projection
    # Within-class scatter is whitened: P C_S Pᵀ = I, and PᵀP = C_S⁻¹ whatever the eigenvector signs.
    torch.testing.assert_close(p @ cs @ p.T, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(p.T @ p, torch.linalg.inv(cs))
    # Class means rotated onto their principal axes: diagonal scatter, decreasing variance.
    xn = F.normalize(x, dim=1)
    means = torch.stack([xn[labels == c].mean(0) for c in range(6)])
    z = (means - xn.mean(0)) @ p.T
    scatter = z.T @ z / 6
    torch.testing.assert_close(scatter, torch.diag(scatter.diagonal()), atol=1e-10, rtol=0)
    assert bool((scatter.diagonal()[:-1] >= scatter.diagonal()[1:] - 1e-12).all())


def test_apply_and_dim():
    x, labels, _ = _data()
    w = learn_whitening(x.float(), labels)
    assert isinstance(w, Whitening) and w.projection.dtype == torch.float64
    out = w(x.float())
    assert out.dtype == torch.float32 and out.shape == (30, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(30))
    expected = F.normalize((F.normalize(x, dim=1) - w.mean) @ w.projection.T, dim=1)
    torch.testing.assert_close(w(x), expected)
    w3 = learn_whitening(x, labels, dim=3)
    assert w3.projection.shape == (3, 5)
    torch.testing.assert_close(w3.projection, w.projection[:3])


def test_labels_need_not_be_contiguous():
    x, labels, _ = _data()
    w = learn_whitening(x, labels)
    w2 = learn_whitening(x, labels * 7 + 3)
    torch.testing.assert_close(w2.projection.T @ w2.projection, w.projection.T @ w.projection)


def test_shrink_one_is_a_rotation_of_the_scaled_identity():
    x, labels, _ = _data()
    w = learn_whitening(x, labels, shrink=1.0)
    pp = w.projection @ w.projection.T
    torch.testing.assert_close(pp, pp[0, 0] * torch.eye(5, dtype=torch.float64))


def test_whitening_removes_a_nuisance_direction():
    # Class identity lives in dims 1-7; dim 0 is a large shared nuisance (a "style") that dominates the
    # cosine. Fitted on training classes, whitening makes new classes retrievable across the nuisance.
    g = torch.Generator().manual_seed(0)

    def sample(n_classes):
        centres = torch.zeros(n_classes, 8)
        centres[:, 1:] = torch.randn(n_classes, 7, generator=g)
        labels = torch.arange(n_classes).repeat_interleave(2)
        style = torch.tensor([-1.0, 1.0]).repeat(n_classes)
        x = centres[labels] + 0.1 * torch.randn(len(labels), 8, generator=g)
        x[:, 0] += 4.0 * style
        return x, labels, (style > 0).long()

    xt, lt, dt = sample(200)
    xn, ln, dn = sample(100)
    q, ql, gal, gl = xn[dn == 0], ln[dn == 0], xn[dn == 1], ln[dn == 1]
    plain = recall_at_k(q, ql, gal, gl, k=1)[1]
    for domains in (None, dt):
        w = learn_whitening(xt, lt, domains=domains)
        whitened = recall_at_k(w(q), ql, w(gal), gl, k=1)[1]
        assert whitened > plain + 0.2 and whitened > 0.9


def test_errors():
    x, labels, domains = _data()
    with pytest.raises(InvalidArgumentError, match="at least 2 classes"):
        learn_whitening(x, torch.zeros(30, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="shrink"):
        learn_whitening(x, labels, shrink=1.5)
    with pytest.raises(InvalidArgumentError, match="dim"):
        learn_whitening(x, labels, dim=6)
    with pytest.raises(ShapeError, match="labels"):
        learn_whitening(x, labels[:-1])
    with pytest.raises(InvalidArgumentError, match="labels"):
        learn_whitening(x, labels - 1)
    with pytest.raises(InvalidArgumentError, match="domains"):
        learn_whitening(x, labels, domains=domains + 1)
    with pytest.raises(InvalidArgumentError, match="both domains"):
        learn_whitening(x, labels, domains=torch.zeros(30, dtype=torch.long))
    w = learn_whitening(x, labels)
    with pytest.raises(ShapeError, match="fitted D"):
        w(x[:, :4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_follows_the_device():
    x, labels, domains = _data()
    w = learn_whitening(x.cuda(), labels.cuda(), domains=domains.cuda())
    assert w.projection.is_cuda and w(x.cuda().float()).is_cuda
