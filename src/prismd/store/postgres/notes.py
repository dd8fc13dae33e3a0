"""The agents' memory notes in the PostgreSQL store (`memory_notes`), searched with
PostgreSQL's full text search over tokens made as SQLite's FTS5 makes them (`note_tokens`,
`note_vector`, `note_query`): both stores find the same notes.
"""

from __future__ import annotations

import functools
import unicodedata

from ..base import NoteRecord, note_time, query_words
from ..common import _note
from .core import PostgresCore

# Notes are searched with PostgreSQL's full text search (a tsvector column with a GIN index,
# ts_rank) over tokens made here, not by a text search configuration: here SQLite FTS5's
# unicode61 tokenizer (remove_diacritics 2), which the SQLite store uses, is reproduced, so that
# a search finds the same notes on both stores (a configuration splits words its own way, e.g.
# e-mail addresses and hyphenated words, depends on the database's locale, and `unaccent` is an
# extension not every server has). The note's vector and the query are written as tsvector and
# tsquery values whose every lexeme is quoted: no user text ever becomes query syntax.

MAX_LEXEME_BYTES = 2046  # PostgreSQL's longest lexeme; a longer token is not indexed
MAX_POSITIONS = 256  # positions PostgreSQL keeps per lexeme


# SQLite's diacritics: the combining characters U+0300-U+0331 of these bits, which vanish
# from a token (the others separate tokens).
_DIACRITICS = (0x08029FDF, 0x000361F8)


@functools.lru_cache(maxsize=65536)
def _fold(ch: str) -> str | None:
    """What a character becomes in a token ("" for a diacritic: it vanishes); None if it
    separates tokens."""
    n = ord(ch) - 0x300
    if 0 <= n < 50:
        return "" if _DIACRITICS[n // 32] >> (n % 32) & 1 else None
    category = unicodedata.category(ch)
    if category[0] not in "LN" and category != "Co":
        return None
    low = ch.lower().replace("\u03c2", "\u03c3")  # final sigma: σ
    if unicodedata.name(ch, "").startswith("LATIN "):  # without its diacritics
        low = "".join(c for c in unicodedata.normalize("NFD", low) if not unicodedata.combining(c))
    return low


def note_tokens(text: str) -> list[str]:
    """The tokens of `text` as FTS5's unicode61 tokenizer (remove_diacritics 2) makes them:
    runs of letters, digits and private-use characters, lowercased, Latin letters without
    their diacritics; every other character separates tokens. (SQLite classifies characters
    by Unicode 6.1: characters assigned since, such as newer emoji, may differ.)"""
    tokens: list[str] = []
    current: list[str] = []
    for ch in text:
        folded = _fold(ch)
        if folded is not None:
            current.append(folded)
        elif current:
            if token := "".join(current):
                tokens.append(token)
            current.clear()
    if token := "".join(current):
        tokens.append(token)
    return tokens


def _lexeme(token: str) -> str:
    return "'" + token.replace("\\", "\\\\").replace("'", "''") + "'"


def _fits(token: str) -> bool:
    return len(token.encode()) <= MAX_LEXEME_BYTES


def note_vector(text: str, tags: str) -> str:
    """A note's tsvector (as text): its tokens with their positions, the tags' after the
    text's one position apart (a phrase never spans both, as with FTS5's two columns)."""
    positions: dict[str, list[int]] = {}
    at = 0
    for part in (text, tags):
        for token in note_tokens(part):
            at += 1
            positions.setdefault(token, []).append(at)
        at += 1
    return " ".join(
        f"{_lexeme(token)}:{','.join(map(str, where[:MAX_POSITIONS]))}"
        for token, where in positions.items()
        if _fits(token)
    )


def note_query(words: list[str]) -> str:
    """A tsquery (as text) matching any of `words` (`query_words`), each as the phrase of its
    tokens; "" when no word holds a token (nothing matches, as in FTS5)."""
    phrases = []
    for word in words:
        tokens = note_tokens(word)
        if tokens and all(_fits(t) for t in tokens):
            phrase = " <-> ".join(map(_lexeme, tokens))
            phrases.append(f"({phrase})" if len(tokens) > 1 else phrase)
    return " | ".join(phrases)


class PostgresNotes(PostgresCore):
    async def add_note(self, scope: str, text: str, tags: list[str]) -> int:
        joined = ", ".join(tags)
        row = (scope, note_time(), text, joined, note_vector(text, joined))
        note_id = await self._call(
            lambda c: c.fetchval(
                "INSERT INTO memory_notes (scope, created_at, text, tags, search) "
                "VALUES ($1,$2,$3,$4,$5::tsvector) RETURNING id",
                *row,
            )
        )
        return int(note_id)

    async def search_notes(self, scope: str, query: str, limit: int) -> list[NoteRecord]:
        words = query_words(query)
        if not words:  # no words: the newest notes
            rows = await self._pooled(
                lambda c: c.fetch(
                    "SELECT id, created_at, text, tags FROM memory_notes WHERE scope=$1 "
                    "ORDER BY id DESC LIMIT $2",
                    scope,
                    limit,
                )
            )
            return [_note(scope, row) for row in rows]
        match = note_query(words)
        if not match:
            return []
        rows = await self._pooled(
            lambda c: c.fetch(
                "SELECT id, created_at, text, tags FROM memory_notes "
                "WHERE scope=$1 AND search @@ $2::tsquery "
                "ORDER BY ts_rank(search, $2::tsquery, 1) DESC, id DESC LIMIT $3",
                scope,
                match,
                limit,
            )
        )
        return [_note(scope, row) for row in rows]
