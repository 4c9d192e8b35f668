"""Quality at scale: fit every practical rule on ~1M tokens, score every rule x mode x r on
the full task sets, and place each setting by the FFN bytes it reads (the frontier).

    python -m experiments.quality_frontier --model smollm2 --stage all      # GPU
    python -m experiments.quality_frontier --model smollm2 --quick          # CPU smoke run

Stages (``--stage``; fits are kept in ``--work`` between them; ``all`` = fit, eval):
  fit   fitting text (data.fitting_texts, plus text sampled from the model itself on a
        GPU) -> CATS / M thresholds at every r (the release's mean-k-th rule), D |s|
        thresholds (quantile) for the cascade, |s_hat| thresholds (quantile) of each
        low-bit proxy, D predictors at several ranks trained
        online to the best validation BCE (predictor_online), cascade candidate cut-offs;
        per-layer allocations (budget.py) at every bytes budget of D-ideal (oracle
        bytes), the first proxy and CATS / M thresholds.
  eval  dense + {CATS, M, D} ideal + {CATS, M} threshold + D predictor (per rank) +
        D cascade (per rank) + D proxy (per bit width; proxy.py) + the allocated rules
        on every rc_0shot document, all of LAMBADA and every BoolQ passage not used for
        fitting; summarised with each setting's bytes_share.
  ``--rules allocated`` fits and scores dense and the allocated rules alone (a run that
        adds them to a frontier already measured; merging keeps the other rules' rows).
  tokens  per-token budgets at equal mean bytes (experiments/token_budget.py): top-k vs
        a per-layer threshold vs a threshold with a per-token floor / ceiling.
Results: experiments/results/frontier.csv, frontier_fit.csv, frontier_<model>.png,
budget_<model>.png (kept share by layer), frontier_timing.json, token_budget.csv
(RESULTS.md reads them; experiments/frontier_report.py makes the tables, the plots and
the goal checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import api
from countdown_jax import budget as B
from countdown_jax import calibrate as C
from countdown_jax import data as D
from countdown_jax import evaluate as E
from countdown_jax import predictor as P
from countdown_jax import predictor_online as PO
from countdown_jax.cost import bytes_share
from countdown_jax.generate import Sampling, generate
from countdown_jax.policy import SparseSpec, make_policy
from countdown_jax.proxy import quantize_mlp
from experiments import token_budget
from experiments.frontier_report import kept_share, write_outputs

R_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
TRAIN_R = (0.3, 0.5, 0.7, 0.8, 0.9)
# cascade: final kept share k, candidate share c = min(ratio * k, 0.95)
CASCADE_K = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
CASCADE_RATIO = (1.5, 2.5)
# D-COUNTDOWN's low-bit proxy (proxy.py): (bits, group); group 64 divides both models' d
PROXIES = ((4, 64), (2, 64))
TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa",
         "boolq", "lambada", "boolq_ppl")
# bytes budgets of the allocated rules (those a rule can reach: CATS / M from 1/3 up)
BUDGETS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


@dataclasses.dataclass(frozen=True)
class Scale:
    seq_len: int = 256
    sample_rows: int = 2560          # rows of text sampled from the model (GPU only)
    max_train_rows: int | None = None
    sample_batch: int = 512
    prompt_len: int = 32
    calib_rows: int = 1024           # rows for the threshold statistics
    val_rows: int = 64               # held-out rows: predictor validation, cascade cut-offs
    ranks: tuple[int, ...] = (64, 128, 256)
    batch_rows: int = 16
    max_epochs: float = 4.0
    eval_every: int = 40
    patience: int = 3
    n_docs: int | None = None        # None: every document
    tasks: tuple[str, ...] = TASKS
    max_rows: int = 256
    logit_budget: int = 8 << 30
    compile_threads: int = 12
    calib_batch: int = 32
    r_sweep: tuple[float, ...] = R_SWEEP
    train_r: tuple[float, ...] = TRAIN_R
    cascade_k: tuple[float, ...] = CASCADE_K
    proxies: tuple[tuple[int, int], ...] = PROXIES
    budgets: tuple[float, ...] = BUDGETS
    alloc: tuple[str, ...] | None = None   # allocated rules to fit (alloc_rules' names; None: all)
    alloc_rows: int = 32             # fitting rows the allocation measures on (one batch)
    alloc_seq_len: int | None = None    # their first tokens (None: seq_len)
    alloc_batch: int = 8             # rows per KL batch (float32 log-probs of the vocab)
    alloc_deltas: tuple[float, ...] = B.DELTAS
    alloc_steps: tuple[float, ...] = B.STEPS             # the line search from uniform
    token_kept: tuple[float, ...] = (0.2, 0.3, 0.45)    # the per-token comparison's k
    token_bands: tuple[float, ...] = (1.5, 2.0)         # its floor / ceiling factors


QUICK = Scale(seq_len=64, sample_rows=0, max_train_rows=24, calib_rows=8, val_rows=4, ranks=(8,),
              batch_rows=4, max_epochs=1.0, eval_every=4, patience=2, n_docs=3,
              tasks=("arc_easy", "winogrande", "lambada", "boolq_ppl"), max_rows=8,
              logit_budget=1 << 27, compile_threads=1, calib_batch=4,
              r_sweep=(0.5, 0.9), train_r=(0.5, 0.8), cascade_k=(0.1, 0.3),
              proxies=((4, 8), (2, 8)), budgets=(0.5,), alloc_rows=1, alloc_seq_len=16,
              alloc_batch=1, alloc_deltas=(0.6, 0.0, -0.6), alloc_steps=(1.0,),
              token_kept=(0.3,), token_bands=(2.0,))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- fit ----------------------------------------------------------------------------------
def fitting_rows(model, sc: Scale):
    """(train rows [N, T], val rows [V, T]) of fitting text, split by document; plus rows
    sampled from the model (prompt = a train row's first tokens) when sample_rows > 0."""
    train_t, val_t = D.split_texts(D.fitting_texts(), 0.05, seed=0)
    train, tl = D.pack_tokens(model.tokenizer, train_t, sc.seq_len)
    val, vl = D.pack_tokens(model.tokenizer, val_t, sc.seq_len, max_rows=sc.val_rows)
    train, val = train[tl == sc.seq_len][:sc.max_train_rows], val[vl == sc.seq_len]
    rows = [train]
    if sc.sample_rows:
        rng = np.random.default_rng(1)
        new = sc.seq_len - sc.prompt_len
        for s in range(0, sc.sample_rows, sc.sample_batch):
            pick = rng.choice(len(train), sc.sample_batch)
            prompt = jnp.asarray(train[pick, :sc.prompt_len])
            g = generate(model.params, model.cfg, prompt,
                         jnp.full((sc.sample_batch,), sc.prompt_len, jnp.int32),
                         jax.random.PRNGKey(s), max_new_tokens=new,
                         sampling=Sampling(temperature=1.0, top_p=0.95))
            full = np.concatenate([np.asarray(prompt), np.asarray(g.tokens)], axis=1)
            rows.append(full[np.asarray(g.num_tokens) == new])     # no early stop inside
    return np.concatenate(rows), val


def fit(model, sc: Scale, work: Path, rules: str = "all"):
    params, cfg = model.params, model.cfg
    t0 = time.perf_counter()
    train, val = fitting_rows(model, sc)
    log(f"fitting rows: {train.shape[0]} x {sc.seq_len} = {train.size} tokens "
        f"(val {val.shape[0]} rows); {time.perf_counter() - t0:.0f} s")
    if rules == "allocated":            # the allocations alone (each fits its own taus)
        fits = {}
        rows = fit_allocations(model, sc, train, fits)
        meta = dict(train_tokens=int(train.size), sampled_rows=sc.sample_rows,
                    rules=rules, fit_seconds=time.perf_counter() - t0)
        _save_fits(work, fits, meta)
        return rows, meta
    fits, rows = {}, []
    calib = train[np.random.default_rng(2).permutation(len(train))[:sc.calib_rows]]
    clen = np.full((len(calib),), sc.seq_len, np.int32)
    for method in ("cats", "m_countdown"):
        st = C.collect_stats(params, cfg, calib, clen, method=method, sparsities=sc.r_sweep,
                             forward="ideal", batch_size=sc.calib_batch)
        fits[f"tau_{method}"] = np.stack([st.thresholds(r, "mean_kth") for r in sc.r_sweep])
    st = C.collect_stats(params, cfg, calib, clen, method="d_countdown",
                         sparsities=[1.0 - k for k in sc.cascade_k], forward="dense",
                         batch_size=sc.calib_batch)
    fits["tau_s"] = np.stack([st.thresholds(1.0 - k, "quantile") for k in sc.cascade_k])
    for bits, group in sc.proxies:
        st = C.collect_stats(params, cfg, calib, clen, method="d_countdown",
                             sparsities=sc.r_sweep, forward="dense", batch_size=sc.calib_batch,
                             proxy=quantize_mlp(params["layers"]["mlp"], bits, group))
        fits[f"tau_proxy_{bits}_{group}"] = np.stack([st.thresholds(r, "quantile")
                                                      for r in sc.r_sweep])
    log(f"thresholds: {time.perf_counter() - t0:.0f} s")

    vdata = P.record(params, cfg, val, np.full((len(val),), sc.seq_len, np.int32),
                     method="d_countdown", sparsities=sc.train_r, batch_size=8)
    oc = PO.OnlineConfig(ranks=sc.ranks, batch_rows=sc.batch_rows, max_epochs=sc.max_epochs,
                         eval_every=sc.eval_every, patience=sc.patience)
    preds, hist = PO.train_online(params, cfg, train, vdata, oc=oc)
    log(f"predictors: {hist['steps']} steps, {hist['tokens']} tokens, "
        f"{hist['seconds']:.0f} s, best val BCE {hist['best_val_bce']}")
    shares = sorted({min(q * k, 0.95) for k in sc.cascade_k for q in CASCADE_RATIO})
    fits["cascade_shares"] = np.asarray(shares)
    for k, pred in preds.items():
        fits[f"V_{k}"], fits[f"U_{k}"] = np.asarray(pred["V"]), np.asarray(pred["U"])
        theta_c = PO.theta_for_share(pred, vdata, shares)                  # [R, L, S]
        fits[f"theta_c_{k}"] = theta_c
        met = P.metrics(pred, vdata)
        for i, r in enumerate(sc.train_r):
            for layer in range(cfg.num_layers):
                rows.append(dict(kind="predictor", rank=k, sparsity_target=r, layer=layer,
                                 **{m: float(met[m][i, layer]) for m in
                                    ("precision", "recall", "f1", "realised_sparsity",
                                     "bce")}))
        # the cascade's first stage: recall of the oracle set within the candidates
        for si, c in enumerate(shares):
            i = _nearest(sc.train_r, 1.0 - c)
            mc = P.metrics(pred, vdata, theta=theta_c[:, :, si])
            rows.append(dict(kind="cascade_candidates", rank=k, sparsity_target=sc.train_r[i],
                             layer=-1, candidates=c, recall=float(mc["recall"][i].mean()),
                             precision=float(mc["precision"][i].mean()),
                             realised_sparsity=float(mc["realised_sparsity"][i].mean())))
    save_cascades(model, sc, fits)
    rows += fit_allocations(model, sc, train, fits)
    log(f"allocations: {time.perf_counter() - t0:.0f} s")
    for k, curve in hist["val_bce"].items():
        rows += [dict(kind="val_bce", rank=int(k), step=s, bce=b) for s, b in curve]
    meta = dict(train_tokens=int(train.size), val_tokens=int(val.size),
                sampled_rows=sc.sample_rows, steps=hist["steps"],
                trained_tokens=hist["tokens"], train_seconds=hist["seconds"],
                fit_seconds=time.perf_counter() - t0)
    _save_fits(work, fits, meta)
    return rows, meta


def _save_fits(work: Path, fits, meta):
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "fits.npz", **fits)
    (work / "fits.json").write_text(json.dumps(meta, indent=1))


