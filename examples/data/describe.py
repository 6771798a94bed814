"""Print the per-dataset attribute tables of ``docs/datasets.md``.

    python -m examples.data.describe > /tmp/tables.md

The tables are generated from the loaded data (default sizes and seed), so the documentation can be
checked against the code (``tests/test_examples.py`` does).
"""

from __future__ import annotations

from examples.data.tabular import DEFAULT_MAX_ROWS, SOURCES, TABULAR_DATASETS, load_tabular


def dataset_section(name: str) -> str:
    """Markdown section of one tabular dataset: source, sizes, by-hand decisions, attributes."""
    data = load_tabular(name)
    source = SOURCES[name]
    n_train, n_val = len(data.train["x"]), len(data.val["x"])
    lines = [
        f"### `{name}` ({source.origin})",
        "",
        f"{data.source_rows} rows in the source; {n_train} train / {n_val} val rows"
        + (f" (subsampled to {DEFAULT_MAX_ROWS})" if data.source_rows > DEFAULT_MAX_ROWS else "")
        + f"; {len(data.schema.attributes)} attributes, encoder input width "
        f"{data.schema.input_dim}.",
    ]
    decisions = []
    if source.drop:
        decisions.append("dropped: " + ", ".join(f"`{c}`" for c in source.drop))
    if source.overrides:
        decisions.append(
            "kind overrides: " + ", ".join(f"`{c}` -> {k}" for c, k in source.overrides.items())
        )
    if source.fill:
        decisions.append(
            "missing values filled: " + ", ".join(f"`{c}` -> {v!r}" for c, v in source.fill.items())
        )
    if decisions:
        lines += ["", "By hand: " + "; ".join(decisions) + "."]
    if source.notes:
        lines += ["", source.notes]
    lines += ["", data.schema.markdown(), ""]
    return "\n".join(lines)


def main() -> None:
    for name in TABULAR_DATASETS:
        print(dataset_section(name))


if __name__ == "__main__":
    main()
