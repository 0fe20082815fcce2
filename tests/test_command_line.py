"""The command line as a newcomer meets it: every bad input the README lists is one line on stderr
(the entry points run as subprocesses), ``HYDRA_FULL_ERROR=1`` brings the traceback back, a
failed config leaves no run folder, ``--help`` lists only what the job accepts, and the
``fastattn`` command names every entry point."""

import os
import subprocess
import sys

import pytest

from experiments.cli import COMMANDS, find_command, main
from fastattn import CompressionPlan
from test_entry_points import commands
from test_run import ROOT, SMALL


def run_module(module, *args, cwd=ROOT, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=300)


def plan_file(folder, steps, layers, seq_len=16):
    path = folder / f"plan_{steps}x{layers}_{seq_len}.json"
    plan = CompressionPlan.all_full(steps, layers)
    plan.model.update(seq_len=seq_len, num_heads=4, head_dim=16)  # tiny_dit's 4 heads of 16 (at 8 x 8: 16 tokens)
    plan.save(path)
    return path


def bad_inputs(tmp):
    """(module, arguments, extra environment, the start of the one line), as the README lists them."""
    tiny = ["model=tiny_dit", *SMALL]
    return [
        ("experiments.run", ["threshold.delta=-1"], {}, "threshold.delta must be >= 0, got -1.0"),
        ("experiments.run", ["threshold.dleta=1"], {}, "Could not override 'threshold.dleta'; Key 'dleta' not in"),
        ("experiments.run", ["solver.num_steps=ten"], {}, "Error merging override solver.num_steps=ten; Value 'ten'"),
        ("experiments.run", ["model=tiny_latte"], {}, "model.family must be one of dit, pixart, sd3, flux, got 'latte'"),
        ("experiments.run", ["model=dit_xl2"], {}, "model=dit_xl2: no such option (choose from dit_xl_2_512,"),
        ("experiments.run", ["threshold=rse_0.2"], {}, "threshold.metric: 'rse' (threshold rse_0.2) is a DiTFastAttnV2"),
        ("experiments.run", ["plan_path=README.md"], {}, "plan_path: README.md: not a valid plan JSON file"),
        ("experiments.run", [*tiny, f"plan_path={plan_file(tmp, 7, 2)}"], {}, "plan_path: plan has 7 steps but"),
        ("experiments.run", [*tiny, f"plan_path={plan_file(tmp, 5, 3)}"], {}, "plan_path: plan has 3 layers"),
        ("experiments.run", [*tiny, f"plan_path={plan_file(tmp, 5, 2, seq_len=4)}", "other_resolution=refuse"], {},
         "other_resolution: plan searched at 4 tokens (plan.model.seq_len) runs on calls of 16 tokens: refused"),
        ("experiments.run", [*tiny, "stages=[generate]"], {}, "stages: generate reads plan.json, which is not in"),
        ("experiments.run", ["metrics.fid=true"], {}, "metrics.fid needs data.reference_dir"),
        ("experiments.run", ["metrics.fid=true", "data.reference_stats=/no/stats.npz"], {},
         "data.reference_stats: file not found: /no/stats.npz"),
        ("experiments.run", ["model=dit_xl_2_512", "metrics=basic"], {"HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"},
         "model.pipeline_id: cannot load 'facebook/DiT-XL-2-512'"),
        ("experiments.run", ["cuda_graphs=true", "device=cpu"], {}, "cuda_graphs=true needs a CUDA device"),
        ("experiments.video_sample", ["model=small_dit"], {}, "model.num_frames: small_dit is not a video model"),
        ("analysis.tables", [str(tmp / "nothing")], {}, "error: runs directory not found"),
        ("analysis.tables", ["--outdir"], {}, "python -m analysis.tables: unrecognized arguments: --outdir"),
    ]


def test_every_bad_input_the_readme_lists_is_one_line(tmp_path):
    failures = []
    for i, (module, args, env, message) in enumerate(bad_inputs(tmp_path)):
        hydra_job = module.startswith("experiments.")
        proc = run_module(module, *args, *([f"hydra.run.dir={tmp_path / f'run{i}'}"] if hydra_job else []), **env)
        lines = proc.stderr.splitlines()
        if proc.returncode not in (1, 2) or len(lines) != 1 or not lines[0].startswith(message) or proc.stdout:
            failures.append(f"{module} {' '.join(args)}: rc {proc.returncode}\n{proc.stdout}{proc.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    made = [p.name for p in tmp_path.glob("run*")]  # only the runs refused after their search stage
    assert made == ["run9"] and not list((tmp_path / "run9" / "samples").rglob("*.png")), made


def test_the_traceback_comes_back_on_request(tmp_path):
    proc = run_module("experiments.run", "threshold.delta=-1", f"hydra.run.dir={tmp_path}", HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "threshold.delta must be >= 0" in proc.stderr


def test_a_failed_config_leaves_no_run_folder_but_keeps_a_run_with_results(tmp_path):
    proc = run_module("experiments.run", "threshold.delta=-1", cwd=tmp_path)  # the default, dated run folder
    assert proc.returncode == 1 and list(tmp_path.iterdir()) == []
    kept = tmp_path / "my_run"
    (kept / "samples").mkdir(parents=True)  # an earlier run's results, resumed with a bad value
    proc = run_module("experiments.run", "threshold.delta=-1", f"hydra.run.dir={kept}", cwd=tmp_path)
    assert proc.returncode == 1 and (kept / "samples").is_dir()


def help_groups(text: str) -> dict[str, list[str]]:
    """group -> options of a job's --help (its "config groups" block)."""
    block = text.split("config groups (* the default):\n", 1)[1].split("\n\n", 1)[0]
    return {group.strip(): options.split(", ") for group, options in
            (line.split(": ", 1) for line in block.splitlines())}


def test_help_lists_only_what_the_job_accepts():
    main = run_module("experiments.run", "--help")
    assert main.returncode == 0 and main.stdout.startswith("python -m experiments.run: The main job")
    groups = help_groups(main.stdout)
    assert {"small_dit*", "tiny_pixart", "sd3_medium_1024"} <= set(groups["model"])
    assert not {"model_schema", "tiny_latte", "wan_1_3b_480p", "opensora_v1_1_240p"} & set(groups["model"])
    assert "benchmark" not in groups and "solver_schema" not in groups["solver"]
    assert "settings (KEY=VALUE):" in main.stdout and "HYDRA_FULL_ERROR=1" in main.stdout
    video = help_groups(run_module("experiments.video_sample", "--help").stdout)
    assert "tiny_latte*" in video["model"] and "small_dit" not in video["model"] and "rse_0.2" not in video["threshold"]


def test_the_fastattn_command_names_every_entry_point():
    entry_points = set(commands()) | {"analysis.tables", "analysis.tables_v2"}
    assert {module for module, _ in COMMANDS.values()} == entry_points
    assert find_command(["bench", "headwise", "arch=flux_dev"]) == ("bench headwise", ["arch=flux_dev"])
    assert find_command(["bench", "device=cuda"]) == ("bench", ["device=cuda"])
    with pytest.raises(SystemExit):
        find_command(["benchmark"])


def test_the_fastattn_command_lists_its_commands_and_passes_verbose_on(capsys, monkeypatch, tmp_path):
    main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored after the test: the dispatcher sets it
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the dispatcher hands the job its own argv
    with pytest.raises(SystemExit) as stopped:
        main(["--verbose", "tables", str(tmp_path / "nothing")])
    assert stopped.value.code == 2 and os.environ["HYDRA_FULL_ERROR"] == "1"
    assert sys.argv[0] == "fastattn tables"
