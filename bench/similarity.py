"""How far an image set is from another, in the model's own vision features.

The score is the unbiased MMD^2 with an RBF kernel (bandwidth: median pairwise distance over both sets
pooled in equal shares, so the distance is symmetric and does not move with the sets' sizes: A to B is B to A, and distances from different sets are on one
scale; a bandwidth from the reference alone made docvqa->shapes-shift 1.24 but shapes-shift->docvqa 0.64), with a label-permutation p-value and a bootstrap interval; KID (the same estimator with
the cubic polynomial kernel) is a second column and a cross-validated two-sample classifier's AUC the
easy-to-read one (0.5: indistinguishable, 1.0: trivially separable). Not FID: at a few hundred images
its small-sample bias swamps real shifts, while these unbiased estimators sit at ~0 for identical
distributions.

    python run_bench.py --similarity --data ~/my-images            # vs pretraining and every suite
    python run_bench.py --similarity --data shapes,docvqa --out results/similarity
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.errors import BenchError

PERMUTATIONS = 500
BOOTSTRAPS = 500
ALPHA = 0.05


def _rbf(z: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(z, z).pow(2) / (2 * bandwidth**2))


def _cubic(z: torch.Tensor) -> torch.Tensor:
    return (z @ z.T / z.shape[1] + 1) ** 3


def median_distance(y: np.ndarray) -> float:
    d = torch.pdist(torch.as_tensor(y, dtype=torch.float64))
    return float(d.median()) if len(d) else 1.0


def pooled_bandwidth(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Median pairwise distance over both sets pooled in equal shares (the larger one subsampled to the
    smaller's size, at a fixed seed): symmetric in ``x`` and ``y``, and not tilted toward whichever set
    has more rows, so 200 images against 1000 give the distance 1000 against 1000 do."""
    k = min(len(x), len(y))
    rng = np.random.default_rng(seed)
    pick = lambda a: a if len(a) == k else a[np.sort(rng.choice(len(a), k, replace=False))]  # noqa: E731
    return median_distance(np.concatenate([pick(x), pick(y)]))


