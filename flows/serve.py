"""Serve the thumbnet deployments with `flow.serve` (no work pool needed).

    prefect server start                      # another terminal
    python -m flows.serve                     # from the repository root
    prefect deployment run thumbnet/train-elpv --watch
    prefect deployment run thumbnet/train-imagenet

(`--params '{"params": {...}}'` names only the fields to change: the others
keep the deployment's values; README, "Deployments".)

Deployments (parameters in `DEPLOYMENTS`, the same as in `prefect.yaml`):

* `thumbnet/train-imagenet`: ImageNet (ILSVRC2012 tars in the TFDS manual
  dir), f = 2, 224x224, the keras.applications ResNet-50 with its ImageNet
  weights as teacher (`applications:ResNet50`; `teacher: null` trains one
  first, days on ImageNet); SGD-Nesterov, warm-up + cosine, label smoothing.
* `thumbnet/train-places`: Places365 (TFDS places365_small), ResNet-50, f = 4.
* `thumbnet/train-elpv`: the embedded ELPV demo (f = 2 and 4).
* `generalize/generalize`: reuse the ELPV demo's E on Fashion-MNIST and with
  ResNet-18.
* `thumbnet/smoke`: a seconds-long run on the embedded ELPV data (tests, a
  worker's first check); `--smoke-dataset MANIFEST` points it at another
  manifest.
"""

from __future__ import annotations

import argparse
import copy
import sys

from flows.thumbnet_flows import generalize, thumbnet
from thumbnet_keras.pipeline.presets import demo

__all__ = ["DEPLOYMENTS", "build_deployments", "main", "pool_deployments"]

# The README's demo settings (`thumbnet demo`), without the run-folder name.
_ELPV = {k: v for k, v in demo().items() if k not in ("run_name", "batch_size")}

# name -> (flow name, parameters). ImageNet/Places settings follow ThumbNet
# (224x224 teacher input, f = 2 on ImageNet, f = 4 on Places).
DEPLOYMENTS: dict[str, tuple[str, dict]] = {
    "train-imagenet": (
        "thumbnet",
        {
            "params": {
                # The usual ImageNet recipe (sources: docs/flows.md).
                "dataset": "imagenet2012",
                "backbone": "resnet50",
                "teacher": "applications:ResNet50",
                "factors": [2],
                "image_size": 224,
                "teacher_epochs": 90,
                # The paper's recipe at this scale (docs/design.md), without
                # E pre-training through T (chosen on ELPV only).
                "e_pretrain_epochs": 0,
                "fm_epochs": 5,
                "fm_weight": 1.0,
                "mm_weight": 1.0,
                "joint_epochs": 30,
                "batch_size": 256,
                "optimizer": "sgd",
                "weight_decay": 1e-4,
                "warmup_epochs": 5,
                "label_smoothing": 0.1,
                "teacher_learning_rate": 0.1,
                "learning_rate": 0.01,
            }
        },
    ),
    "train-places": (
        "thumbnet",
        {
            "params": {
                "dataset": "places365",
                "backbone": "resnet50",
                "factors": [4],
                "image_size": 224,
                "teacher_epochs": 40,
                "e_pretrain_epochs": 0,
                "fm_epochs": 5,
                "fm_weight": 1.0,
                "mm_weight": 1.0,
                "joint_epochs": 30,
                "batch_size": 64,
                "learning_rate": 1e-4,
            }
        },
    ),
    "train-elpv": ("thumbnet", {"params": dict(_ELPV)}),
    "generalize": (
        "generalize",
        {
            "params": {
                "source_run": "runs/elpv-demo",
                "factor": 2,
                "experiments": [
                    {"dataset": "fashion_mnist", "backbone": None},
                    {"dataset": None, "backbone": "resnet18"},
                ],
                "epochs": 5,
            }
        },
    ),
    # A minute on a CPU: checks a worker or server end to end (ELPV, 32x32).
    "smoke": (
        "thumbnet",
        {"params": {"dataset": "elpv", "smoke": True, "factors": [2]}},
    ),
}

_FLOWS = {"thumbnet": thumbnet, "generalize": generalize}


def build_deployments(
    runs_dir: str | None = None, smoke_dataset: str | None = None
) -> list:
    """The `RunnerDeployment`s to serve.

    Args:
        runs_dir: overrides every deployment's `runs_dir` (default: `runs`
            relative to where the flow runs).
        smoke_dataset: when given, `thumbnet/smoke` runs on that manifest instead of ELPV.
    """
    deployments = []
    items = dict(DEPLOYMENTS)
    if smoke_dataset:
        items["smoke"] = (
            "thumbnet",
            {"params": {"dataset": smoke_dataset, "smoke": True, "factors": [2]}},
        )
    for name, (flow_name, parameters) in items.items():
        parameters = copy.deepcopy(parameters)
        if runs_dir:
            parameters["params"]["runs_dir"] = runs_dir
        deployments.append(
            _FLOWS[flow_name].to_deployment(
                name=name,
                parameters=parameters,
                tags=["thumbnet"],
                description=f"{flow_name}: {name}",
            )
        )
    return deployments


def main(argv: list[str] | None = None) -> None:
    """Serve every deployment until interrupted (Ctrl-C or SIGTERM)."""
    from prefect import serve

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--runs-dir", default=None, help="runs folder of every deployment"
    )
    parser.add_argument(
        "--smoke-dataset",
        default=None,
        help="run thumbnet/smoke on this manifest instead of ELPV",
    )
    args = parser.parse_args(argv)
    deployments = build_deployments(args.runs_dir, args.smoke_dataset)
    taken = pool_deployments(deployments)
    if taken:
        print(
            "python -m flows.serve: error: the server already has "
            f"{', '.join(taken)} on a work pool (`prefect deploy --all`). Serving "
            "the same names would take them over, and their runs would then "
            "crash on the pool's worker and here. Use the work pool (`prefect "
            "worker start --pool ...`), or delete those deployments first "
            "(`prefect deployment delete <flow>/<name>`), or serve to another "
            "server.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    serve(*deployments)


def pool_deployments(deployments) -> list[str]:
    """`flow/name (work pool 'p')` for each of `deployments` that the
    server already has on a work pool: `flow.serve` would overwrite it,
    keep its pool and drop its pull steps, so neither side could run it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            name = f"{deployment.flow_name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                taken.append(f"{name} (work pool {existing.work_pool_name!r})")
    return taken


if __name__ == "__main__":
    main()
