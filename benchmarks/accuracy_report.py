"""Selection, tables, targets and the plot of the accuracy study.

Pure functions of the JSON files that `accuracy_study.py` writes, so that
every number in `docs/results.md` can be recomputed from them:

* `choose(search_records)`: the settings validation chose (`chosen.json`);
* `aggregate(final_records)`: mean and standard deviation over seeds of
  validation and test top-1 per arm and factor;
* `targets(rows, factors)`: the issue's P3 targets, on test means;
* `markdown(table)`, `plot(table, path)`, `write_summary(results_dir)`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

ARM_ORDER = (
    "teacher",
    "teacher_bicubic",
    "teacher_bicubic_bn",
    "bicubic_cl",
    "bicubic_kd",
    "bicubic_kd_equal",
    "es_kd",
    "es_kd_mm",
    "es_kd_fm",
    "es_full",
    "es_kd_pre",
    "thumbnet",
)
# What ThumbNet must beat: every way to get a thumbnail classifier without E.
BASELINES = (
    "teacher_bicubic",
    "teacher_bicubic_bn",
    "bicubic_cl",
    "bicubic_kd",
    "bicubic_kd_equal",
)
ARM_LABELS = {
    "teacher": "Teacher, full size",
    "teacher_bicubic": "Teacher on bicubic thumbnails",
    "teacher_bicubic_bn": "Teacher on bicubic, BN re-estimated",
    "bicubic_cl": "Bicubic + S fine-tuned (CL)",
    "bicubic_kd": "Bicubic + S (CL + KD)",
    "bicubic_kd_equal": "Bicubic + S (CL + KD), at least E + S's MACs",
    "es_kd": "E + S, CL + KD",
    "es_kd_mm": "E + S, CL + KD + MM",
    "es_kd_fm": "E + S, CL + KD + FM",
    "es_full": "E + S, CL + KD + FM + MM, no FM pre-train",
    "es_kd_pre": "E + S, CL + KD after e_pretrain (2 epochs)",
    "thumbnet": "ThumbNet (FM pre-train, CL + KD + FM + MM)",
}
# Search families: the arms one learning-rate choice drives, and the
# ThumbNetParams fields it sets in the final runs ("main": the main run;
# an ablation name: that ablation's own run).
FAMILIES = {
    "baselines": (("bicubic_cl", "bicubic_kd", "bicubic_kd_equal"), "main",
                  ("baseline_learning_rate",)),
    "thumbnet": (("thumbnet",), "main", ("fm_learning_rate", "joint_learning_rate")),
    "es_kd": (("es_kd",), "es_kd", ("joint_learning_rate",)),
    "es_kd_mm": (("es_kd_mm",), "es_kd_mm", ("joint_learning_rate",)),
    "es_kd_fm": (("es_kd_fm",), "es_kd_fm", ("joint_learning_rate",)),
    "es_full": (("es_full",), "es_full", ("joint_learning_rate",)),
}  # fmt: skip


def choose(records: list[dict]) -> dict:
    """The grid value with the best mean validation top-1, per family.

    Args:
        records: search records of one dataset, `{"kind": "search", "seed",
            "variants": [{"value": lr, "arms": [{"arm", "factor",
            "val_top1"}]}]}`. Test numbers are refused.

    Returns:
        `{"main": {field: value}, "<ablation>": {field: value},
        "validation": {family: {value: mean val top-1}}, "search_seeds"}`.
        Ties go to the first grid value.
    """
    scores: dict = defaultdict(lambda: defaultdict(list))
    grid: list = []
    for record in records:
        for variant in record["variants"]:
            if variant["value"] not in grid:
                grid.append(variant["value"])
            for arm in variant["arms"]:
                if any("test" in key or key == "top1" for key in arm):
                    raise ValueError(f"A search record holds a test number: {arm}")
                for family, (arms, _, _) in FAMILIES.items():
                    if arm["arm"] in arms:
                        scores[family][variant["value"]].append(arm["val_top1"])
    chosen: dict = {
        "validation": {},
        "search_seeds": sorted(r["seed"] for r in records),
    }
    for family, (_, target, fields) in FAMILIES.items():
        means = {v: sum(s) / len(s) for v, s in scores[family].items() if s}
        if not means:
            continue
        best = max((v for v in grid if v in means), key=means.__getitem__)
        chosen.setdefault(target, {}).update({field: best for field in fields})
        chosen["validation"][family] = {str(v): round(m, 5) for v, m in means.items()}
    return chosen


def load_results(results_dir: str | Path) -> list[dict]:
    """Every final per-seed record under `results_dir`, sorted by file name."""
    records = []
    for path in sorted(Path(results_dir).glob("*-seed*.json")):
        record = json.loads(path.read_text())
        if record.get("kind") == "final":
            records.append(record)
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _row(arm: str, factor: int | None, items: list[tuple[int, dict]]) -> dict:
    """One table row from `(seed, arm record)` pairs: mean/std in percent."""
    items = sorted(items, key=lambda item: item[0])
    test = [100 * r["test_top1"] for _, r in items]
    val = [100 * r["val_top1"] for _, r in items]
    first = items[0][1]
    label = ARM_LABELS.get(arm, arm)
    if arm == "teacher" and factor is not None:
        label += f" (the f = {factor} runs' teacher)"
    return {
        "arm": arm,
        "label": label,
        "factor": factor,
        "input_size": first["input_size"],
        "seeds": [s for s, _ in items],
        "test": test,
        "validation": val,
        "test_mean_std": _mean_std(test),
        "validation_mean_std": _mean_std(val),
        "flops": first["flops"],
        "params": first["params"],
    }


def aggregate(records: list[dict]) -> dict:
    """`{dataset: {(arm, factor): row}}`: mean/std over seeds in percent.

    The teacher row repeats in every factor's record of a seed. When a
    dataset's factors were run with different teachers (a teacher retrained
    between sessions gives other numbers), the teacher gets one row per
    factor, `("teacher", f)`, and each factor's targets use its own."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    teachers: dict = defaultdict(lambda: defaultdict(dict))  # dataset -> f -> seed
    for record in records:
        factors = sorted({r["factor"] for r in record["arms"] if r["factor"]})
        for r in record["arms"]:
            group = groups[record["dataset"]][(r["arm"], r["factor"])]
            if all(seed != record["seed"] for seed, _ in group):
                group.append((record["seed"], r))
            if r["arm"] == "teacher":
                for f in factors:
                    teachers[record["dataset"]][f][record["seed"]] = r
    table = {}
    for dataset, arms in groups.items():
        rows = {key: _row(*key, items) for key, items in arms.items()}
        per_factor = {
            f: _row("teacher", f, list(by_seed.items()))
            for f, by_seed in teachers[dataset].items()
        }
        results = {
            (tuple(r["test"]), tuple(r["validation"])) for r in per_factor.values()
        }
        if len(results) > 1:
            del rows[("teacher", None)]
            rows |= {("teacher", f): row for f, row in per_factor.items()}
        table[dataset] = rows
    return table