def _mmd2_from_kernel(k: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 for each column of the 0/1 group matrix ``a`` (N x P) over the pooled kernel ``k``."""
    b = 1 - a
    ka = k @ a
    kb = k @ b
    diag = torch.diagonal(k).unsqueeze(1)
    m, n = a.sum(0), b.sum(0)
    xx = (a * ka).sum(0) - (a * diag).sum(0)
    yy = (b * kb).sum(0) - (b * diag).sum(0)
    xy = (a * kb).sum(0)
    return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2 * xy / (m * n)


def _bootstrap(k: torch.Tensor, m: int, resamples: int, gen: torch.Generator) -> torch.Tensor:
    """MMD^2 on resampled sets; pairs of copies of one original image are left out of the within-set
    sums, so the unbiased estimator stays unbiased under resampling."""
    n = k.shape[0] - m
    cx = torch.zeros(m, resamples, dtype=k.dtype)
    cy = torch.zeros(n, resamples, dtype=k.dtype)
    cx.scatter_add_(0, torch.randint(m, (m, resamples), generator=gen), torch.ones(m, resamples, dtype=k.dtype))
    cy.scatter_add_(0, torch.randint(n, (n, resamples), generator=gen), torch.ones(n, resamples, dtype=k.dtype))
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    dx, dy = torch.diagonal(kxx).unsqueeze(1), torch.diagonal(kyy).unsqueeze(1)
    xx = ((cx * (kxx @ cx)).sum(0) - (cx.pow(2) * dx).sum(0)) / (m * m - cx.pow(2).sum(0))
    yy = ((cy * (kyy @ cy)).sum(0) - (cy.pow(2) * dy).sum(0)) / (n * n - cy.pow(2).sum(0))
    xy = (cx * (kxy @ cy)).sum(0) / (m * n)
    return xx + yy - 2 * xy


def _pooled(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Both samples stacked, and the 0/1 column marking ``x``'s rows."""
    z = torch.as_tensor(np.concatenate([x, y]), dtype=torch.float64)
    a = torch.zeros(len(z), 1, dtype=torch.float64)
    a[: len(x)] = 1
    return z, a


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased RBF-kernel MMD^2 between samples ``x`` and ``y`` (rows are feature vectors); the
    bandwidth defaults to :func:`pooled_bandwidth` (symmetric in ``x`` and ``y``)."""
    z, a = _pooled(x, y)
    return float(_mmd2_from_kernel(_rbf(z, bandwidth or pooled_bandwidth(x, y)), a)[0])


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Kernel inception distance: unbiased MMD^2 with the kernel (x.y/d + 1)^3."""
    z, a = _pooled(x, y)
    return float(_mmd2_from_kernel(_cubic(z), a)[0])


def classifier_auc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Cross-validated (5-fold) ROC AUC of a logistic regression telling ``x`` from ``y``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.concatenate([x, y])
    labels = np.r_[np.ones(len(x)), np.zeros(len(y))]
    folds = StratifiedKFold(n_splits=min(5, len(x), len(y)), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    scores = cross_val_predict(model, features, labels, cv=folds, method="decision_function")
    return float(roc_auc_score(labels, scores))


@dataclass(frozen=True)
class Comparison:
    mmd2: float
    low: float
    high: float
    p_value: float
    kid: float
    auc: float
    early_mmd2: float
    n_data: int
    n_reference: int

    @property
    def same(self) -> bool:
        return self.p_value >= ALPHA


def compare(data: dict[str, np.ndarray], reference: dict[str, np.ndarray], seed: int = 0,
            permutations: int = PERMUTATIONS, bootstraps: int = BOOTSTRAPS) -> Comparison:
    """``data`` vs ``reference`` (feature dicts from :func:`bench.features.embed`)."""
    c = compare_samples(data["final"], reference["final"], seed, permutations, bootstraps)
    return replace(c, early_mmd2=mmd2(data["early"], reference["early"]))


def compare_samples(x: np.ndarray, y: np.ndarray, seed: int = 0, permutations: int = PERMUTATIONS,
                 bootstraps: int = BOOTSTRAPS) -> Comparison:
    """Two samples of feature rows, no early layer: the final-layer part of :func:`compare`, and the task axis's
    comparison of text embeddings (:func:`bench.features.embed_texts`)."""
    if len(x) < 4 or len(y) < 4:
        raise BenchError(f"similarity needs at least 4 items per set (got {len(x)} and {len(y)}); add images")
    z, observed = _pooled(x, y)
    k = _rbf(z, pooled_bandwidth(x, y))  # pooled: symmetric, one scale for every pair
    m, total = len(x), len(z)
    gen = torch.Generator().manual_seed(seed)
    stat = float(_mmd2_from_kernel(k, observed)[0])
    null = []
    for start in range(0, permutations, 100):
        cols = min(100, permutations - start)
        order = torch.argsort(torch.rand(total, cols, generator=gen), dim=0)
        null.append(_mmd2_from_kernel(k, (order < m).to(torch.float64)))
    null = torch.cat(null)
    p_value = (1 + int((null >= stat).sum())) / (1 + permutations)
    boot = _bootstrap(k, m, bootstraps, gen)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Comparison(mmd2=stat, low=low, high=high, p_value=p_value, kid=kid(x, y), auc=classifier_auc(x, y, seed),
                      early_mmd2=math.nan, n_data=len(x), n_reference=len(y))


# ----------------------------------------------------------------------------------------------- CLI


def run(args) -> int:
    """``--similarity``: every ``--data`` set against the pretraining reference and every suite."""
    from rich.console import Console

    from bench import features, suites
    from bench.models import get_adapter
    from bench.report import frame_table
    from bench.spec import resolve_device
    from bench.store import atomic_write_text

    console = Console(stderr=True)
    if not args.data:
        raise BenchError("--similarity needs --data: a folder of images, a dataset, or a suite name (comma-separated for several)")
    n = args.samples
    if n < 10:
        raise BenchError(f"--samples must be at least 10 (got {n}); 500 is a good default")
    out = Path(args.out) if args.out else Path("results") / "runs" / "similarity"
    targets = [t.strip() for t in args.data.split(",") if t.strip()]
    data_sets = [features.resolve(t, n) for t in targets]  # validates every path before the model loads
    adapter = get_adapter(args.model, args.trust_remote_code)
    adapter.load(resolve_device(args.device))
    reference = features.reference_images(adapter, args.reference, n)
    if reference is None:
        console.print(f"[yellow]{adapter.display_name()} has no pretraining sample; pass --reference DIR (images like its "
                      "pretraining data) for the distance from pretraining. Reporting suite-to-suite similarity only.[/yellow]")
    suite_sets = [features.suite_images(name, n) for name in suites.available()]
    table = similarity_table(adapter, data_sets, reference, suite_sets, console)
    tasks = task_table(adapter, targets, data_sets, n) if reference is not None else None
    text = markdown(table, adapter, reference, data_sets, suite_sets, args, tasks)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "similarity.csv", table.to_csv(index=False, float_format="%.5g"))
    atomic_write_text(out / "similarity.md", text)
    shown = table[["data", "against", "mmd2", "low", "high", "p_value", "kid", "auc", "verdict"]]
    console.print(frame_table(shown, title=f"Similarity in {adapter.display_name()}'s vision features"))
    console.print(f"wrote {out / 'similarity.md'} and similarity.csv")
    return 0


def similarity_table(adapter, data_sets, reference, suite_sets, console=None) -> pd.DataFrame:
    """One row per (data set, reference or suite)."""
    from bench import features

    against = ([reference] if reference is not None else []) + list(suite_sets)
    cache: dict[str, dict] = {}

    def feats(s):
        if s.key not in cache:
            cache[s.key] = features.embed(adapter, s)
        return cache[s.key]

    rows = []
    for data in data_sets:
        for ref in against:
            if ref.key == data.key:
                continue
            c = compare(feats(data), feats(ref))
            rows.append({"data": data.name, "against": ref.name, "mmd2": c.mmd2, "low": c.low, "high": c.high,
                         "p_value": c.p_value, "kid": c.kid, "auc": c.auc, "early_mmd2": c.early_mmd2,
                         "n_data": c.n_data, "n_against": c.n_reference, "verdict": "same" if c.same else "different"})
            if console is not None:
                console.print(f"[dim]{data.name} vs {ref.name}: MMD^2 {c.mmd2:.4f} (p={c.p_value:.3f})[/dim]")
    return pd.DataFrame(rows)


def task_table(adapter, targets: list[str], data_sets, n: int) -> pd.DataFrame | None:
    """The second axis: each data set's questions and answers against the pretraining generator's, in the
    LLM's token embeddings (bench.features.embed_texts); None when the model has no such sample."""
    from bench import features

    reference = features.reference_texts(adapter, n)
    if reference is None:
        return None
    ref = features.embed_texts(adapter, reference)
    rows = []
    for target, data in zip(targets, data_sets):
        texts = features.data_texts(target, n)
        if texts is None:
            rows.append({"data": data.name, "task_mmd2": math.nan, "low": math.nan, "high": math.nan, "p_value": math.nan,
                         "verdict": "no questions (images only)"})
            continue
        c = compare_samples(features.embed_texts(adapter, texts), ref)
        rows.append({"data": data.name, "task_mmd2": c.mmd2, "low": c.low, "high": c.high, "p_value": c.p_value,
                     "verdict": "same" if c.same else "different"})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, adapter, reference, data_sets, suite_sets, args, tasks: pd.DataFrame | None = None) -> str:
    lines = [f"# Image similarity in {adapter.display_name()}'s vision features", ""]
    lines += [f"Command: `python run_bench.py --similarity --data {args.data}"
              + (f" --reference {args.reference}" if args.reference else "") + f" --samples {args.samples}`", ""]
    lines += ["MMD^2: unbiased, RBF kernel on L2-normalised mean-pooled final-layer features (bandwidth = median "
              "distance over both sets pooled in equal shares, so A to B equals B to A); [low, high] = 95% bootstrap interval; p = permutation "
              f"p-value ({PERMUTATIONS} permutations); KID = the same with the cubic kernel; AUC = 5-fold logistic "
              "two-sample classifier (0.5 = indistinguishable); early = MMD^2 of an early layer. "
              "\"same\" = p >= 0.05.", ""]
    sets = ([reference] if reference is not None else []) + list(data_sets) + list(suite_sets)
    lines += ["Image sets:", ""] + [f"- **{s.name}**: {s.origin}" for s in dict((s.key, s) for s in sets).values()] + [""]
    if reference is not None:
        part = table[table.against == "pretraining"]
        lines += ["## Distance from pretraining", "", _md(part.drop(columns=["against"])), ""]
    if tasks is not None:
        lines += ["## Task distance from pretraining", "", "The questions with their first answers as mean token embeddings in "
                  "the model's LLM, against the pretraining generator's (the recommender's second axis: images cannot see "
                  "new questions). Same estimator and bandwidth rule as above.", "",
                  _md(tasks.rename(columns={"task_mmd2": "mmd2"})), ""]
    pivot = table[table.against != "pretraining"].pivot_table(index="data", columns="against", values="mmd2", sort=False)
    if len(pivot):
        lines += ["## Distance from each suite (MMD^2)", "", pivot.to_markdown(floatfmt=".4f"), ""]
    return "\n".join(lines)


def _md(frame: pd.DataFrame) -> str:
    formats = {"mmd2": "{:.4f}", "low": "{:.4f}", "high": "{:.4f}", "p_value": "{:.3f}", "kid": "{:.4f}",
               "auc": "{:.3f}", "early_mmd2": "{:.4f}"}
    shown = frame.copy()
    for col, fmt in formats.items():
        if col in shown:
            shown[col] = shown[col].map(fmt.format)
    return shown.to_markdown(index=False)
