"""The README stays true to the code: every server setting is in its configuration table."""

from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme():
    missing = [name for name in Settings.model_fields if f"`VAE_{name.upper()}`" not in README]
    assert missing == []

