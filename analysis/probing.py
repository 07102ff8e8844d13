"""Probe what layers, channels and neurons encode about face attributes (seed 003): PLS projection + QDA.

For every (layer, attribute): a balanced sample, a PLS projection of the whole layer fitted with the
attribute as target, a QDA classifier on the projection, VIP scores ranking neurons and channels, and
probes restricted to the top channels and neurons. Tensors in, dataclasses out; plots are functions of
results. Works on CPU and CUDA.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from analysis.layers import capture, resolve_layer
from facelens.attributes import ATTRIBUTE_INDEX, resolve_attributes

# --------------------------------------------------------------------------------------------------
# PLS (PLS1, NIPALS with implicit deflation)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnBlocks:
    """Features too large to hold, as column blocks: `make()` yields (n, m_b) tensors covering the
    columns left to right, identical on every call. Each fit pass reads every block once."""

    make: Callable[[], Iterable[Tensor]]


@dataclass(frozen=True)
class RowBlocks:
    """Features too large to hold, as row blocks: `make()` yields (n_b, m) tensors covering the samples
    in order, identical on every call (e.g. re-running a model over batches of images)."""

    make: Callable[[], Iterable[Tensor]]


Features = Tensor | ColumnBlocks | RowBlocks

# Block size for float64 fits and for transform: a block stays in cache while it is converted and used.
_CPU_BLOCK_BYTES = 4 << 20


class PLS:
    """PLS regression of one target (PLS1), equal to scikit-learn's `PLSRegression(scale=False)`.

    Same conventions as scikit-learn: X and y are centred, each weight vector has unit norm and its
    largest-magnitude entry positive, `x_scores_ = X_k w_k`, `x_loadings_ = X_k^T t / t^T t`,
    `y_loadings_ = y_k^T t / t^T t` (equal to `y_weights_`), `x_rotations_ = W (P^T W)^-1`.

    X is never deflated, copied or centred. With orthogonal scores X_k^T y_k = X_c^T y_k, so component k
    needs two matrix-vector products, g_k = X_c^T y_k and X_c g_k (the score before orthogonalisation);
    the loadings follow from consecutive g's. The weights are recomputed from the deflated target y_k
    every time instead of being downdated (g_k - p_k t^T y), which keeps float32 products accurate: the
    error no longer doubles with each component. Means, scores, y_k (re-orthogonalised against the
    scores) and every accumulation across blocks are float64.

    precision: "float32" (matrix-vector products in float32 straight on X: no copy of X at all;
    relative errors about 2e-6 for every component on 2048 x 8192 activations, VIP correlation
    1 - 1e-11), "float64" (products in float64 on blocks converted in cache; 1e-12, about 4x slower on
    CPU), or "auto" (default): float64 up to 2^20 matrix entries, where it costs little, float32 above.

    `fit` accepts a tensor (n, m), `ColumnBlocks` (K + 1 passes) or `RowBlocks` (2K + 1 passes).
    Fitted tensors are float64 on the compute device.
    """

    AUTO_FLOAT64_MAX_ENTRIES = 1 << 20
    PARALLEL_MIN_ENTRIES = 1 << 24

    def __init__(self, n_components: int = 8, device: torch.device | str | None = None,
                 block_columns: int | None = None, precision: str = "auto"):
        if not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"PLS: n_components must be a positive integer, got {n_components!r}")
        if block_columns is not None and block_columns < 1:
            raise ValueError(f"PLS: block_columns must be positive, got {block_columns!r}")
        if precision not in ("auto", "float64", "float32"):
            raise ValueError(f"PLS: precision must be 'auto', 'float64' or 'float32', got {precision!r}")
        self.n_components = n_components
        self.precision = precision
        self.device = None if device is None else torch.device(device)
        self.block_columns = block_columns

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, X: Features, y: Tensor) -> PLS:
        y = torch.as_tensor(y).reshape(-1)
        device = self.device or (X.device if isinstance(X, Tensor) else y.device)
        self.device_ = torch.device(device)
        y = y.to(self.device_, torch.float64)
        n = y.numel()
        if n < 2:
            raise ValueError(f"PLS.fit: need at least 2 samples, got {n}")
        self.y_mean_ = y.mean()
        yc = y - self.y_mean_
        self._threads = torch.get_num_threads() if self.device_.type == "cpu" else None
        self._wide = not isinstance(X, Tensor) or X.numel() >= self.PARALLEL_MIN_ENTRIES
        with self._serial():
            self._dispatch(X, yc, n)
            self._finish()
        return self

    @contextlib.contextmanager
    def _serial(self):
        """CPU bookkeeping on vectors runs on one thread: on a busy machine a parallel region over a 1e5
        vector waits milliseconds for its second thread (10 ms instead of 10 us on 2 shared cores), which
        would cost more than the matrix products. `_parallel` restores the threads for the products of
        matrices of PARALLEL_MIN_ENTRIES or more (and for making streamed blocks); smaller fits run
        serially throughout (64 x 16384: 12 ms against 230 ms with 2 threads on a loaded machine)."""
        if self._threads is None:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(self._threads)

    @contextlib.contextmanager
    def _parallel(self):
        if self._threads is None or not self._wide:
            yield
            return
        torch.set_num_threads(self._threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def _dispatch(self, X: Features, yc: Tensor, n: int) -> None:
        if isinstance(X, Tensor):
            if X.dim() != 2 or X.shape[0] != n:
                raise ValueError(f"PLS.fit: X must be (n_samples, n_features) with n_samples={n}, got {tuple(X.shape)}")
            self._dtype = self._resolve_dtype(X.numel())
            if not X.is_floating_point():
                X = X.float()
            X = X.to(self.device_)
            if self._dtype == torch.float32:
                X = X.float()  # no copy of float32 input
            width = self.block_columns or self._default_block(X)
            self._fit_columns(lambda: (X[:, c:c + width] for c in range(0, X.shape[1], width)), yc)
        elif isinstance(X, ColumnBlocks):
            self._dtype = self._resolve_dtype(None)
            self._fit_columns(X.make, yc)
        elif isinstance(X, RowBlocks):
            self._dtype = self._resolve_dtype(None)
            self._fit_rows(X.make, yc)
        else:
            raise TypeError(f"PLS.fit: X must be a Tensor, ColumnBlocks or RowBlocks, got {type(X).__name__}")

    def _resolve_dtype(self, entries: int | None) -> torch.dtype:
        """Working precision of the products; streamed inputs are large by definition."""
        if self.precision == "auto":
            small = entries is not None and entries <= self.AUTO_FLOAT64_MAX_ENTRIES
            return torch.float64 if small else torch.float32
        return torch.float64 if self.precision == "float64" else torch.float32

    def _default_block(self, X: Tensor) -> int:
        """float32: all columns at once (full-width products are the fastest: on 2 cores, 2048 x 49152, a
        matrix-vector product takes 0.04 s, cache-sized column blocks no less); float64: blocks converted
        in cache (2048 x 256 on CPU), never a float64 copy of the whole of X."""
        if self._dtype == torch.float32:
            return X.shape[1]
        budget = _CPU_BLOCK_BYTES if X.device.type == "cpu" else 256 << 20
        return max(16, budget // (X.shape[0] * 8))

    def _blocks(self, make: Callable[[], Iterable[Tensor]], n: int):
        """Column blocks on the compute device, with their row count checked; made with all threads."""
        with self._parallel():
            blocks = iter(make())
        for i in range(1 << 62):
            with self._parallel():
                block = next(blocks, None)
                if block is None:
                    return
                if block.dim() != 2 or block.shape[0] != n:
                    raise ValueError(f"PLS.fit: block {i} has shape {tuple(block.shape)}; column blocks must be "
                                     f"(n={n}, m_b)")
                if not block.is_floating_point():
                    block = block.float()
                block = block.to(self.device_, non_blocking=True)
            yield block

    def _start(self, n: int) -> None:
        K, dev = self.n_components, self.device_
        self._T = torch.zeros(n, K, dtype=torch.float64, device=dev)
        self._tt = torch.zeros(K, dtype=torch.float64, device=dev)
        self._W: list[Tensor] = []
        self._P: list[Tensor] = []
        self._c = torch.zeros(K, dtype=torch.float64, device=dev)
        self._yscores = torch.zeros(n, K, dtype=torch.float64, device=dev)

    def _accept(self, k: int, g: Tensor, a: Tensor, yk: Tensor) -> Tensor:
        """Component k from g = X_c^T y_k (m,) and a = X_c g (n,): sign, norm, score; returns y_{k+1}."""
        norm = g.norm()
        if norm == 0:
            raise ValueError(f"PLS.fit: component {k}: X^T y is zero (the target is constant or unexplained)")
        scale = torch.sign(g[g.abs().argmax()]) / norm
        t = a * scale
        for j in range(k):  # modified Gram-Schmidt: t = X_k w
            t = t - self._T[:, j] * (self._T[:, j] @ t) / self._tt[j]
        tt = t @ t
        self._W.append(g * scale)
        self._T[:, k], self._tt[k] = t, tt
        c = (yk @ t) / tt
        self._c[k] = c
        self._yscores[:, k] = yk / c
        yk = yk - c * t
        for j in range(k + 1):  # keep y_{k+1} orthogonal to every score, so X_c^T y_{k+1} = X_{k+1}^T y_{k+1}
            yk = yk - self._T[:, j] * (self._T[:, j] @ yk) / self._tt[j]
        return yk

    def _fit_columns(self, make: Callable[[], Iterable[Tensor]], yc: Tensor) -> None:
        """Pass k reads each block for X_c^T y_k and X_c g_k: one matrix-vector product each.

        X is not centred: X_c^T v = X^T v - mean * sum(v) and X_c g = X g - mean . g, using the vectors as
        rounded to the working precision. Loadings come from consecutive weights: with orthogonal scores,
        X^T y_{k+1} = X^T y_k - c_k X^T t_k, so p_k = (g_k - g_{k+1}) / (c_k t_k^T t_k). The last pass
        only computes g_K for p_{K-1}."""
        n, K, dt = yc.numel(), self.n_components, self._dtype
        self._start(n)
        means, sizes = [], []
        yk, g_prev = yc, None
        ones = torch.ones(n, dtype=dt, device=self.device_)
        for k in range(K + 1):
            y_work = yk.to(dt)
            y_sum = y_work.double().sum()
            g_parts = []
            a = torch.zeros(n, dtype=torch.float64, device=self.device_)
            lo = 0
            for b, block in enumerate(self._blocks(make, n)):
                if k == 0:
                    sizes.append(block.shape[1])
                elif b >= len(sizes) or block.shape[1] != sizes[b]:
                    raise ValueError(f"PLS.fit: ColumnBlocks changed between passes at block {b}")
                with self._parallel():
                    work = block.to(dt)
                    if k == 0:
                        means.append((ones @ work).double() / n)
                    g = (y_work @ work).double()
                mu = means[b]
                g -= mu * y_sum
                g_parts.append(g)
                if k < K:
                    g_work = g.to(dt)
                    with self._parallel():
                        xg = work @ g_work
                    a += xg.double() - mu @ g_work.double()
                lo += block.shape[1]
            if not sizes:
                raise ValueError("PLS.fit: ColumnBlocks yielded no blocks")
            if k == 0:
                self.x_mean_ = torch.cat(means)
                self._check_rank(n, lo)
            elif lo != sum(sizes):
                raise ValueError(f"PLS.fit: ColumnBlocks changed between passes ({lo} columns, expected {sum(sizes)})")
            g = g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts)
            if g_prev is not None:
                self._P.append((g_prev - g) / (self._c[k - 1] * self._tt[k - 1]))
            if k < K:
                yk = self._accept(k, g, a, yk)
            g_prev = g
        self.n_passes_ = K + 1

    def _fit_rows(self, make: Callable[[], Iterable[Tensor]], yc: Tensor) -> None:
        """Row blocks: pass A gives X_c^T [y_k, t_{k-1}], pass B gives X_c g_k (2K + 1 passes)."""
        n, K, dt = yc.numel(), self.n_components, self._dtype
        self._start(n)

        def rows():
            start = 0
            for i, block in enumerate(make()):
                if block.dim() != 2 or start + block.shape[0] > n:
                    raise ValueError(f"PLS.fit: row block {i} has shape {tuple(block.shape)}; rows exceed n={n}")
                if not block.is_floating_point():
                    block = block.float()
                yield start, block.to(self.device_, non_blocking=True)
                start += block.shape[0]
            if start != n:
                raise ValueError(f"PLS.fit: RowBlocks yielded {start} rows, expected {n}")

        def transposed(vectors: Tensor, centre: bool) -> Tensor:
            total = None
            with self._parallel():  # also for making the blocks (e.g. running a model)
                for lo, block in rows():
                    work = block.to(dt) - mu if centre else block.to(dt)
                    part = (work.T @ vectors[lo:lo + len(block)].to(dt)).double()
                    total = part if total is None else total + part
            return total

        def scores(g: Tensor) -> Tensor:
            out = torch.empty(n, dtype=torch.float64, device=self.device_)
            v = g.to(dt)
            with self._parallel():
                for lo, block in rows():
                    out[lo:lo + len(block)] = ((block.to(dt) - mu) @ v).double()
            return out

        first = transposed(torch.stack([torch.ones_like(yc), yc], 1), centre=False)
        self.x_mean_ = first[:, 0] / n
        self._check_rank(n, len(self.x_mean_))
        mu = self.x_mean_.to(dt)
        g = first[:, 1] - self.x_mean_ * yc.sum()  # X_c^T yc
        yk = self._accept(0, g, scores(g), yc)
        for k in range(1, K + 1):
            vectors = self._T[:, k - 1:k] if k == K else torch.stack([yk, self._T[:, k - 1]], 1)
            r = transposed(vectors, centre=True)
            self._P.append(r[:, -1] / self._tt[k - 1])
            if k < K:
                yk = self._accept(k, r[:, 0], scores(r[:, 0]), yk)
        self.n_passes_ = 2 * K + 1

    def _check_rank(self, n: int, m: int) -> None:
        if self.n_components > min(n, m):
            raise ValueError(f"PLS: n_components={self.n_components} exceeds min(n_samples={n}, n_features={m})")

    def _finish(self) -> None:
        self.x_weights_ = torch.stack(self._W, 1)
        self.x_loadings_ = torch.stack(self._P, 1)
        self.x_scores_ = self._T
        self.y_scores_ = self._yscores
        self.y_weights_ = self._c.reshape(1, -1).clone()
        self.y_loadings_ = self._c.reshape(1, -1).clone()
        self.x_rotations_ = self.x_weights_ @ torch.linalg.pinv(self.x_loadings_.T @ self.x_weights_)
        self.coef_ = (self.x_rotations_ @ self.y_loadings_.T).T
        self.intercept_ = self.y_mean_.reshape(1)
        self.n_features_in_ = self.x_weights_.shape[0]
        self.vip_ = vip_scores(self.x_weights_, self.x_scores_, self.y_loadings_)
        for name in ("_T", "_tt", "_W", "_P", "_c", "_yscores"):
            delattr(self, name)

    # -- using ------------------------------------------------------------------------------------
    def transform(self, X: Features) -> Tensor:
        """Scores (n, n_components) of new samples: (X - mean) @ x_rotations_, float64."""
        if not hasattr(self, "x_rotations_"):
            raise RuntimeError("PLS.transform: call fit first")
        R, mu, dt = self.x_rotations_.to(self._dtype), self.x_mean_.to(self._dtype), self._dtype
        if isinstance(X, Tensor):
            if X.dim() != 2 or X.shape[1] != self.n_features_in_:
                raise ValueError(f"PLS.transform: X must be (n, {self.n_features_in_}), got {tuple(X.shape)}")
            rows, data = max(1, _CPU_BLOCK_BYTES * 8 // (X.shape[1] * 8)), X
            X = RowBlocks(lambda: (data[i:i + rows] for i in range(0, len(data), rows)))
        if isinstance(X, RowBlocks):
            parts = [((b.to(self.device_, dt) - mu) @ R).double() for b in X.make()]
            return torch.cat(parts)
        if isinstance(X, ColumnBlocks):
            out, lo = None, 0
            for b in X.make():
                hi = lo + b.shape[1]
                part = ((b.to(self.device_, dt) - mu[lo:hi]) @ R[lo:hi]).double()
                out = part if out is None else out + part
                lo = hi
            if lo != self.n_features_in_:
                raise ValueError(f"PLS.transform: blocks cover {lo} features, expected {self.n_features_in_}")
            return out
        raise TypeError(f"PLS.transform: X must be a Tensor, ColumnBlocks or RowBlocks, got {type(X).__name__}")

    def predict(self, X: Features) -> Tensor:
        return self.transform(X) @ self.y_loadings_.T.reshape(-1) + self.y_mean_


def vip_scores(x_weights: Tensor, x_scores: Tensor, y_loadings: Tensor) -> Tensor:
    """Variable Importance in Projection (seed 003 eq. 2.4, in its standard normalised form):
    VIP_j = sqrt(m * sum_i SS_i (w_ji / |w_i|)^2 / sum_i SS_i), SS_i = q_i^2 t_i^T t_i.
    The mean of VIP^2 over features is 1, so 'VIP > 1' marks above-average neurons."""
    W = x_weights.double()
    ss = y_loadings.double().reshape(-1) ** 2 * (x_scores.double() ** 2).sum(0)
    w2 = (W / W.norm(dim=0, keepdim=True)) ** 2
    return torch.sqrt(W.shape[0] * (w2 @ ss) / ss.sum())


# --------------------------------------------------------------------------------------------------
# QDA
# --------------------------------------------------------------------------------------------------


class QDA:
    """Quadratic discriminant analysis, equal to scikit-learn's `QuadraticDiscriminantAnalysis`
    (class priors from counts, maximum-likelihood covariances, `reg_param` shrinking the variances
    towards 1). Where scikit-learn refuses a rank-deficient class, variances are floored at 1e-10
    of the class's largest so degenerate probes (e.g. dead neurons) still predict."""

    def __init__(self, reg_param: float = 0.0):
        if not 0.0 <= reg_param <= 1.0:
            raise ValueError(f"QDA: reg_param must be in [0, 1], got {reg_param}")
        self.reg_param = reg_param

    def fit(self, X: Tensor, y: Tensor) -> QDA:
        X = torch.as_tensor(X).double()
        if X.dim() == 1:
            X = X[:, None]
        y = torch.as_tensor(y, device=X.device).reshape(-1)
        if len(y) != len(X):
            raise ValueError(f"QDA.fit: X has {len(X)} rows but y has {len(y)}")
        self.classes_, counts = torch.unique(y, return_counts=True)
        if len(self.classes_) < 2:
            raise ValueError(f"QDA.fit: need at least 2 classes, got {self.classes_.tolist()}")
        if (counts < 2).any():
            raise ValueError(f"QDA.fit: every class needs 2 samples, got counts {counts.tolist()}")
        self.priors_ = counts.double() / len(y)
        means, scalings, rotations = [], [], []
        for cls in self.classes_:
            Xg = X[y == cls]
            mean = Xg.mean(0)
            Xc = Xg - mean
            s, R = torch.linalg.eigh(Xc.T @ Xc / len(Xg))
            s = (1 - self.reg_param) * s + self.reg_param
            s = s.clamp_min(s.max().clamp_min(1e-300) * 1e-10)
            means.append(mean), scalings.append(s), rotations.append(R)
        self.means_ = torch.stack(means)
        self.scalings_ = torch.stack(scalings)
        self.rotations_ = torch.stack(rotations)
        return self

    def decision_function(self, X: Tensor) -> Tensor:
        """Per-class log posterior up to a constant, (n, n_classes)."""
        X = torch.as_tensor(X).double().to(self.means_.device)
        if X.dim() == 1:
            X = X[:, None]
        if X.shape[1] != self.means_.shape[1]:
            raise ValueError(f"QDA: fitted on {self.means_.shape[1]} features, got {X.shape[1]}")
        out = []
        for mean, s, R in zip(self.means_, self.scalings_, self.rotations_):
            z = (X - mean) @ (R * s.rsqrt())
            out.append(-0.5 * ((z * z).sum(1) + s.log().sum()))
        return torch.stack(out, 1) + self.priors_.log()

    def predict(self, X: Tensor) -> Tensor:
        return self.classes_[self.decision_function(X).argmax(1)]

    def score(self, X: Tensor, y: Tensor) -> float:
        y = torch.as_tensor(y).reshape(-1).to(self.classes_.device)
        return (self.predict(X) == y).double().mean().item()


