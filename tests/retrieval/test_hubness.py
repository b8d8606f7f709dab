import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.retrieval import csls_penalty, csls_similarity


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _naive(q, g, ref, k):
    q, g, ref = (F.normalize(t, dim=1) for t in (q, g, ref))
    out = torch.empty(len(q), len(g), dtype=q.dtype)
    for j in range(len(g)):
        sims = sorted((float(g[j] @ ref[m]) for m in range(len(ref))), reverse=True)[:k]
        r = sum(sims) / len(sims)
        for i in range(len(q)):
            out[i, j] = 2 * float(q[i] @ g[j]) - r
    return out


@pytest.mark.parametrize("k", [1, 3, 50])
def test_against_naive(k):
    q, g, ref = _rand(7, 5, seed=0), _rand(9, 5, seed=1), _rand(11, 5, seed=2)
    torch.testing.assert_close(csls_similarity(q, g, ref, k), _naive(q, g, ref, k))


def test_blocks_equal_one_block(monkeypatch):
    import fewsight.retrieval.hubness as hubness

    g, ref = _rand(37, 4, seed=3), _rand(13, 4, seed=4)
    whole = csls_penalty(g, ref, 5)
    monkeypatch.setattr(hubness, "_BLOCK_ELEMENTS", 13 * 3)
    torch.testing.assert_close(csls_penalty(g, ref, 5), whole)


def test_same_ranking_as_the_full_formula():
    # Conneau et al.'s score also subtracts r_Q(q), the query's own mean similarity to the gallery:
    # constant per query, so rankings are unchanged.
    q, g = _rand(6, 8, seed=5), _rand(10, 8, seed=6)
    qn, gn = F.normalize(q, dim=1), F.normalize(g, dim=1)
    r_q = (qn @ gn.T).topk(4, dim=1).values.mean(1)
    full = 2 * qn @ gn.T - csls_penalty(g, q, 4)[None, :] - r_q[:, None]
    assert torch.equal(csls_similarity(q, g, q, 4).argsort(1), full.argsort(1))


def test_hub_stops_winning():
    # Queries share a common component h; the gallery item h itself is then every query's nearest
    # neighbour under cosine. CSLS, with the queries' domain as reference, gives each query its own item.
    g = torch.Generator().manual_seed(0)
    h = torch.zeros(1, 64)
    h[0, 0] = 1.0
    u = torch.randn(20, 64, generator=g)
    u[:, 0] = 0
    u = F.normalize(u, dim=1)
    queries = F.normalize(h + 0.9 * u + 0.05 * torch.randn(20, 64, generator=g), dim=1)
    gallery = torch.cat([F.normalize(u + 0.05 * torch.randn(20, 64, generator=g), dim=1), h])
    plain = (queries @ gallery.T).argmax(1)
    assert bool((plain == 20).all())
    reference = F.normalize(h + 0.9 * F.normalize(torch.randn(50, 64, generator=g), dim=1), dim=1)
    for ref in (queries, reference):
        assert torch.equal(csls_similarity(queries, gallery, ref, k=5).argmax(1), torch.arange(20))


def test_dtypes_and_empty():
    q32, g16 = _rand(3, 4, dtype=torch.float32), _rand(5, 4, seed=1, dtype=torch.float16)
    assert csls_similarity(q32, g16, q32).dtype == torch.float32
    assert csls_penalty(torch.zeros(0, 4), q32).shape == (0,)
    assert csls_similarity(torch.zeros(0, 4), g16.float(), q32).shape == (0, 5)


def test_errors():
    q, g = _rand(3, 4), _rand(5, 4)
    with pytest.raises(InvalidArgumentError, match="k"):
        csls_penalty(g, q, 0)
    with pytest.raises(InvalidArgumentError, match="reference"):
        csls_penalty(g, q[:0])
    with pytest.raises(ShapeError, match="reference"):
        csls_penalty(g, _rand(3, 5))
    with pytest.raises(ShapeError, match="queries"):
        csls_similarity(_rand(3, 5), g, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_follows_the_device():
    q, g = _rand(3, 4).cuda(), _rand(5, 4).cuda()
    assert csls_similarity(q, g, q).is_cuda
