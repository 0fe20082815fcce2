"""The stages a job runs, in order: search a plan (or find it in the plan cache), generate raw and
compressed samples (resumable; each sample folder fingerprinted), evaluate them, measure latency.
Jobs (``experiments/*.py``) call them; they call :mod:`experiments.infra` and the library."""