def single_feature_accuracy(X_train: Tensor, y_train: Tensor, X_val: Tensor, y_val: Tensor,
                            chunk: int = 65536) -> Tensor:
    """Validation accuracy of a one-feature QDA on every column at once (binary labels), (m,).
    Equal to fitting `QDA` on each column alone; used to rank and score single neurons."""
    ytr = torch.as_tensor(y_train).reshape(-1).to(X_train.device).bool()
    yva = torch.as_tensor(y_val).reshape(-1).to(X_val.device).bool()
    if ytr.all() or not ytr.any():
        raise ValueError("single_feature_accuracy: y_train needs both classes")
    priors = torch.stack([(~ytr).double().mean(), ytr.double().mean()]).log().to(X_val.device)
    accs = []
    for lo in range(0, X_train.shape[1], chunk):
        tr, va = X_train[:, lo:lo + chunk].double(), X_val[:, lo:lo + chunk].double().to(X_train.device)
        scores = []
        for k, sel in enumerate((~ytr, ytr)):
            x = tr[sel]
            mean = x.mean(0)
            var = ((x - mean) ** 2).mean(0)
            var = var.clamp_min(var.max().clamp_min(1e-300) * 1e-10)
            scores.append(-0.5 * ((va - mean) ** 2 / var + var.log()) + priors[k].to(va.device))
        pred = scores[1] > scores[0]
        accs.append((pred == yva.to(pred.device)[:, None]).double().mean(0))
    return torch.cat(accs)


