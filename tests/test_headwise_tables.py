"""The V2 paper's table layouts (main table and both ablations) from metrics.json files."""

import json

from analysis.tables_v2 import main


def write(folder, name, search="headwise", coefficient=1.5, **metrics):
    path = folder / name / "metrics.json"
    path.parent.mkdir(parents=True)
    base = {"kind": "run", "technique": "headwise", "search": search,
            "config": {"model": {"resolution": 1024}, "search": {"head_coefficient": coefficient}}}
    path.write_text(json.dumps({**base, **metrics}))


def test_table_v2_layout(tmp_path, capsys):
    write(tmp_path, "a", model="sd3_medium_1024", threshold=0.0, clip_score=0.3254, hpsv2=0.2926)
    write(tmp_path, "b", model="sd3_medium_1024", threshold=0.2, attn_sparsity=0.41, lpips=0.182, ssim=0.716,
          clip_score=0.3251, hpsv2=0.2933)
    write(tmp_path, "c", model="flux_dev_2048", threshold=1.0, attn_sparsity=0.68, lpips=0.393, ssim=0.497)
    write(tmp_path, "d", model="tiny_dit", threshold=0.05, technique="all")  # a V1 run: not in this table
    write(tmp_path, "e", model="sd3_medium_1024", threshold=0.2, search="headwise_aa", attn_sparsity=0.3)  # ablation
    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "tables" / "table_v2.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| Model | Resolution | Threshold δ | Attention Sparsity | LPIPS↓ | SSIM↑ | HPSv2↑ | CLIP↑ |"
    assert lines[2] == "| SD3-medium | 1024 | Original | 0 | – | – | 0.2926 | 0.3254 |"
    assert lines[3] == "| SD3-medium | 1024 | δ=0.2 | 0.41 | 0.182 | 0.716 | 0.2933 | 0.3251 |"
    assert lines[4] == "| FLUX.1-dev | 1024 | δ=1 | 0.68 | 0.393 | 0.497 | – | – |"
    assert len(lines) == 5 and "tiny_dit" not in table and (tmp_path / "tables" / "table_v2.csv").exists()
    assert table in capsys.readouterr().out


def test_ablation_tables_in_the_papers_rows(tmp_path):
    write(tmp_path, "orig", model="sd3_medium_1024", threshold=0.0, hpsv2=0.2926)
    for i, (search, sparsity) in enumerate([("headwise_aa", 0.30), ("headwise_aa_oc", 0.55), ("headwise", 0.56)]):
        write(tmp_path, f"m{i}", search=search, model="sd3_medium_1024", threshold=0.6, attn_sparsity=sparsity,
              lpips=0.2, ssim=0.7, hpsv2=0.29, experiment="v2_ablation_methods")
    for i, c in enumerate([None, 1, 2]):
        write(tmp_path, f"c{i}", search="headwise_aa_oc", coefficient=c, model="sd3_medium_1024", threshold=0.6,
              attn_sparsity=0.5 + i / 100, lpips=0.25, ssim=0.64, experiment="v2_ablation_constraint")
    assert main([str(tmp_path)]) == 0
    methods = (tmp_path / "tables" / "table_v2_methods.md").read_text().splitlines()
    assert methods[0] == "| Model | Method Set | Attention Sparsity | LPIPS↓ | SSIM↑ | HPSv2↑ |"
    assert methods[2:] == ["| SD3-medium | Original | 0 | – | – | 0.2926 |",
                           "| SD3-medium | AA only | 0.30 | 0.200 | 0.700 | 0.2900 |",
                           "| SD3-medium | AA + OC | 0.55 | 0.200 | 0.700 | 0.2900 |",
                           "| SD3-medium | + CFG Sharing | – | – | – | – |",  # no run: marked missing
                           "| SD3-medium | + Residual Sharing | 0.56 | 0.200 | 0.700 | 0.2900 |"]
    constraint = (tmp_path / "tables" / "table_v2_constraint.md").read_text().splitlines()
    assert [line.split(" | ")[1:3] for line in constraint[2:]] == [
        ["No constraint", "0.50"], ["c=1", "0.51"], ["c=1.5", "–"], ["c=2", "0.52"]]
