"""Synthetic corpora for the tests: deterministic English-like prose and Project Gutenberg-style wrapping.

Everything here is invented (the words, the names, the boilerplate lines), so the suite needs no real book
beside the repository. The prose has the character mix of a novel: upper and lower case, punctuation,
quoted dialogue, paragraphs separated by blank lines, chapter headings, and digits now and then. It is
plain ASCII, so a prefix of N characters is also a prefix of N bytes.

    story(25_000, seed=3)           # 25,000 characters of prose, the same for the same seed
    gutenberg(body, style="old")    # body between synthetic header/footer lines and start/end markers
    book(6_000)                     # the first 6,000 characters of gutenberg(story(...)): a book's opening
"""

from __future__ import annotations

import random

ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV", "XV")

NAMES = ("Tamsin", "Orrin", "Bexley", "Quill", "Maribel", "Jasper", "Wendeline", "Hollis", "Zara", "Piet")
NOUNS = ("lantern", "orchard", "kettle", "meadow", "staircase", "queen", "cat", "ribbon", "garden", "window",
         "biscuit", "teacup", "hedgehog", "violin", "quilt", "jar", "fox", "puzzle", "clock", "door", "river",
         "lizard", "mushroom", "pebble", "yarn", "wagon", "owl", "cupboard", "thimble", "key")
ADJECTIVES = ("small", "curious", "quiet", "enormous", "crooked", "velvet", "dusty", "bright", "jolly",
              "wobbly", "pale", "golden", "sleepy", "peculiar", "frozen", "zigzag", "lazy", "gentle")
VERBS = ("found", "carried", "watched", "opened", "followed", "painted", "borrowed", "juggled", "mended",
         "squeezed", "polished", "questioned", "dropped", "counted", "wrapped", "fixed", "visited")
ADVERBS = ("slowly", "quickly", "carefully", "almost", "suddenly", "quietly", "never", "twice", "gravely")
INTENSIFIERS = ("very", "rather", "quite", "extremely", "not at all")
PLACES = ("under the table", "beside the river", "in the garden", "behind the door", "across the meadow",
          "at the top of the staircase", "inside the cupboard", "near the window", "over the hedge")
SAID = ("said", "asked", "cried", "whispered", "replied", "muttered", "exclaimed")
LINES = ("I never saw such a thing in all my life", "Who left the kettle on the stairs", "It is far too late",
         "Do you know the way to the orchard", "Hold the lantern higher, please", "That is not my jar",
         "What a peculiar little clock", "Don't be so lazy", "We shall see about that",
         "Why is the river so quiet tonight", "Count the pebbles again", "Nobody asked the owl")


def _noun(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return f"{rng.choice(('the', 'a', 'her', 'his'))} {rng.choice(NOUNS)}"


def _clause(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)} {rng.choice(ADVERBS)} {rng.choice(VERBS)} {_noun(rng)} {rng.choice(PLACES)}"


