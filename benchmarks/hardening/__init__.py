"""The hardening campaign: attacks on the pipeline (kills, bad inputs, loader fuzzing) and their tally.

Run ``.venv/bin/python benchmarks/hardening.py --help``. Modules: ``fuzz`` (mutations of valid small files against
every loader of shared artifacts, each load in a memory-limited worker process with a time limit), ``bad_inputs``
(declarative broken-input cases through the real entry points), ``kills`` (SIGKILL at random points of every
stage, then the outputs are checked before any rerun), ``report`` (the table, as text and Markdown).
"""
