"""DVC stage `download`: one OGBench dataset of the study, downloaded from OGBench or generated here.

    python -m stages.download --dataset cube-single-play-v0 [--params params.yaml] [--out data/datasets/<dataset>]
                              [--ogbench-dir ~/.ogbench/data]

One stage per dataset (`download@<dataset>`), so adding a dataset to a study builds that one alone. Where it comes
from (`data.source`, `data.episodes`) and what its folder holds: stages.core.datasets. Outputs, in OGBench's own
names and format: `<dataset>.npz`, `<dataset>-val.npz` (100m datasets: `<stem>-NNN.npz`, ...) and `manifest.json`,
written last. Identical params give byte-identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import cli, layout
from stages.core.datasets import obtain_dataset_folder
from stages.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.download", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="an OGBench dataset name of params.yaml's datasets")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, help="the dataset's folder (default: data/datasets/<dataset>)")
    parser.add_argument("--ogbench-dir", type=Path, default=Path("~/.ogbench/data"),
                        help="OGBench's dataset folder, searched before downloading (default: ~/.ogbench/data)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cli.check_dataset_arg(args.dataset, params)
    out = args.out if args.out is not None else layout.dataset_dir(args.dataset)
    obtain_dataset_folder(args.dataset, params.data, out, args.ogbench_dir.expanduser())


if __name__ == "__main__":
    cli.run(main)