def save_cascades(model, sc: Scale, fits, ratio: float = 2.5):
    """One cascade per kept share k into the model directory (``api.sparsity_setup`` reads
    cascade/d_countdown/r{1-k}): the smallest rank's predictor, candidates c = ratio * k."""
    from conversion.checkpoint import save_tree

    k_rank = min(sc.ranks)
    shares = list(fits["cascade_shares"])
    for ki, kk in enumerate(sc.cascade_k):
        c = min(ratio * kk, 0.95)
        si, i = shares.index(c), _nearest(sc.train_r, 1.0 - c)
        tree = {"V": fits[f"V_{k_rank}"][i], "U": fits[f"U_{k_rank}"][i],
                "theta": fits[f"theta_c_{k_rank}"][i, :, si], "threshold": fits["tau_s"][ki]}
        save_tree(model.path, api.policy_name("cascade", "d_countdown", round(1.0 - kk, 2)),
                  tree, meta=dict(kept=kk, candidates=c, rank=k_rank,
                                  predictor_r=sc.train_r[i]))


def alloc_rules(sc: Scale):
    """(rule name in the CSVs, budget.Rule) of the allocated variants: D-ideal at oracle
    bytes (the bound), the first proxy, CATS and M thresholds."""
    bits, group = sc.proxies[0]
    rules = (("d_countdown-alloc-ideal", B.Rule("d_countdown", "ideal", oracle=True)),
             (f"d_countdown-alloc-proxy-{bits}bit",
              B.Rule("d_countdown", "proxy", proxy=(bits, group))),
             ("cats-alloc", B.Rule("cats", "threshold")),
             ("m_countdown-alloc", B.Rule("m_countdown", "threshold")))
    return tuple((n, r) for n, r in rules if sc.alloc is None or n in sc.alloc)


