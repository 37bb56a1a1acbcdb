"""The DVC pipeline on a Ray cluster, with the DVC remote and its run-cache as the only shared state.

``python -m stages.cluster_repro`` (the coordinator, ``stages/cluster_repro.py``) turns every stage of the DAG into
a Ray task as soon as its upstream stages are done. A task (``worker.run_stage``) runs on any node, in a clone of
the repository of its own: it resets the clone to the coordinator's commit, writes the accepted ``dvc.lock``
entries of the stage's upstream stages, pulls their outputs and the remote's run-cache entries of its own stage,
runs ``dvc repro <stage>``, pushes the stage's outputs and then its run-cache entry. At the end the coordinator
restores the accepted runs in the user's workspace in one pass (``restore.py``: every output fetched in one batch
and checked out, then ``dvc.lock`` written once, as a serial ``dvc repro`` leaves it), running none, and checks the
result with ``dvc status``.

This package imports neither JAX nor the pipeline's stage modules: the worker side needs the standard library,
PyYAML, Ray and DVC's Python API, the coordinator side DVC's Python API and rich.
"""
