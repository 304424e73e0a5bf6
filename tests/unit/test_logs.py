"""Agent logs: one JSON object per line off a terminal, readable lines on one, no secrets."""

import io
import json
import logging

from machine.logs import JsonFormatter, TextFormatter, redact


def record(message: str, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("machine.test", logging.INFO, __file__, 1, message, None, None)
    rec.fields = fields
    return rec


def test_json_line_with_event_and_fields() -> None:
    line = JsonFormatter().format(record("install step", step="checkout ComfyUI", pid=None))
    entry = json.loads(line)
    assert entry["event"] == "install step" and entry["level"] == "info"
    assert entry["step"] == "checkout ComfyUI" and "\n" not in line


def test_secrets_never_logged() -> None:
    line = JsonFormatter().format(
        record(
            "fetch https://user:hf_secret@huggingface.co/x failed",
            headers={"Authorization": "Bearer hf_secret"},
            hf_token="hf_secret",
            url="https://ci:glpat-secret@gitlab.example/a/b.git",
        )
    )
    assert "secret" not in line
    entry = json.loads(line)
    assert entry["headers"] == {"Authorization": "***"} and entry["hf_token"] == "***"
    assert entry["url"] == "https://***@gitlab.example/a/b.git"
    text = TextFormatter().format(record("x", password="p4ss", api_key="k"))
    assert "p4ss" not in text and "api_key=***" in text


def test_redact_leaves_ordinary_values() -> None:
    assert redact({"port": 8188, "url": "http://127.0.0.1:8188"}) == {
        "port": 8188,
        "url": "http://127.0.0.1:8188",
    }


def test_text_lines_skip_empty_fields() -> None:
    line = TextFormatter().format(record("smoke passed", instance="comfyui-gpu0", error=None))
    assert line.endswith("smoke passed instance=comfyui-gpu0")


def test_setup_picks_json_off_a_terminal() -> None:
    from machine.logs import setup_logging

    stream = io.StringIO()
    setup_logging("INFO", stream)
    logging.getLogger("machine.x").info("hello", extra={"fields": {"a": 1}})
    assert json.loads(stream.getvalue())["a"] == 1
    setup_logging("WARNING")  # back to stderr for the other tests