def fit_allocations(model, sc: Scale, train, fits):
    """Per rule of ``alloc_rules``: its allocation at every reachable budget on
    ``alloc_rows`` fitting rows (``budget.allocate_budgets``) into ``fits``
    (alloc_<rule>_{budgets,kept,values,levels,loss,base,path_kl}), and per budget and
    layer a fit row (kind "allocation")."""
    params, cfg = model.params, model.cfg
    m, d, L = cfg.d_ff, cfg.d_model, cfg.num_layers
    seq = sc.alloc_seq_len or sc.seq_len
    rows = train[np.random.default_rng(3).permutation(len(train))[:sc.alloc_rows], :seq]
    lens = np.full((len(rows),), seq, np.int32)
    out = []
    for name, rule in alloc_rules(sc):
        a, b = rule.line(m, d)
        budgets = [x for x in sc.budgets if a + b / m <= x < a + b]
        if not budgets:
            continue
        got = B.allocate_budgets(params, cfg, rows, lens, rule, budgets,
                                 deltas=sc.alloc_deltas, steps=sc.alloc_steps,
                                 batch_size=sc.alloc_batch)
        fits.update({f"alloc_{name}_budgets": got.budgets, f"alloc_{name}_kept": got.kept,
                     f"alloc_{name}_values": got.values, f"alloc_{name}_path_kl": got.path_kl,
                     **{f"alloc_{name}_{k}": v for k, v in got.curves.tree().items()}})
        out += [dict(kind="allocation", rule=name, budget=float(x), layer=l,
                     kept=float(got.kept[i, l]), kl_uniform=float(got.path_kl[i, 0]),
                     kl=float(got.path_kl[i, got.chosen[i]]),
                     step=got.steps[got.chosen[i]])
                for i, x in enumerate(got.budgets) for l in range(L)]
    return out


