"""Short facts laid out as lines: as many to a line as fit, separated by ' · '."""

from rich.text import Text


def fact_lines(facts: list[Text], width: int, max_lines: int | None = None) -> list[Text]:
    """``facts`` in order, wrapped to ``width``; facts that would need more than
    ``max_lines`` lines are left out (so put the most important first)."""
    lines: list[Text] = []
    for fact in facts:
        if lines and lines[-1].cell_len + 3 + fact.cell_len <= width:
            lines[-1].append(" · ", style="dim")
            lines[-1].append_text(fact)
        elif max_lines is None or len(lines) < max_lines:
            lines.append(fact.copy())
    return lines