# --------------------------------------------------------------------------------------------------
# Probes, sampling, features
# --------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """A fitted classifier on some columns of one layer's flattened output: PLS (when the columns
    outnumber the components) then QDA."""

    qda: QDA
    pls: PLS | None = None
    columns: Tensor | None = None  # None: the whole layer

    def predict(self, X: Tensor) -> Tensor:
        if self.columns is not None:
            X = X[:, self.columns.to(X.device)]
        Z = self.pls.transform(X) if self.pls is not None else X
        return self.qda.predict(Z)

    def accuracy(self, X: Tensor, y: Tensor) -> float:
        pred = self.predict(X)
        return (pred == torch.as_tensor(y).reshape(-1).to(pred.device)).double().mean().item()


def fit_probe(X: Tensor, y: Tensor, columns: Tensor | None = None, n_components: int = 8,
              use_pls: bool = True, reg_param: float = 0.0, precision: str = "auto") -> Probe:
    """PLS + QDA on `X[:, columns]` (seed 003 section 4.1); no PLS when there are at most n_components columns."""
    Xs = X if columns is None else X[:, columns.to(X.device)]
    y = torch.as_tensor(y).reshape(-1).to(X.device)
    if use_pls and Xs.shape[1] > n_components:
        pls = PLS(min(n_components, len(Xs) - 1), precision=precision).fit(Xs, y)
        return Probe(QDA(reg_param).fit(pls.x_scores_, y.to(pls.device_)), pls, columns)
    return Probe(QDA(reg_param).fit(Xs, y), None, columns)


def balanced_split(labels: Tensor, known: Tensor | None = None, n_train: int = 2048, n_val: int = 6144,
                   seed: int = 0, attribute: str = "attribute") -> tuple[Tensor, Tensor]:
    """Disjoint class-balanced train and validation indices drawn from a pooled split (seed 003 5.1.2).

    Training takes n_train/2 samples per class (an error when a class is too small); validation takes
    up to n_val/2 per class from the rest, as many per class as the smaller class allows."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    ok = torch.ones_like(labels, dtype=torch.bool) if known is None else torch.as_tensor(known).reshape(-1).cpu().bool()
    if n_train < 2 or n_train % 2 or n_val < 0 or n_val % 2:
        raise ValueError(f"balanced_split: n_train and n_val must be even (n_train >= 2), got {n_train}, {n_val}")
    gen = torch.Generator().manual_seed(seed)
    pools = []
    for cls in (0, 1):
        idx = torch.nonzero(ok & (labels == cls)).reshape(-1)
        pools.append(idx[torch.randperm(len(idx), generator=gen)])
    half = n_train // 2
    if min(len(p) for p in pools) < half + 1:
        raise ValueError(
            f"balanced_split: {attribute} has {len(pools[0])} negative and {len(pools[1])} positive labelled "
            f"samples; a balanced train set of {n_train} needs {half} of each plus validation samples "
            f"(lower n_train)")
    v = min(n_val // 2, *(len(p) - half for p in pools))
    train = torch.cat([p[:half] for p in pools])
    val = torch.cat([p[half:half + v] for p in pools])
    return train[torch.randperm(len(train), generator=gen)], val[torch.randperm(len(val), generator=gen)]


def conv_and_block_layers(model: nn.Module, convs: bool = True, blocks: bool = True) -> list[str]:
    """Names of every convolution and every residual block of a timm/torchvision model, in module order
    (the probing points of seed 003 Figs 5.1-5.3)."""
    block_types = ("BasicBlock", "Bottleneck", "InvertedResidual", "DepthwiseSeparableConv", "EdgeResidual",
                   "ResBottleneckBlock", "ResBasicBlock")
    names, pending = [], []  # a block is listed after its own convolutions: its output comes later
    for name, module in model.named_modules():
        if not name:
            continue
        while pending and not name.startswith(pending[-1] + "."):
            names.append(pending.pop())
        if convs and isinstance(module, nn.Conv2d):
            names.append(name)
        if blocks and type(module).__name__ in block_types:
            pending.append(name)
    names.extend(reversed(pending))
    if not names:
        raise ValueError(f"conv_and_block_layers: {type(model).__name__} has no Conv2d or residual block modules")
    return names


def collect_batches(loader: Iterable[Mapping[str, Tensor]], max_samples: int | None = None) -> dict[str, Tensor]:
    """Concatenate `image`, `attributes` and `attribute_mask` of dict batches (the batch contract) on CPU."""
    keys = ("image", "attributes", "attribute_mask")
    parts: dict[str, list[Tensor]] = {k: [] for k in keys}
    count = 0
    for i, batch in enumerate(loader):
        missing = [k for k in keys[:2] if k not in batch]
        if missing:
            raise KeyError(f"collect_batches: batch {i} lacks {missing}; got keys {sorted(batch)}")
        n = len(batch["image"])
        parts["image"].append(batch["image"].cpu())
        parts["attributes"].append(batch["attributes"].cpu())
        parts["attribute_mask"].append(batch.get("attribute_mask", torch.ones_like(batch["attributes"], dtype=torch.bool)).cpu())
        count += n
        if max_samples is not None and count >= max_samples:
            break
    if count == 0:
        raise ValueError("collect_batches: the loader yielded no batches")
    out = {k: torch.cat(v) for k, v in parts.items()}
    return {k: v[:max_samples] for k, v in out.items()} if max_samples else out


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(model: nn.Module, layers: Sequence[str], images: Tensor, batch_size: int = 128,
                     device: torch.device | str | None = None, hooks: Sequence[Callable[[nn.Module], Any]] = (),
                     out_device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """Flattened float32 outputs (N, m) of named layers over `images`, in eval mode, and each layer's
    per-sample shape. `hooks` are called with the model before the sweep and return handles to remove
    (used by ablation)."""
    device = _model_device(model, device)
    for name in layers:
        resolve_layer(model, name)
    was_training = model.training
    model.eval()
    handles = [h(model) for h in hooks]
    feats: dict[str, list[Tensor]] = {name: [] for name in layers}
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with capture(model, layers) as store:
            for lo in range(0, len(images), batch_size):
                model(images[lo:lo + batch_size].to(device))
                for name in layers:
                    out = store[name]
                    shapes[name] = tuple(out.shape[1:])
                    feats[name].append(out.reshape(len(out), -1).float().to(out_device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: torch.cat(v) for k, v in feats.items()}, shapes


class _Reached(Exception):
    """Raised by a forward hook to end a forward pass at the layer being streamed."""

    def __init__(self, output: Tensor):
        super().__init__()
        self.output = output


def layer_row_blocks(model: nn.Module, layer: str, images: Tensor, batch_size: int = 64,
                     device: torch.device | str | None = None, index: Tensor | None = None,
                     columns: Tensor | None = None) -> RowBlocks:
    """Streaming PLS input for a layer too large to hold: every pass re-runs the model over `images`
    (or over `images[index]`), a batch at a time and in eval mode, yielding float32 (batch, m) blocks of
    the flattened layer (only `columns` of it when given). Each forward pass stops at the layer (its first
    call, for a module called more than once), so an early layer costs only the network up to it."""
    count = len(images) if index is None else len(index)
    device = _model_device(model, device)
    module = resolve_layer(model, layer)

    def stop(_m, _inp, out):
        raise _Reached(out[0] if isinstance(out, (tuple, list)) else out)

    @torch.no_grad()
    def make():
        was_training = model.training
        model.eval()
        handle = module.register_forward_hook(stop)
        try:
            for lo in range(0, count, batch_size):
                batch = images[lo:lo + batch_size] if index is None else images[index[lo:lo + batch_size]]
                try:
                    model(batch.to(device))
                except _Reached as reached:
                    out = reached.output
                else:
                    raise RuntimeError(f"layer_row_blocks: the forward pass of {type(model).__name__} never "
                                       f"called layer {layer!r}")
                out = out.reshape(len(out), -1).float()
                yield out if columns is None else out[:, columns.to(out.device)]
        finally:
            handle.remove()
            model.train(was_training)

    return RowBlocks(make)


def streamed_single_feature_accuracy(blocks: RowBlocks, y: Tensor, chunk: int = 65536) -> Tensor:
    """`single_feature_accuracy(X, y, X, y)` (training accuracy of a one-feature QDA on every column) with X
    given as row blocks: three passes (class means, variances, predictions), never the whole of X."""
    y = torch.as_tensor(y).reshape(-1).cpu().bool()
    if y.all() or not y.any():
        raise ValueError("streamed_single_feature_accuracy: y needs both classes")

    def rows():
        lo = 0
        for block in blocks.make():
            yield block.double(), y[lo:lo + len(block)].to(block.device)
            lo += len(block)
        if lo != len(y):
            raise ValueError(f"streamed_single_feature_accuracy: blocks yielded {lo} rows for {len(y)} labels")

    counts = torch.stack([(~y).sum(), y.sum()]).double()
    sums = None
    for x, yb in rows():
        part = torch.stack([x[~yb].sum(0), x[yb].sum(0)])
        sums = part if sums is None else sums + part
    means = sums / counts.to(sums.device)[:, None]
    squares = torch.zeros_like(means)
    for x, yb in rows():
        squares += torch.stack([((x[~yb] - means[0]) ** 2).sum(0), ((x[yb] - means[1]) ** 2).sum(0)])
    var = squares / counts.to(means.device)[:, None]
    for lo in range(0, var.shape[1], chunk):  # the floor is relative to each chunk's largest, as in-memory
        part = var[:, lo:lo + chunk]
        var[:, lo:lo + chunk] = part.clamp_min(part.max(1, keepdim=True).values.clamp_min(1e-300) * 1e-10)
    priors = (counts / len(y)).log().to(means.device)
    correct = torch.zeros(var.shape[1], dtype=torch.float64, device=means.device)
    for x, yb in rows():
        scores = [-0.5 * ((x - means[k]) ** 2 / var[k] + var[k].log()) + priors[k] for k in (0, 1)]
        correct += ((scores[1] > scores[0]) == yb[:, None]).double().sum(0)
    return correct / len(y)


def channel_of_neuron(shape: Sequence[int]) -> Tensor | None:
    """Channel index of every flattened neuron: (C, H, W) channels first, (N, C) tokens channels last;
    None for vectors, which have no channels."""
    if len(shape) == 3:
        C, H, W = shape
        return torch.arange(C).repeat_interleave(H * W)
    if len(shape) == 2:
        N, C = shape
        return torch.arange(C).repeat(N)
    return None


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------

_SCALARS = ("layer_acc", "channel_acc", "neuron_acc", "best_channel_acc", "best_neuron_acc")


@dataclass
class LayerAttributeProbe:
    """Probing of one attribute in one layer. Accuracies are on the balanced validation sample;
    channel entries are None for layers without channels."""

    layer: str
    attribute: str
    layer_acc: float
    channel_acc: float | None
    neuron_acc: float
    top_channels: list[int]
    top_channel_accs: list[float]
    top_neurons: list[int]
    top_neuron_accs: list[float]
    n_train: int
    n_val: int
    vip: Tensor | None = field(default=None, repr=False)
    probes: dict[str, Probe] = field(default_factory=dict, repr=False)

    @property
    def best_channel(self) -> int | None:
        return self.top_channels[max(range(len(self.top_channels)), key=self.top_channel_accs.__getitem__)] \
            if self.top_channels else None

    @property
    def best_channel_acc(self) -> float | None:
        return max(self.top_channel_accs) if self.top_channel_accs else None

    @property
    def best_neuron(self) -> int:
        return self.top_neurons[max(range(len(self.top_neurons)), key=self.top_neuron_accs.__getitem__)]

    @property
    def best_neuron_acc(self) -> float:
        return max(self.top_neuron_accs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_acc": self.layer_acc, "channel_acc": self.channel_acc, "neuron_acc": self.neuron_acc,
            "top_channels": self.top_channels, "top_channel_accs": self.top_channel_accs,
            "top_neurons": self.top_neurons, "top_neuron_accs": self.top_neuron_accs,
            "best_channel": self.best_channel, "best_channel_acc": self.best_channel_acc,
            "best_neuron": self.best_neuron, "best_neuron_acc": self.best_neuron_acc,
            "n_train": self.n_train, "n_val": self.n_val,
        }


@dataclass
class ProbingResult:
    """Probes of many (layer, attribute) pairs; layers in depth order. `splits` holds each attribute's
    (train, validation) indices into the probed image set."""

    layers: list[str]
    attributes: list[str]
    entries: dict[tuple[str, str], LayerAttributeProbe]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    splits: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    config: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str]) -> LayerAttributeProbe:
        if key not in self.entries:
            raise KeyError(f"ProbingResult: no entry for layer/attribute {key}; layers {self.layers}, "
                           f"attributes {self.attributes}")
        return self.entries[key]

    def curve(self, attribute: str, kind: str = "layer_acc") -> list[float | None]:
        """Accuracy over depth of one attribute (kind: one of layer_acc, channel_acc, neuron_acc, best_*)."""
        if kind not in _SCALARS:
            raise ValueError(f"ProbingResult.curve: kind must be one of {_SCALARS}, got {kind!r}")
        return [getattr(self.entries[(layer, attribute)], kind) for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers, "attributes": self.attributes, "config": self.config,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "results": {layer: {attr: self.entries[(layer, attr)].to_dict() for attr in self.attributes}
                        for layer in self.layers},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbingResult:
        """Rebuild from `to_dict()` output (JSON), without VIP, probes or splits."""
        entries = {}
        for layer, per_attr in data["results"].items():
            for attr, d in per_attr.items():
                entries[(layer, attr)] = LayerAttributeProbe(
                    layer, attr, d["layer_acc"], d["channel_acc"], d["neuron_acc"], list(d["top_channels"]),
                    list(d["top_channel_accs"]), list(d["top_neurons"]), list(d["top_neuron_accs"]),
                    d["n_train"], d["n_val"])
        return cls(list(data["layers"]), list(data["attributes"]), entries,
                   {k: tuple(v) for k, v in data.get("shapes", {}).items()}, {}, dict(data.get("config", {})))

    def to_table(self) -> list[dict[str, Any]]:
        """One row per (layer, attribute): depth, names and the five accuracies."""
        return [{"depth": depth, "layer": layer, "attribute": attr,
                 **{k: getattr(self.entries[(layer, attr)], k) for k in _SCALARS}}
                for depth, layer in enumerate(self.layers) for attr in self.attributes]


# --------------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------------


def _check_ranking(neuron_ranking: str) -> None:
    if neuron_ranking not in ("vip", "accuracy"):
        raise ValueError(f"probe: neuron_ranking must be 'vip' or 'accuracy', got {neuron_ranking!r}")


def probe_features(X_train: Tensor, y_train: Tensor, X_val: Tensor, y_val: Tensor, shape: Sequence[int],
                   layer: str = "layer", attribute: str = "attribute", n_components: int = 8, top_k: int = 8,
                   neuron_ranking: str = "vip", reg_param: float = 0.0, keep: bool = True,
                   precision: str = "auto") -> LayerAttributeProbe:
    """Whole layer, top-k channels by mean VIP, top-k neurons (by VIP or by single-neuron training
    accuracy) and each of those channels and neurons alone (seed 003 section 5.1.2)."""
    _check_ranking(neuron_ranking)
    m = X_train.shape[1]
    if math.prod(shape) != m:
        raise ValueError(f"probe: layer {layer} shape {tuple(shape)} does not match {m} features")
    whole = fit_probe(X_train, y_train, None, n_components, reg_param=reg_param, precision=precision)
    if whole.pls is None:  # too few features for a projection: VIP from a PLS of full rank
        vip = PLS(min(m, len(X_train) - 1)).fit(X_train, y_train).vip_ if m > 1 else torch.ones(1, dtype=torch.float64)
    else:
        vip = whole.pls.vip_
    ranking = single_feature_accuracy(X_train, y_train, X_train, y_train) if neuron_ranking == "accuracy" else None
    return _probe_columns(whole, whole.accuracy(X_val, y_val), vip, ranking,
                          lambda cols: (X_train[:, cols.to(X_train.device)], X_val[:, cols.to(X_val.device)]),
                          y_train, y_val, shape, layer, attribute, n_components, top_k, reg_param, keep)


def _probe_columns(whole: Probe, layer_acc: float, vip: Tensor, ranking: Tensor | None,
                   columns: Callable[[Tensor], tuple[Tensor, Tensor]], y_train: Tensor, y_val: Tensor,
                   shape: Sequence[int], layer: str, attribute: str, n_components: int, top_k: int,
                   reg_param: float, keep: bool) -> LayerAttributeProbe:
    """The channel and neuron probes of `probe_features`, given the whole-layer probe, the VIP scores and
    (neuron_ranking 'accuracy') the single-neuron training accuracies. They read only the columns of the top
    channels and neurons, which `columns(sorted layer columns)` returns as (train, validation) matrices; the
    kept probes index the whole layer."""
    vip = vip.cpu()
    probes = {"layer": whole}
    k = min(top_k, len(vip))
    channel_of = channel_of_neuron(shape)
    top_channels, channel_cols = [], torch.empty(0, dtype=torch.long)
    if channel_of is not None:
        n_channels = int(channel_of.max()) + 1
        channel_vip = torch.zeros(n_channels, dtype=torch.float64).index_add_(0, channel_of, vip) \
            / torch.bincount(channel_of, minlength=n_channels)
        top_channels = channel_vip.topk(min(top_k, n_channels)).indices.tolist()
        channel_cols = torch.nonzero(torch.isin(channel_of, torch.tensor(top_channels))).reshape(-1)
    top_neurons = (vip if ranking is None else ranking.cpu()).topk(k).indices
    needed = torch.unique(torch.cat([channel_cols, top_neurons]))
    X_train, X_val = columns(needed)

    def fit(cols: Tensor, use_pls: bool = True) -> tuple[Probe, float]:
        fitted = fit_probe(X_train, y_train, torch.searchsorted(needed, cols), n_components, use_pls, reg_param)
        acc = fitted.accuracy(X_val, y_val)
        fitted.columns = cols
        return fitted, acc

    channel_acc, channel_accs = None, []
    if channel_of is not None:
        probes["channels"], channel_acc = fit(channel_cols)
        channel_accs = [fit(torch.nonzero(channel_of == c).reshape(-1))[1] for c in top_channels]
    probes["neurons"], neuron_acc = fit(top_neurons, use_pls=False)
    local = torch.searchsorted(needed, top_neurons).to(X_train.device)
    neuron_accs = single_feature_accuracy(X_train[:, local], y_train, X_val[:, local.to(X_val.device)], y_val)
    return LayerAttributeProbe(
        layer, attribute, layer_acc, channel_acc, neuron_acc, top_channels, channel_accs,
        top_neurons.tolist(), neuron_accs.tolist(), len(X_train), len(X_val),
        vip if keep else None, probes if keep else {})


def probe_streamed(model: nn.Module, layer: str, images: Tensor, train: Tensor, val: Tensor, y_train: Tensor,
                   y_val: Tensor, shape: Sequence[int], attribute: str = "attribute", n_components: int = 8,
                   top_k: int = 8, neuron_ranking: str = "vip", reg_param: float = 0.0, keep: bool = True,
                   precision: str = "auto", batch_size: int = 128,
                   device: torch.device | str | None = None) -> LayerAttributeProbe:
    """`probe_features` of a layer too large to hold, with `images[train]` and `images[val]` as samples:
    the PLS fit, its validation scores and the single-neuron ranking make passes over batches of
    activations recomputed by forward passes; only the columns of the top channels and neurons are held.
    Equal to the in-memory result (the working precision of "auto" is resolved from the same matrix size)."""
    _check_ranking(neuron_ranking)
    device = _model_device(model, device)
    m, n = math.prod(shape), len(train)
    if m <= n_components:
        raise ValueError(f"probe: layer {layer} has {m} features, too few to stream a {n_components}-component PLS")

    def blocks(index: Tensor, columns: Tensor | None = None) -> RowBlocks:
        return layer_row_blocks(model, layer, images, batch_size, device, index, columns)

    if precision == "auto":
        precision = "float64" if n * m <= PLS.AUTO_FLOAT64_MAX_ENTRIES else "float32"
    y_train = torch.as_tensor(y_train).reshape(-1).to(device)
    y_val = torch.as_tensor(y_val).reshape(-1).to(device)
    pls = PLS(min(n_components, n - 1), device=device, precision=precision).fit(blocks(train), y_train)
    whole = Probe(QDA(reg_param).fit(pls.x_scores_, y_train.to(pls.device_)), pls, None)
    predicted = whole.qda.predict(pls.transform(blocks(val)))
    layer_acc = (predicted == y_val.to(predicted.device)).double().mean().item()
    ranking = streamed_single_feature_accuracy(blocks(train), y_train) if neuron_ranking == "accuracy" else None

    def columns(cols: Tensor) -> tuple[Tensor, Tensor]:
        out = []
        for index in (train, val):
            X = torch.empty(len(index), len(cols), device=device)
            lo = 0
            for block in blocks(index, cols).make():
                X[lo:lo + len(block)] = block
                lo += len(block)
            out.append(X)
        return out[0], out[1]

    return _probe_columns(whole, layer_acc, pls.vip_, ranking, columns, y_train, y_val, shape, layer, attribute,
                          n_components, top_k, reg_param, keep)


def _layer_groups(model: nn.Module, layers: Sequence[str], image: Tensor, n: int, max_bytes: int,
                  n_components: int, device: torch.device) -> tuple[list[tuple[list[str], bool]],
                                                                   dict[str, tuple[int, ...]]]:
    """Split layers into groups whose features for n images fit in max_bytes (one forward sweep each), and
    each layer's shape. A layer larger than max_bytes alone is a group of its own marked streamed."""
    _, shapes = extract_features(model, layers, image[:1], 1, device)
    groups: list[tuple[list[str], bool]] = []
    used = 0
    for name in layers:
        m = math.prod(shapes[name])
        size = m * 4 * n
        if size > max_bytes and m > n_components:
            groups.append(([name], True))
            continue
        if not groups or groups[-1][1] or used + size > max_bytes:
            groups.append(([], False))
            used = 0
        groups[-1][0].append(name)
        used += size
    return groups, shapes


def probe(model: nn.Module, layers: Sequence[str], images: Tensor | Iterable[Mapping[str, Tensor]],
          labels: Tensor | None = None, label_mask: Tensor | None = None,
          attributes: Sequence[str] | None = None, n_train: int = 2048, n_val: int = 6144,
          n_components: int = 8, top_k: int = 8, neuron_ranking: str = "vip", seed: int = 0,
          batch_size: int = 128, device: torch.device | str | None = None, reg_param: float = 0.0,
          max_feature_bytes: int = 2 << 30, keep_probes: bool = True, precision: str = "auto",
          shard: Any = None) -> ProbingResult:
    """Probe attributes in named layers of `model` (seed 003).

    images: (N, 3, H, W) in [0, 1] with labels (N, 40) in CelebA order (and optional label_mask), or a
    loader of batch-contract dicts (collected to memory). Each attribute gets its own balanced sample
    (seeded by seed + attribute index); features of all sampled images are extracted once per group of
    layers fitting in max_feature_bytes. A layer whose features of the sampled images alone exceed
    max_feature_bytes is streamed (`probe_streamed`): no (images x features) matrix of it is built, its
    fits re-run the model up to the layer over batches of images (per attribute 2 n_components + 2 sweeps
    over the training images, 3 more with neuron_ranking='accuracy', and 2 over the validation images), and
    the result equals the in-memory one.

    shard: for several processes, an object with `rank`, `world_size` and `gather(value) -> [value of each
    rank]` (e.g. `callbacks.base.Shard`). Then `images` are only this rank's items rank, rank + world_size, ...
    of the N labelled ones; each rank extracts the features of its sampled images, the features are put
    back in global order on every rank, the (layer, attribute) fits are spread over the ranks and gathered, so
    the result equals the one-process result. For streamed layers the sampled images (not their features)
    are gathered instead.
    """
    if not isinstance(images, Tensor):
        data = collect_batches(images)
        images, labels, label_mask = data["image"], data["attributes"], data["attribute_mask"]
    rank, world = (int(shard.rank), int(shard.world_size)) if shard is not None else (0, 1)
    if labels is None:
        raise ValueError("probe: labels (N, 40) are required with an image tensor")
    if labels.dim() != 2 or len(range(rank, labels.shape[0], world)) != len(images):
        raise ValueError(f"probe: labels must be (N, 40) with N={len(images)} images"
                         + (f" on rank {rank} of {world}" if world > 1 else "") + f", got {tuple(labels.shape)}")
    if world > 1 and keep_probes:
        raise ValueError("probe: keep_probes=True needs one process (fitted probes stay on the rank that fits them)")
    if max_feature_bytes <= 0:
        raise ValueError(f"probe: max_feature_bytes must be positive, got {max_feature_bytes!r}")
    _check_ranking(neuron_ranking)
    layers = list(layers)
    if not layers:
        raise ValueError("probe: no layers given")
    attributes = resolve_attributes(attributes)
    device = _model_device(model, device)
    splits = {}
    for attr in attributes:
        col = ATTRIBUTE_INDEX[attr]
        known = None if label_mask is None else label_mask[:, col]
        splits[attr] = balanced_split(labels[:, col] > 0.5, known, n_train, n_val, seed + col, attr)
    pool = torch.unique(torch.cat([torch.cat(s) for s in splits.values()]))
    position = {attr: (torch.searchsorted(pool, tr), torch.searchsorted(pool, va)) for attr, (tr, va) in splits.items()}
    owner = pool % world  # the rank holding each sampled image, at local row pool // world
    entries = {}
    probe_image = images[:1] if len(images) else None
    if world > 1:  # a rank may hold no image: the layer shapes come from an image of any rank
        probe_image = next(x for x in shard.gather(probe_image) if x is not None)
    groups, shapes = _layer_groups(model, layers, probe_image.to(device), len(pool), max_feature_bytes, n_components,
                                   device)
    local = pooled = None
    for group, streamed in groups:
        pairs = [(layer, attr) for layer in group for attr in attributes]
        mine = {}
        if streamed:
            if world == 1:  # sampled images by their index in `images`
                source, index = images, splits
            else:  # every rank gets the sampled images, in pool order
                if pooled is None:
                    parts = shard.gather(images[pool[owner == rank] // world])
                    pooled = torch.empty(len(pool), *probe_image.shape[1:], dtype=probe_image.dtype)
                    for r, part in enumerate(parts):
                        pooled[owner == r] = part.to(pooled.device)
                source, index = pooled, position
            for layer, attr in pairs[rank::world]:
                tr, va = index[attr]
                y = labels[:, ATTRIBUTE_INDEX[attr]] > 0.5
                mine[(layer, attr)] = probe_streamed(
                    model, layer, source, tr, va, y[splits[attr][0]].long(), y[splits[attr][1]].long(),
                    shapes[layer], attr, n_components, top_k, neuron_ranking, reg_param, keep_probes, precision,
                    batch_size, device)
        else:
            if local is None:
                local = images[pool[owner == rank] // world]
            if len(local):
                feats, _ = extract_features(model, group, local, batch_size, device, out_device=device)
            else:  # this rank holds none of the sampled images
                feats = {name: torch.empty(0, math.prod(shapes[name]), device=device) for name in group}
            if world > 1:
                parts = shard.gather(feats)
                feats = {}
                for layer in group:
                    X = torch.empty(len(pool), math.prod(shapes[layer]), device=device)
                    for r, part in enumerate(parts):
                        X[(owner == r).to(device)] = part[layer].to(device)
                    feats[layer] = X
            for layer, attr in pairs[rank::world]:
                X = feats[layer]
                tr, va = (i.to(X.device) for i in position[attr])
                y = (labels[pool, ATTRIBUTE_INDEX[attr]] > 0.5).long().to(X.device)
                mine[(layer, attr)] = probe_features(X[tr], y[tr], X[va], y[va], shapes[layer], layer, attr,
                                                     n_components, top_k, neuron_ranking, reg_param, keep_probes,
                                                     precision)
            del feats
        for part in (shard.gather(mine) if world > 1 else [mine]):
            entries.update(part)
    entries = {(layer, attr): entries[(layer, attr)] for layer in layers for attr in attributes}
    config = {"n_train": n_train, "n_val": n_val, "n_components": n_components, "top_k": top_k,
              "neuron_ranking": neuron_ranking, "seed": seed, "reg_param": reg_param, "precision": precision}
    return ProbingResult(layers, attributes, entries, shapes, splits, config)


# --------------------------------------------------------------------------------------------------
# Ablation (Table 5.4) and VIP analysis (section 5.3)
# --------------------------------------------------------------------------------------------------


@dataclass
class AblationResult:
    """Accuracy of later layers' fitted probes when the top VIP neurons of `layer` are zeroed.
    accuracy[fraction][later_layer][representation]; drop = baseline - accuracy."""

    layer: str
    attribute: str
    fractions: list[float]
    baseline: dict[str, dict[str, float]]
    accuracy: dict[float, dict[str, dict[str, float]]]

    def drop(self, fraction: float, later_layer: str, representation: str = "layer") -> float:
        return self.baseline[later_layer][representation] - self.accuracy[fraction][later_layer][representation]

    def mean_drop(self, fraction: float, representation: str = "layer") -> float:
        layers = list(self.baseline)
        return sum(self.drop(fraction, lay, representation) for lay in layers) / len(layers)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "attribute": self.attribute, "fractions": self.fractions,
                "baseline": self.baseline, "accuracy": {str(f): v for f, v in self.accuracy.items()}}

    def to_table(self) -> list[dict[str, Any]]:
        return [{"fraction": f, "later_layer": lay, "representation": rep, "accuracy": acc,
                 "drop": self.baseline[lay][rep] - acc}
                for f, per_layer in self.accuracy.items() for lay, reps in per_layer.items() for rep, acc in reps.items()]


def zero_neurons_hook(layer: str, neurons: Tensor) -> Callable[[nn.Module], Any]:
    """A hook factory for `extract_features`: zero the given flattened neurons of `layer`'s output."""

    def install(model: nn.Module):
        def hook(_m, _inp, out):
            flat = out.reshape(len(out), -1).clone()
            flat[:, neurons.to(flat.device)] = 0
            return flat.view(out.shape)

        return resolve_layer(model, layer).register_forward_hook(hook)

    return install


def ablation_study(model: nn.Module, result: ProbingResult, images: Tensor, layer: str, attribute: str,
                   fractions: Sequence[float] = (0.01, 0.05, 0.10), later_layers: Sequence[str] | None = None,
                   batch_size: int = 128, device: torch.device | str | None = None,
                   labels: Tensor | None = None) -> AblationResult:
    """Zero the top `fraction` of `layer`'s neurons by VIP for `attribute` and re-evaluate the probes
    already fitted on later layers (reused, not refitted: seed 003 Table 5.4) on the same validation
    images. `images` must be the image set `result` was probed on; labels (N, 40) likewise."""
    entry = result[(layer, attribute)]
    if entry.vip is None or not entry.probes:
        raise ValueError("ablation_study: the result was made with keep_probes=False; probe again with keep_probes=True")
    if labels is None:
        raise ValueError("ablation_study: labels (N, 40) of the probed images are required")
    if later_layers is None:
        later_layers = result.layers[result.layers.index(layer) + 1:]
    later_layers = list(later_layers)
    bad = [name for name in later_layers if (name, attribute) not in result.entries or name == layer]
    if bad or not later_layers:
        raise ValueError(f"ablation_study: later layers must be probed layers other than {layer}: got {later_layers}")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"ablation_study: fractions must lie in [0, 1], got {list(fractions)}")
    _, val = result.splits[attribute]
    y = (labels[val, ATTRIBUTE_INDEX[attribute]] > 0.5).long()
    order = entry.vip.argsort(descending=True)

    def evaluate(hooks) -> dict[str, dict[str, float]]:
        feats, _ = extract_features(model, later_layers, images[val], batch_size, device, hooks,
                                    out_device=_model_device(model, device))
        return {name: {rep: p.accuracy(feats[name], y) for rep, p in result[(name, attribute)].probes.items()}
                for name in later_layers}

    baseline = evaluate(())
    accuracy = {}
    for f in fractions:
        count = int(round(f * len(order)))
        accuracy[float(f)] = evaluate([zero_neurons_hook(layer, order[:count])])
    return AblationResult(layer, attribute, [float(f) for f in fractions], baseline, accuracy)


@dataclass
class VipAnalysis:
    """Single-neuron validation accuracy against VIP and against mean activation on positives."""

    neurons: list[int]
    vip: list[float]
    accuracy: list[float]
    mean_positive_activation: list[float]
    corr_vip: float
    corr_activation: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def vip_analysis(X_train: Tensor, y_train: Tensor, X_val: Tensor, y_val: Tensor, vip: Tensor,
                 n_neurons: int = 50, seed: int = 0, sampling: str = "vip_uniform") -> VipAnalysis:
    """Seed 003 section 5.3 / Fig 5.9: pick n_neurons (uniformly over the VIP range, or at random),
    fit a one-neuron QDA on each and correlate validation accuracy with VIP and with the neuron's
    mean activation on positive training samples."""
    vip = vip.double().cpu()
    m = len(vip)
    if m != X_train.shape[1]:
        raise ValueError(f"vip_analysis: {m} VIP scores for {X_train.shape[1]} features")
    n_neurons = min(n_neurons, m)
    gen = torch.Generator().manual_seed(seed)
    if sampling == "random":
        chosen = torch.randperm(m, generator=gen)[:n_neurons]
    elif sampling == "vip_uniform":
        order = vip.argsort()
        targets = torch.rand(n_neurons, generator=gen, dtype=torch.float64) * (vip.max() - vip.min()) + vip.min()
        pos = torch.searchsorted(vip[order], targets).clamp_max(m - 1)
        chosen, taken = [], set()
        for p in pos.tolist():  # nearest unused neuron in VIP order
            lo = hi = p
            while True:
                cand = [i for i in (lo, hi) if 0 <= i < m and int(order[i]) not in taken]
                if cand:
                    chosen.append(int(order[cand[0]]))
                    taken.add(chosen[-1])
                    break
                lo, hi = lo - 1, hi + 1
        chosen = torch.tensor(chosen)
    else:
        raise ValueError(f"vip_analysis: sampling must be 'vip_uniform' or 'random', got {sampling!r}")
    cols = chosen.to(X_train.device)
    acc = single_feature_accuracy(X_train[:, cols], y_train, X_val[:, cols.to(X_val.device)], y_val).cpu()
    pos_mask = torch.as_tensor(y_train).reshape(-1).bool().to(X_train.device)
    act = X_train[pos_mask][:, cols].double().mean(0).cpu()
    v = vip[chosen]
    return VipAnalysis(chosen.tolist(), v.tolist(), acc.tolist(), act.tolist(), _pearson(v, acc), _pearson(act, acc))


# --------------------------------------------------------------------------------------------------
# Plots (Figs 5.1-5.4, 5.9)
# --------------------------------------------------------------------------------------------------

_COLORS = {"layer_acc": "tab:blue", "channel_acc": "tab:green", "neuron_acc": "tab:orange"}
_LABELS = {"layer_acc": "layer", "channel_acc": "top-8 channels", "neuron_acc": "top-8 neurons"}


def plot_accuracy_over_depth(result: ProbingResult, attributes: Sequence[str] | None = None, ncols: int = 4):
    """Figs 5.1-5.3: per attribute, accuracy over depth of the whole layer (blue), top channels (green)
    and top neurons (orange)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    attributes = list(attributes or result.attributes)
    missing = [a for a in attributes if a not in result.attributes]
    if missing:
        raise ValueError(f"plot_accuracy_over_depth: attributes {missing} were not probed ({result.attributes})")
    ncols = min(ncols, len(attributes))
    nrows = math.ceil(len(attributes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows), squeeze=False, sharex=True)
    depth = list(range(1, len(result.layers) + 1))
    for ax, attr in zip(axes.flat, attributes):
        for kind, color in _COLORS.items():
            ys = result.curve(attr, kind)
            pts = [(d, v) for d, v in zip(depth, ys) if v is not None]
            if pts:
                ax.plot(*zip(*pts), color=color, label=_LABELS[kind], lw=1.2)
        ax.set_title(attr.replace("_", " "), fontsize=9)
        ax.set_ylim(0.4, 1.0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(attributes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.supxlabel("depth (probed layer)")
    fig.supylabel("validation accuracy")
    fig.tight_layout()
    return fig


def plot_mean_accuracy(results: Mapping[str, ProbingResult], kind: str = "layer_acc"):
    """Fig 5.4: mean accuracy over attributes per depth, one curve per model (e.g. trained vs random init)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, res in results.items():
        means = []
        for layer in res.layers:
            vals = [getattr(res.entries[(layer, a)], kind) for a in res.attributes]
            vals = [v for v in vals if v is not None]
            means.append(sum(vals) / len(vals) if vals else float("nan"))
        ax.plot(range(1, len(means) + 1), means, marker=".", label=label)
    ax.set_xlabel("depth (probed layer)")
    ax.set_ylabel(f"mean {kind.replace('_', ' ')}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_vip_analysis(analysis: VipAnalysis, vip: Tensor | None = None, title: str = ""):
    """Fig 5.9: VIP histogram (log counts, when all VIP scores are given) and accuracy against VIP."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncols = 2 if vip is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3), squeeze=False)
    if vip is not None:
        axes[0, 0].hist(vip.double().cpu().numpy(), bins=50, log=True, color="tab:blue")
        axes[0, 0].set_xlabel("VIP")
        axes[0, 0].set_ylabel("neurons")
    ax = axes[0, -1]
    ax.scatter(analysis.vip, analysis.accuracy, s=10)
    ax.set_xlabel("VIP")
    ax.set_ylabel("single-neuron accuracy")
    ax.set_title(f"{title} r={analysis.corr_vip:.2f} (activation r={analysis.corr_activation:.2f})", fontsize=9)
    fig.tight_layout()
    return fig
