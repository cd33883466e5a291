"""The patch tool: anchors found or refused, idempotence, exact revert, refusal changes nothing.

Every repository here is a few small files written by the test; no upstream code is involved.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from memloss_addon.experiments.patching import (
    STATE_FILE,
    PatchError,
    add_patch_subcommand,
    apply_patch,
    edit_text,
    main,
    revert_patch,
)
from memloss_addon.integrations.specs import LINE_BUDGET, PATCHES, SHIM_PATH, Edit, RepoPatch

REPO_ROOT = Path(__file__).resolve().parents[1]

# A made-up two-file "repository" and a patch for it.
TRAIN_PY = (
    "import os\n"
    "args = parse()\n"
    "for x, y in loader:\n"
    "    loss = f(x, y)\n"
    "    loss.backward()\n"
    "save()\n"
)
LOSS_PY = (
    "def f(x, y):\r\n    out = g(x)\r\n    return out\r\n    return out\r\n"
    "# caf\u00e9, no newline at end"
)

DEMO = RepoPatch(
    name="demo",
    repository="someone/demo",
    commit="0123456789abcdef0123456789abcdef01234567",
    required_files=("train.py", "lib/loss.py"),
    edits=(
        Edit("train.py", ("import os",), "insert_after", ("from shim import hook",)),
        Edit("train.py", ("args = parse()",), "insert_before", ("hook.add(parser)",)),
        Edit(
            "train.py", ("for x, y in loader:",), "replace", ("for x, y, i in hook.wrap(loader):",)
        ),
        Edit(
            "train.py", ("    loss = f(x, y)",), "insert_after", ("    loss = loss + hook.term(i)",)
        ),
        Edit(
            "lib/loss.py", ("    return out",), "insert_before", ("    hook.record(out)",), count=2
        ),
        Edit("lib/loss.py", ("# caf\u00e9, no newline at end",), "insert_after", ("# end",)),
    ),
    new_files={"shim.py": "hook = None\n"},
)

PATCHED_TRAIN_PY = (
    "import os\n"
    "from shim import hook\n"
    "hook.add(parser)\n"
    "args = parse()\n"
    "for x, y, i in hook.wrap(loader):\n"
    "    loss = f(x, y)\n"
    "    loss = loss + hook.term(i)\n"
    "    loss.backward()\n"
    "save()\n"
)
PATCHED_LOSS_PY = (
    "def f(x, y):\r\n    out = g(x)\r\n    hook.record(out)\r\n    return out\r\n"
    "    hook.record(out)\r\n    return out\r\n# caf\u00e9, no newline at end\r\n# end\r\n"
)


def make_repo(root: Path) -> Path:
    (root / "lib").mkdir(parents=True)
    (root / "train.py").write_bytes(TRAIN_PY.encode())
    (root / "lib" / "loss.py").write_bytes(LOSS_PY.encode())
    os.chmod(root / "train.py", 0o755)
    return root


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root with its bytes and permission bits."""
    return {
        str(path.relative_to(root)): (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------- edit_text


def test_edit_text_applies_each_action_and_keeps_line_endings():
    train_edits = [e for e in DEMO.edits if e.path == "train.py"]
    loss_edits = [e for e in DEMO.edits if e.path == "lib/loss.py"]
    assert edit_text(TRAIN_PY, train_edits) == PATCHED_TRAIN_PY
    assert edit_text(LOSS_PY, loss_edits) == PATCHED_LOSS_PY


def test_replace_keeps_a_missing_final_newline_missing():
    edit = Edit("a.py", ("b",), "replace", ("c",))
    assert edit_text("a\nb", [edit]) == "a\nc"


def test_anchor_must_match_the_whole_line():
    edit = Edit("a.py", ("x = 1",), "insert_after", ("y = 2",))
    with pytest.raises(PatchError, match="found 0"):
        edit_text("    x = 1\n", [edit])  # indentation is part of the anchor
    with pytest.raises(PatchError, match="found 0"):
        edit_text("x = 10\n", [edit])


def test_anchor_found_too_often_is_refused():
    edit = Edit("a.py", ("x = 1",), "insert_after", ("y = 2",))
    with pytest.raises(PatchError, match=r"expected 1 occurrence.*found 2"):
        edit_text("x = 1\nx = 1\n", [edit])


def test_multi_line_anchor_disambiguates():
    edit = Edit("a.py", ("a", "x = 1"), "replace", ("a", "x = 2"))
    assert edit_text("x = 1\na\nx = 1\n", [edit]) == "x = 1\na\nx = 2\n"


def test_edit_rejects_bad_definitions():
    with pytest.raises(ValueError, match="action"):
        Edit("a.py", ("x",), "append", ("y",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty anchor"):
        Edit("a.py", (), "replace", ("y",))
    with pytest.raises(ValueError, match="count 0"):
        Edit("a.py", ("x",), "replace", ("y",), count=0)


def test_changed_lines_counts_added_plus_removed():
    assert Edit("a", ("x",), "insert_after", ("y", "z")).changed_lines == 2
    assert Edit("a", ("x",), "replace", ("y",)).changed_lines == 2
    assert Edit("a", ("x",), "insert_before", ("y",), count=2).changed_lines == 2
    # train.py: 1 + 1 + 2 + 1; lib/loss.py: 2 + 1
    assert DEMO.changed_lines == 8


# ---------------------------------------------------------------- apply / revert


def test_apply_writes_the_edits_and_new_files(tmp_path):
    root = make_repo(tmp_path / "repo")
    result = apply_patch(DEMO, root)
    assert result.outcome == "applied"
    assert (root / "train.py").read_bytes() == PATCHED_TRAIN_PY.encode()
    assert (root / "lib" / "loss.py").read_bytes() == PATCHED_LOSS_PY.encode()
    assert (root / "shim.py").read_text() == "hook = None\n"
    assert (root / STATE_FILE).is_file()
    assert stat.S_IMODE((root / "train.py").stat().st_mode) == 0o755  # mode kept


def test_apply_twice_is_a_no_op(tmp_path):
    root = make_repo(tmp_path / "repo")
    apply_patch(DEMO, root)
    before = snapshot(root)
    result = apply_patch(DEMO, root)
    assert result.outcome == "already-applied"
    assert result.files == ()
    assert snapshot(root) == before


def test_revert_restores_the_exact_original_bytes(tmp_path):
    root = make_repo(tmp_path / "repo")
    original = snapshot(root)
    apply_patch(DEMO, root)
    result = revert_patch(DEMO, root)
    assert result.outcome == "reverted"
    assert snapshot(root) == original  # CRLF, non-ASCII text, missing final newline, modes
    assert revert_patch(DEMO, root).outcome == "not-applied"
    assert snapshot(root) == original


def test_apply_revert_apply_gives_the_same_result(tmp_path):
    root = make_repo(tmp_path / "repo")
    apply_patch(DEMO, root)
    first = snapshot(root)
    revert_patch(DEMO, root)
    apply_patch(DEMO, root)
    assert snapshot(root) == first


# ---------------------------------------------------------------- refusals change nothing


def test_missing_required_file_is_refused_and_named(tmp_path):
    root = make_repo(tmp_path / "repo")
    (root / "lib" / "loss.py").unlink()
    before = snapshot(root)
    with pytest.raises(PatchError, match=r"missing lib/loss.py") as error:
        apply_patch(DEMO, root)
    assert "someone/demo" in str(error.value) and "Nothing was changed" in str(error.value)
    assert snapshot(root) == before


def test_one_missing_anchor_changes_no_file(tmp_path):
    root = make_repo(tmp_path / "repo")
    # The last file's anchor is gone: the earlier, valid edits must not be written either.
    (root / "lib" / "loss.py").write_bytes(LOSS_PY.replace("# caf", "# tea").encode())
    before = snapshot(root)
    with pytest.raises(PatchError, match=r"lib/loss.py: expected 1 occurrence"):
        apply_patch(DEMO, root)
    assert snapshot(root) == before


def test_every_problem_is_reported_at_once(tmp_path):
    root = make_repo(tmp_path / "repo")
    broken = TRAIN_PY.replace("save()", "").replace("import os", "import sys")
    (root / "train.py").write_text(broken)
    (root / "lib" / "loss.py").write_text("nothing here\n")
    with pytest.raises(PatchError) as error:
        apply_patch(DEMO, root)
    message = str(error.value)
    assert "train.py: expected 1 occurrence(s) of the anchor 'import os', found 0" in message
    assert "lib/loss.py: expected 2 occurrence(s) of the anchor 'return out', found 0" in message


def test_existing_new_file_without_state_is_refused(tmp_path):
    root = make_repo(tmp_path / "repo")
    (root / "shim.py").write_text("mine\n")
    before = snapshot(root)
    with pytest.raises(PatchError, match="shim.py already exists"):
        apply_patch(DEMO, root)
    assert snapshot(root) == before


def test_non_utf8_file_is_refused(tmp_path):
    root = make_repo(tmp_path / "repo")
    (root / "lib" / "loss.py").write_bytes(b"\xff\xfe broken")
    before = snapshot(root)
    with pytest.raises(PatchError, match="not UTF-8"):
        apply_patch(DEMO, root)
    assert snapshot(root) == before


def test_another_patch_is_refused(tmp_path):
    root = make_repo(tmp_path / "repo")
    apply_patch(DEMO, root)
    other = RepoPatch("other", "x/y", "0" * 40, ("train.py",), DEMO.edits[:1])
    before = snapshot(root)
    with pytest.raises(PatchError, match="already carries the 'demo' patch"):
        apply_patch(other, root)
    with pytest.raises(PatchError, match="carries the 'demo' patch, not 'other'"):
        revert_patch(other, root)
    assert snapshot(root) == before


def test_revert_after_local_changes_is_refused(tmp_path):
    root = make_repo(tmp_path / "repo")
    apply_patch(DEMO, root)
    with (root / "train.py").open("a") as stream:
        stream.write("extra()\n")
    before = snapshot(root)
    with pytest.raises(PatchError, match="changed after patching: train.py"):
        revert_patch(DEMO, root)
    assert snapshot(root) == before
    assert "changed since: train.py" in apply_patch(DEMO, root).message


def test_revert_without_state_but_with_our_file_is_refused(tmp_path):
    root = make_repo(tmp_path / "repo")
    apply_patch(DEMO, root)
    (root / STATE_FILE).unlink()
    before = snapshot(root)
    with pytest.raises(PatchError, match="no .memloss-patch.json"):
        revert_patch(DEMO, root)
    assert snapshot(root) == before


def test_not_a_directory_and_unknown_name_are_refused(tmp_path):
    with pytest.raises(PatchError, match="is not a directory"):
        apply_patch(DEMO, tmp_path / "missing")
    with pytest.raises(PatchError, match="unknown patch 'nope'"):
        apply_patch("nope", tmp_path)


# ---------------------------------------------------------------- command line


def test_subcommand_registers_patch_with_a_handler(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="memloss")
    add_patch_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["patch", "trades", str(tmp_path)])
    assert (args.name, args.path, args.revert) == ("trades", str(tmp_path), False)
    assert args.func(args) == 2  # an empty folder is not a TRADES checkout
    err = capsys.readouterr().err
    assert "missing train_trades_cifar10.py, trades.py" in err
    assert list(tmp_path.iterdir()) == []
    args = parser.parse_args(["patch", "st", str(tmp_path), "--revert"])
    assert args.func(args) == 0  # nothing to revert
    assert "not applied" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["patch", "pgd", str(tmp_path)])  # not a known repository


def test_main_refuses_with_exit_code_2(tmp_path, capsys):
    assert main(["hat", str(tmp_path)]) == 2
    assert "imrahulr/hat" in capsys.readouterr().err


def test_module_runs_as_a_script(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "memloss_addon.experiments.patching", "mart", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert completed.returncode == 2
    assert "missing train_wideresnet.py, train_resnet.py, mart.py" in completed.stderr


# ---------------------------------------------------------------- the shipped patches


# Each shipped patch's scripts, as the issue that asked for them names them.
SHIPPED_SCRIPTS = {
    "trades": ["train_trades_cifar10.py"],
    "mart": ["train_wideresnet.py", "train_resnet.py"],
    "hat": ["train.py", "train-wa.py"],
    "st": ["train_stat.py"],
    "robust-overfitting": ["train_cifar.py", "train_svhn.py", "train_cifar100.py"],
    "awp": ["AT_AWP/train_cifar10.py", "trades_AWP/train_trades_cifar.py"],
}


def test_shipped_patches_cover_their_scripts_within_the_line_budget():
    assert sorted(PATCHES) == sorted(SHIPPED_SCRIPTS)
    for patch in PATCHES.values():
        by_script = patch.changed_lines_by_script()
        assert list(by_script) == SHIPPED_SCRIPTS[patch.name]
        for script, lines in by_script.items():
            assert 0 < lines <= LINE_BUDGET, (patch.name, script, lines)
            assert patch.scripts[script][0] == script  # the script itself comes first
        assert set(patch.edited_files) <= set(patch.required_files), patch.name
        assert re.fullmatch(r"[0-9a-f]{40}", patch.commit)


def test_script_line_counts_are_the_edits_on_each_path():
    # robust-overfitting: one file per script; hat: train-wa.py runs through both loss files.
    patch = PATCHES["robust-overfitting"]
    for script, files in patch.scripts.items():
        assert files == (script,)
        expected = sum(edit.changed_lines for edit in patch.edits if edit.path == script)
        assert patch.changed_lines_by_script()[script] == expected
    hat = PATCHES["hat"]
    assert set(hat.scripts["train-wa.py"]) == {
        "train-wa.py",
        "core/utils/hat.py",
        "gowal21uncovering/utils/hat.py",
    }
    assert sum(hat.changed_lines_by_script().values()) > hat.changed_lines  # shared file


def test_scripts_must_name_exactly_the_edited_files():
    edits = (Edit("a.py", ("x",), "insert_after", ("y",)), Edit("b.py", ("x",), "replace", ("y",)))
    with pytest.raises(ValueError, match="lists files no edit touches: c.py"):
        RepoPatch("p", "o/p", "0" * 40, ("a.py",), edits, scripts={"a.py": ("a.py", "c.py")})
    with pytest.raises(ValueError, match="edited files on no script's path: b.py"):
        RepoPatch("p", "o/p", "0" * 40, ("a.py",), edits, scripts={"a.py": ("a.py",)})
    one = RepoPatch("p", "o/p", "0" * 40, ("a.py",), edits)
    assert one.changed_lines_by_script() == {"a.py": 3}


def test_shipped_shims_compile_and_name_real_hook_objects():
    from memloss_addon.integrations import hook

    for patch in PATCHES.values():
        assert patch.new_files, patch.name
        for path, source in patch.new_files.items():
            assert path.rsplit("/", 1)[-1] == SHIM_PATH
            compile(source, path, "exec")
            names = re.search(r"from memloss_addon\.integrations\.hook import (.+)", source)
            for name in names.group(1).split(", "):
                assert hasattr(hook, name), (patch.name, name)


def test_every_script_folder_has_a_shim():
    """A script imports ``memloss_shim`` from its own folder (the first entry of sys.path)."""
    for patch in PATCHES.values():
        folders = {path.rpartition("/")[0] for path in patch.new_files}
        for script in patch.scripts:
            assert script.rpartition("/")[0] in folders, (patch.name, script)


def test_shipped_patches_call_only_what_the_hook_provides():
    from memloss_addon.integrations.hook import TrainingHook

    for patch in PATCHES.values():
        for edit in patch.edits:
            for line in edit.lines:
                for method in re.findall(r"memloss\.(\w+)\(", line):
                    assert callable(getattr(TrainingHook, method, None)), (patch.name, line)


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_rendered_patch_file_matches_the_spec(name):
    """integrations/<name>/memloss.patch shows exactly the lines the tool adds and removes."""
    rendered = (REPO_ROOT / "integrations" / name / "memloss.patch").read_text()
    added: dict[str, list[str]] = {}
    removed: dict[str, list[str]] = {}
    current = ""
    for line in rendered.splitlines():
        if line.startswith("+++ "):
            current = line.removeprefix("+++ b/")
        elif line.startswith("+") and not line.startswith("+++"):
            added.setdefault(current, []).append(line[1:])
        elif line.startswith("-") and not line.startswith("---"):
            removed.setdefault(current, []).append(line[1:])
    patch = PATCHES[name]
    for path in patch.edited_files:
        expected_added = [
            text
            for edit in patch.edits
            if edit.path == path
            for _ in range(edit.count)
            for text in edit.lines
        ]
        expected_removed = [
            text
            for edit in patch.edits
            if edit.path == path and edit.action == "replace"
            for _ in range(edit.count)
            for text in edit.anchor
        ]
        assert sorted(added.pop(path)) == sorted(expected_added), path
        assert sorted(removed.pop(path, [])) == sorted(expected_removed), path
    for path, text in patch.new_files.items():
        assert "\n".join(added.pop(path)) + "\n" == text, path
    assert added == {} and removed == {}


# ---------------------------------------------------------------- the shipped specs on stand-ins


def anchor_repo(root: Path, patch: RepoPatch) -> Path:
    """Writes files that hold each anchor of ``patch`` (as often as expected) between fillers.

    Only the anchor lines of the spec are written: the test carries no upstream code.
    """
    for path in patch.required_files:
        lines = []
        for edit in patch.edits:
            if edit.path == path:
                for _ in range(edit.count):
                    lines += ["# filler", *edit.anchor]
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join([*lines, "# end"]) + "\n")
    return root


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_shipped_spec_applies_to_its_anchors_and_reverts_exactly(tmp_path, name):
    patch = PATCHES[name]
    root = anchor_repo(tmp_path / name, patch)
    original = snapshot(root)
    result = apply_patch(name, root)
    assert result.outcome == "applied"
    for path in patch.edited_files:
        text = (root / path).read_text().splitlines()
        for edit in patch.edits:
            if edit.path == path:
                for line in edit.lines:
                    assert text.count(line) >= edit.count, (path, line)
                if edit.action == "replace":
                    assert not set(edit.anchor) & set(text) - set(edit.lines), (path, edit.anchor)
    for path, content in patch.new_files.items():
        assert (root / path).read_text() == content
    # Upstream lines changed, counted in the files (added plus removed lines of a plain diff).
    changed = 0
    for path in patch.edited_files:
        before, after = (
            original[path][0].decode().splitlines(),
            (root / path).read_text().splitlines(),
        )
        diff = difflib.unified_diff(before, after, n=0, lineterm="")
        changed += sum(1 for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    assert changed == patch.changed_lines
    assert apply_patch(name, root).outcome == "already-applied"
    assert revert_patch(name, root).outcome == "reverted"
    assert snapshot(root) == original


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_shipped_spec_refuses_a_missing_or_repeated_anchor_by_name(tmp_path, name):
    patch = PATCHES[name]
    for number, edit in enumerate(patch.edits):
        for change in ("missing", "repeated"):
            root = anchor_repo(tmp_path / f"{name}-{number}-{change}", patch)
            path = root / edit.path
            text = path.read_text()
            block = "\n".join(edit.anchor) + "\n"
            if change == "missing":
                text = text.replace(block, "# gone\n")
                found = 0
            else:
                text = text + block
                found = edit.count + 1
            path.write_text(text)
            before = snapshot(root)
            with pytest.raises(PatchError) as error:
                apply_patch(name, root)
            message = str(error.value)
            assert f"{edit.path}: expected {edit.count} occurrence(s)" in message, message
            assert f"found {found}" in message and edit.anchor[-1].strip() in message
            assert patch.repository in message and "Nothing was changed" in message
            assert snapshot(root) == before


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_shipped_spec_refuses_a_checkout_without_its_scripts(tmp_path, name):
    patch = PATCHES[name]
    root = anchor_repo(tmp_path / name, patch)
    script = next(iter(patch.scripts))
    (root / script).unlink()
    before = snapshot(root)
    with pytest.raises(PatchError, match=f"missing {re.escape(script)}"):
        apply_patch(name, root)
    assert snapshot(root) == before
