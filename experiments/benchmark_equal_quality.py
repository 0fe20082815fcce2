"""Wall-clock speed-up at equal PSNR on full-size architectures, with random weights.

    python -m experiments.benchmark_equal_quality comparison=outputs/compare out=outputs/bench_eq timed_steps=5  # GPU
    python -m experiments.benchmark_equal_quality comparison=<dir> size=tiny device=cpu out=/tmp/eq           # CPU smoke

A compare_caches run (``comparison``, its ``seed<n>/compare.json``) measured each row's compute and
PSNR on the built-in model; its rows' decision traces say what each transformer call ran. Picked
there (:mod:`.bench.row_selection`): the reference, the best-PSNR peer at compute <=
``compute_target`` (its PSNR is P*), and each method group's cheapest row reaching P*. Each
picked row's trace is replayed on PixArt-Σ at 2048², FLUX.1-dev at 2048² and Wan 2.1 1.3B at 480p
(:mod:`.bench.zoo_shapes`; :mod:`.bench.replay`), its loop timed against the raw model's on the
same dense kernel (FlashAttention-4 where it runs), its block FLOPs counted in the warm-up loop.
Verdict per model: fastattn's fastest pick (alone or stacked) is at least as fast as the reference.

That the built-in model's decisions transfer is an assumption: they are mapped by depth, and the
peers' own decision work (SeaCache's FFT, a first-block residual check) is not in the replayed time.
``timed_steps=n`` times n of the trace's steps (one drawn at random from each of n equal strata,
the same for every row; step 0 runs first, untimed, where it is not among them) and scales the
loop by steps / n; each row shows the trace's fractions of block calls that ran and of attention
calls that computed full attention, over all steps and over the timed ones. A single draw can
misrepresent a cache's skip pattern (10 of 50 steps ran SeaCache's blocks at 0.6 where all 50 run
0.5): where the reference's or fastattn's fastest row's fractions differ by more than
``SAMPLE_TOLERANCE`` the verdict is left undecided.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fastattn import describe
from fastattn.models import get_adapter

from .bench.per_model import check_model_settings, run_models
from .bench.replay import (Replay, Unreplayable, blocks_ran, full_attention, load_trace, loop_calls, run_calls,
                           timed_steps, trace_steps)
from .bench.row_selection import FASTATTN, RAW, STACKED, load_rows, select_rows, side, trace_paths
from .bench.zoo_shapes import CFG_BATCH, CFG_NONE, MODELS, build, zoo_shape
from .infra.app import ConfigError, hydra_app
from .infra.block_flops import BlockFlopCounter
from .infra.config import check_device, check_fraction, check_int, check_set
from .infra.timing import time_ms

JSON = "benchmark_equal_quality.json"
# what a step's work is made of, per trace: over the timed steps against over all of them
TRACE_SHARES = {"blocks_ran": blocks_ran, "full_attention": full_attention}
# a timed sample whose share differs more than this for a compared row decides no verdict
SAMPLE_TOLERANCE = 0.02
ASSUMPTION = ("Decisions are the built-in model's, mapped by depth onto this architecture: that they transfer is "
              "an assumption. The peers' own decision work (SeaCache's FFT, a first-block residual check) is not "
              "in the replayed time.")


def cfg_mode(model: str, size: str, transformer, inputs: dict) -> str:
    """How this model's calls hold CFG: a batch where the call holds both halves, else as its
    pipeline runs it (two calls, or none)."""
    if get_adapter(transformer).cfg_layout(transformer, (), inputs) is not None:
        return CFG_BATCH
    shape = zoo_shape(model, size)
    return CFG_NONE if shape.cfg == CFG_BATCH else shape.cfg


def benchmark(model: str, cfg: DictConfig, device: torch.device, dtype: torch.dtype, chosen: dict,
              traces: dict[str, dict]) -> dict:
    transformer, inputs = build(model, cfg.size, device, dtype)
    info = describe(transformer)
    mode = cfg_mode(model, cfg.size, transformer, inputs)
    total = chosen["steps"]
    timed = timed_steps(total, cfg.timed_steps)
    run = timed if timed[0] == 0 else [0] + timed  # step 0 fills the caches first (untimed)
    primed = len(run) - len(timed)
    scale = total / len(timed)

    def measure(steps_calls: list[list[dict]], reset) -> tuple[float, float]:
        """(loop seconds, scaled to every step; block FLOPs of the timed calls, counted in the warm-up)."""
        def before():
            reset()
            run_calls(transformer, steps_calls[:primed])

        def loop():
            run_calls(transformer, steps_calls[primed:])
        before()
        counter = BlockFlopCounter(transformer)
        try:
            loop()
        finally:
            counter.remove()
        seconds = time_ms(loop, device, cfg.warmup - 1, cfg.repeats, clock="wall", before=before) / 1e3
        return seconds * scale, counter.flops.total

    raw_s, raw_flops = measure(loop_calls(inputs, info.timestep_arg, run, total, mode), lambda: None)
    rows = []
    for row in chosen["timed"]:
        record = {"key": row["key"], "method": row["method"], "setting": row.get("setting", ""), "side": side(row),
                  "role": "raw" if side(row) == RAW else "reference" if row["key"] == chosen["reference"] else "pick",
                  "builtin_compute": row.get("compute"), "builtin_psnr_db": row.get("psnr_db")}
        if side(row) == RAW:
            rows.append({**record, "real_compute": 1.0, "loop_s": raw_s, "speedup": 1.0})
            continue
        try:
            replay = Replay(transformer, traces[row["key"]], run, mode, row["key"])
        except Unreplayable as refusal:
            print(refusal)
            rows.append({**record, "refused": str(refusal)})
            continue
        with replay:
            seconds, flops = measure(replay.calls(inputs, info.timestep_arg, total), replay.reset)
        trace = traces[row["key"]]
        # the ideal is the counted FLOPs' speed-up, 1 / real compute (1 / ((1 - a) + a f) for an attention plan)
        rows.append({**record, "real_compute": flops / raw_flops, "loop_s": seconds, "speedup": raw_s / seconds,
                     "of_ideal": raw_s / seconds * flops / raw_flops,
                     "plan_counts": replay.plan.counts(), "skipped_blocks": len(replay.hooked),
                     **{f"trace_{name}": {"all_steps": share(trace, list(range(total))), "timed_steps": share(trace, timed)}
                        for name, share in TRACE_SHARES.items()}})
    return {"model": model, "class": info.class_name, "size": cfg.size, "note": zoo_shape(model, cfg.size).note,
            "layers": info.num_layers, "cfg": mode, "steps": total, "timed_steps": timed, "loop_raw_s": raw_s,
            "selection": {k: chosen[k] for k in ("comparison", "seed", "compute_target", "reference",
                                                  "psnr_target_db", "groups")},
            "rows": rows, "verdict": verdict(rows)}


def verdict(rows: list[dict]) -> dict:
    """Whether fastattn's fastest pick (alone or stacked) is at least as fast as the reference."""
    reference = next(r for r in rows if r["role"] == "reference")
    ours = [r for r in rows if r["side"] in (FASTATTN, STACKED) and "loop_s" in r]
    if "loop_s" not in reference:
        return {"holds": None, "why": f"the reference {reference['key']} was not replayed"}
    if not ours:
        return {"holds": False, "why": "no fastattn row reaches the reference's PSNR (or none could be replayed)"}
    fastest = min(ours, key=lambda r: r["loop_s"])
    result = {"holds": fastest["loop_s"] <= reference["loop_s"], "fastattn_row": fastest["key"],
              "reference": reference["key"], "fastattn_over_reference": reference["loop_s"] / fastest["loop_s"]}
    for row in (reference, fastest):
        for name in TRACE_SHARES:
            share = row[f"trace_{name}"]
            if abs(share["all_steps"] - share["timed_steps"]) > SAMPLE_TOLERANCE:
                return {**result, "holds": None,
                        "why": f"the timed steps stand badly for {row['key']}: {name.replace('_', ' ')} "
                               f"{share['all_steps']:.2f} over all steps, {share['timed_steps']:.2f} over the "
                               f"timed ones (time every step: timed_steps=null)"}
    return result