def _nearest(values, x):
    return int(np.argmin([abs(v - x) for v in values]))


# -- eval ---------------------------------------------------------------------------------
def settings(model, sc: Scale, fits, rules: str = "all"):
    """[(Setting, per-policy info dicts)] of every rule (``rules`` "allocated": dense and
    the allocated rules only); info holds rank / candidates."""
    L = model.cfg.num_layers
    out = [(E.dense_setting(), [{}])]
    out += allocated_settings(model, sc, fits)
    if rules == "allocated":
        return out
    for method in ("cats", "m_countdown", "d_countdown"):
        out.append((E.ideal_setting(L, method, sc.r_sweep), [{}] * len(sc.r_sweep)))
    for method in ("cats", "m_countdown"):
        pols = [make_policy(L, threshold=t) for t in fits[f"tau_{method}"]]
        out.append((E.stacked_setting(f"{method}/threshold", SparseSpec(method, "threshold"),
                                      sc.r_sweep, pols), [{}] * len(pols)))
    for bits, group in sc.proxies:
        pr = quantize_mlp(model.params["layers"]["mlp"], bits, group)
        pols = [make_policy(L, threshold=t, proxy=pr) for t in fits[f"tau_proxy_{bits}_{group}"]]
        out.append((E.stacked_setting(f"d_countdown/proxy-{bits}bit",
                                      SparseSpec("d_countdown", "proxy"), sc.r_sweep, pols),
                    [dict(proxy_bits=bits, proxy_group=group)] * len(pols)))
    shares = list(fits["cascade_shares"])
    for k in sc.ranks:
        V, U = fits[f"V_{k}"], fits[f"U_{k}"]
        pols = [make_policy(L, predictor={"V": V[i], "U": U[i]}) for i in range(len(V))]
        out.append((E.stacked_setting(f"d_countdown/predictor-rank{k}",
                                      SparseSpec("d_countdown", "predictor"), sc.train_r, pols),
                    [dict(rank=k)] * len(pols)))
        pols, info, targets = [], [], []
        for ki, kk in enumerate(sc.cascade_k):
            for q in CASCADE_RATIO:
                c = min(q * kk, 0.95)
                si, i = shares.index(c), _nearest(sc.train_r, 1.0 - c)
                pols.append(make_policy(L, predictor={"V": V[i], "U": U[i]},
                                        theta=fits[f"theta_c_{k}"][i, :, si],
                                        threshold=fits["tau_s"][ki]))
                info.append(dict(rank=k, candidates_target=c, predictor_r=sc.train_r[i]))
                targets.append(1.0 - kk)
        out.append((E.stacked_setting(f"d_countdown/cascade-rank{k}",
                                      SparseSpec("d_countdown", "cascade"), targets, pols),
                    info))
    return out


