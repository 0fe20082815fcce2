"""No file escapes its folder, a failed config removes only what its invocation made, and a full
disk, a read-only file system or a refused write is one line naming the file (issue 33, findings
3, 4 and 8's storage errors). CPU, offline."""

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from omegaconf import DictConfig

from analysis.heatmaps import plan_heatmaps
from experiments.infra import app as app_module
from experiments.infra.app import ConfigError, hydra_app
from fastattn import CompressionPlan
from fastattn.utils.io import atomic_write_bytes, atomic_write_json
from fastattn.utils.paths import path_inside, slug
from test_run import ROOT

CRAFTED = {"model_name": "x/../../../escaped_dir/pwn", "solver": "/tmp/abs_solver", "technique": "../../t",
           "threshold": 0.1}


def crafted_plan(folder: Path, search: dict = CRAFTED) -> Path:
    plan = CompressionPlan([["full", "full"], ["ast", "wars"]], model={"seq_len": 16, "num_heads": 2, "head_dim": 8},
                           search=search)
    plan.save(folder / "plan.json")
    return folder / "plan.json"


def files_below(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_slug_keeps_safe_names_and_flattens_the_rest():
    for name in ("tiny_dit_dpm_solver_50", "fastattn_0.1+first_block_threshold0.2", "b0.5"):
        assert slug(name) == name
    for crafted in ("x/../../../escaped_dir/pwn", "/etc/passwd", "..", ".hidden", "", "a\\b:c d"):
        made = slug(crafted)
        assert made and "/" not in made and "\\" not in made and not made.startswith(".")
    assert slug("first block [1, 2]", replacement="") == "firstblock12"


def test_path_inside_refuses_what_leaves_the_folder(tmp_path):
    assert path_inside(tmp_path, "a", "b.png") == tmp_path / "a" / "b.png"
    (tmp_path / "link").symlink_to(tmp_path.parent)
    for escape in ("../out.png", "/etc/out.png", "link/out.png"):
        with pytest.raises(ValueError, match=f"resolves outside {tmp_path}; not written"):
            path_inside(tmp_path, escape)


def test_a_crafted_plan_draws_its_heatmap_inside_the_folder(tmp_path):
    crafted_plan(tmp_path / "plans" / "0")
    crafted_plan(tmp_path / "plans" / "1")  # the same fields: a second name, not an overwrite
    out = tmp_path / "deep" / "figures"
    before = files_below(tmp_path)
    written = plan_heatmaps(tmp_path / "plans", out)
    assert files_below(tmp_path) - before == set(written) and all(p.parent == out for p in written)
    assert [p.name for p in written] == ["plan_x_.._.._.._escaped_dir_pwn__tmp_abs_solver_.._.._t_delta0.100.png",
                                         "plan_x_.._.._.._escaped_dir_pwn__tmp_abs_solver_.._.._t_delta0.100_2.png"]


def test_the_redundancy_job_with_a_crafted_plan_writes_only_in_its_folder(tmp_path):
    crafted_plan(tmp_path / "plans")
    out = tmp_path / "a" / "b" / "out"
    before = files_below(tmp_path)
    cmd = [sys.executable, "-m", "experiments.redundancy", "model=tiny_dit", "logger=disabled", "num_samples=1",
           "solver.num_steps=3", "model.tiny.sample_size=8", "model.resolution=8", "model.tiny.num_layers=2",
           f"plans_dir={tmp_path / 'plans'}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    made = files_below(tmp_path) - before
    assert made and all(out in p.parents for p in made), sorted(map(str, made))
    assert not (tmp_path / "escaped_dir").exists() and not Path("/tmp/abs_solver").exists()


# ----------------------------------------------------------------------------- hydra_app in-process

TINY_CONF = "output_dir: ${hydra:runtime.output_dir}\nfail: none\n"


def tiny_job(cfg: DictConfig) -> None:
    """Fails as ``fail`` says: a config error, or a disk that fills at the first write."""
    if cfg.fail == "config":
        raise ConfigError("fail: refused")
    atomic_write_json(Path(cfg.output_dir) / "metrics.json", {"ok": True})


def run_tiny(tmp_path, monkeypatch, *overrides) -> int:
    """Run ``tiny_job`` through hydra_app as the command line would; its exit status."""
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "tiny.yaml").write_text(TINY_CONF)
    monkeypatch.setattr(sys, "argv", ["tiny", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        hydra_app("tiny", tiny_job, conf_dir=conf)()
        raise SystemExit(0)
    return exit_info.value.code


def test_a_failed_config_into_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "new" / "run"
    assert run_tiny(tmp_path, monkeypatch, "fail=config", f"hydra.run.dir={run_dir}") == 1
    assert not (tmp_path / "runs").exists()


def test_a_failed_config_keeps_a_folder_it_did_not_make(tmp_path, monkeypatch):
    notes = tmp_path / "mine" / "notes.log"
    notes.parent.mkdir()
    notes.write_text("the user's notes\n")
    assert run_tiny(tmp_path, monkeypatch, "fail=config", f"hydra.run.dir={notes.parent}") == 1
    assert {p.name for p in notes.parent.iterdir()} == {"notes.log"} and notes.read_text() == "the user's notes\n"
    earlier = tmp_path / "earlier"  # an earlier run's folder: results, its .hydra and its log
    for name in ("metrics.json", ".hydra/config.yaml", "test_output_paths.log"):
        (earlier / name).parent.mkdir(parents=True, exist_ok=True)
        (earlier / name).write_text("before\n")
    assert run_tiny(tmp_path, monkeypatch, "fail=config", f"hydra.run.dir={earlier}") == 1
    assert {p.relative_to(earlier).as_posix() for p in files_below(earlier)} >= \
        {"metrics.json", ".hydra/config.yaml", "test_output_paths.log"}
    assert (earlier / "metrics.json").read_text() == "before\n"


def test_an_empty_folder_of_the_user_is_kept(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert run_tiny(tmp_path, monkeypatch, "fail=config", f"hydra.run.dir={tmp_path / 'empty'}") == 1
    assert (tmp_path / "empty").is_dir() and not list((tmp_path / "empty").iterdir())


def raise_on_fsync(code: int):
    def fsync(fd):
        raise OSError(code, os.strerror(code))

    return fsync


@pytest.mark.parametrize("code, start", [(errno.ENOSPC, "disk full writing {}: free some space"),
                                         (errno.EROFS, "read-only file system: cannot write {};"),
                                         (errno.EACCES, "permission denied on {}: make it")])
def test_a_storage_error_in_a_job_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, code, start):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(os, "fsync", raise_on_fsync(code))
    run_dir = tmp_path / "run"
    assert run_tiny(tmp_path, monkeypatch, f"hydra.run.dir={run_dir}") == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start.format(run_dir / "metrics.json")), lines
    assert not list(run_dir.glob(".metrics.json.*.tmp"))


def test_a_read_only_run_folder_is_one_line_before_the_job(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    read_only = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # as root chmod does not stop writes: the file system says no
        if read_only in (self, *self.parents):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert run_tiny(tmp_path, monkeypatch, f"hydra.run.dir={read_only / 'run'}") == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"read-only file system: cannot write {read_only / 'run'}; "
                     "choose an output folder on a writable disk"]


def test_the_traceback_comes_back_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(os, "fsync", raise_on_fsync(errno.ENOSPC))
    monkeypatch.setattr(sys, "argv", ["tiny", f"hydra.run.dir={tmp_path / 'run'}"])
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "tiny.yaml").write_text(TINY_CONF)
    with pytest.raises(OSError) as error:
        hydra_app("tiny", tiny_job, conf_dir=tmp_path / "conf")()
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "run" / "metrics.json")
    assert not app_module._folder_before and "fastattn_run_folder" not in " ".join(sys.argv)


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("where", ["mkstemp", "fsync", "replace"])
def test_an_atomic_write_that_fails_names_the_target_and_leaves_no_temporary(tmp_path, monkeypatch, where):
    target = tmp_path / "out" / "plan.json"
    target.parent.mkdir()

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / ".plan.json.x.tmp"))

    monkeypatch.setattr({"mkstemp": tempfile, "fsync": os, "replace": os}[where], where, refuse)
    with pytest.raises(OSError) as error:
        atomic_write_bytes(target, b"{}")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(target)
    assert isinstance(error.value.__cause__, OSError) and list(target.parent.iterdir()) == []