def _num(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_table(results: list[dict]) -> None:
    for r in results:
        s = r["selection"]
        timed = len(r["timed_steps"])
        steps = (f"every step of the trace ({r['steps']})" if timed == r["steps"] else
                 f"{timed} of the trace's {r['steps']} steps (one drawn at random from each of {timed} equal "
                 f"strata, the same for every row: {r['timed_steps']}), the loop scaled by {r['steps']}/{timed}; "
                 "'blocks run' and 'full attention' are the trace's fractions of block calls that ran and of attention "
                 "calls that computed full attention, over all steps / the timed ones; a compared row whose two "
                 f"differ by more than {SAMPLE_TOLERANCE} gets no verdict")
        missed = [g["method"] for g in s["groups"] if g["pick"] is None]
        print(f"\n### {r['model']} ({r['class']}, {r['size']}: {r['note']}; CFG: {r['cfg']})\n")
        print(f"{ASSUMPTION} Timed: {steps}. Reference: {s['reference']}, the best peer at built-in compute <= "
              f"{s['compute_target']:g}: P* = {s['psnr_target_db']:.2f} dB (comparison {s['comparison']}, "
              f"seed {s['seed']}). Not reached: {', '.join(missed) or 'none'}.\n")
        print("| row | method | setting | built-in compute | built-in PSNR | blocks run (all / timed) "
              "| full attention (all / timed) | real compute | loop s | speed-up | of ideal |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in r["rows"]:
            shares = " | ".join(f"{row[f'trace_{name}']['all_steps']:.3f} / {row[f'trace_{name}']['timed_steps']:.3f}"
                                for name in TRACE_SHARES) if "of_ideal" in row else "– | –"
            tail = (f"{shares} | {_num(row.get('real_compute'), 3)} | {row['loop_s']:.3f} | {row['speedup']:.2f}x | "
                    f"{row['of_ideal']:.0%}" if "of_ideal" in row else
                    f"{shares} | 1.000 | {row['loop_s']:.3f} | 1.00x | –" if "loop_s" in row else
                    f"{shares} | refused: {row['refused']} | – | – | –")
            print(f"| {row['key']} ({row['role']}) | {row['method']} | {row['setting']} | "
                  f"{_num(row['builtin_compute'], 3)} | {_num(row['builtin_psnr_db'], 2)} | {tail} |")
        v = r["verdict"]
        line = (f"no verdict: {v['why']}" + (f"; sampled, fastattn's fastest ran at {v['fastattn_over_reference']:.2f}x"
                                              if "fastattn_over_reference" in v else "")
                if v["holds"] is None else f"fails: {v['why']}" if "why" in v else
                f"{'holds' if v['holds'] else 'fails'}: {v['fastattn_row']} runs at "
                f"{v['fastattn_over_reference']:.2f}x the reference's speed ({v['reference']})")
        print(f"\nVerdict (fastattn's fastest pick at least as fast as the reference): {line}")


def check_config(cfg: DictConfig) -> None:
    check_set(cfg, "comparison", "a compare_caches run directory")
    check_model_settings(cfg, JSON, MODELS, "size")
    check_int(cfg, "seed", minimum=0)
    check_fraction(cfg, "compute_target")
    if cfg.timed_steps is not None:
        check_int(cfg, "timed_steps")
    if cfg.picks is not None and (not OmegaConf.is_list(cfg.picks) or not cfg.picks):
        raise ConfigError(f"picks must be null or a non-empty list of row keys, got {cfg.picks}")
    check_int(cfg, "warmup")  # the first warm-up loop counts the FLOPs
    check_int(cfg, "repeats")
    check_device(cfg)


def choose(cfg: DictConfig) -> tuple[dict, dict[str, dict]]:
    """The selection from the comparison and the timed rows' traces; one-line errors."""
    seed_dir, rows = load_rows(cfg.comparison, int(cfg.seed))
    chosen = select_rows(rows, float(cfg.compute_target))
    if cfg.picks is not None:  # raw and the reference always run: the speed-ups and the verdict stand on them
        picked = [r["key"] for r in chosen["timed"][2:]]
        unknown = [k for k in cfg.picks if k not in picked]
        if unknown:
            raise ConfigError(f"picks: {', '.join(map(str, unknown))} not among this comparison's picks "
                              f"({', '.join(picked) or 'none'})")
        chosen["timed"] = chosen["timed"][:2] + [r for r in chosen["timed"][2:] if r["key"] in cfg.picks]
    traces = {}
    for key, path in trace_paths(seed_dir, chosen["timed"]).items():
        try:
            traces[key] = load_trace(path)
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"comparison: row {key}'s trace {path} cannot be read ({error})") from None
    counts = {trace_steps(t) for t in traces.values()}
    if len(counts) != 1:
        raise ConfigError(f"comparison: the rows' traces have different step counts {sorted(counts)}")
    return {**chosen, "comparison": str(Path(cfg.comparison)), "seed": int(cfg.seed), "steps": counts.pop()}, traces


def benchmark_equal_quality(cfg: DictConfig) -> list[dict]:
    check_config(cfg)
    chosen, traces = choose(cfg)
    return run_models(cfg, JSON, lambda m, c, device, dtype: benchmark(m, c, device, dtype, chosen, traces),
                      print_table)


main = hydra_app("benchmark_equal_quality", benchmark_equal_quality)

if __name__ == "__main__":
    main()