def allocated_settings(model, sc: Scale, fits):
    """[(Setting, info)] of each allocated rule fitted (``fit_allocations``)."""
    out = []
    for name, rule in alloc_rules(sc):
        if f"alloc_{name}_budgets" not in fits:
            continue
        proxy = rule.make_proxy(model.params)
        pols = [make_policy(model.cfg.num_layers, **{rule.key: v}, proxy=proxy)
                for v in fits[f"alloc_{name}_values"]]
        info = {} if rule.proxy is None else dict(proxy_bits=rule.proxy[0],
                                                  proxy_group=rule.proxy[1])
        out.append((E.stacked_setting(name.replace("-", "/", 1), rule.spec,
                                      1.0 - fits[f"alloc_{name}_kept"].mean(axis=1), pols),
                    [info] * len(pols)))
    return out


def candidate_shares(model, setting, held):
    """The cascade's realised candidate share per policy, on held-out evaluation text: its
    first stage alone is the predictor rule at theta (D-predictor forward)."""
    tokens, lengths = held
    spec = SparseSpec("d_countdown", "predictor")
    out = []
    for r in range(setting.size):
        pol = jax.tree.map(lambda a: a[r], setting.policies)
        pol = {k: pol[k] for k in ("theta", "predictor")}
        out.append(1.0 - float(np.mean(C.realised_sparsity(model.params, model.cfg, tokens,
                                                             lengths, spec, pol, 32))))
    return out


