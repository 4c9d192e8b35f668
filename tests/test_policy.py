"""Policy construction and validation: bad input fails loudly, naming the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax.ffn import ffn
from countdown_jax.policy import (DENSE, SparseSpec, check_layer, check_policy, make_policy,
                                  stack_policies)

L, D, M, RANK = 4, 6, 10, 3


def _pred(l=L, d=D, m=M, r=RANK, r_u=None):
    return {"V": np.ones((l, d, r), np.float32), "U": np.ones((l, m, r if r_u is None else r_u),
                                                                np.float32)}


def test_make_policy_broadcasts_and_types():
    pol = make_policy(L, sparsity=0.7, threshold=[0.1, 0.2, 0.3, 0.4], predictor=_pred())
    assert set(pol) == {"sparsity", "threshold", "theta", "predictor"}
    for k in ("sparsity", "threshold", "theta"):
        assert pol[k].shape == (L,) and pol[k].dtype == jnp.float32
    np.testing.assert_array_equal(pol["sparsity"], np.float32(0.7))
    np.testing.assert_array_equal(pol["theta"], 0.0)                 # default with a predictor
    assert set(pol["predictor"]) == {"Vt", "U"}                      # V stored transposed
    assert pol["predictor"]["Vt"].shape == (L, RANK, D)
    assert make_policy(L, sparsity=0.0)["sparsity"].tolist() == [0.0] * L
    assert set(make_policy(L, threshold=-np.inf)) == {"threshold"}
    check_policy(SparseSpec("d_countdown", "predictor"), pol, num_layers=L, d=D, m=M)
    check_policy(SparseSpec("cats", "threshold"), pol, num_layers=L)
    check_policy(DENSE, None, num_layers=L)


def test_stack_policies_for_sweeps():
    sweep = stack_policies([make_policy(L, sparsity=r) for r in (0.1, 0.5, 0.9)])
    assert sweep["sparsity"].shape == (3, L)
    with pytest.raises(ValueError, match="at least one"):
        stack_policies([])


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5, np.nan, [0.1, 0.2, 1.0, 0.3]])
def test_sparsity_out_of_range(r):
    with pytest.raises(ValueError, match="sparsity must lie in|contains NaN"):
        make_policy(L, sparsity=r)


@pytest.mark.parametrize("key", ["sparsity", "threshold", "theta"])
@pytest.mark.parametrize("value", [[0.1] * (L + 1), [[0.1] * L], np.zeros((L, 2))])
def test_per_layer_values_must_be_scalar_or_L(key, value):
    with pytest.raises(ValueError, match=rf"policy '{key}' must be a scalar or have shape \[L\]"):
        make_policy(L, **{key: value})


@pytest.mark.parametrize("pred,match", [
    (_pred(l=L + 1), r"predictor 'V' must have shape \[L=4"),
    ({"V": np.ones((L, D, RANK)), "U": np.ones((L, M))}, r"predictor 'U' must have shape"),
    (_pred(r_u=RANK + 1), "predictor ranks differ"),
    ({"V": np.ones((L, D, RANK))}, "keys 'V'"),
    ({"V": np.ones((L, D, RANK), np.int32), "U": np.ones((L, M, RANK), np.int32)},
     "floating point"),
])
def test_bad_predictor(pred, match):
    with pytest.raises(ValueError, match=match):
        make_policy(L, predictor=pred)


def test_predictor_stored_transposed():
    """make_policy takes the paper's V [L, d, rank] and stores Vt [L, rank, d]; a policy's
    own predictor is accepted again as is; a layer slice in the old form is refused."""
    rng = np.random.default_rng(0)
    pred = {"V": rng.standard_normal((L, D, RANK)).astype(np.float32),
            "U": rng.standard_normal((L, M, RANK)).astype(np.float32)}
    pol = make_policy(L, predictor=pred)
    np.testing.assert_array_equal(pol["predictor"]["Vt"], np.swapaxes(pred["V"], 1, 2))
    again = make_policy(L, predictor=pol["predictor"])
    np.testing.assert_array_equal(again["predictor"]["Vt"], pol["predictor"]["Vt"])
    with pytest.raises(ValueError, match=r"predictor 'Vt' must have shape \[L=4, rank, d\]"):
        make_policy(L, predictor={"Vt": pred["V"][0], "U": pred["U"]})
    spec = SparseSpec("d_countdown", "predictor")
    old = {"theta": np.float32(0), "predictor": {"V": pred["V"][0], "U": pred["U"][0]}}
    with pytest.raises(ValueError, match="keys 'Vt' and 'U'"):
        check_layer(spec, old, d=D, m=M)


def test_bad_num_layers():
    for n in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_layers"):
            make_policy(n, sparsity=0.5)


@pytest.mark.parametrize("kw,match", [
    (dict(method="nope"), "unknown sparsity method 'nope'"),
    (dict(method="cats", mode="oracle"), "unknown sparsity mode 'oracle'"),
    (dict(method="cats", implementation="cuda"), "unknown implementation 'cuda'"),
    (dict(method="s_countdown", mode="threshold"), "'s_countdown' does not support mode 'threshold'"),
    (dict(method="s_countdown", mode="predictor"), "'s_countdown' does not support mode 'predictor'"),
    (dict(method="cats", mode="predictor"), "'cats' does not support mode 'predictor'"),
    (dict(method="m_countdown", mode="predictor"), "does not support mode 'predictor'"),
    (dict(method="cats", capacity=0), "capacity must be a positive int"),
    (dict(method="cats", capacity=2.5), "capacity must be a positive int"),
])
def test_spec_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SparseSpec(**kw)


def _mlp():
    rng = np.random.default_rng(0)
    return {k: jnp.asarray(rng.standard_normal((M, D)), jnp.float32) for k in ("gate", "up", "down")}


def _slice(pol, i=0):
    return jax.tree.map(lambda a: a[i], pol)


def test_ffn_policy_errors():
    mlp, x = _mlp(), jnp.ones((2, D), jnp.float32)
    pred_spec = SparseSpec("d_countdown", "predictor")
    with pytest.raises(ValueError, match="needs a trained predictor"):
        ffn(mlp, x, act="silu", spec=pred_spec, policy=_slice(make_policy(L, theta=0.0)))
    with pytest.raises(ValueError, match="needs a trained predictor"):
        ffn(mlp, x, act="silu", spec=SparseSpec("dejavu", "predictor", "xla"),
            policy=_slice(make_policy(L, sparsity=0.5)))
    with pytest.raises(ValueError, match="got None"):
        ffn(mlp, x, act="silu", spec=SparseSpec("cats", "ideal"), policy=None)
    with pytest.raises(ValueError, match=r"needs \['threshold'\]"):
        ffn(mlp, x, act="silu", spec=SparseSpec("cats", "threshold"),
            policy=_slice(make_policy(L, sparsity=0.5)))
    with pytest.raises(ValueError, match="for one layer must be a scalar"):   # whole [L] policy
        ffn(mlp, x, act="silu", spec=SparseSpec("cats", "ideal"), policy=make_policy(L, sparsity=0.5))
    with pytest.raises(ValueError, match="expects model width d=7"):
        ffn(mlp, x, act="silu", spec=pred_spec,
            policy=_slice(make_policy(L, predictor=_pred(d=D + 1))))
    with pytest.raises(ValueError, match="expects m=11 neurons"):
        ffn(mlp, x, act="silu", spec=pred_spec,
            policy=_slice(make_policy(L, predictor=_pred(m=M + 1))))
    for r in (1.0, -0.2):            # a hand-built out-of-range r is caught when concrete
        with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
            ffn(mlp, x, act="silu", spec=SparseSpec("cats", "ideal"),
                policy={"sparsity": jnp.float32(r)})
    with pytest.raises(ValueError, match="unsupported MLP activation 'relu'"):
        ffn(mlp, x, act="relu", spec=SparseSpec("cats", "ideal"),
            policy=_slice(make_policy(L, sparsity=0.5)))
    with pytest.raises(ValueError, match="MLP input has width 5"):
        ffn(mlp, jnp.ones((2, D - 1)), act="silu", spec=SparseSpec("cats", "ideal"),
            policy=_slice(make_policy(L, sparsity=0.5)))


def test_check_policy_whole_model():
    with pytest.raises(ValueError, match=r"must have shape \[L\]=\[4\]"):
        check_policy(SparseSpec("cats", "ideal"), {"sparsity": jnp.zeros(3)}, num_layers=L)
    with pytest.raises(ValueError, match="expects m=10 neurons, the MLP has m=12"):
        check_policy(SparseSpec("dejavu", "predictor"), make_policy(L, predictor=_pred()),
                     num_layers=L, d=D, m=12)
    with pytest.raises(ValueError, match="predictor"):
        check_layer(SparseSpec("dejavu", "predictor"), {"theta": jnp.float32(0)}, d=D, m=M)
