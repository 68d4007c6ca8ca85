"""Float dtypes an output may be written in, by the names users type (``--dtype``, ``--save-dtype``).

Names map to the safetensors codes so the command line can check them before torch is imported;
:func:`loratool.io.safetensors_file.torch_dtypes` turns a code into a torch dtype.
"""

from __future__ import annotations

from loratool.errors import UsageError

# The names help shows; FLOAT_CODES also accepts their spelled-out aliases.
FLOAT_NAMES = ("fp16", "bf16", "fp32")
FLOAT_CODES = {
    "fp16": "F16", "float16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp32": "F32", "float32": "F32", "float": "F32",
}


def float_code(name: str, option: str) -> str:
    """The safetensors code of a float dtype name; a :class:`UsageError` naming ``option`` otherwise."""
    code = FLOAT_CODES.get(name.lower())
    if code is None:
        raise UsageError(f"{option} {name}: choose {', '.join(FLOAT_NAMES[:-1])} or {FLOAT_NAMES[-1]}")
    return code
