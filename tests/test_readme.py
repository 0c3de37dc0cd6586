"""The README's compatibility table names tests; each one must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_test_the_compatibility_table_names_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Training-stack compatibility"):]
    section = section[: section.index("\n## ", 1)]
    named = 0
    for row in (line for line in section.splitlines() if line.startswith("| ")):
        current = None
        for ref in re.findall(r"`((?:tests/[\w/]+\.py)?::\w+(?:\[[^\]]*\])?|tests/[\w/]+\.py)`", row):
            path, _, name = ref.partition("::")
            if path:
                current = ROOT / path
                assert current.exists(), f"README names a missing test file: {path}"
            if name:
                assert current is not None, f"README row names ::{name} before any test file"
                function = name.split("[")[0]
                assert f"def {function}(" in current.read_text(), f"README names a missing test: {ref}"
                named += 1
    assert named >= 20


def test_every_result_file_the_readme_links_exists():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((benchmarks/results/[^)#\s]+)\)", readme))
    assert {"benchmarks/results/evidence.md", "benchmarks/results/evidence_speed.png",
            "benchmarks/results/evidence_memory.png", "benchmarks/results/evidence_convergence.png",
            "benchmarks/results/evidence_accuracy.png"} <= linked
    for path in linked:
        assert (ROOT / path).exists(), f"README links a missing result: {path}"
