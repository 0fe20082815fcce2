"""What every job stands on: the Hydra scaffold (app, schema, config checks), the run folder,
pipelines and conditions, logging, progress, timing, multi-GPU sharding and sample output.
Imports nothing from the jobs or :mod:`experiments.stages`."""
