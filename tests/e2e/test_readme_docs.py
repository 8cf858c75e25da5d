"""The README says how long each quickstart command takes on 2 CPU cores, and that the
quickstart tower's rebuild is seeded but not bitwise (issue 15: a first run of the MNIST-Location
TCPA quickstart took ~70 minutes with no warning that it would)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
QUICKSTART = README.split("\n## Install and quickstart", 1)[1].split("\n## ", 1)[0]
DURATION = r"(\d+(\.\d+)? (s|seconds?|minutes?|hours?)\b|an hour)"


def _blocks_and_following_text(section: str) -> list[tuple[str, str]]:
    """(code block, the prose after it up to the next block) for each fenced block of a section."""
    parts = re.split(r"```bash\n(.*?)```", section, flags=re.S)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def test_every_quickstart_command_says_how_long_it_takes_on_2_cores() -> None:
    blocks = [(code, text) for code, text in _blocks_and_following_text(QUICKSTART) if "vlm fit --config configs/quickstart" in code]
    commands = [re.search(r"configs/quickstart\S*\.yaml", code).group(0) for code, _ in blocks]  # type: ignore[union-attr]
    assert commands == ["configs/quickstart.yaml", "configs/quickstart_pretrain.yaml", "configs/quickstart/vit/location_tcpa.yaml"]
    for (_, text), command in zip(blocks, commands):
        paragraph = " ".join(text.strip().split("\n\n")[0].split())  # the paragraph right after the command
        assert "2 CPU cores" in paragraph and re.search(DURATION, paragraph), (command, paragraph)
    tcpa_text = " ".join(blocks[2][1].strip().split("\n\n")[0].split())
    assert re.search(r"linear probe about \d+ minutes", tcpa_text), "the baseline named in the block's comment too"


def test_quickstart_pretrain_is_documented_as_seeded_not_bitwise() -> None:
    (_, text), = [(c, t) for c, t in _blocks_and_following_text(QUICKSTART) if "quickstart_pretrain.yaml" in c]
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    assert "seeded" in paragraph and "not bitwise" in paragraph and "deterministic: false" in paragraph
