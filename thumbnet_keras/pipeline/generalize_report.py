"""The `generalize` run's report, as a pure function of its records.

`summarize_generalize(experiments, records)` pairs the `learned` and
`bicubic` records of each (experiment, seed), and per experiment gives the
mean and spread over seeds of the difference learned - bicubic (test and
validation top-1, in points) with the per-seed values. `generalize_markdown`
renders that, with the notes on when E cannot help. No files are read here:
`generalize.write_generalize_report` does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["generalize_markdown", "mean_std", "summarize_generalize"]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std None for one value."""
    if not values:
        raise ValueError("mean_std needs at least one value.")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _points(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _stats(rows: Sequence[Mapping], key: str) -> dict | None:
    """`{"mean", "std"}` of `row[key]` over rows; None if any value is None."""
    values = [row[key] for row in rows]
    if any(v is None for v in values):
        return None
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _sign(differences: Sequence[float]) -> str:
    """'E better on every seed', 'bicubic better on every seed' or 'mixed'."""
    if len(differences) > 1 and all(d > 0 for d in differences):
        return "E better on every seed"
    if len(differences) > 1 and all(d < 0 for d in differences):
        return "bicubic better on every seed"
    return "mixed" if len(differences) > 1 else "one seed"


def summarize_generalize(
    experiments: Sequence[Mapping], records: Sequence[Mapping]
) -> list[dict]:
    """Per experiment, the learned - bicubic difference over seeds.

    Args:
        experiments: `[{"dataset", "backbone", "notes": [...]}, ...]` in
            experiment order (`source.json`).
        records: arm records, each with `experiment` (index), `seed`, `arm`
            ("learned" or "bicubic"), `top1` and `val_top1` (fractions; val
            None without a validation split).

    Returns:
        One dict per experiment with at least one complete seed:
        `dataset`, `backbone`, `notes`, `seeds` (the paired seeds),
        `per_seed` (`[{"seed", "learned_top1", "bicubic_top1", "diff",
        "learned_val_top1", "bicubic_val_top1", "val_diff"}]`, in points),
        `learned` / `bicubic` / `diff` / `val_diff` as `{"mean", "std"}`
        in points (`val_diff` None without validation), and `sign`.
    """
    arms: dict[tuple[int, int], dict[str, Mapping]] = {}
    for record in records:
        key = (int(record["experiment"]), int(record["seed"]))
        arms.setdefault(key, {})[record["arm"]] = record
    summary = []
    for index, experiment in enumerate(experiments):
        per_seed = []
        for (exp, seed), pair in sorted(arms.items()):
            if exp != index or set(pair) != {"learned", "bicubic"}:
                continue
            learned, bicubic = pair["learned"], pair["bicubic"]
            lv, bv = learned.get("val_top1"), bicubic.get("val_top1")
            per_seed.append(
                {
                    "seed": seed,
                    "learned_top1": _points(learned["top1"]),
                    "bicubic_top1": _points(bicubic["top1"]),
                    "diff": _points(learned["top1"] - bicubic["top1"]),
                    "learned_val_top1": _points(lv),
                    "bicubic_val_top1": _points(bv),
                    "val_diff": None if lv is None or bv is None else _points(lv - bv),
                }
            )
        if not per_seed:
            continue

        summary.append(
            {
                "dataset": experiment.get("name") or experiment["dataset"],
                "backbone": experiment["backbone"],
                "notes": list(experiment.get("notes", [])),
                "seeds": [row["seed"] for row in per_seed],
                "per_seed": per_seed,
                "learned": _stats(per_seed, "learned_top1"),
                "bicubic": _stats(per_seed, "bicubic_top1"),
                "diff": _stats(per_seed, "diff"),
                "val_diff": _stats(per_seed, "val_diff"),
                "sign": _sign([row["diff"] for row in per_seed]),
            }
        )
    return summary


def _pm(stat: Mapping | None, signed: bool = False) -> str:
    if stat is None:
        return "n/a"
    mean = f"{stat['mean']:+.2f}" if signed else f"{stat['mean']:.2f}"
    return mean if stat["std"] is None else f"{mean} ± {stat['std']:.2f}"


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def generalize_markdown(
    title: str, intro: str, summary: Sequence[Mapping]
) -> tuple[str, list[dict], list[dict]]:
    """The report's markdown, its summary table and its per-seed table.

    Returns:
        `(markdown, table, per_seed_table)`; the tables are lists of
        `{column: text}` rows.
    """
    from thumbnet_keras.reports.render import _md_table

    table = [
        {
            "dataset": row["dataset"],
            "backbone": row["backbone"],
            "seeds": len(row["seeds"]),
            "learned E top-1 %": _pm(row["learned"]),
            "bicubic top-1 %": _pm(row["bicubic"]),
            "difference (points)": _pm(row["diff"], signed=True),
            "val difference (points)": _pm(row["val_diff"], signed=True),
            "per seed": ", ".join(
                f"s{s['seed']} {s['diff']:+.2f}" for s in row["per_seed"]
            ),
            "sign": row["sign"],
        }
        for row in summary
    ]
    per_seed = [
        {
            "dataset": row["dataset"],
            "backbone": row["backbone"],
            "seed": s["seed"],
            "learned val %": _num(s["learned_val_top1"]),
            "learned test %": _num(s["learned_top1"]),
            "bicubic val %": _num(s["bicubic_val_top1"]),
            "bicubic test %": _num(s["bicubic_top1"]),
            "difference test (points)": _num(s["diff"], signed=True),
        }
        for row in summary
        for s in row["per_seed"]
    ]
    notes = [
        f"- **{row['dataset']} / {row['backbone']}**: {note}"
        for row in summary
        for note in row["notes"]
    ]
    parts = [f"# {title}", intro, _md_table(table).rstrip()]
    if notes:
        parts.append(
            "## Where the target differs from E's source\n\n" + "\n".join(notes)
        )
    parts.append("## Per seed\n\n" + _md_table(per_seed).rstrip())
    return "\n\n".join(parts) + "\n", table, per_seed
