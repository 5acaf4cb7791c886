import re

import pytest

from pretune.errors import RecipeError
from pretune.recipe import load_recipe


def test_defaults_and_overrides():
    recipe = load_recipe(None, ["trainer.lr=3e-4", "data.files=corpus/*.txt", "task.mask_prob=0.2", "backbone=gpt2"])
    assert recipe.trainer.lr == 3e-4
    assert recipe.data == {"files": "corpus/*.txt"}
    assert recipe.task == {"name": "mlm", "mask_prob": 0.2}
    assert recipe.backbone == {"name": "gpt2"}


@pytest.mark.parametrize("override, words", [
    ("trainer.lr=-1", ["trainer.lr", "greater than 0", "-1"]),
    ("trainer.bogus=1", ["unknown recipe key 'trainer.bogus'", "allowed keys", "batch_size"]),
    ("data.tokenizer.kind=sentencepiece", ["data.tokenizer.kind", "wordpiece"]),
    ("trainer.batch_size=many", ["trainer.batch_size", "many"]),
    ("nonsense", ["key=value"]),
])
def test_bad_values_give_one_line_naming_the_key(override, words):
    from pretune.run import compose

    with pytest.raises(RecipeError) as err:
        compose(load_recipe(None, [override]))  # task and data sections are checked by their task
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("trainer:\n  lr: [1,\n")
    with pytest.raises(RecipeError, match=r"r\.yaml line \d+"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_task_section_validated_by_its_owner():
    from pretune.run import compose

    with pytest.raises(RecipeError, match="task.mask_prob"):
        compose(load_recipe(None, ["task.mask_prob=2"]))
    with pytest.raises(RecipeError, match="unknown task 'nope'"):
        compose(load_recipe(None, ["task=nope"]))


def test_shipped_recipes_validate():
    from pathlib import Path

    from pretune.run import compose

    from pretune.studies.compare import load_study

    for path in sorted(Path(__file__).parents[1].glob("recipes/*.yaml")):  # study-*.yaml: study keys + a fine-tuning recipe
        compose(load_study(path)[2] if path.name.startswith("study-") else load_recipe(path))


def test_a_bad_key_typed_on_the_command_line_is_reported_as_an_override_not_against_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer: {lrr: 1}\n")
    with pytest.raises(RecipeError, match=r"^override 'trainer\.lrr=3': unknown recipe key 'trainer\.lrr'"):
        load_recipe("recipes/text-mlm.yaml", ["trainer.lrr=3"])
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(recipe))}: unknown recipe key 'trainer\.lrr'"):
        load_recipe(recipe)
