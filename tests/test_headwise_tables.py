"""The V2 paper's table layout from metrics.json files."""

import json

from analysis.tables_v2 import main


def write(folder, name, **metrics):
    path = folder / name / "metrics.json"
    path.parent.mkdir(parents=True)
    base = {"kind": "run", "technique": "headwise", "config": {"model": {"resolution": 1024}}}
    path.write_text(json.dumps({**base, **metrics}))


def test_table_v2_layout(tmp_path, capsys):
    write(tmp_path, "a", model="sd3_medium_1024", threshold=0.0, clip_score=0.3254)
    write(tmp_path, "b", model="sd3_medium_1024", threshold=0.2, attn_sparsity=0.41, lpips=0.182, ssim=0.716,
          clip_score=0.3251)
    write(tmp_path, "c", model="flux_dev_2048", threshold=1.0, attn_sparsity=0.68, lpips=0.393, ssim=0.497)
    write(tmp_path, "d", model="tiny_dit", threshold=0.05, technique="all")  # a V1 run: not in this table
    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "tables" / "table_v2.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| Model | Resolution | Threshold δ | Attention Sparsity | LPIPS")
    assert lines[2] == "| SD3-medium | 1024 | Original | 0 | – | – | 0.3254 |"
    assert lines[3] == "| SD3-medium | 1024 | δ=0.2 | 0.41 | 0.182 | 0.716 | 0.3251 |"
    assert lines[4].startswith("| FLUX.1-dev | 1024 | δ=1 | 0.68 | 0.393 | 0.497 |")
    assert "tiny_dit" not in table and (tmp_path / "tables" / "table_v2.csv").exists()
    assert capsys.readouterr().out == table
