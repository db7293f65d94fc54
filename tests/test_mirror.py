"""wrn/ and wrn_mobi/ are self-contained copies (SPEC §2): this fails as soon as they drift apart.

Everything but models.py is byte-identical (`python tools/mirror.py` writes the copies from wrn/);
in models.py every definition present in both folders (the Wide ResNet) is identical, except
build_pair, pair_names and PUBLISHED_TEST_USES_BATCH_STATISTICS, which say which pair is trained
and how the published code tested it.
"""
import ast
import shutil

import pytest

from conftest import ROOT, import_tools

mirror, = import_tools("mirror")
MIRROR_COMMAND = "python tools/mirror.py"
PER_FOLDER_NAMES = {"build_pair", "pair_names", "PUBLISHED_TEST_USES_BATCH_STATISTICS"}  # allowed to differ
SHARED_WRN_NAMES = {"PreActBlock", "wrn_group", "Head", "WideResNet", "init_wrn_weights", "wrn"}
MOBILENET_NAMES = {"mobilenet", "MobileNet"}


def top_level_definitions(source):
    """{name: source text} of the module's top-level functions, classes and assignments."""
    tree = ast.parse(source)
    definitions = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)]
        else:
            continue
        for name in names:
            if name in definitions:  # a redefinition would make the comparison below meaningless
                raise AssertionError(f"{name} is defined twice at the top level")
            definitions[name] = ast.get_source_segment(source, node)
    return definitions


def drifted_definitions(source_a, source_b):
    """Names defined in both sources whose definitions differ (the per-folder names excepted)."""
    a, b = top_level_definitions(source_a), top_level_definitions(source_b)
    return sorted(name for name in set(a) & set(b) - PER_FOLDER_NAMES if a[name] != b[name])


def names_used(source_text):
    return {node.id for node in ast.walk(ast.parse(source_text)) if isinstance(node, ast.Name)}


def models_sources():
    return ((ROOT / "wrn" / "models.py").read_text(), (ROOT / "wrn_mobi" / "models.py").read_text())


@pytest.mark.parametrize("copy", mirror.FOLDERS[1:])
def test_every_folder_holds_the_same_files(copy):
    wrn, other = mirror.folder_files("wrn"), mirror.folder_files(copy)
    assert wrn == other, (f"only in wrn/: {sorted(wrn - other)}; only in {copy}/: {sorted(other - wrn)}; "
                          f"write {copy}/ from wrn/ with `{MIRROR_COMMAND}`")
    assert {"main.py", "models.py", "dcm_loss.py"} <= wrn


@pytest.mark.parametrize("copy", mirror.FOLDERS[1:])
def test_every_file_but_models_py_is_byte_identical(copy):
    differ = [name for name in sorted(mirror.folder_files("wrn") - {"models.py"})
              if (ROOT / copy / name).is_file()
              and (ROOT / "wrn" / name).read_bytes() != (ROOT / copy / name).read_bytes()]
    assert not differ, (f"wrn/ and {copy}/ differ in {', '.join(differ)}: edit wrn/, then write {copy}/ "
                        f"from it with `{MIRROR_COMMAND}`")


def test_the_mirror_command_writes_every_file_but_models_py_and_removes_strays(tmp_path, monkeypatch):
    for folder in ("wrn", "wrn_mobi"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns(*mirror.IGNORED_DIRS))
    (tmp_path / "wrn" / "dcm_loss.py").write_text("# fixed\n")
    (tmp_path / "wrn_mobi" / "main.py").unlink()
    (tmp_path / "wrn_mobi" / "stray.py").write_text("")
    (tmp_path / "wrn_mobi" / "logs").mkdir()
    (tmp_path / "wrn_mobi" / "logs" / "log.txt").write_text("a run's")
    models = (tmp_path / "wrn_mobi" / "models.py").read_bytes()
    monkeypatch.setattr(mirror, "ROOT", tmp_path)
    assert mirror.mirror("wrn_mobi") == (["dcm_loss.py", "main.py"], ["stray.py"])
    assert mirror.folder_files("wrn") == mirror.folder_files("wrn_mobi")
    for name in mirror.folder_files("wrn") - {"models.py"}:
        assert (tmp_path / "wrn" / name).read_bytes() == (tmp_path / "wrn_mobi" / name).read_bytes(), name
    assert (tmp_path / "wrn_mobi" / "models.py").read_bytes() == models
    assert (tmp_path / "wrn_mobi" / "logs" / "log.txt").read_text() == "a run's"
    assert mirror.mirror("wrn_mobi") == ([], [])


