"""Prompt validation, as ComfyUI 0.3.64's ``validate_prompt``/``validate_inputs``.

The error objects are the same as ComfyUI's (``invalid_prompt``, ``prompt_no_outputs``,
``prompt_outputs_failed_validation`` with per-node ``value_not_in_list``,
``required_input_missing``, ``value_smaller_than_min``, ``invalid_input_type``,
``exception_during_validation``, ...) and so are the lines logged for a failure.
Widget values are converted in place (``"64"`` -> ``64`` for an INT), as ComfyUI does.
"""

from __future__ import annotations

import inspect
import logging
import sys
import traceback
from typing import Any

from nodes import NODE_CLASS_MAPPINGS

ValidationResult = tuple[bool, list[dict[str, Any]], str]


def full_type_name(klass: type) -> str:
    """``KeyError`` for builtins, ``module.Class`` for everything else."""
    if klass.__module__ == "builtins":
        return klass.__qualname__
    return f"{klass.__module__}.{klass.__qualname__}"


def is_link(value: Any) -> bool:
    """A ``[node_id, output_index]`` input."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
    )


# --------------------------------------------------------------------------- validation


def get_input_info(
    class_def: type, input_name: str, valid_inputs: dict[str, Any] | None = None
) -> tuple[Any, str | None, dict[str, Any] | None]:
    """``(type, category, extra options)`` of an input, or ``(None, None, None)``."""
    valid_inputs = valid_inputs or class_def.INPUT_TYPES()
    for category in ("required", "optional", "hidden"):
        if category in valid_inputs and input_name in valid_inputs[category]:
            spec = valid_inputs[category][input_name]
            if isinstance(spec, str):  # hidden inputs are plain strings ("PROMPT")
                return spec, category, {}
            return spec[0], category, (spec[1] if len(spec) > 1 else {})
    return None, None, None


def validate_node_input(received_type: Any, input_type: Any) -> bool:
    """Whether an output type may feed an input type (comma-separated unions, ``*``)."""
    if received_type == input_type or "*" in (received_type, input_type):
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    accepted = {t.strip() for t in input_type.split(",")}
    return bool(received & accepted)


def validate_inputs(
    prompt: dict[str, Any], item: str, validated: dict[str, ValidationResult]
) -> ValidationResult:
    """Validate one node and, recursively, the nodes it links to (ComfyUI's rules)."""
    unique_id = item
    if unique_id in validated:
        return validated[unique_id]

    inputs = prompt[unique_id]["inputs"]
    class_type = prompt[unique_id]["class_type"]
    obj_class = NODE_CLASS_MAPPINGS[class_type]
    class_inputs = obj_class.INPUT_TYPES()
    # ComfyUI iterates a set here; sorting gives a stable order (it matches the recording).
    valid_inputs = sorted(
        set(class_inputs.get("required", {})) | set(class_inputs.get("optional", {}))
    )

    errors: list[dict[str, Any]] = []
    valid = True
    validate_function_inputs: list[str] = []
    validate_has_kwargs = False
    if hasattr(obj_class, "VALIDATE_INPUTS"):
        argspec = inspect.getfullargspec(obj_class.VALIDATE_INPUTS)
        validate_function_inputs = argspec.args
        validate_has_kwargs = argspec.varkw is not None
    received_types: dict[str, Any] = {}

    for x in valid_inputs:
        input_type, input_category, extra_info = get_input_info(obj_class, x, class_inputs)
        assert extra_info is not None
        if x not in inputs:
            if input_category == "required":
                errors.append(
                    {
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": f"{x}",
                        "extra_info": {"input_name": x},
                    }
                )
            continue

        val = inputs[x]
        info = (input_type, extra_info)
        if isinstance(val, list):
            if len(val) != 2:
                errors.append(
                    {
                        "type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of "
                        "[node_id, slot_index]",
                        "details": f"{x}",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                        },
                    }
                )
                continue
            o_id = val[0]
            o_class_type = prompt[o_id]["class_type"]
            r = NODE_CLASS_MAPPINGS[o_class_type].RETURN_TYPES
            received_type = r[val[1]]
            received_types[x] = received_type
            if "input_types" not in validate_function_inputs and not validate_node_input(
                received_type, input_type
            ):
                errors.append(
                    {
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": f"{x}, received_type({received_type}) mismatch "
                        f"input_type({input_type})",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_type": received_type,
                            "linked_node": val,
                        },
                    }
                )
                continue
            try:
                r = validate_inputs(prompt, o_id, validated)
                if r[0] is False:
                    valid = False  # the linked node's own errors are already in `validated`
                    continue
            except Exception as ex:
                typ, _, tb = sys.exc_info()
                valid = False
                assert typ is not None
                validated[o_id] = (
                    False,
                    [
                        {
                            "type": "exception_during_inner_validation",
                            "message": "Exception when validating inner node",
                            "details": str(ex),
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "exception_message": str(ex),
                                "exception_type": full_type_name(typ),
                                "traceback": traceback.format_tb(tb),
                                "linked_node": val,
                            },
                        }
                    ],
                    o_id,
                )
                continue
        else:
            try:
                # A list widget value is sent wrapped as {"__value__": [...]}.
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                if input_type == "INT":
                    val = int(val)
                    inputs[x] = val
                if input_type == "FLOAT":
                    val = float(val)
                    inputs[x] = val
                if input_type == "STRING":
                    val = str(val)
                    inputs[x] = val
                if input_type == "BOOLEAN":
                    val = bool(val)
                    inputs[x] = val
            except Exception as ex:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{x}, {val}, {ex}",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                            "exception_message": str(ex),
                        },
                    }
                )
                continue

            if x not in validate_function_inputs and not validate_has_kwargs:
                if "min" in extra_info and val < extra_info["min"]:
                    errors.append(
                        {
                            "type": "value_smaller_than_min",
                            "message": f"Value {val} smaller than min of {extra_info['min']}",
                            "details": f"{x}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                            },
                        }
                    )
                    continue
                if "max" in extra_info and val > extra_info["max"]:
                    errors.append(
                        {
                            "type": "value_bigger_than_max",
                            "message": f"Value {val} bigger than max of {extra_info['max']}",
                            "details": f"{x}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                            },
                        }
                    )
                    continue
                if isinstance(input_type, list) or input_type == "COMBO":
                    options = extra_info.get("options", []) if input_type == "COMBO" else input_type
                    if val not in options:
                        input_config: Any = info
                        # Like ComfyUI: do not send back huge lists of model names.
                        if len(options) > 20:
                            list_info = f"(list of length {len(options)})"
                            input_config = None
                        else:
                            list_info = str(options)
                        errors.append(
                            {
                                "type": "value_not_in_list",
                                "message": "Value not in list",
                                "details": f"{x}: '{val}' not in {list_info}",
                                "extra_info": {
                                    "input_name": x,
                                    "input_config": input_config,
                                    "received_value": val,
                                },
                            }
                        )
                        continue

    if validate_function_inputs or validate_has_kwargs:
        errors.extend(
            _custom_validation(
                obj_class, inputs, validate_function_inputs, validate_has_kwargs, received_types
            )
        )

    ret: ValidationResult = (
        (False, errors, unique_id) if errors or not valid else (True, [], unique_id)
    )
    validated[unique_id] = ret
    return ret


