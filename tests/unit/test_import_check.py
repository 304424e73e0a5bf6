"""Import results parsed from real ComfyUI start-up logs (tests/fixtures/comfyui-0.3.64)."""

from services.import_check import modules_loaded, parse_startup_log
from tests.support import recording_text


def test_failed_custom_node_with_its_error_line() -> None:
    result = parse_startup_log(recording_text("startup_with_custom_nodes.log"))
    assert result.complete
    assert result.failures == {"broken_node": "No module named 'nonexistent_dep'"}


def test_both_failures_when_tooling_head_is_incompatible() -> None:
    log = recording_text("startup_with_custom_nodes_tooling_HEAD_incompatible.log")
    result = parse_startup_log(log)
    assert set(result.failures) == {"broken_node", "comfyui-tooling-nodes"}
    assert "cannot import name 'Anima'" in result.failures["comfyui-tooling-nodes"]


def test_only_the_last_start_counts_and_builtin_failures_are_not_nodes() -> None:
    first = recording_text("startup_with_custom_nodes.log")
    clean = recording_text("startup.log")
    assert parse_startup_log(first + clean).failures == {}
    assert "nodes_audio.py" not in parse_startup_log(first).failures


def test_log_without_the_block_is_incomplete() -> None:
    assert not parse_startup_log("Starting server\n").complete


def test_object_info_modules() -> None:
    info = {
        "A": {"python_module": "custom_nodes.comfyui-tooling-nodes"},
        "B": {"python_module": "nodes"},
        "C": {"python_module": "custom_nodes.x.sub"},
    }
    assert modules_loaded(info) == {"comfyui-tooling-nodes", "x"}


def test_node_without_mappings_is_a_failure_with_the_reason() -> None:
    log = (
        "Skip /w/ComfyUI/custom_nodes/empty module for custom nodes due to the lack of "
        "NODE_CLASS_MAPPINGS or NODES_LIST (need one).\n\nImport times for custom nodes:\n"
        "   0.0 seconds (IMPORT FAILED): /w/ComfyUI/custom_nodes/empty\n\n"
    )
    failures = parse_startup_log(log).failures
    assert failures == {"empty": "the lack of NODE_CLASS_MAPPINGS or NODES_LIST (need one)."}