# The arm each target line judges: the paper's recipe, and the product's
# default recipe (E + S with CL + KD, chosen on validation: docs/design.md),
# before and since its e_pretrain stage (on by default from 2026-11-29).
JUDGED = {
    "thumbnet": "ThumbNet, paper recipe",
    "es_kd": "ThumbNet, default recipe less e_pretrain",
    "es_kd_pre": "ThumbNet, default recipe (with e_pretrain)",
}


def targets(rows: dict, factors: list[int], arm: str = "thumbnet") -> list[dict]:
    """The P3 targets of one dataset, on test means over seeds.

    f = 2: ThumbNet within 1 point of the teacher, and above EVERY baseline
    (`BASELINES`) by more than the seed spread (the larger of the two
    standard deviations). Other factors: ThumbNet closes >= 60% of the gap
    between the best baseline and the teacher.
    """
    out = []
    for f in factors:
        teacher = rows.get(("teacher", f)) or rows.get(("teacher", None))
        thumb = rows.get((arm, f))
        bases = {b: rows[(b, f)] for b in BASELINES if (b, f) in rows}
        if not (teacher and thumb and bases):
            continue
        t, _ = teacher["test_mean_std"]
        m, s_m = thumb["test_mean_std"]
        margins = {
            b: {
                "mean": r["test_mean_std"][0],
                "margin": m - r["test_mean_std"][0],
                "spread": max(s_m, r["test_mean_std"][1]),
            }
            for b, r in bases.items()
        }
        best = max(margins, key=lambda b: margins[b]["mean"])
        gap = t - margins[best]["mean"]
        closed = (m - margins[best]["mean"]) / gap if gap > 0 else None
        item = {
            "factor": f,
            "arm": arm,
            "teacher": t,
            "thumbnet": m,
            "best_baseline": best,
            "baselines": margins,
            "gap_closed": closed,
        }
        if f == 2:
            item["target"] = (
                "within 1 pt of the teacher and above every baseline by > spread"
            )
            item["met"] = bool(
                t - m <= 1.0
                and all(v["margin"] > v["spread"] for v in margins.values())
            )
        else:
            item["target"] = "closes >= 60% of the best-baseline -> teacher gap"
            item["met"] = None if closed is None else bool(closed >= 0.6)
        out.append(item)
    return out


def _verdict(met: bool | None) -> str:
    if met is None:
        return "not applicable (the best baseline is not below the teacher)"
    return "met" if met else "missed"


