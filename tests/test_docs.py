"""The README stays true to the code: its configuration table matches the settings, its examples run."""

import re
import subprocess
import sys
from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
ROW = re.compile(r"^\| `VAE_(\w+)` \| `(--[\w-]+)` \| `([^`]*)` \| (.*) \|$", re.MULTILINE)


def shown(default: object) -> str:
    """How the table writes a default: `unset` for None, `true`/`false`, else the value."""
    if default is None:
        return "unset"
    return str(default).lower() if isinstance(default, bool) else str(default)


def test_every_setting_is_documented_in_the_readme():
    missing = [name for name in Settings.model_fields if f"`VAE_{name.upper()}`" not in README]
    assert missing == []


def test_the_settings_table_matches_the_code():
    rows = {name.lower(): (flag, default, meaning) for name, flag, default, meaning in ROW.findall(README)}
    assert list(rows) == list(Settings.model_fields)  # one row per setting, in the code's order
    for name, field in Settings.model_fields.items():
        flag, default, meaning = rows[name]
        assert flag == "--" + name.replace("_", "-")
        assert default == shown(field.default), name
        assert meaning.strip(), f"VAE_{name.upper()} has no description"
        assert field.description in (None, meaning), f"VAE_{name.upper()}: the README and settings.py differ"


def test_the_readme_makes_the_images_its_curl_examples_upload(tmp_path):
    snippet = re.search(r'^python -c "(from PIL import .*?)"$', README, re.MULTILINE | re.DOTALL)
    assert snippet, "the README's curl block starts with a python -c line that draws digit.png and one.png"
    subprocess.run([sys.executable, "-c", snippet.group(1)], cwd=tmp_path, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digit.png", "one.png"]
