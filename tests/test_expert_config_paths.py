"""An expert's recorded folders (expert.json) are absolute, so ``suti expert loss`` and a resume
work from any working directory."""

from experts import resolve_config


def test_relative_instance_and_class_folders_are_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    (tmp_path / "class").mkdir()
    monkeypatch.chdir(tmp_path)
    config = resolve_config("dreambooth", {"model": "tiny", "instance_dir": "photos", "class_data_dir": "class", "class_noun": "dog"})
    assert config.instance_dir == str(tmp_path / "photos") and config.class_data_dir == str(tmp_path / "class")
    config = resolve_config("dreambooth", {"model": "tiny", "instance_dir": "s3://bucket/photos", "class_noun": "dog"})
    assert config.instance_dir == "s3://bucket/photos", "a URI is left as it is"