def _narration(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        text, end = _clause(rng), "."
    elif r < 0.6:
        text, end = f"{_clause(rng)}, and {_clause(rng)}", "."
    elif r < 0.7:
        text, end = f"{_clause(rng)}; then {_noun(rng)} was {rng.choice(ADJECTIVES)}", "."
    elif r < 0.8:
        text, end = f"Was {_noun(rng)} {rng.choice(PLACES)}, or was it {rng.choice(ADJECTIVES)}", "?"
    elif r < 0.9:
        text, end = f"{_clause(rng)} (which was {rng.choice(INTENSIFIERS)} {rng.choice(ADJECTIVES)})", "."
    elif r < 0.96:
        n = rng.randint(2, 99)
        text, end = f"{rng.choice(NAMES)} {rng.choice(VERBS)} {n} {rng.choice(NOUNS)}s {rng.choice(PLACES)}", "."
    else:
        text, end = f"{_clause(rng)} -- how {rng.choice(ADJECTIVES).upper()} it was", "!"
    return text[0].upper() + text[1:] + end


def _dialogue(rng: random.Random) -> str:
    line = rng.choice(LINES)
    mark = "?" if line.split()[0] in ("Who", "Do", "What", "Why") else rng.choice((",", "!"))
    name, verb = rng.choice(NAMES), rng.choice(SAID)
    if mark == ",":
        return f'"{line}," {verb} {name}.'
    return f'"{line}{mark}" {verb} {name}.'


def _paragraph(rng: random.Random) -> str:
    sentences = [_dialogue(rng) if rng.random() < 0.3 else _narration(rng) for _ in range(rng.randint(2, 6))]
    words = " ".join(sentences).split(" ")
    lines, current = [], ""
    for word in words:  # wrapped near 72 columns, as plain-text books are
        if current and len(current) + 1 + len(word) > 72:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\n".join(lines)


def story(chars: int, seed: int = 0) -> str:
    """Exactly `chars` characters of invented prose (deterministic in `seed`), starting with a title and a
    chapter heading; no leading or trailing whitespace (the end may cut a word)."""
    rng = random.Random(seed)
    title = f"THE {rng.choice(ADJECTIVES).upper()} {rng.choice(NOUNS).upper()}"
    parts = [title, "", f"CHAPTER {ROMAN[0]}. The {rng.choice(NOUNS).capitalize()}"]
    size, chapter, since_heading = sum(len(p) + 2 for p in parts), 1, 0
    while size < chars + 64:
        if since_heading >= 12 and rng.random() < 0.15:
            heading = f"CHAPTER {ROMAN[chapter % len(ROMAN)]}. A {rng.choice(ADJECTIVES).capitalize()} " \
                      f"{rng.choice(NOUNS).capitalize()}"
            parts.append(heading)
            chapter, since_heading = chapter + 1, 0
            size += len(heading) + 2
        paragraph = _paragraph(rng)
        parts.append(paragraph)
        since_heading += 1
        size += len(paragraph) + 2
    return "\n\n".join(parts)[:chars].rstrip()


def gutenberg(body: str, style: str = "new", crlf: bool = False, bom: bool = False,
              title: str = "The Lantern Orchard", author: str = "Wendeline Hollis") -> str:
    """`body` inside synthetic Project Gutenberg boilerplate (invented header and footer lines).

    style "new": `*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***` ... `*** END OF THE ... ***`;
    style "old": `*** START OF THIS PROJECT GUTENBERG EBOOK <TITLE> ***` ... `End of the Project Gutenberg
    EBook of <Title>, by <Author>` then `*** END OF THIS ... ***`. crlf: CRLF line ends; bom: a leading BOM.
    Returns text; encode it (UTF-8) for a file.
    """
    upper = title.upper()
    if style == "new":
        header = [f"The Project Gutenberg eBook of {title}", "",
                  "This ebook is a made-up example for tests, with no license of its own.", "",
                  f"Title: {title}", "", f"Author: {author}", "", "Release date: March 3, 2031 [eBook #99999]",
                  "", "Language: English", "", "", f"*** START OF THE PROJECT GUTENBERG EBOOK {upper} ***"]
        footer = [f"*** END OF THE PROJECT GUTENBERG EBOOK {upper} ***", "",
                  "Updated editions of this invented file replace the previous one.",
                  "Nothing here comes from a real book."]
    elif style == "old":
        header = [f"Project Gutenberg's {title}, by {author}", "",
                  "This eBook is an invented stand-in for tests; it carries no real license text.", "",
                  f"Title: {title}", "", f"Author: {author}", "", "Posting Date: June 9, 2009 [EBook #99998]",
                  "", "", f"*** START OF THIS PROJECT GUTENBERG EBOOK {upper} ***"]
        footer = [f"End of the Project Gutenberg EBook of {title}, by {author}", "",
                  f"*** END OF THIS PROJECT GUTENBERG EBOOK {upper} ***", "",
                  "***** This invented file should be named 99998.txt *****"]
    else:
        raise ValueError(f"style must be 'new' or 'old', not {style!r}")
    text = "\n".join([*header, "", "", body, "", "", "", *footer]) + "\n"
    if crlf:
        text = text.replace("\n", "\r\n")
    return ("\ufeff" if bom else "") + text


def book(chars: int, seed: int = 0, style: str = "old") -> str:
    """The first `chars` characters (= bytes: ASCII) of a synthetic Gutenberg book: header lines, start
    marker, then the story; the footer lies beyond the cut, as in the opening of any real book file."""
    text = gutenberg(story(chars, seed), style=style)
    assert len(text) >= chars
    return text[:chars]
