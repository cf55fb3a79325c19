"""Every configuration key with its default and meaning, generated from the `description=` of the
fields in `image_autoencoding.config`, so the documentation cannot drift from the code.

The key table in docs/configuration.md (between its `<!-- keys: ... -->` and `<!-- end of keys -->`
markers) is the output of `python -m image_autoencoding.config_docs`; tests/test_config.py checks that
it is, so after adding or changing a field, regenerate the table and paste it there.
`keys_help_text()` is the same listing as plain text, for `vae train --help`'s epilog (use
`argparse.RawDescriptionHelpFormatter`, which keeps its line breaks).

Imports only the configuration, pydantic and the standard library (no torch): the CLI's help stays fast.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any, NamedTuple

from pydantic import BaseModel

from image_autoencoding.config import MODEL_CONFIGS, Config


class KeyRow(NamedTuple):
    key: str  # section.key, as written in overrides, e.g. "train.lr"
    default: str  # the default as YAML-ish text, e.g. "0.001", "[64, 128, 256]", "null"
    description: str


def format_default(value: Any) -> str:
    """A default as it would be written in a config file: null, true, 1e-7, [0.5, 0.5, 0.5], digits."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:  # 1e-07 -> 1e-7
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_default(item) for item in value) + "]"
    return str(value)


def _sections() -> list[tuple[str, list[tuple[str, type[BaseModel]]]]]:
    """Each section with its classes as (tag, class): one, untagged, but for the model section, whose
    class model.arch picks ("seed" -> SeedModelConfig, ...)."""
    return [(name, list(MODEL_CONFIGS.items()) if name == "model" else [("", field.annotation)])  # type: ignore[misc]
            for name, field in Config.model_fields.items()]


def _arch_row(section: str) -> KeyRow:
    """model.arch: its default is the architecture of a config that names none; each architecture's
    class describes itself."""
    default = Config.model_fields[section].get_default(call_default_factory=True).arch
    choices = "; ".join(f"{arch}: {model.model_fields['arch'].description}" for arch, model in MODEL_CONFIGS.items())
    return KeyRow(f"{section}.arch", default, f"which encoder and decoder, and so which of the model keys apply: "
                  f"{choices}")


def key_rows() -> list[KeyRow]:
    """(key, default, description) for every field of every section, in the classes' order. A model
    key that not every architecture has says which have it ("model.arch=resnet: ..."); keys every
    architecture has come first."""
    rows = []
    for section, classes in _sections():
        # (name, default, description) -> the architectures whose class has that field so
        found: dict[tuple[str, str, str], list[str]] = {}
        for arch, model in classes:
            for name, field in model.model_fields.items():
                default = format_default(field.get_default(call_default_factory=True))
                found.setdefault((name, default, field.description or ""), []).append(arch)
        shared = [entry for entry, archs in found.items() if len(archs) == len(classes) or entry[0] == "arch"]
        for name, default, description in [*shared, *(entry for entry in found if entry not in shared)]:
            archs = found[(name, default, description)]
            if section == "model" and name == "arch":
                if archs == [classes[0][0]]:  # one row for the key, where the first architecture has it
                    rows.append(_arch_row(section))
                continue
            only = "" if len(archs) == len(classes) else f"model.arch={' or '.join(archs)}: "
            rows.append(KeyRow(f"{section}.{name}", default, only + description))
    return _one_row_per_key(rows)


def _one_row_per_key(rows: list[KeyRow]) -> list[KeyRow]:
    """A key that architectures have with different defaults or meanings (model.latent_channels: a
    resnet's optional spatial latent, an AutoencoderKL's latent) as one row, at its first place:
    each default with its architectures, the descriptions joined."""
    merged: dict[str, list[KeyRow]] = {}
    for row in rows:
        merged.setdefault(row[0], []).append(row)
    result = []
    for key, same in merged.items():
        if len(same) == 1:
            result.append(same[0])
            continue
        archs = [description.partition(": ")[0].removeprefix("model.arch=") for _, _, description in same]
        default = ", ".join(f"{value} ({arch})" for (_, value, _), arch in zip(same, archs, strict=True))
        result.append(KeyRow(key, default, "; ".join(description for _, _, description in same)))
    return result


def key_table_markdown() -> str:
    """The markdown table of every key, one row per key, ending with a newline."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, description in key_rows():
        meaning = description.replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"


def keys_help_text(width: int | None = None) -> str:
    """Every key as plain text, one entry per key (`  section.key (default X): description`), wrapped
    to `width` columns (default: the terminal's, as argparse, between 60 and 100)."""
    if width is None:
        width = max(60, min(shutil.get_terminal_size().columns - 2, 100))
    entries = []
    for key, default, description in key_rows():
        head = f"{key} (default {default}):".replace(" ", "\0")  # never broken, e.g. inside [64, 128, 256]
        text = textwrap.fill(
            f"{head} {description.replace('`', '')}",
            width=width,
            initial_indent="  ",
            subsequent_indent="      ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        entries.append(text.replace("\0", " "))
    return "\n".join(entries)


if __name__ == "__main__":
    print(key_table_markdown(), end="")
