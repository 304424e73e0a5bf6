"""Custom-node inputs: env list, TOML tables and ComfyUI-Manager snapshots, validated."""

import json
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.nodes import CustomNodeEntry, build_specs, parse_env_list, snapshot_nodes
from config.settings import custom_node_specs, load_settings


def test_env_list_with_refs() -> None:
    assert parse_env_list(
        "https://github.com/a/b@v1.0, git@github.com:a/c.git@main,file:///srv/x,"
    ) == [("https://github.com/a/b", "v1.0"), ("git@github.com:a/c.git", "main"),
          ("file:///srv/x", None)]


def test_env_wins_over_toml_over_snapshot_by_name() -> None:
    specs, problems = build_specs(
        "https://github.com/o/tool@v3",
        [CustomNodeEntry(url="https://github.com/o/tool", ref="v2", required=True)],
        [CustomNodeEntry(url="https://github.com/o/tool.git", ref="abc")],
    )
    assert problems == [] and len(specs) == 1
    assert (specs[0].name, specs[0].ref, specs[0].source) == ("tool", "v3",
                                                              "COMFYUI_CUSTOM_NODES")


def test_bad_inputs_each_name_the_node() -> None:
    _, problems = build_specs("not-a-url", [
        CustomNodeEntry(url="https://github.com/a/x", name="../x"),
        CustomNodeEntry(url="https://github.com/a/dup"),
        CustomNodeEntry(url="https://github.com/b/dup"),
    ], [])
    lines = [str(p) for p in problems]
    assert lines[0].startswith("custom_nodes[0] name=../x: must be a plain directory name")
    assert lines[1].startswith("custom_nodes[2] name=dup: two different nodes would share "
                               "custom_nodes/dup")
    assert lines[2].startswith("COMFYUI_CUSTOM_NODES=not-a-url: is not a git URL")


def test_snapshot_gives_comfyui_commit_nodes_and_disabled(tmp_path: Path) -> None:
    snapshot = {
        "comfyui": "a" * 40,
        "git_custom_nodes": {
            "https://github.com/Acly/comfyui-tooling-nodes": {"hash": "b" * 40, "disabled": False},
            "https://github.com/x/old": {"hash": "c" * 40, "disabled": True},
        },
        "cnr_custom_nodes": {"some-registry-node": "1.0.0"},
        "pips": {},
    }
    ref, entries, problems = snapshot_nodes(snapshot, "snap")
    assert ref == "a" * 40
    assert [(e.ref, e.enabled) for e in entries] == [("b" * 40, True), ("c" * 40, False)]
    assert "registry (CNR) nodes are not installed" in str(problems[0])
    # Through settings: the snapshot's ComfyUI commit is used unless COMFYUI_REF is set.
    del snapshot["cnr_custom_nodes"]
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(snapshot))
    conf = tmp_path / "machine.toml"
    conf.write_text('custom_nodes_snapshot = "snapshot.json"\n')  # relative to the TOML file
    specs, comfyui_ref = custom_node_specs(load_settings({"MACHINE_CONFIG": str(conf)}))
    assert comfyui_ref == "a" * 40 and {s.name for s in specs} == {"comfyui-tooling-nodes", "old"}
    _, pinned = custom_node_specs(load_settings({"MACHINE_CONFIG": str(conf),
                                                 "COMFYUI_REF": "v0.3.64"}))
    assert pinned == "v0.3.64"


def test_unreadable_snapshot_and_bad_toml_table(tmp_path: Path) -> None:
    broken = tmp_path / "snap.yaml"
    broken.write_text("git_custom_nodes: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot be read as a ComfyUI-Manager snapshot"):
        custom_node_specs(load_settings({"CUSTOM_NODES_SNAPSHOT": str(broken)}))
    conf = tmp_path / "machine.toml"
    conf.write_text('[[custom_nodes]]\nurl = "https://github.com/a/b"\nreff = "v1"\n')
    with pytest.raises(ConfigError) as info:
        load_settings({"MACHINE_CONFIG": str(conf)})
    assert str(info.value.problems[0]) == (
        f"custom_nodes[0].reff (in {conf})='v1': unknown key; did you mean 'ref'? accepted keys: "
        "url, ref, name, required, enabled, auth_env"
    )
