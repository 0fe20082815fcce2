"""The harness's models: loaders for the real checkpoints and the built-in model
(:mod:`.loaders`), tiny random-weight pipelines for tests (:mod:`.tiny`), full-size random-weight
architectures for benchmarks (:mod:`.architectures`) and the samplers (:mod:`.solvers`). The
library never imports them: it only needs a pipeline, whoever built it."""