def _custom_validation(
    obj_class: type,
    inputs: dict[str, Any],
    arg_names: list[str],
    has_kwargs: bool,
    received_types: dict[str, Any],
) -> list[dict[str, Any]]:
    """Run a node's ``VALIDATE_INPUTS`` with its widget values (links are not known yet)."""
    class_inputs = obj_class.INPUT_TYPES()
    filtered: dict[str, Any] = {}
    for name, value in inputs.items():
        if is_link(value):
            continue
        _, category, _ = get_input_info(obj_class, name, class_inputs)
        if category is not None and (name in arg_names or has_kwargs):
            filtered[name] = value
    if "input_types" in arg_names:
        filtered["input_types"] = received_types
    result = obj_class.VALIDATE_INPUTS(**filtered)
    errors = []
    if result is not True:
        for name in filtered:
            details = name if result is False else f"{name} - {result}"
            errors.append(
                {
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": details,
                    "extra_info": {"input_name": name},
                }
            )
    return errors


def validate_prompt(
    prompt: dict[str, Any], partial_execution_list: list[str] | None = None
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    """``(ok, error, outputs_to_execute, node_errors)`` exactly as ComfyUI builds them."""
    outputs: list[str] = []
    for x in prompt:
        if "class_type" not in prompt[x]:
            error = {
                "type": "invalid_prompt",
                "message": "Cannot execute because a node is missing the class_type property.",
                "details": f"Node ID '#{x}'",
                "extra_info": {},
            }
            return False, error, [], {}
        class_type = prompt[x]["class_type"]
        class_ = NODE_CLASS_MAPPINGS.get(class_type, None)
        if class_ is None:
            error = {
                "type": "invalid_prompt",
                "message": f"Cannot execute because node {class_type} does not exist.",
                "details": f"Node ID '#{x}'",
                "extra_info": {},
            }
            return False, error, [], {}
        if getattr(class_, "OUTPUT_NODE", False) is True and (
            partial_execution_list is None or x in partial_execution_list
        ):
            outputs.append(x)

    if not outputs:
        error = {
            "type": "prompt_no_outputs",
            "message": "Prompt has no outputs",
            "details": "",
            "extra_info": {},
        }
        return False, error, [], {}

    good_outputs: list[str] = []
    errors: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    validated: dict[str, ValidationResult] = {}
    for o in outputs:
        valid = False
        reasons: list[dict[str, Any]] = []
        try:
            valid, reasons, _ = validate_inputs(prompt, o, validated)
        except Exception as ex:
            typ, _, tb = sys.exc_info()
            assert typ is not None
            valid = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {
                        "exception_type": full_type_name(typ),
                        "traceback": traceback.format_tb(tb),
                    },
                }
            ]
            validated[o] = (False, reasons, o)

        if valid is True:
            good_outputs.append(o)
            continue
        logging.error(f"Failed to validate prompt for output {o}:")
        if reasons:
            logging.error("* (prompt):")
            for reason in reasons:
                logging.error(f"  - {reason['message']}: {reason['details']}")
        errors.append((o, reasons))
        for node_id, result in validated.items():
            node_valid, node_reasons = result[0], result[1]
            # Downstream nodes of a broken one are invalid without errors of their own;
            # only nodes with errors are reported.
            if node_valid is not True and node_reasons:
                if node_id not in node_errors:
                    node_class = prompt[node_id]["class_type"]
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": node_class,
                    }
                    logging.error(f"* {node_class} {node_id}:")
                    for reason in node_reasons:
                        logging.error(f"  - {reason['message']}: {reason['details']}")
                node_errors[node_id]["dependent_outputs"].append(o)
        logging.error("Output will be ignored")

    if not good_outputs:
        details = "\n".join(
            f"{error['message']}: {error['details']}" for _, reasons in errors for error in reasons
        )
        error = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": details,
            "extra_info": {},
        }
        return False, error, good_outputs, node_errors
    return True, None, good_outputs, node_errors
