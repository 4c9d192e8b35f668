"""Settings: one static spec plus the stacked policies (every r) that share it."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from countdown_jax.policy import DENSE, Budget, SparseSpec, make_policy, stack_policies

# eval's practical mode = the method's deployable rule (generate's --mode names it)
PRACTICAL_MODE = {"cats": "threshold", "m_countdown": "threshold", "d_countdown": "predictor",
                  "dejavu": "predictor"}
EVAL_MODES = ("ideal", "practical", "proxy")


def spec_mode(method: str, mode: str) -> str:
    """eval's --mode -> the SparseSpec mode: ideal; practical = the method's deployable
    rule (PRACTICAL_MODE); proxy = D-COUNTDOWN's low-bit proxy (d_countdown only)."""
    if mode == "ideal":
        return "ideal"
    if mode == "practical":
        if method not in PRACTICAL_MODE:
            raise ValueError(f"{method} has no practical mode (oracle only); use --mode ideal")
        return PRACTICAL_MODE[method]
    if mode == "proxy":
        if method != "d_countdown":
            raise ValueError(f"--mode proxy is D-COUNTDOWN's low-bit proxy: use --method "
                             f"d_countdown, not {method!r}")
        return "proxy"
    raise ValueError(f"unknown eval mode {mode!r}; expected one of {EVAL_MODES}")

@dataclasses.dataclass(frozen=True)
class Setting:
    """A spec plus R policies sharing it (e.g. every r of one method/mode)."""

    name: str                      # e.g. "cats/ideal"
    spec: SparseSpec
    sparsities: tuple[float, ...]  # target r per policy (0 for dense)
    policies: Any = None           # stacked policy pytree, leading axis R (None: dense)

    @property
    def size(self) -> int:
        return len(self.sparsities)


def dense_setting() -> Setting:
    return Setting("dense", DENSE, (0.0,), None)


def ideal_setting(num_layers: int, method: str, sparsities: Sequence[float],
                  mode: str = "ideal") -> Setting:
    pols = [make_policy(num_layers, sparsity=r) for r in sparsities]
    return Setting(f"{method}/{mode}", SparseSpec(method=method, mode=mode),
                   tuple(float(r) for r in sparsities), stack_policies(pols))


def stacked_setting(name: str, spec: SparseSpec, sparsities, policies: Sequence[dict]) -> Setting:
    # one spec serves every r of the stack: no single target r
    spec = dataclasses.replace(spec, target_sparsity=None)
    return Setting(name, spec, tuple(float(r) for r in sparsities), stack_policies(policies))



def settings_for(model, methods, modes, sparsities) -> list[Setting]:
    """Dense plus, per method/mode, one setting stacking every r (practical modes read the
    calibrated thresholds / trained predictors saved with the model), or every ``Budget``
    (the per-layer allocations saved with it; the setting's r are their mean targets)."""
    from countdown_jax import api

    out = [dense_setting()]
    L = model.cfg.num_layers
    budgets = any(isinstance(r, Budget) for r in sparsities)
    for method in methods:
        for mode in modes:
            if mode == "ideal" and not budgets:
                out.append(ideal_setting(L, method, sparsities))
                continue
            practical = spec_mode(method, mode)
            setups = [api.sparsity_setup(model, method, practical, r) for r in sparsities]
            targets = [spec.target_sparsity for spec, _ in setups]
            out.append(stacked_setting(f"{method}/{practical}" + ("/budget" if budgets else ""),
                                       setups[0][0], targets, [pol for _, pol in setups]))
    return out
