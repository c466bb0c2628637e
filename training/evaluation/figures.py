"""PNG figures (matplotlib, Agg): t-SNE of the latent spaces and a retrieval example panel per source.

- ``tsne_<source>.png``: OCT (top row) and fundus (bottom row) embeddings, one panel per task label.
- ``tsne_modality_<source>.png``: fundus and OCT embeddings in one t-SNE, coloured by modality, with
  a thin line joining each fundus image to its paired OCT volume (short lines = aligned modalities).
- ``retrieval_<source>.png``: held-out fundus queries, then the top-k OCT volumes (central B-scan)
  with cosine scores; the true pair is framed in green.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from retinacli.ranking import eye_key
from retinacli.tasks import TASKS
from training.evaluation.retrieval import top_matches


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = len(x)
    if n < 4:
        return np.zeros((n, 2))
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    # Exact gradients are faster than Barnes-Hut for the few hundred points of a cohort, and deterministic.
    method = "exact" if n <= 1000 else "barnes_hut"
    # 500 iterations settle a few hundred points; scikit-learn < 1.5 calls the option n_iter.
    iterations = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=method,
        **{iterations: 500},
    )
    return tsne.fit_transform(np.asarray(x, np.float64))


def make_figures(out_dir: Path, sources, cache, embeddings, cohort, cfg, results) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        emb = embeddings[source.key]
        key, label = source.key, source.label
        written.append(plot_tsne_tasks(out_dir / f"tsne_{key}.png", label, emb, cohort, cfg))
        written.append(plot_tsne_modality(out_dir / f"tsne_modality_{key}.png", label, emb, cfg.seed))
        if source.key in results.get("retrieval", {}):
            rows = np.flatnonzero(np.isin(cohort.patient_ids, source.val_patients))
            arrays = cache.get(source.spec)
            eyes = [eye_key(r) for r in cohort.rows]
            path = out_dir / f"retrieval_{key}.png"
            written.append(plot_retrieval(path, label, emb, arrays, rows, source.spec, eyes=eyes))
    return written


def plot_tsne_tasks(path: Path, label: str, emb: dict, cohort, cfg) -> Path:
    plt = _pyplot()
    tasks = list(cfg.tasks)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 8.0), squeeze=False)
    for r, modality in enumerate(("oct", "fundus")):
        xy = tsne_2d(emb[modality], cfg.seed)
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            y = cohort.labels(task)
            known = np.isfinite(y)
            if (~known).any():
                ax.scatter(xy[~known, 0], xy[~known, 1], s=12, c="lightgrey", label="no label")
            if TASKS[task].kind == "regression":
                points = ax.scatter(xy[known, 0], xy[known, 1], s=16, c=y[known], cmap="viridis")
                fig.colorbar(points, ax=ax, shrink=0.8, label=TASKS[task].column)
            else:
                for value, colour, name in ((0, "tab:blue", "0"), (1, "tab:red", "1")):
                    pick = known & (y == value)
                    ax.scatter(xy[pick, 0], xy[pick, 1], s=16, c=colour, label=f"{task} = {name}")
                ax.legend(fontsize=7, loc="best")
            name = "OCT" if modality == "oct" else "fundus"
            ax.set_title(f"{name} embeddings: {TASKS[task].title}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"t-SNE of the latent space — {label} (coloured by task label)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_tsne_modality(path: Path, label: str, emb: dict, seed: int) -> Path:
    plt = _pyplot()
    n = len(emb["oct"])
    xy = tsne_2d(np.concatenate([emb["fundus"], emb["oct"]]), seed)
    fundus_xy, oct_xy = xy[:n], xy[n:]
    fig, ax = plt.subplots(figsize=(6.0, 5.5))
    for i in range(n):
        ax.plot([fundus_xy[i, 0], oct_xy[i, 0]], [fundus_xy[i, 1], oct_xy[i, 1]], c="grey", lw=0.4, alpha=0.5)
    ax.scatter(fundus_xy[:, 0], fundus_xy[:, 1], s=18, c="tab:orange", label="fundus")
    ax.scatter(oct_xy[:, 0], oct_xy[:, 1], s=18, c="tab:purple", marker="s", label="OCT")
    ax.legend()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        f"t-SNE by modality — {label}\n(grey lines join each fundus image to its paired OCT)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _display_fundus(x: np.ndarray, spec: dict) -> np.ndarray:
    f = spec["fundus"]
    mean = np.asarray(f["mean"], np.float32)[:, None, None]
    std = np.asarray(f["std"], np.float32)[:, None, None]
    image = np.clip(x * std + mean, 0.0, 1.0).transpose(1, 2, 0)
    return image[..., 0] if image.shape[-1] == 1 else image


def _display_bscan(x: np.ndarray, spec: dict) -> np.ndarray:
    o = spec["oct"]
    central = x[0, x.shape[1] // 2]
    return np.clip(central * float(o["std"]) + float(o["mean"]), 0.0, 1.0)


def plot_retrieval(path: Path, label: str, emb: dict, arrays, rows: np.ndarray, spec: dict,
                   n_queries: int = 4, k: int = 5, eyes: list | None = None) -> Path:
    """Top-k OCT volumes of a few fundus queries; the true pair in green, other visits of the query's
    eye (hits at eye level) in orange when ``eyes`` (one key per cohort row) is given."""
    plt = _pyplot()
    k = min(k, len(rows))
    picks = rows[np.linspace(0, len(rows) - 1, min(n_queries, len(rows))).round().astype(int)]
    order, scores = top_matches(emb["fundus"][picks], emb["oct"][rows], k)
    fig, axes = plt.subplots(len(picks), k + 1, figsize=(2.0 * (k + 1), 2.2 * len(picks)), squeeze=False)
    for r, query in enumerate(picks):
        ax = axes[r][0]
        ax.imshow(_display_fundus(arrays.fundus[query], spec), cmap="gray")
        ax.set_title(f"query fundus #{r + 1}", fontsize=8)
        ax.axis("off")
        for c in range(k):
            candidate = rows[order[r, c]]
            ax = axes[r][c + 1]
            ax.imshow(_display_bscan(arrays.oct[candidate], spec), cmap="gray", aspect="auto")
            match = candidate == query
            same_eye = not match and eyes is not None and eyes[candidate] == eyes[query]
            note = " ✓ match" if match else " ✓ same eye" if same_eye else ""
            color = "green" if match else "darkorange" if same_eye else "black"
            ax.set_title(f"#{c + 1} s={scores[r, c]:.2f}" + note, fontsize=8, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor({"green": "limegreen", "black": "lightgrey"}.get(color, color))
                spine.set_linewidth(1 if color == "black" else 4)
    same = ", orange = another visit of the same eye" if eyes is not None else ""
    fig.suptitle(f"Fundus → OCT retrieval on held-out patients — {label}\n"
                 f"(top-{k} of {len(rows)} OCT volumes, central B-scan; green = true pair{same})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
