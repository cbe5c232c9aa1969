"""Progress a person can follow, and the end-of-run summary.

While a run trains, everything goes through the `thumbnet_keras.progress`
logger (`logging`, never `print`: the command line, Prefect's run logs or a
user's own configuration decide where it shows):

    [4/15] fm_pretrain f=2
    [4/15] fm_pretrain f=2 epoch 1/5:  loss 0.4334  (12s, ETA 48s)
    ...
    [4/15] fm_pretrain f=2: done in 1m01s
    [5/15] joint f=2
    [5/15] joint f=2 epoch 1/10:  loss 1.8489  train top-1 27.3%  val top-1 50.0% (best)  (3s, ETA 27s)
    ...
    [5/15] joint f=2: done in 31s, kept epoch 4 (val top-1 52.0%)

(the stage modules add their own lines between these, e.g. BatchNorm
re-estimation). The stage count comes from the run's config: the teacher,
then every stage of `STAGES` per factor (e_pretrain only when
`e_pretrain_epochs` > 0, fm_pretrain only when `fm_epochs` > 0). In a terminal Keras draws its progress bar as well
(`keras_verbose`); piped, the epoch line above is the only per-epoch output.

`format_summary(metrics)` (and `run_summary(run_dir)`, which reads the run's
`metrics.json`) is the table the command line prints when a run ends: the
teacher, every baseline and ThumbNet per factor with validation and test
top-1, MACs, the teacher's MACs over the model's and measured images/s,
then the output paths.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Collection, Mapping, Sequence

import keras

from thumbnet_keras.pipeline import interrupt
from thumbnet_keras.pipeline.checkpoint import TIEBREAK, improves
from thumbnet_keras.pipeline.config import skipped_stages

__all__ = [
    "EpochProgress",
    "format_duration",
    "format_summary",
    "keras_verbose",
    "logger",
    "run_stage_ids",
    "run_summary",
    "skipped_stages",
    "stage_done",
    "stage_label",
    "stage_started",
    "summary_rows",
]

logger = logging.getLogger("thumbnet_keras.progress")


def run_stage_ids(factors: Sequence[int], skip: Collection[str] = ()) -> list[str]:
    """The stage ids of a `thumbnet` run, in the order they run, without the
    stages in `skip` (`skipped_stages`)."""
    from thumbnet_keras.pipeline.stages import STAGES, stage_id

    stages = [s for s in STAGES if s not in skip]
    return ["teacher"] + [stage_id(f, s) for f in factors for s in stages]


def _title(sid: str) -> str:
    """`f2-joint` -> `joint f=2`; `teacher` stays."""
    head, sep, stage = sid.partition("-")
    if sep and head[:1] == "f" and head[1:].isdigit():
        return f"{stage} f={head[1:]}"
    return sid


def stage_label(factors: Sequence[int], sid: str, skip: Collection[str] = ()) -> str:
    """`[3/13] fm_pretrain f=2`: the stage's place in the run and its name
    (`skip` as in `run_stage_ids`)."""
    ids = run_stage_ids(factors, skip)
    if sid not in ids:
        return f"[{_title(sid)}]"
    return f"[{ids.index(sid) + 1}/{len(ids)}] {_title(sid)}"


def format_duration(seconds: float) -> str:
    """`48s`, `3m05s`, `1h02m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def keras_verbose(verbose: int | str) -> int:
    """Keras' own `verbose` for `model.fit`, given the run's setting.

    `1`: Keras' progress bar (a terminal); `2` (piped) and `0`: Keras says
    nothing, `EpochProgress` logs one line per epoch instead (Keras' `2`
    prints two lines per epoch and every loss term). `"auto"`: `1` in a
    terminal, else `0`.
    """
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 0
    return 1 if int(verbose) == 1 else 0


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


# When each stage of this process started (`stage_started`), for the wall
# time `stage_done` logs: loading, checks and evaluation included (a record's
# `seconds` are its training alone: a loaded teacher's are 0).
_STARTED: dict[str, float] = {}


def stage_started(factors: Sequence[int], sid: str, skip: Collection[str] = ()) -> None:
    """Logs `[3/13] fm_pretrain f=2`: a stage starts (or is found done).
    A Ctrl-C that something swallowed stops the run here."""
    interrupt.check()
    _STARTED.clear()  # One stage at a time: a stage found done leaves none.
    _STARTED[sid] = time.perf_counter()
    logger.info(stage_label(factors, sid, skip))


def stage_done(run, sid: str, record: Mapping) -> None:
    """Logs the end of a stage: its time (since `stage_started` in this
    process, else the record's training time) and the epoch it kept.

    Args:
        run: the `Run` (its config gives the stage count).
        sid: the stage id.
        record: the stage record (`seconds`, `selection`, `unavailable`).
    """
    config = run.config()["config"]
    text = f"{stage_label(config['factors'], sid, skipped_stages(config))}: "
    started = _STARTED.pop(sid, None)
    if record.get("unavailable"):
        text += "unavailable"
    else:
        seconds = record.get("seconds") or 0
        if started is not None:
            seconds = time.perf_counter() - started
        text += f"done in {format_duration(seconds)}"
        selection = record.get("selection") or {}
        if selection.get("best_value") is not None:
            text += (
                f", kept epoch {selection['best_epoch']} "
                f"(val top-1 {_pct(selection['best_value'])})"
            )
    logger.info(text)


class EpochProgress(keras.callbacks.Callback):
    """Logs one line per epoch: the loss, train and validation top-1 (when
    the stage has them, with the best so far marked) and, once the first
    epoch is timed, the stage's estimated time left (the mean epoch time
    times the epochs left; the first epoch, which includes tracing, counts
    only until a second one is timed).

    Args:
        sid: the stage id (`teacher`, `f2-joint`, ...).
        epochs: the stage's total epochs (a resumed `fit` starts later).
        factors: the run's factors (for the stage count), or None.
        log: a `logging.Logger` (default: `thumbnet_keras.progress`).
        skip: the stages the run does not have (`skipped_stages`; for the count).
    """

    def __init__(
        self,
        sid: str,
        epochs: int,
        factors: Sequence[int] | None = None,
        log: logging.Logger | None = None,
        skip: Collection[str] = (),
    ):
        super().__init__()
        self.label = stage_label(factors or [], sid, skip)
        self.epochs = int(epochs)
        self.log = log or logger
        self.durations: list[float] = []
        self.best: dict | None = None  # {"value", "val_loss"?}, as kept
        self._start = 0.0
        self._pending: str | None = None

    def restore_best(self, best: Mapping) -> None:
        """A resumed stage's best epoch so far (its checkpoint's `{"value",
        "val_loss"?}`), so "(best)" marks only an epoch that beats it."""
        self.best = dict(best)

    def _flush(self) -> None:
        if self._pending is not None:
            self.log.info(self._pending)
            self._pending = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._flush()  # The last epoch's line, whatever follows.
        # A Ctrl-C that something swallowed (`interrupt`): stop here, where
        # the last epoch's checkpoint is saved (it runs after this callback
        # at an epoch's end).
        interrupt.check()
        self._start = time.perf_counter()

    def format_epoch(self, epoch: int, logs: Mapping, seconds: float) -> str:
        """The line for (0-based) `epoch`; updates the timing and best value."""
        self.durations.append(seconds)
        parts = [f"{self.label} epoch {epoch + 1}/{self.epochs}:"]
        if "loss" in logs:
            parts.append(f"loss {float(logs['loss']):.4f}")
        if "accuracy" in logs:
            parts.append(f"train top-1 {_pct(float(logs['accuracy']))}")
        if "val_accuracy" in logs:
            value = float(logs["val_accuracy"])
            text = f"val top-1 {_pct(value)}"
            loss = logs.get(TIEBREAK)
            if improves(value, loss, self.best):  # What the checkpoint keeps.
                self.best = {"value": value}
                if loss is not None:
                    self.best[TIEBREAK] = float(loss)
                text += " (best)"
            parts.append(text)
        left = self.epochs - (epoch + 1)
        # The first epoch of a process also traces/compiles the step: once
        # later epochs are timed, they alone give the pace.
        timed = self.durations[1:] or self.durations
        mean = sum(timed) / len(timed)
        timing = f"({format_duration(seconds)}"
        timing += f", ETA {format_duration(mean * left)})" if left > 0 else ")"
        return "  ".join(parts) + "  " + timing

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        # Logged once Keras' progress bar (which runs after this callback)
        # has ended its line: at the next epoch's start or the end of `fit`.
        seconds = time.perf_counter() - self._start
        self._pending = self.format_epoch(epoch, logs or {}, seconds)

    def on_train_end(self, logs=None) -> None:
        self._flush()


# --- the end-of-run summary ------------------------------------------------

_BASELINE_ORDER = (
    "teacher_bicubic",
    "teacher_bicubic_bn",
    "bicubic_cl",
    "bicubic_kd",
    "bicubic_kd_equal",
)
_SHORT = {
    "teacher": "Teacher",
    "teacher_bicubic": "Teacher on bicubic (no retraining)",
    "teacher_bicubic_bn": "Teacher on bicubic, BN re-estimated",
    "bicubic_cl": "Bicubic + CL",
    "bicubic_kd": "Bicubic + KD",
    "bicubic_kd_equal": "Bicubic + KD, larger thumbnail",  # MACs: its columns
    "thumbnet": "ThumbNet (E + S)",
}


def _macs(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _ordered_arms(arms: Sequence[Mapping]) -> list[Mapping]:
    """The teacher, then per factor the baselines, then ThumbNet."""
    order = {
        name: i for i, name in enumerate(("teacher", *_BASELINE_ORDER, "thumbnet"))
    }

    def key(arm):
        factor = arm.get("factor") or 0
        return (factor, order.get(arm["name"], len(order)))

    return sorted(arms, key=key)


def _rate(value) -> str:
    return "" if not value else f"{value:,.0f}"


def summary_rows(metrics: Mapping) -> list[dict]:
    """One row per evaluated model: model, f, thumbnail (the side S
    classifies; every model takes the full-size image), val top-1, test
    top-1, MACs, fewer MACs (the teacher's MACs over the model's: a ratio of
    work, not a timing) and images/s (measured on this machine by
    `evaluate`, the Keras models side by side at the run's batch size; ""
    when not measured)."""
    arms = metrics.get("arms", [])
    teacher = next((a for a in arms if a["name"] == "teacher"), None)
    rows = []
    for arm in _ordered_arms(arms):
        speedup = ""
        if teacher is not None and arm["flops"]:
            speedup = f"{teacher['flops'] / arm['flops']:.1f}x"
        val = arm.get("val_top1")
        rows.append(
            {
                "model": _SHORT.get(arm["name"], arm.get("label", arm["name"])),
                "f": str(arm.get("factor") or "-"),
                "thumbnail": (
                    "none"
                    if arm["name"] == "teacher"
                    else f"{arm['input_size']}x{arm['input_size']}"
                ),  # fmt: skip
                "val top-1": "" if val is None else f"{100 * val:.2f}%",
                "test top-1": f"{100 * arm['top1']:.2f}%",
                "MACs": _macs(arm["flops"]),
                "fewer MACs": speedup,
                "images/s": _rate(arm.get("images_per_second")),
            }
        )
    return rows


def _text_table(rows: Sequence[Mapping]) -> list[str]:
    head = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in head]
    left = {"model"}

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if h in left else str(c).rjust(w)
            for h, c, w in zip(head, cells, widths)
        ).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    out += [line([r[h] for h in head]) for r in rows]
    return out


def _health_lines(metrics: Mapping) -> list[str]:
    from thumbnet_keras.reports.render import health_warnings

    warnings = health_warnings(metrics)
    if not warnings:
        return []
    return [f"WARNING: {warnings[0]}", *(f"  - {text}" for text in warnings[1:])]


def format_summary(metrics: Mapping) -> str:
    """The end-of-run summary: health warnings first (when the run has any),
    the headline, the results table and the output paths, with which factor
    the top-level `thumbnet.keras` is.

    Args:
        metrics: the run's `metrics.json` (see `reports.render`).
    """
    from thumbnet_keras.reports.render import THROUGHPUT_NOTE, caveats, headline

    lines = _health_lines(metrics)
    lines.append(f"Run {metrics.get('run_name', '')}: {headline(metrics)}")
    lines += [f"Note: {text}" for text in caveats(metrics)]
    if metrics.get("arms"):
        lines += ["", *_text_table(summary_rows(metrics)), THROUGHPUT_NOTE]
    outputs = metrics.get("outputs", {})
    primary = metrics.get("primary_factor")
    factors = (metrics.get("config") or {}).get("factors") or []
    lines.append("")
    if "thumbnet.keras" in outputs:
        note = f"  (f={primary}, the first factor)" if primary else ""
        lines.append(f"thumbnet.keras: {outputs['thumbnet.keras']}{note}")
    for factor in factors:
        key = f"f{factor}/thumbnet.keras"
        if key in outputs and len(factors) > 1:
            lines.append(f"  f={factor}:      {outputs[key]}")
    for key in ("report.html", "report.md", "metrics.json"):
        if key in outputs:
            lines.append(f"{key + ':':<15} {outputs[key]}")
    return "\n".join(lines)


def run_summary(run_dir: str) -> str:
    """`format_summary` of the run folder's `metrics.json`."""
    from thumbnet_keras.pipeline.rundir import Run, read_json

    return format_summary(read_json(Run(run_dir).metrics_json))
