"""Regenerate ``suti/configs/identifiers/denylist.txt``: the strings an identifier must never be.

A DreamBooth identifier needs a weak prior in the text encoder and the image model (Ruiz et al.
2023, section 3.2), so it must not be a word, an acronym, slang or profanity. The list holds
every string of 2-4 letters without vowels that wordfreq's large English list knows (words,
acronyms and slang seen in web text, subtitles, news and social media; wordfreq 3.1, Speer 2022),
plus the hand-kept ``extra`` list below (tokens notorious among DreamBooth users, and acronyms
wordfreq misses). Run it where wordfreq is installed (it is not a dependency of suti):

    pip install wordfreq && python scripts/identifier_denylist.py
"""

from pathlib import Path

from wordfreq import iter_wordlist

EXTRA = ["sks", "ohwx", "zwx", "xyz", "fck", "szn", "jkt", "wwfc", "bwfc", "afcb", "lfc", "mufc", "cfc", "thfc", "nufc", "wx", "nsfw", "wtf", "stfu", "gtfo",
         "bbw", "bdsm", "pr0n", "xxx", "xx", "kkk", "ss", "nzs", "hh"]


def main() -> None:
    vowels = set("aeiouy")
    words = {w for w in iter_wordlist("en", "large") if 2 <= len(w) <= 4 and w.isascii() and w.isalpha() and w.islower() and not set(w) & vowels}
    words |= {w for w in EXTRA if w.isascii()}
    out = Path(__file__).resolve().parents[1] / "suti" / "configs" / "identifiers" / "denylist.txt"
    out.write_text("# strings an identifier must never be (scripts/identifier_denylist.py)\n" + "\n".join(sorted(words)) + "\n")
    print(f"{out}: {len(words)} strings")


if __name__ == "__main__":
    main()
