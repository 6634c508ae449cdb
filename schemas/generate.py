"""Write the JSON Schema files for every message model: ``python -m schemas.generate``."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.messages import ALL_MESSAGES

SCHEMA_DIR = Path(__file__).with_name("json")


def render() -> dict[str, str]:
    """File name -> JSON Schema text, for every message model."""
    out = {}
    for name, model in ALL_MESSAGES.items():
        schema = model.model_json_schema(by_alias=True)
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for fname, text in render().items():
        (SCHEMA_DIR / fname).write_text(text)
        print(SCHEMA_DIR / fname)


if __name__ == "__main__":
    main()
