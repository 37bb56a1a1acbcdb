"""DVC stage `download`: the OGBench datasets the configured tasks need, downloaded from OGBench or generated here.

    python -m stages.download [--params params.yaml] [--out data/datasets] [--ogbench-dir ~/.ogbench/data]

Where each dataset comes from (`data.source`, `data.episodes`) and what the folder holds: stages.core.datasets.
Outputs, in OGBench's own names and format: `<dataset>.npz`, `<dataset>-val.npz` (100m datasets: a folder of
files) and `manifest.json`, written last. Identical params give byte-identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import cli, layout
from stages.core.datasets import obtain_datasets
from stages.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.download", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=layout.DATASETS)
    parser.add_argument("--ogbench-dir", type=Path, default=Path("~/.ogbench/data"),
                        help="OGBench's dataset folder, searched before downloading (default: ~/.ogbench/data)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    obtain_datasets(params.tasks, params.data, args.out, args.ogbench_dir.expanduser())


if __name__ == "__main__":
    cli.run(main)