def _fmt_flops(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _factors(rows: dict) -> list[int]:
    return sorted({r["factor"] for r in rows.values() if r["factor"]})


def markdown(table: dict) -> str:
    """One table per dataset, then its targets."""
    lines = []
    for dataset, rows in sorted(table.items()):
        n = max(len(r["seeds"]) for r in rows.values())
        lines += [
            f"### {dataset}, {n} seed(s)",
            "",
            "| f | input | arm | val top-1 % | test top-1 % | MACs | params |",
            "|---|---|---|---|---|---|---|",
        ]
        order = sorted(
            rows.values(), key=lambda r: (r["factor"] or 1, ARM_ORDER.index(r["arm"]))
        )
        for r in order:
            (vm, vs), (tm, ts) = r["validation_mean_std"], r["test_mean_std"]
            lines.append(
                f"| {r['factor'] or 1} | {r['input_size']} | {r['label']} | "
                f"{vm:.2f} ± {vs:.2f} | {tm:.2f} ± {ts:.2f} | "
                f"{_fmt_flops(r['flops'])} | {r['params']:,} |"
            )
        checks = [c for a in JUDGED for c in targets(rows, _factors(rows), a)]
        if checks:
            lines += ["", "Targets (test means over seeds):", ""]
        for c in checks:
            closed = (
                "n/a" if c["gap_closed"] is None else f"{100 * c['gap_closed']:.0f}%"
            )
            worst = min(
                c["baselines"].items(), key=lambda kv: kv[1]["margin"] - kv[1]["spread"]
            )
            lines.append(
                f"- f={c['factor']}: teacher {c['teacher']:.2f}, {JUDGED[c['arm']]} "
                f"{c['thumbnet']:.2f}, "
                f"best baseline {c['best_baseline']} {c['baselines'][c['best_baseline']]['mean']:.2f}"
                f"; gap closed {closed}; smallest margin over spread: {worst[0]} "
                f"({worst[1]['margin']:+.2f} vs {worst[1]['spread']:.2f}). "
                f"Target: {c['target']}: **{_verdict(c['met'])}**."
            )
        lines.append("")
    return "\n".join(lines)


UNTRAINED = ("teacher_bicubic", "teacher_bicubic_bn")  # far below: named, not drawn


def plot(table: dict, path: str | Path) -> None:
    """Test top-1 (mean ± std over seeds) against MACs, one panel per dataset.

    Each method's factors are joined by a line; the teacher is a dashed
    line; the untrained "teacher on bicubic" arms, 50+ points below, are
    listed in the panel's note instead of squeezing the axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if not table:
        return
    fig = Figure(figsize=(6.5 * len(table), 5), dpi=100)
    for i, dataset in enumerate(sorted(table)):
        ax = fig.add_subplot(1, len(table), i + 1)
        rows_all = table[dataset].values()
        for k, arm in enumerate(ARM_ORDER):
            rows = sorted(
                (r for r in rows_all if r["arm"] == arm), key=lambda r: r["flops"]
            )
            if not rows or arm in UNTRAINED:
                continue
            if arm == "teacher":  # One per teacher (see `aggregate`).
                for r in rows:
                    ax.axhline(r["test_mean_std"][0], color="k", ls="--", lw=1)
            x = [r["flops"] for r in rows]
            y = [r["test_mean_std"][0] for r in rows]
            ax.errorbar(x, y, yerr=[r["test_mean_std"][1] for r in rows],
                        marker="*xsDv^<>hoXP"[k], markersize=7, capsize=3,
                        linestyle="-" if len(rows) > 1 else "none", lw=1,
                        label=ARM_LABELS.get(arm, arm))  # fmt: skip
            for r in rows:
                ax.annotate(f"{r['test_mean_std'][0]:.1f}", (r["flops"], r["test_mean_std"][0]),
                            textcoords="offset points", xytext=(4, 3), fontsize=7)  # fmt: skip
        below = [f"{ARM_LABELS.get(r['arm'], r['arm'])} f={r['factor']}: "
                 f"{r['test_mean_std'][0]:.1f}" for r in rows_all if r["arm"] in UNTRAINED]  # fmt: skip
        if below:
            ax.text(0.01, 0.99, "not drawn (untrained):\n" + "\n".join(sorted(below)),
                    transform=ax.transAxes, fontsize=6, va="top")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("multiply-adds per image (inference model, E included)")
        ax.set_ylabel("test top-1 % (mean ± std over seeds)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.savefig(str(path), bbox_inches="tight")


def write_summary(results_dir: str | Path, markdown_path: str | None = None) -> dict:
    """Aggregates the final per-seed files; writes `summary.json`, the plot
    and, when asked, the markdown tables."""
    results_dir = Path(results_dir)
    table = aggregate(load_results(results_dir))
    text = markdown(table)
    serial = {
        dataset: {
            "arms": list(rows.values()),
            "targets": [c for a in JUDGED for c in targets(rows, _factors(rows), a)],
        }
        for dataset, rows in table.items()
    }
    if table:
        (results_dir / "summary.json").write_text(json.dumps(serial, indent=1) + "\n")
        plot(table, results_dir / "accuracy_vs_flops.png")
    if markdown_path:
        Path(markdown_path).write_text(text)
    return {"markdown": text, "summary": serial}
