"""scripts/ship_model.py: the model card judges each quality bar on an evaluation of
that bar's own task where one is given, else on the mixed evaluation."""

import json
import shutil
import subprocess
import sys

from nextchat_ros.model.build import DEFAULT_MODEL_DIR as SHIPPED
from tests.conftest import ROOT


def fake_run(tmp_path, mixed: dict):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy2(SHIPPED / name, run / "final" / name)
    report = {"config": "training/configs/tiny.yaml", "device": "cpu", "torch_threads": 2, "total_seconds": 60.0,
              "train_seconds": {"stage1": 60.0}, "heldout_metrics": mixed,
              "stages": [{"name": "stage1", "steps": 10, "batch_size": 2, "turns_per_image": 1}]}
    (run / "report.json").write_text(json.dumps(report))
    return run


def ship(run, out, *extra):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_model.py"), "--run", str(run),
                           "--out", str(out), *map(str, extra)], capture_output=True, text=True, timeout=120)


MIXED = {"num_samples": 1000, "rec_acc@0.5": 0.95, "mask_miou": 0.85, "pope_accuracy": 0.895,
         "region_caption_attribute_accuracy": 0.9,
         "task_counts": {"rec": 256, "pope": 181, "region_caption": 176, "count": 387}}


def test_bars_are_judged_on_questions_of_their_own_task(tmp_path):
    run = fake_run(tmp_path, MIXED)
    pope = tmp_path / "pope.json"
    pope.write_text(json.dumps({"num_samples": 1000, "pope_accuracy": 0.927, "task_counts": {"pope": 1000}}))
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"num_samples": 1000, "rec_acc@0.5": 0.771, "mask_miou": 0.663,
                               "task_counts": {"rec": 1000, "pope": 0}}))

    sections = tmp_path / "sections.md"
    sections.write_text("## On a renderer it never saw\n\nREC 0.5 there.\n")
    mixed_only = ship(run, tmp_path / "a", "--sections", sections)
    assert mixed_only.returncode == 0, mixed_only.stderr
    card = (tmp_path / "a" / "README.md").read_text()
    # hand-written sections are kept, before the generated tables of the mixed evaluation
    assert card.index("## On a renderer it never saw\n\nREC 0.5 there.") < card.index("## Held-out metrics")
    assert "| pope_accuracy | 0.895 | >= 0.9: MISSED by 0.005 |" in card
    assert "below the quality bars (pope_accuracy)" in card

    judged = ship(run, tmp_path / "b", "--task-metrics", pope, rec)
    assert judged.returncode == 0, judged.stderr
    card = (tmp_path / "b" / "README.md").read_text()
    assert "| pope_accuracy | pope | 1000 | 0.927 | >= 0.9: met |" in card
    assert "| rec_acc@0.5 | rec | 1000 | 0.771 | >= 0.9: MISSED by 0.129 |" in card
    assert "| mask_miou | rec | 1000 | 0.663 | >= 0.8: MISSED by 0.137 |" in card
    # the mixed table stays, its bar figures pointing at the per-task table
    assert "| pope_accuracy | 0.895 | bar 0.9: judged on its own task, above |" in card
    # a bar with no per-task file is judged on the mixed evaluation
    assert "| region_caption_attribute_accuracy | 0.900 | >= 0.85: met |" in card
    assert "below the quality bars (rec_acc@0.5, mask_miou)" in card
    assert (tmp_path / "b" / "model.safetensors").stat().st_size == (SHIPPED / "model.safetensors").stat().st_size


def test_a_mixed_evaluation_is_refused_as_a_task_file(tmp_path):
    run = fake_run(tmp_path, MIXED)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(MIXED))
    out = ship(run, tmp_path / "c", "--task-metrics", mixed)
    assert out.returncode != 0 and "not a single-task evaluation" in out.stderr