def test_shared_wrn_definitions_are_identical_in_both_models_py():
    wrn_source, mobi_source = models_sources()
    drifted = drifted_definitions(wrn_source, mobi_source)
    assert not drifted, f"models.py definitions differ between wrn/ and wrn_mobi/: {', '.join(drifted)}"


def test_the_wrn_code_is_present_in_both_folders():
    wrn_defs, mobi_defs = (top_level_definitions(source) for source in models_sources())
    shared = set(wrn_defs) & set(mobi_defs)
    assert shared and {"wrn", "WideResNet"} <= shared
    assert SHARED_WRN_NAMES <= shared, f"missing from one models.py: {sorted(SHARED_WRN_NAMES - shared)}"
    assert PER_FOLDER_NAMES <= shared


def test_mobilenet_only_in_wrn_mobi_and_nothing_only_in_wrn():
    wrn_defs, mobi_defs = (top_level_definitions(source) for source in models_sources())
    assert MOBILENET_NAMES <= set(mobi_defs)
    assert not MOBILENET_NAMES & set(wrn_defs)
    only_wrn = set(wrn_defs) - set(mobi_defs)
    assert not only_wrn, f"defined only in wrn/models.py (copy them to wrn_mobi/): {sorted(only_wrn)}"


def test_shared_definitions_use_no_folder_specific_helper():
    # A WRN helper added to one folder only would escape the identity check above.
    wrn_defs, mobi_defs = (top_level_definitions(source) for source in models_sources())
    shared = (set(wrn_defs) & set(mobi_defs)) - PER_FOLDER_NAMES
    only_one_folder = set(wrn_defs) ^ set(mobi_defs)
    for name in shared:
        leaked = names_used(mobi_defs[name]) & only_one_folder
        assert not leaked, f"{name} (shared WRN code) uses {sorted(leaked)}, defined in one folder only"


def test_module_level_code_outside_definitions_is_identical():
    # Imports and other statements the shared code relies on.
    def other_statements(source):
        tree = ast.parse(source)
        return [ast.get_source_segment(source, node) for node in tree.body
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                                         ast.AnnAssign, ast.Expr))]
    wrn_source, mobi_source = models_sources()
    assert other_statements(wrn_source) == other_statements(mobi_source)


# --- the checker itself -------------------------------------------------------------------------

BASE = '''
import torch

SCALE = 2

def wrn(depth):
    return depth * SCALE

class WideResNet:
    pass

def build_pair():
    return wrn(1), wrn(1)
'''


def test_checker_names_a_drifted_function_and_ignores_build_pair():
    drifted = BASE.replace("return depth * SCALE", "return depth * SCALE + 1").replace(
        "return wrn(1), wrn(1)", "return wrn(1), None")
    assert drifted_definitions(BASE, drifted) == ["wrn"]
    assert drifted_definitions(BASE, BASE) == []


def test_checker_names_drifted_classes_and_constants():
    drifted = BASE.replace("SCALE = 2", "SCALE = 3").replace("    pass", "    depth = 28")
    assert drifted_definitions(BASE, drifted) == ["SCALE", "WideResNet"]


def test_checker_refuses_a_name_defined_twice():
    with pytest.raises(AssertionError, match="wrn"):
        top_level_definitions(BASE + "\ndef wrn(depth):\n    return 0\n")
