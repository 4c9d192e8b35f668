"""The byte model of each rule (cost.bytes_share) against counts written out by hand."""

import pytest

from countdown_jax.cost import bytes_share, predictor_share

M, D = 1536, 576


def _rows(*counts):
    """Weight elements read / the dense FFN's 3 m d, counted per matrix."""
    return sum(counts) / (3 * M * D)


def test_threshold_rules_read_one_dense_matrix_and_kept_rows():
    for method in ("cats", "m_countdown"):
        for mode in ("ideal", "threshold", "topk"):
            k = 0.25
            want = _rows(M * D, k * M * D, k * M * D)
            assert bytes_share(method, mode, k, m=M, d=D) == pytest.approx(want)
    assert bytes_share("cats", "threshold", 1.0, m=M, d=D) == pytest.approx(1.0)
    assert bytes_share("m_countdown", "ideal", 0.0, m=M, d=D) == pytest.approx(1 / 3)


def test_predictor_and_cascade_count_the_predictor():
    rank, k, c = 64, 0.2, 0.5
    pred = rank * D + M * rank
    assert predictor_share(rank, M, D) == pytest.approx(_rows(pred))
    assert bytes_share("d_countdown", "predictor", k, m=M, d=D, rank=rank) == pytest.approx(
        _rows(pred, 3 * k * M * D))
    got = bytes_share("d_countdown", "cascade", k, m=M, d=D, rank=rank, candidates=c)
    assert got == pytest.approx(_rows(pred, c * M * D, c * M * D, k * M * D))
    # the cascade costs more than the predictor rule at equal kept share, less than dense
    assert bytes_share("d_countdown", "predictor", k, m=M, d=D, rank=rank) < got < 1.0


def test_oracle_modes_pay_the_dense_coefficients_unless_drawn_as_bound():
    k = 0.1
    assert bytes_share("d_countdown", "ideal", k, m=M, d=D) == pytest.approx(
        _rows(M * D, M * D, k * M * D))
    assert bytes_share("d_countdown", "ideal", k, m=M, d=D, oracle=True) == k
    assert bytes_share("dense", "ideal", 0.3, m=M, d=D) == 1.0


@pytest.mark.parametrize("kw", [dict(method="d_countdown", mode="predictor", kept=0.2),
                                dict(method="d_countdown", mode="cascade", kept=0.2, rank=8),
                                dict(method="d_countdown", mode="cascade", kept=0.5, rank=8,
                                     candidates=0.3),
                                dict(method="cats", mode="threshold", kept=1.5),
                                dict(method="nope", mode="ideal", kept=0.1)])
def test_bad_input_is_refused(kw):
    with pytest.raises(ValueError):
        bytes_share(kw.pop("method"), kw.pop("mode"), kw.pop("kept"), m=M, d=D, **kw)
