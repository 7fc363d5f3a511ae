"""Choosing the kept records per sub-dataset, and writing what ``nvila train`` and the reference read.

Every method keeps K = ceil(keep * n_i) records of sub-dataset i (n_i: its candidate records, the
data file less any ``drop:`` list it already had), so the mixture's proportions are preserved and
the three methods keep sets of equal size:

* ``deltaloss``: the K highest scores; ties go to the lower index; records that could not be
  scored (``BadSample``: training would skip them too) rank last.
* ``random``: a seeded uniform sample (the seed string includes the dataset name).
* ``cluster``: k-means (k = ceil(sqrt(n_i)), k-means++ init, seeded) on the large model's mean final
  hidden state per sample, then a round-robin over the clusters, each cluster's members nearest its
  centroid first (ties: lower index). Every cluster keeps about K / k members, so small clusters
  (rare kinds of sample) survive and big ones are thinned: coverage over the embedding space, the
  point of a cluster baseline. Unscored records rank last.

Outputs, under ``out``: ``filter_index/<tag>/<name>.json`` (the reference's drop-index files,
spec §3: a JSON list of the record indices to drop; ``VILA_SLICE_FOLDER=out/filter_index`` and a
mixture entry ``name@<tag>`` read them), and ``mixture.yaml``, the input mixture with a ``drop:``
per dataset pointing at those files (``nvila train`` reads it as is). This module knows no models.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

import torch

from ..train.data import DatasetSpec

METHODS = ("deltaloss", "random", "cluster")


def num_kept(n: int, keep: float) -> int:
    """K = ceil(keep * n), computed so that 0.3 * 10 stays 3."""
    return min(n, math.ceil(round(keep * n, 9)))


def top_k(rows: list[dict], k: int) -> list[int]:
    """Indices of the ``k`` highest scores; ties to the lower index; unscored rows last."""
    order = sorted(rows, key=lambda r: (r.get("score") is None, -(r.get("score") or 0.0), r["index"]))
    return sorted(r["index"] for r in order[:k])


def random_k(indices: list[int], k: int, seed: int, name: str) -> list[int]:
    return sorted(random.Random(f"{seed}:{name}").sample(sorted(indices), k))


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. x (N, D) -> (assignment (N,) long, centroids (k, D))."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    centroids = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centroids).min(1).values.square()  # (N,)
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else torch.randint(len(x), (1,), generator=g)
        centroids = torch.cat([centroids, x[pick]])
    assign = torch.cdist(x, centroids).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty cluster stays put
        new = torch.cdist(x, centroids).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign, centroids


def cluster_k(rows: list[dict], k: int, seed: int, name: str) -> list[int]:
    """Round-robin over k-means clusters of the rows' embeddings (see the module docstring)."""
    scored = sorted((r for r in rows if r.get("embedding") is not None), key=lambda r: r["index"])
    rest = sorted(r["index"] for r in rows if r.get("embedding") is None)
    if not scored:
        return rest[:k]
    x = torch.tensor([r["embedding"] for r in scored])  # (N, H)
    n_clusters = min(len(scored), math.ceil(math.sqrt(len(scored))))
    assign, centroids = kmeans(x, n_clusters, seed=seed * 1_000_003 + zlib.crc32(name.encode()))
    dist = (x.double() - centroids[assign]).norm(dim=1)
    queues = [sorted((float(dist[i]), scored[i]["index"]) for i in range(len(scored)) if assign[i] == c)
              for c in range(n_clusters)]
    order = [q[r][1] for r in range(max(map(len, queues))) for q in queues if r < len(q)]
    return sorted((order + rest)[:k])


