"""Expert configs: recorded folders (expert.json) are absolute, so ``suti expert loss`` and a
resume work from any working directory; identifiers and class prompts that would train the wrong
thing are refused."""

import pytest

from experts import resolve_config
from suti.errors import InputError


def test_relative_instance_and_class_folders_are_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    (tmp_path / "class").mkdir()
    monkeypatch.chdir(tmp_path)
    config = resolve_config("dreambooth", {"model": "tiny", "instance_dir": "photos", "class_data_dir": "class", "class_noun": "dog"})
    assert config.instance_dir == str(tmp_path / "photos") and config.class_data_dir == str(tmp_path / "class")
    config = resolve_config("dreambooth", {"model": "tiny", "instance_dir": "s3://bucket/photos", "class_noun": "dog"})
    assert config.instance_dir == "s3://bucket/photos", "a URI is left as it is"


@pytest.mark.parametrize("overrides, message", [
    ({"identifier": ""}, "--identifier"),
    ({"identifier": "  "}, "--identifier"),
    ({"identifier": "{class}"}, "--identifier"),
    ({"identifier": "{V}"}, "--identifier"),
    ({"class_prompt": "a photo of {V} {class}"}, "--class-prompt must not contain"),
])
def test_identifiers_and_class_prompts_that_would_train_the_wrong_thing_are_refused(tmp_path, overrides, message):
    with pytest.raises(InputError, match=message):
        resolve_config("dreambooth", {"model": "tiny", "instance_dir": str(tmp_path), "class_noun": "dog", **overrides})