def evaluate(model, name, sc: Scale, fits, rules: str = "all"):
    cfg = model.cfg
    t0 = time.perf_counter()
    items, gold = E.build_items(model.tokenizer, sc.tasks, sc.n_docs, ppl_texts=sc.n_docs,
                                lambada=sc.n_docs)
    sets = settings(model, sc, fits, rules)
    n_settings = sum(st.size for st, _ in sets)
    n_sparse = sum(len(it.continuation) - 1 for it in items)
    log(f"{name}: {len(items)} items ({n_sparse} sparse tokens) x {n_settings} settings")
    scores = E.score(model.params, cfg, items, [st for st, _ in sets], max_rows=sc.max_rows,
                     logit_budget=sc.logit_budget, compile_threads=sc.compile_threads,
                     desc=name)
    log(f"{name}: scored in {scores.seconds:.0f} s (compile {scores.compile_seconds:.0f} s)")
    rows = E.summarize(scores, gold, model=name)
    held = C.calibration_rows(model.tokenizer, sc.seq_len, sc.val_rows, held_out=True)
    cands = {st.name: candidate_shares(model, st, held) for st, _ in sets
             if st.spec.mode == "cascade"}
    infos = {st.name: inf for st, inf in sets}
    by_name = {st.name: st for st, _ in sets}
    out = []
    for row in rows:
        st = by_name[row["setting"]]
        r_idx = row["policy_index"]
        extra = dict(infos[st.name][r_idx])
        kept = kept_share(row)
        cand = cands[st.name][r_idx] if st.name in cands else None
        extra["candidates"] = cand
        row["bytes_share"] = bytes_share(st.spec.method, st.spec.mode, kept, m=cfg.d_ff,
                                         d=cfg.d_model, rank=extra.get("rank", 0),
                                         candidates=None if cand is None else max(cand, kept),
                                         proxy=(extra["proxy_bits"], extra["proxy_group"])
                                         if "proxy_bits" in extra else None)
        row["rule"] = _rule(st)
        out.append({**row, **extra})
    tasks = "+".join(sc.tasks) + ("" if rules == "all" else f" ({rules})")
    timing = dict(model=name, tasks=tasks, items=len(items), sparse_tokens=n_sparse, settings=n_settings,
                  seconds=scores.seconds, compile_seconds=scores.compile_seconds,
                  items_x_settings_per_s=len(items) * n_settings / scores.seconds,
                  total_seconds=time.perf_counter() - t0, device=str(jax.devices()[0]))
    return out, timing


def _rule(st):
    if st.spec.is_dense:
        return "dense"
    if "/alloc" in st.name:                       # the allocated rules: alloc_rules' names
        return st.name.replace("/", "-", 1)
    mode = {"ideal": "ideal", "threshold": "practical", "predictor": "practical",
            "cascade": "cascade", "proxy": "proxy"}[st.spec.mode]
    tail = st.name.split("-")[-1]
    return f"{st.spec.method}-{mode}" + (f"-{tail}" if "rank" in tail or "bit" in tail
                                        else "")


