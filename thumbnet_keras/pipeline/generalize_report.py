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

__all__ = [
    "generalize_markdown",
    "generalize_summary_text",
    "mean_std",
    "summarize_generalize",
]


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
    # Rounded: 100 * (0.6 - 0.5) is 9.999999999999998, not a number to print.
    return None if value is None else round(100.0 * value, 6)


def _stats(rows: Sequence[Mapping], key: str) -> dict | None:
    """`{"mean", "std"}` of `row[key]` over rows; None if any value is None."""
    values = [row[key] for row in rows]
    if any(v is None for v in values):
        return None
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _sign(differences: Sequence[float], paired: Sequence[Mapping | None] = ()) -> str:
    """The verdict over seeds: which arm is ahead on every seed, and whether
    each seed's test set can tell (its paired 95% interval excludes 0).

    "E better on every seed" / "bicubic better on every seed" (each paired
    interval excluding 0, or no paired data: older records), "... on every
    seed, within chance on k of n" (some intervals hold 0: one image in a
    thousand is no evidence), "no clear difference on any seed" (every
    interval holds 0, signs mixed), "mixed", or "one seed"."""
    from thumbnet_keras.evaluation.paired import verdict

    if len(differences) < 2:
        return "one seed"
    known = [p for p in paired if p is not None]
    missing = len(paired) - len(known)
    unclear = sum(verdict(p) not in ("ahead", "behind") for p in known)
    for side, better in ((1, "E"), (-1, "bicubic")):
        if all(side * d > 0 for d in differences):
            text = f"{better} better on every seed"
            if unclear:
                text += f", within chance on {unclear} of {len(differences)}"
            if missing:  # records written before per-image hits were kept
                text += f" (no paired interval on {missing} of {len(differences)})"
            return text
    if paired and not missing and unclear == len(known):
        return "no clear difference on any seed"
    return "mixed"


