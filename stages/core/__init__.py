"""The pipeline's pure library. Importing the package first applies the project's XLA flags (xla_setup), so any
stage, test or benchmark that uses the core gets them before JAX starts its backend."""

from stages.core import xla_setup  # noqa: F401
