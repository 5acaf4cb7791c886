"""The README's first command, at a smaller size: both acts run and report what they promise."""

from pretune.demo import run_demo


def test_demo_runs_both_acts(tmp_path, capsys):
    result = run_demo(str(tmp_path / "demo"), steps=5, finetune_epochs=1)
    out = capsys.readouterr().out
    assert "perplexity" in out and "test accuracy" in out and "from scratch" in out
    assert result["after"]["mlm_loss"] < result["before"]["mlm_loss"]
    assert set(result["accuracy"]) == {"pretrained", "scratch"}
    assert all(0.0 <= acc <= 1.0 for acc in result["accuracy"].values())
    assert (tmp_path / "demo" / "finetune-pretrained" / "model" / "config.json").is_file()
