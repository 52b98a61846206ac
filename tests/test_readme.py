"""The README stays true to the code: every setting is documented, every link stays inside."""

from __future__ import annotations

import re
from pathlib import Path

from governance.settings import GovernanceSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_settings_table_lists_every_setting_and_no_other() -> None:
    section = README[README.index("## Settings") : README.index("## Layout")]
    documented = set(re.findall(r"^\| `(GOVERNANCE_[A-Z_]+)` \|", section, flags=re.M))
    expected = {f"GOVERNANCE_{name.upper()}" for name in GovernanceSettings.model_fields}
    assert documented == expected


def test_links_point_inside_the_repository_at_files_that_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the README links the design document, at least"
    for target in local:
        assert not target.startswith(".."), f"{target}: outside the repository"
        assert (ROOT / target).exists(), f"{target}: no such file"