def load_model(name: str, dtype: str, work: Path):
    """A model directory given as is; a registry model through a private directory in
    ``work`` whose params / tokenizer link to the shared conversion cache (the fits this
    script saves, e.g. the cascades, stay out of the cache other runs read)."""
    if Path(name).is_dir():
        return api.load(name)
    from conversion.registry_models import converted
    src, dst = converted(name, dtype), work / "model"
    dst.mkdir(parents=True, exist_ok=True)
    for part in ("params", "tokenizer"):
        if not (dst / part).exists():
            (dst / part).symlink_to(src / part)
    (dst / "config.json").write_text((src / "config.json").read_text())
    return api.load(dst)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | a converted dir")
    ap.add_argument("--name", default=None, help="model name in the CSVs (default --model)")
    ap.add_argument("--stage", choices=("fit", "eval", "tokens", "all"), default="all",
                    help="all = fit, then eval (tokens runs alone)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny sizes)")
    ap.add_argument("--dtype", default="float32", help="dtype of a registry conversion")
    ap.add_argument("--work", default=None, help="where fits are kept (default out/<name>)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--tasks", nargs="+", default=None, choices=TASKS,
                    help="evaluate these tasks only (default: all; results of other tasks "
                         "already in frontier.csv are kept)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None,
                    help="predictor ranks (default 64 128 256)")
    ap.add_argument("--max-epochs", type=float, default=None,
                    help="predictor training epochs at most (default 4; early stopping)")
    ap.add_argument("--rules", choices=("all", "allocated"), default="all",
                    help="allocated: fit and score dense and the allocated rules only (their "
                         "rows replace those rules' rows on merging; the others are kept)")
    ap.add_argument("--budgets", type=float, nargs="+", default=None,
                    help="bytes budgets of the allocated rules (default 0.25 ... 0.7)")
    ap.add_argument("--alloc", nargs="+", default=None, choices=[n for n, _ in alloc_rules(Scale())],
                    help="allocated rules to fit (default: all four)")
    ap.add_argument("--sample-rows", type=int, default=None,
                    help="fitting rows sampled from the model on a GPU (default 2560)")
    ap.add_argument("--compile-threads", type=int, default=None,
                    help="threads compiling the scorer's programs (default 12)")
    ap.add_argument("--logit-budget-gib", type=float, default=None,
                    help="float32 logits per scoring batch (default 8; less for runs "
                         "that share a GPU)")
    args = ap.parse_args(argv)
    sc = QUICK if args.quick else Scale()
    if args.tasks:
        sc = dataclasses.replace(sc, tasks=tuple(args.tasks))
    for key in ("ranks", "max_epochs", "compile_threads", "sample_rows", "budgets", "alloc"):
        if getattr(args, key) is not None:
            value = getattr(args, key)
            sc = dataclasses.replace(sc, **{key: tuple(value) if isinstance(value, list)
                                            else value})
    if args.logit_budget_gib is not None:
        sc = dataclasses.replace(sc, logit_budget=int(args.logit_budget_gib * (1 << 30)))
    name = args.name or Path(args.model).name
    work = Path(args.work or f"out/frontier-{name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, args.dtype, work)
    log(f"{name}: {model.cfg.num_layers} layers, d={model.cfg.d_model}, m={model.cfg.d_ff}, "
        f"device {jax.devices()[0]}")
    fit_rows = None
    if args.stage in ("fit", "all"):
        fit_rows, meta = fit(model, sc, work, args.rules)
        log(f"fit: {meta}")
    rows = timing = None
    if args.stage in ("eval", "all"):
        fits = dict(np.load(work / "fits.npz", allow_pickle=False))
        rows, timing = evaluate(model, name, sc, fits, args.rules)
    if args.stage == "tokens":
        run_tokens(model, name, sc, out)
        return
    write_outputs(out, name, fit_rows=fit_rows, rows=rows, timing=timing)


def run_tokens(model, name: str, sc: Scale, out: Path):
    """The per-token comparison (experiments/token_budget.py) on fitting rows."""
    t0 = time.perf_counter()
    train, _ = fitting_rows(model, dataclasses.replace(sc, sample_rows=0))
    rows = train[np.random.default_rng(4).permutation(len(train))[:sc.alloc_rows],
                 :sc.alloc_seq_len or sc.seq_len]
    tasks = tuple(t for t in sc.tasks if t != "hellaswag")
    res = token_budget.run(model, name, rows, kept=sc.token_kept, bands=sc.token_bands,
                           proxy=sc.proxies[0],
                           text=dict(tasks=tasks, n_docs=sc.n_docs, max_rows=sc.max_rows,
                                     held_rows=sc.val_rows, seq_len=sc.seq_len))
    token_budget.write(out, name, res)
    log(f"{name}: per-token budgets in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