def select(rows: dict[str, list[dict]], candidates: dict[str, list[int]], keep: float, method: str,
           seed: int = 0) -> dict[str, list[int]]:
    """Kept record indices per dataset.

    Args:
        rows: scored rows per dataset (``deltaloss``, ``cluster``; unused by ``random``).
        candidates: every candidate record index per dataset.
    """
    if method not in METHODS:
        raise ValueError(f"--method: {method!r} is not valid; choose one of {', '.join(METHODS)}")
    kept = {}
    for name, indices in candidates.items():
        k = num_kept(len(indices), keep)
        if method == "random":
            kept[name] = random_k(indices, k, seed, name)
            continue
        have = {r["index"]: r for r in rows.get(name, [])}
        full = [have.get(i, {"index": i}) for i in indices]
        kept[name] = top_k(full, k) if method == "deltaloss" else cluster_k(full, k, seed, name)
    return kept


# ---------------------------------------------------------------------------------------- outputs
def tag_for(keep: float) -> str:
    return f"{keep:g}"


def write_outputs(out: Path, specs: list[DatasetSpec], n_records: dict[str, int], kept: dict[str, list[int]],
                  tag: str) -> tuple[Path, dict[str, Path]]:
    """Drop-index files and the pruned mixture; returns (mixture path, {dataset: drop file})."""
    import yaml

    folder = out / "filter_index" / tag
    folder.mkdir(parents=True, exist_ok=True)
    drops, entries = {}, []
    for s in specs:
        keep = set(kept[s.name])
        path = folder / f"{s.name}.json"
        path.write_text(json.dumps([i for i in range(n_records[s.name]) if i not in keep]) + "\n", encoding="utf-8")
        drops[s.name] = path
        entries.append({"name": s.name, "path": str(s.path), "media_root": str(s.media_root), "repeat": s.repeat,
                        "fraction": s.fraction, "drop": str(path.relative_to(out))})
    mixture = out / "mixture.yaml"
    mixture.write_text(f"# written by nvila prune (kept {tag} of every dataset); nvila train "
                       f"data.mixture={mixture.name}\n" + yaml.safe_dump({"datasets": entries}, sort_keys=False),
                       encoding="utf-8")
    return mixture, drops


def report(out: Path, rows: dict[str, list[dict]], kept: dict[str, list[int]], *, method: str,
           extremes: int = 5) -> list[str]:
    """``report.txt`` (per dataset: counts, score quantiles, the top kept and bottom dropped rows) and
    ``scores.png`` (a histogram per dataset, kept vs dropped; skipped without matplotlib).
    Returns the report's lines."""
    lines = [f"nvila prune report (method {method}; score = CE_small - CE_large, positive = large more confident)"]
    for name, indices in kept.items():
        keep = set(indices)
        scored = [r for r in rows.get(name, []) if r.get("score") is not None]
        skipped = sum(1 for r in rows.get(name, []) if r.get("score") is None)
        lines.append(f"\n[{name}] kept {len(keep)}; scored {len(scored)}, unscorable {skipped}")
        if not scored:
            continue
        s = torch.tensor([r["score"] for r in scored], dtype=torch.float64)
        q = torch.quantile(s, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
        lines.append("  score min/q1/median/q3/max: " + " / ".join(f"{v:.4f}" for v in q))
        by = sorted(scored, key=lambda r: (-r["score"], r["index"]))
        fmt = "    index {index:>7}  id {id!s:>12}  score {score:+.4f}  ce_small {ce_small:.4f}  ce_large {ce_large:.4f}"
        lines.append("  highest kept:")
        lines += [fmt.format(**r) for r in [r for r in by if r["index"] in keep][:extremes]]
        lines.append("  lowest dropped:")
        lines += [fmt.format(**r) for r in [r for r in reversed(by) if r["index"] not in keep][:extremes]]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines.append("\n(scores.png skipped: matplotlib is not installed; pip install nvila[dev])")
    else:
        names = list(kept)
        fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.4 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            keep = set(kept[name])
            scored = [r for r in rows.get(name, []) if r.get("score") is not None]
            ax.hist([[r["score"] for r in scored if r["index"] in keep],
                     [r["score"] for r in scored if r["index"] not in keep]],
                    bins=30, stacked=True, label=["kept", "dropped"])
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("CE_small - CE_large")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "scores.png", dpi=100)
        plt.close(fig)
    (out / "report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines
