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
    _, problems = build_specs("./not-a-url", [
        CustomNodeEntry(url="https://github.com/a/x", name="../x"),
        CustomNodeEntry(url="https://github.com/a/dup"),
        CustomNodeEntry(url="https://github.com/b/dup"),
    ], [])
    lines = [str(p) for p in problems]
    assert lines[0].startswith("custom_nodes[0] name=../x: must be a plain directory name")
    assert lines[1].startswith("custom_nodes[2] name=dup: two different nodes would share "
                               "custom_nodes/dup")
    assert lines[2].startswith("COMFYUI_CUSTOM_NODES=./not-a-url: is not a git URL")


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
    assert [(e.ref, e.enabled) for e in entries[:2]] == [("b" * 40, True), ("c" * 40, False)]
    # A registry (cnr) node is an entry with its id and version.
    assert problems == [] and (entries[2].id, entries[2].version) == ("some-registry-node",
                                                                      "1.0.0")
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
        "url, ref, id, version, name, required, enabled, auth_env"
    )


def test_registry_ids_in_the_env_list_toml_and_snapshot() -> None:
    """An item that is neither a URL nor a path is a Comfy Registry id, optionally @version;
    ids are lower-cased as the registry stores them."""
    assert parse_env_list("comfyui-impact-pack@8.8.1, ComfyUI-KJNodes, https://h/o/r@v1") == [
        ("comfyui-impact-pack", "8.8.1"), ("ComfyUI-KJNodes", None), ("https://h/o/r", "v1")]
    specs, problems = build_specs(
        "comfyui-impact-pack@8.8.1, ComfyUI-KJNodes",
        [CustomNodeEntry(id="rgthree-comfy", version="1.0.0", required=True),
         CustomNodeEntry(id="comfyui-impact-pack", version="8.0.0")],
        [CustomNodeEntry(id="was-node-suite-comfyui", version="latest")],
    )
    assert problems == []
    shown = {s.name: (s.kind, s.registry_id, s.ref, s.url, s.required, s.source) for s in specs}
    assert shown == {
        "was-node-suite-comfyui": ("registry", "was-node-suite-comfyui", "latest", "", False,
                                   "custom_nodes_snapshot"),
        "rgthree-comfy": ("registry", "rgthree-comfy", "1.0.0", "", True, "custom_nodes[0]"),
        # the environment wins over the TOML file, matched by name
        "comfyui-impact-pack": ("registry", "comfyui-impact-pack", "8.8.1", "", False,
                                "COMFYUI_CUSTOM_NODES"),
        "comfyui-kjnodes": ("registry", "comfyui-kjnodes", "latest", "", False,
                            "COMFYUI_CUSTOM_NODES"),
    }
    assert specs[0].requested_version is None and specs[1].requested_version == "1.0.0"


def test_bad_registry_entries_each_name_field_value_and_fix() -> None:
    _, problems = build_specs("bad id!, good@1.2.3;rm", [
        CustomNodeEntry(url="https://h/o/r", id="r"),
        CustomNodeEntry(name="x"),
        CustomNodeEntry(id="r", ref="main"),
        CustomNodeEntry(url="https://h/o/r", version="1.0.0"),
        CustomNodeEntry(id="../etc"),
        CustomNodeEntry(id="a/b"),
        CustomNodeEntry(id="-lead"),
        CustomNodeEntry(id="r", auth_env="TOKEN"),
        CustomNodeEntry(id="git-twin"),
        CustomNodeEntry(url="https://h/o/git-twin"),
    ], [])
    lines = [str(p) for p in problems]
    assert lines[0].startswith("custom_nodes[0]=https://h/o/r: gives both `url` and `id`")
    assert lines[1].startswith("custom_nodes[1]=: needs `url` (a git repository, with `ref`) "
                               "or `id` (a Comfy Registry node, with `version`)")
    assert lines[2] == ("custom_nodes[2] ref=main: a registry node (`id`) takes `version`, not "
                        "`ref` (a git ref)")
    assert lines[3].startswith("custom_nodes[3] version=1.0.0: a git node (`url`) takes `ref`")
    for line, given in zip(lines[4:7], ("../etc", "a/b", "-lead"), strict=True):
        assert line.startswith(f"custom_nodes[{lines.index(line)}] id={given}: is not a Comfy "
                               "Registry node id (1-100 lower-case letters, digits, '-', '_', "
                               "'.', starting and ending with a letter or digit; no '/'")
    assert lines[7].startswith("custom_nodes[7] auth_env=TOKEN: registry nodes are public")
    assert lines[8].startswith("custom_nodes[9] name=git-twin: two different nodes would share "
                               "custom_nodes/git-twin (registry id git-twin from "
                               "custom_nodes[8] and https://h/o/git-twin)")
    assert lines[9].startswith("COMFYUI_CUSTOM_NODES id=bad id!: is not a Comfy Registry node id")
    assert lines[10].startswith("COMFYUI_CUSTOM_NODES version=1.2.3;rm: is not a registry "
                                "version (semver, e.g. 1.2.3")


def test_snapshot_cnr_nodes_need_a_version_string() -> None:
    _, entries, problems = snapshot_nodes({"cnr_custom_nodes": {"a": "1.0.0", "b": None}}, "s")
    assert [(e.id, e.version) for e in entries] == [("a", "1.0.0")]
    assert str(problems[0]).startswith("s cnr_custom_nodes=b: each entry needs a version")
    _, _, problems = snapshot_nodes({"cnr_custom_nodes": ["a"]}, "s")
    assert str(problems[0]).startswith("s cnr_custom_nodes=list: cnr_custom_nodes must map")


def test_registry_url_setting(tmp_path: Path) -> None:
    assert load_settings({}).comfy_registry_url == "https://api.comfy.org"
    assert load_settings({"COMFY_REGISTRY_URL": "http://10.0.0.5:8080/registry/"}
                         ).comfy_registry_url == "http://10.0.0.5:8080/registry"
    for bad, why in [("ftp://mirror/api", "is not an http(s) URL with a host"),
                     ("https://user:secret@mirror/api", "carries credentials"),
                     ("https://mirror/api?x=1", "has a query or fragment")]:
        with pytest.raises(ConfigError) as info:
            load_settings({"COMFY_REGISTRY_URL": bad})
        line = str(info.value.problems[0])
        assert line.startswith("COMFY_REGISTRY_URL=") and why in line, line
        assert "give the registry API's base URL, e.g. https://api.comfy.org" in line
        assert "secret" not in line
    conf = tmp_path / "machine.toml"
    conf.write_text('[[custom_nodes]]\nid = "comfyui-impact-pack"\nversion = "8.8.1"\n')
    specs, _ = custom_node_specs(load_settings({"MACHINE_CONFIG": str(conf)}))
    assert [(s.name, s.kind, s.ref) for s in specs] == [("comfyui-impact-pack", "registry",
                                                         "8.8.1")]
