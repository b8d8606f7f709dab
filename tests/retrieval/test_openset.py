"""Open-set AUROC and FPR@TPR: naive loops, torchmetrics, pytorch-ood (sign conventions), ties."""

from __future__ import annotations

import math

import pytest
import torch

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError
from fewsight.retrieval import auroc, fpr_at_tpr
from tests._helpers import MaxNumel

# ----------------------------------------------------------------------------- references


def ref_auroc(known, unknown):
    total = 0.0
    for a in known.tolist():
        for b in unknown.tolist():
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(known) * len(unknown))


def ref_fpr(known, unknown, tpr):
    """Scan thresholds from high to low; the first accepting >= tpr of the knowns (score >= t)."""
    if tpr == 0:
        return 0.0
    n = len(known)
    for t in sorted(set(known.tolist()), reverse=True):
        if sum(1 for a in known.tolist() if a >= t) / n >= tpr:
            return sum(1 for b in unknown.tolist() if b >= t) / len(unknown)
    raise AssertionError("unreachable")


def scores(n, m, seed, tied=False):
    gen = torch.Generator().manual_seed(seed)
    if tied:
        return torch.randint(0, 6, (n,), generator=gen).float(), torch.randint(0, 5, (m,), generator=gen).float()
    return torch.randn(n, generator=gen) + 1.0, torch.randn(m, generator=gen)


CASES = [(50, 40, 0, False), (37, 91, 1, True), (1, 1, 2, True), (100, 3, 3, True), (20, 20, 4, False)]


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("n, m, seed, tied", CASES)
def test_auroc_matches_naive_loop(n, m, seed, tied):
    k, u = scores(n, m, seed, tied)
    assert auroc(k, u) == pytest.approx(ref_auroc(k, u), abs=1e-12)


@pytest.mark.parametrize("tpr", [0.0, 0.07, 0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("n, m, seed, tied", CASES)
def test_fpr_matches_naive_loop(n, m, seed, tied, tpr):
    k, u = scores(n, m, seed, tied)
    assert fpr_at_tpr(k, u, tpr=tpr) == pytest.approx(ref_fpr(k, u, tpr), abs=1e-12)


def test_float_rounding_of_the_accepted_count():
    # 0.07 * 100 = 7.000000000000001: exactly 7 accepted knowns reach TPR 0.07.
    known = torch.arange(100.0)
    unknown = torch.tensor([92.5, 93.0])
    assert fpr_at_tpr(known, unknown, tpr=0.07) == 0.5  # t = 93 (7th highest); 93 >= t, 92.5 < t


@pytest.mark.parametrize("n, m, seed, tied", CASES[:4])
def test_auroc_matches_torchmetrics(n, m, seed, tied):
    from torchmetrics.functional.classification import binary_auroc

    k, u = scores(n, m, seed, tied)
    preds = torch.cat([k, u])
    target = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(m, dtype=torch.long)])
    assert auroc(k, u) == pytest.approx(float(binary_auroc(preds.double(), target)), abs=1e-6)


@pytest.mark.parametrize("n, m, seed, tied", CASES)
def test_matches_pytorch_ood(n, m, seed, tied):
    # pytorch-ood: larger outlier score = more OOD, labels < 0 = OOD = its positive class.
    from pytorch_ood.metrics import OODMetrics

    k, u = scores(n, m, seed, tied)
    # Natural mapping: outlier score = -known-ness, unknowns are OOD. AUROC is the same quantity.
    natural = OODMetrics()
    natural.update(torch.cat([-k, -u]), torch.cat([torch.zeros(n, dtype=torch.long), -torch.ones(m, dtype=torch.long)]))
    assert auroc(k, u) == pytest.approx(float(natural.compute()["AUROC"]), abs=1e-12)
    # FPR@TPR has OOD as positives there; ours has knowns as positives: swap roles to compare.
    for tpr in (0.5, 0.9, 0.95):
        swapped = OODMetrics(fpr_at=tpr)
        known_as_ood = torch.cat([-torch.ones(n, dtype=torch.long), torch.zeros(m, dtype=torch.long)])
        swapped.update(torch.cat([k, u]), known_as_ood)
        out = swapped.compute()
        assert auroc(k, u) == pytest.approx(float(out["AUROC"]), abs=1e-12)
        assert fpr_at_tpr(k, u, tpr=tpr) == pytest.approx(float(out[f"FPR{tpr * 100:g}TPR"]), abs=1e-12)


