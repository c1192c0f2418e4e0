"""ComfyUI's own checks of widget values, for the inputs a node's ``validate_inputs`` names.

ComfyUI skips its min/max (and list) checks for every input that a node's ``validate_inputs``
takes as an argument, leaving them to the node (``execution.validate_inputs``). A node that checks
some of its settings early must therefore repeat those checks for the inputs it names, or a value
out of range would pass unnoticed.
"""
from __future__ import annotations


def out_of_limits(node_class, values: dict) -> str | None:
    """The first of ``values`` (input name -> widget value; None = linked, not known yet) outside the
    limits ``node_class`` declares, as a message naming the input and its limits; None if all fit."""
    declared = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in (declared.get(section) or {}).items():
            value = values.get(name)
            if value is None:
                continue
            options = spec[1] if len(spec) > 1 else {}
            choices = spec[0] if isinstance(spec[0], list) else options.get("options")
            if choices is not None and value not in choices:
                return f"{name} must be one of {list(choices)}, got {value!r}."
            if "min" in options and value < options["min"]:
                return f"{name} is {value}, less than its minimum {options['min']}."
            if "max" in options and value > options["max"]:
                return f"{name} is {value}, more than its maximum {options['max']}."
    return None
