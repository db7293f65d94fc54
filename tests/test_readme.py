"""The README and docs/ as a newcomer reads them: install steps in the order they must run, the
test command CI runs, a map that lists every docs/ file, and links that lead somewhere."""
import re

from conftest import ROOT

CPU_WHEELS = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
REQUIREMENTS = "pip install -r requirements.txt"


def commands(text):
    """The command lines (not comments) of every ```bash block of a Markdown text, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
    lines = (line.split("  #")[0].strip() for block in blocks for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def markdown_files():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def anchors(path):
    """GitHub's anchors of the headings of a Markdown file (code blocks skipped)."""
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and re.match(r"#+ ", line):
            heading = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return found


def test_the_cpu_only_wheels_are_a_step_before_the_requirements():
    steps = commands((ROOT / "README.md").read_text())
    assert CPU_WHEELS in steps, "the CPU-only install must be a command, not a comment"
    assert REQUIREMENTS in steps
    # pip keeps an installed torch that satisfies requirements.txt; installed after it, the CUDA
    # libraries are already downloaded.
    assert steps.index(CPU_WHEELS) < steps.index(REQUIREMENTS)


def test_ci_runs_the_readme_test_command():
    readme = [line.split("&&")[-1].strip() for line in commands((ROOT / "README.md").read_text())]
    test_commands = [line for line in readme if "pytest" in line]
    assert test_commands, "the README gives no test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in ci


def test_the_readme_map_links_every_docs_file():
    readme = (ROOT / "README.md").read_text()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in readme, f"docs/{doc.name} is missing from the README's map"


def test_every_relative_link_leads_to_a_file_and_heading():
    broken = []
    for path in markdown_files():
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            name, _, anchor = target.partition("#")
            linked = (path.parent / name).resolve() if name else path
            if not linked.exists() or (anchor and linked.is_file() and anchor not in anchors(linked)):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken
