"""The README's first command, at a smaller size: all three acts run and report what they promise."""

from pretune.demo import run_demo


def test_demo_runs_all_acts(tmp_path, capsys):
    result = run_demo(str(tmp_path / "demo"), steps=5, finetune_epochs=1)
    out = capsys.readouterr().out
    assert "perplexity" in out and "test accuracy" in out and "from scratch" in out
    assert result["after"]["mlm_loss"] < result["before"]["mlm_loss"]
    assert set(result["accuracy"]) == {"pretrained", "scratch"}
    assert all(0.0 <= acc <= 1.0 for acc in result["accuracy"].values())
    assert (tmp_path / "demo" / "finetune-pretrained" / "model" / "config.json").is_file()
    images = result["images"]
    assert "SimCLR-pretrained + fine-tuned" in out and images["labels"] == 70  # 5% of each digit class of the train split
    assert set(images["accuracy"]) == {"pretrained", "scratch"} and all(0.0 <= a <= 1.0 for a in images["accuracy"].values())
    assert (tmp_path / "demo" / "simclr" / "model" / "model.safetensors").is_file()
