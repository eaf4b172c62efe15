"""Exact-match scoring: what counts as the same answer, per task.

A prediction matches when its *extracted* form equals the reference's:

    gsm8k          the first number after the first "####": commas, "$" and a trailing "." dropped, "-" or "−"
                   kept, decimals compared as numbers (3.50 == 3.5, 7.0 == 7); no "####" or no number -> no
                   answer. lm-evaluation-harness's strict match reads the same number where it finds one; it
                   finds none in "####72", "#### $72" or "#### The answer is 72", which count here
    sql            outside string literals: case-insensitive; runs of whitespace -> one space; no spaces around
                   ( ) , = < > !; a trailing ";" dropped. A literal keeps its text exactly ('Bob' is not 'bob',
                   as in SQL), in single quotes whichever quotes it came in: a double-quoted string is read as a
                   value, as sql-create-context writes its values (SQLite too, when no column has that name)
    viggo, games   case-insensitive; runs of whitespace -> one space; no spaces around ( ) [ ] ,
    anything else  case-insensitive; runs of whitespace -> one space; surrounding whitespace dropped
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, InvalidOperation

_NUMBER = re.compile(r"[-−]?\s*\$?\s*(?:\d[\d,]*(?:\.\d*)?|\.\d+)")


def normalize_text(text: str) -> str:
    return " ".join(text.lower().split())


def normalize_mr(text: str) -> str:
    """Meaning representations: `inform(name[X], genres[a, b])`, compared without layout differences."""
    return re.sub(r"\s*([()\[\],])\s*", r"\1", normalize_text(text))


_SQL_LITERAL = re.compile(r"'[^']*'|\"[^\"]*\"")  # a quoted string ('it''s' reads as two, the same either side)


def normalize_sql(text: str) -> str:
    literals: list[str] = []

    def set_aside(match: re.Match) -> str:  # a literal leaves the text while the rest is normalised
        literals.append(f"'{match.group()[1:-1]}'")
        return f"\0{len(literals) - 1}\0"

    text = normalize_text(_SQL_LITERAL.sub(set_aside, text)).rstrip(";").strip()
    text = re.sub(r"\s*([(),=<>!])\s*", r"\1", text)
    return re.sub(r"\0(\d+)\0", lambda m: literals[int(m.group(1))], text)


def extract_gsm8k(text: str) -> str | None:
    """The final answer of a GSM8K solution ("... #### 1,234") as a canonical number string, or None."""
    if "####" not in text:
        return None
    match = _NUMBER.search(text.split("####", 2)[1])  # what a model rambles on with after it does not count
    if match is None:
        return None
    number = re.sub(r"[\s$,]", "", match.group()).replace("−", "-")
    try:
        value = Decimal(number)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # exact at any length; "-0" is 0
    return format(value.normalize(Context(prec=len(number))), "f")  # "3.50" is 3.5, every digit kept, no exponent


EXTRACT = {"gsm8k": extract_gsm8k, "sql": normalize_sql, "viggo": normalize_mr, "games": normalize_mr}


def extract(task: str, text: str) -> str | None:
    """The form of `text` that exact match compares for `task`."""
    return EXTRACT.get(task, normalize_text)(text)


def exact_match(task: str, prediction: str, reference: str) -> bool:
    predicted = extract(task, prediction)
    return predicted is not None and predicted == extract(task, reference)