def _paired(learned: Mapping, bicubic: Mapping) -> dict | None:
    """Learned - bicubic on the same test images (`evaluation.paired`), in
    points; None when a record has no per-image hits (older runs)."""
    a, b = learned.get("test_correct"), bicubic.get("test_correct")
    if not a or not b or len(a) != len(b):
        return None
    import numpy as np

    from thumbnet_keras.evaluation.paired import paired_difference

    p = paired_difference(
        np.frombuffer(a.encode(), np.uint8) == ord("1"),
        np.frombuffer(b.encode(), np.uint8) == ord("1"),
    )
    return {
        "difference": _points(p["difference"]),
        "ci95": [_points(v) for v in p["ci95"]],
        "p_value": p["p_value"],
        "a_only": p["a_only"],
        "b_only": p["b_only"],
        "examples": p["examples"],
    }


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
        in points (`val_diff` None without validation), `sign` (the verdict,
        from the per-seed paired intervals: `_sign`), `test_examples`,
        `test_majority` (the largest class's share of test, in percent: what
        always answering it scores), `learned_macs` and `bicubic_macs`.
        Per seed, `paired`: learned - bicubic on the same test images
        (difference and 95% interval in points, McNemar's p, the images
        only one arm gets right), None for records without per-image hits.
        Accuracies and differences here are in percent and points; the
        records' own `top1` are fractions.
    """
    arms: dict[tuple[int, int], dict[str, Mapping]] = {}
    for record in records:
        key = (int(record["experiment"]), int(record["seed"]))
        arms.setdefault(key, {})[record["arm"]] = record
    summary = []
    for index, experiment in enumerate(experiments):
        per_seed, pairs = [], []
        for (exp, seed), pair in sorted(arms.items()):
            if exp != index or set(pair) != {"learned", "bicubic"}:
                continue
            pairs.append(pair)
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
                    "paired": _paired(learned, bicubic),
                }
            )
        if not per_seed:
            continue

        first = pairs[0]
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
                "sign": _sign(
                    [row["diff"] for row in per_seed],
                    [row["paired"] for row in per_seed],
                ),
                # What the numbers are out of, and what each arm costs.
                "test_examples": first["learned"].get("examples"),
                "test_majority": _points(first["learned"].get("test_majority")),
                "learned_macs": first["learned"].get("flops"),
                "bicubic_macs": first["bicubic"].get("flops"),
                "at_majority": _at_majority(pairs),
            }
        )
    return summary


def _at_majority(pairs: Sequence[Mapping[str, Mapping]]) -> list[str]:
    """ "learned s0", "bicubic s2": the trained S whose test top-1 is at or
    below the largest class's share, what answering that class always
    scores: it may have learned nothing, and its difference to the other
    arm is noise (a trial's report showed "+0.00 (+0.00 to +0.00)" for two
    such models without a word)."""
    found = []
    for pair in pairs:
        for arm in ("learned", "bicubic"):
            record = pair[arm]
            majority = record.get("test_majority")
            if majority is not None and record["top1"] <= majority + 1e-9:
                found.append(f"{arm} s{record['seed']}")
    return found


def majority_warning(summary: Sequence[Mapping]) -> str | None:
    """One paragraph naming every model at or below the largest-class rate,
    or None."""
    rows = [
        f"{row['dataset']} / {row['backbone']}: {', '.join(row['at_majority'])}"
        for row in summary
        if row.get("at_majority")
    ]
    if not rows:
        return None
    return (
        "**Warning: models at or below the largest-class rate** (always "
        "answering the largest class scores as much: they may have learned "
        "nothing, and their differences are noise; train longer or check the "
        "data): " + "; ".join(rows) + "."
    )


def _pm(stat: Mapping | None, signed: bool = False) -> str:
    if stat is None:
        return "n/a"
    mean = f"{stat['mean']:+.2f}" if signed else f"{stat['mean']:.2f}"
    return mean if stat["std"] is None else f"{mean} ± {stat['std']:.2f}"


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _seed_text(seed: Mapping) -> str:
    """'s0 +1.20 (-0.40 to +2.80)': a seed's difference and, where known,
    its paired 95% interval on the same test images."""
    text = f"s{seed['seed']} {seed['diff']:+.2f}"
    paired = seed.get("paired")
    if paired and not paired.get("a_only") and not paired.get("b_only"):
        text += " (no disagreement)"  # not a certain zero: "+0.00 to +0.00"
    elif paired:
        low, high = paired["ci95"]
        text += f" ({low:+.2f} to {high:+.2f})"
    return text


def _macs_pair(row: Mapping) -> str:
    from thumbnet_keras.reports.render import _flops

    learned, bicubic = row.get("learned_macs"), row.get("bicubic_macs")
    if not learned or not bicubic:
        return "n/a"
    return f"{_flops(int(learned))} / {_flops(int(bicubic))}"


VERDICT_NOTE = (
    "Per seed: the difference and its paired 95% interval on the same test "
    "images; the verdict says which arm is ahead on every seed and on how "
    "many seeds the test set cannot tell the two apart (the interval holds "
    "0). Compare top-1 with the largest class's share: a model that always "
    "answers that class scores it."
)


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
            "test images": row.get("test_examples") or "",
            "largest class %": _num(row.get("test_majority")),
            "learned E top-1 %": _pm(row["learned"]),
            "bicubic top-1 %": _pm(row["bicubic"]),
            "difference (points)": _pm(row["diff"], signed=True),
            "val difference (points)": _pm(row["val_diff"], signed=True),
            "per seed": ", ".join(_seed_text(s) for s in row["per_seed"]),
            "verdict": row["sign"],
            "MACs learned / bicubic": _macs_pair(row),
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
    parts = [f"# {title}", intro, _md_table(table).rstrip(), VERDICT_NOTE]
    warning = majority_warning(summary)
    if warning:
        parts.insert(2, warning)
    if notes:
        parts.append(
            "## Where the target differs from E's source\n\n" + "\n".join(notes)
        )
    parts.append("## Per seed\n\n" + _md_table(per_seed).rstrip())
    return "\n\n".join(parts) + "\n", table, per_seed


def generalize_summary_text(summary: Sequence[Mapping]) -> str:
    """What `thumbnet generalize` prints at the end: per experiment, both
    arms' test top-1 (mean ± std over seeds), the difference and the
    verdict, with what they are out of."""
    from thumbnet_keras.pipeline.progress import _text_table

    if not summary:
        return "No experiment finished a seed with both arms."
    rows = [
        {
            "dataset / backbone": f"{row['dataset']} / {row['backbone']}",
            "seeds": str(len(row["seeds"])),
            "test images": str(row.get("test_examples") or ""),
            "largest class": _num(row.get("test_majority")),
            "learned E": _pm(row["learned"]),
            "bicubic": _pm(row["bicubic"]),
            "difference": _pm(row["diff"], signed=True),
            "verdict": row["sign"],
        }
        for row in summary
    ]
    warning = majority_warning(summary)
    return "\n".join(
        [
            "Frozen E against bicubic thumbnails: test top-1 %, mean ± std over "
            "seeds; difference in points (learned - bicubic).",
            *_text_table(rows),
            *([warning.replace("**", "")] if warning else []),
        ]
    )
