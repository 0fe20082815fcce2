#!/bin/bash
# one device call: world-size-1 check (PixArt-Sigma 2K loop, base vs head), the shard-band kernel test, compare_caches
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
python -m pytest -q -p no:cacheprovider tests/test_kernel_backends.py -k shard_band 2>&1 | tail -2
B="python -m experiments.benchmark --config-name memory sections=[end_to_end] end_to_end.cache_dtypes=[null] end_to_end.cache_devices=[null]"
for round in 1 2; do
  (cd .base && PYTHONPATH=/tmp/site:$PWD timeout 150 $B out_dir=$OUT/base$round > $OUT/base$round.log 2>&1; grep -iE "raw|0.24|loop" $OUT/base$round.log | tail -4)
  timeout 150 $B out_dir=$OUT/head$round > $OUT/head$round.log 2>&1; grep -iE "raw|0.24|loop" $OUT/head$round.log | tail -4
  [ $SECONDS -gt 330 ] && break
done
timeout $((560 - SECONDS)) python -m experiments.compare_caches device=cuda hydra.run.dir=/tmp/cc > $OUT/cc.log 2>&1; echo cc rc=$?
tail -3 $OUT/cc.log; cp -r /tmp/cc $OUT/cc 2>/dev/null; true
