"""Code fingerprints (cfga.workflow.fingerprint): derived module sets; code counts, comments do not."""
import shutil
from pathlib import Path

import pytest

from cfga.workflow import fingerprint as fp

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "workflow_scripts"
EXTRACTION_SCRIPTS = [SCRIPTS / "extract_features.py", SCRIPTS / "gather_features.py"]
TABLES_SCRIPTS = [SCRIPTS / "make_tables.py"]


@pytest.fixture
def pkg(tmp_path):
    """A copy of the cfga package to edit."""
    root = tmp_path / "cfga"
    shutil.copytree(fp.CFGA_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def package_modules(root, package):
    base = root.joinpath(*package.split(".")[1:])
    return {f"{package}.{p.stem}" for p in base.glob("*.py") if p.stem != "__init__"}


def test_extraction_covers_the_packages_extraction_uses():
    mods = set(fp.extraction_modules(EXTRACTION_SCRIPTS))
    want = {"cfga.registry.protocols", "cfga.files", "cfga.runtime", "cfga.checkpoints.load",
            "cfga.checkpoints.formats", "cfga.data.manifest",
            *package_modules(fp.CFGA_DIR, "cfga.extraction"), *package_modules(fp.CFGA_DIR, "cfga.backbones"),
            *(package_modules(fp.CFGA_DIR, "cfga.numerics") - {"cfga.numerics.metrics"})}
    want -= {"cfga.extraction.maps", "cfga.numerics.cam"}  # the heatmaps' own code, not the features'
    assert want <= mods, sorted(want - mods)
    # the feature registry stands in as facts (names, dims, layers), not as code; the rest is unrelated
    assert not mods & {"cfga.registry.features", "cfga.numerics.metrics", "cfga.data.synthetic",
                       "cfga.data.formats", "cfga.checkpoints.save"}
    assert not any(m.startswith(("cfga.outputs", "cfga.training", "cfga.workflow")) for m in mods)


def test_tables_cover_their_code_only():
    mods = set(fp.module_closure(set().union(*(fp.script_imports(s) for s in TABLES_SCRIPTS))))
    assert {"cfga.outputs.tables", "cfga.registry.features", "cfga.registry.losses", "cfga.files"} <= mods
    # `from cfga import files` imports the cfga package, not the lazily loaded extraction
    assert not any(m.startswith(("cfga.extraction", "cfga.checkpoints", "cfga.numerics")) for m in mods), mods


def edit(path: Path, old, new):
    text = path.read_text()
    if old is None:
        path.write_text(text + new)
    else:
        assert old in text
        path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("module", ["extraction/pipeline.py", "numerics/gradients.py", "backbones/resnet.py",
                                    "registry/protocols.py", "files.py"])
def test_comments_and_docstrings_do_not_count_code_does(pkg, module):
    before = fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg)
    path = pkg / module
    edit(path, None, "\n# a comment only\n")
    edit(path, '"""', '"""(an edited docstring) ')
    assert fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg) == before
    edit(path, None, "\n_A_CODE_EDIT = 1\n")
    assert fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg) != before


def test_unrelated_modules_and_the_version_do_not_count(pkg):
    before = fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg)
    edit(pkg / "numerics/metrics.py", None, "\n_A_CODE_EDIT = 1\n")
    edit(pkg / "outputs/tables.py", None, "\n_A_CODE_EDIT = 1\n")
    edit(pkg / "__init__.py", '__version__ = "', '__version__ = "9')
    assert fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg) == before


def test_a_new_module_extraction_imports_is_covered(pkg):
    """No hand-kept list: a module the pipeline starts to import (lazily, relatively) counts."""
    (pkg / "numerics/newstep.py").write_text("VALUE = 1\n")
    edit(pkg / "extraction/pipeline.py", None, "\n\ndef _uses_new():\n    from ..numerics import newstep\n    return newstep\n")
    assert "cfga.numerics.newstep" in fp.extraction_modules(EXTRACTION_SCRIPTS, root=pkg)
    before = fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg)
    (pkg / "numerics/newstep.py").write_text("VALUE = 2\n")
    assert fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg) != before


def test_a_column_rename_reruns_tables_not_extraction(pkg):
    ex = fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg)
    tab = fp.tables_fingerprint(TABLES_SCRIPTS, root=pkg)
    edit(pkg / "registry/features.py", 'Feature("cfga_plus", 1024, "CFGA+"', 'Feature("cfga_plus", 1024, "CFGA plus"')
    assert fp.extraction_fingerprint(EXTRACTION_SCRIPTS, root=pkg) == ex
    assert fp.tables_fingerprint(TABLES_SCRIPTS, root=pkg) != tab


def test_code_tree_ignores_layout():
    a = fp.code_tree('"""doc"""\nx = 1  # c\n\n\ndef f():\n    """d"""\n    return x\n')
    b = fp.code_tree("x = 1\ndef f(): return x\n")
    assert a == b
    assert fp.code_tree("x = 2\ndef f(): return x\n") != b


def test_unknown_module_is_an_error(pkg):
    with pytest.raises(ValueError, match="cfga.nothing"):
        fp.code_fingerprint(["cfga.nothing"], root=pkg)