def test_sklearn_roc_convention():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    k, u = scores(60, 45, 5, tied=True)
    y = torch.cat([torch.ones(60), torch.zeros(45)]).numpy()
    s = torch.cat([k, u]).numpy()
    fpr, tpr, _ = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    first = int((tpr >= 0.95).nonzero()[0][0])
    assert fpr_at_tpr(k, u, 0.95) == pytest.approx(float(fpr[first]))
    assert auroc(k, u) == pytest.approx(float(sklearn_metrics.roc_auc_score(y, s)))


# ----------------------------------------------------------------------------- properties and edges


def test_extremes_and_symmetry():
    k, u = scores(30, 30, 6)
    assert auroc(k + 100, u) == 1.0
    assert auroc(k - 100, u) == 0.0
    assert auroc(torch.zeros(5), torch.zeros(7)) == 0.5
    assert auroc(k, u) == pytest.approx(1 - auroc(u, k))
    assert fpr_at_tpr(k + 100, u) == 0.0
    assert fpr_at_tpr(k - 100, u) == 1.0
    inf = torch.tensor([math.inf, -math.inf, 0.0])
    assert auroc(inf, torch.tensor([0.0])) == 0.5


def test_dtypes():
    k, u = scores(40, 30, 7)
    ref = auroc(k, u)
    assert auroc(k.double(), u) == ref
    assert auroc(k.half(), u.half()) == auroc(k.half().float(), u.half().float())
    assert auroc(k.bfloat16(), u.bfloat16()) == auroc(k.bfloat16().float(), u.bfloat16().float())
    ki, ui = torch.randint(0, 9, (20,)), torch.randint(0, 9, (25,))
    assert auroc(ki, ui) == pytest.approx(ref_auroc(ki, ui))
    assert fpr_at_tpr(ki, ui, 0.8) == pytest.approx(ref_fpr(ki, ui, 0.8))
    assert fpr_at_tpr(k.half(), u.half(), 0.9) == fpr_at_tpr(k.half().float(), u.half().float(), 0.9)


def test_empty_gives_nan():
    e = torch.empty(0)
    x = torch.randn(4)
    for a, b in ((e, x), (x, e), (e, e)):
        assert math.isnan(auroc(a, b))
        assert math.isnan(fpr_at_tpr(a, b))


def test_large_inputs_are_linear_in_memory():
    k, u = scores(20_000, 30_000, 8)
    with MaxNumel() as mode:
        a = auroc(k, u)
        fpr_at_tpr(k, u)
    assert mode.max_numel <= 30_000
    # Two unit-variance Gaussians one apart: AUROC = Φ(1/√2) ≈ 0.760.
    assert a == pytest.approx(0.7602, abs=0.01)


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda k, u: auroc(k[None], u), ShapeError, "known_scores"),
        (lambda k, u: auroc(k, u[None]), ShapeError, "unknown_scores"),
        (lambda k, u: auroc(k > 0, u), DTypeError, "known_scores"),
        (lambda k, u: auroc(k, u * math.nan), InvalidArgumentError, "unknown_scores"),
        (lambda k, u: fpr_at_tpr(k, u, tpr=1.5), InvalidArgumentError, "tpr"),
        (lambda k, u: fpr_at_tpr(k, u, tpr=-0.1), InvalidArgumentError, "tpr"),
        (lambda k, u: fpr_at_tpr(k, u, tpr="0.9"), InvalidArgumentError, "tpr"),
        (lambda k, u: auroc(k.tolist(), u), DTypeError, "known_scores"),
    ],
)
def test_errors_name_the_argument(call, exc, text):
    k, u = scores(5, 5, 9)
    with pytest.raises(exc, match=text):
        call(k, u)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    k, u = scores(500, 700, 10, tied=True)
    assert auroc(k.cuda(), u.cuda()) == auroc(k, u)
    assert fpr_at_tpr(k.cuda(), u.cuda(), 0.95) == fpr_at_tpr(k, u, 0.95)
