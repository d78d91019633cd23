"""The offline CLIP tokenizer and rare-token identifiers."""

import open_clip
import pytest

from experts.identifier import RARE_ID_RANGE, fill_prompt, instance_prompt, rare_token_candidates, sample_identifier, token_count
from suti.tokenizer import VOCAB_SIZE, load_clip_tokenizer

COMMON_WORDS = {"the", "and", "dog", "cat", "sks", "for", "you", "run", "big", "red", "box", "cup", "why", "try", "fly", "dry", "sky", "shy", "gym", "spy", "cry", "my", "by"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_tokenizer_matches_open_clip(tokenizer):
    reference = open_clip.get_tokenizer("ViT-B-32")
    for text in ["a sks dog on the beach", "A photo of a RED backpack!", "naïve café 123", "a [V] teddy"]:
        ours = tokenizer(text).input_ids
        theirs = [int(t) for t in reference([text])[0] if int(t) != 0]
        assert ours == theirs, text
    assert len(tokenizer) == VOCAB_SIZE


def test_identifier_is_rare_short_and_single_token(tokenizer):
    vocab = tokenizer.get_vocab()
    for seed in range(20):
        ident = sample_identifier(tokenizer, seed=seed)
        assert token_count(tokenizer, ident) == 1
        assert 2 <= len(ident) <= 4 and ident.isalpha() and " " not in ident
        assert RARE_ID_RANGE[0] <= vocab[ident + "</w>"] <= RARE_ID_RANGE[1]
        assert not set("aeiouy") & set(ident), "consonant-only tokens are not English words"
        assert ident not in COMMON_WORDS
    assert sample_identifier(tokenizer, seed=3) == sample_identifier(tokenizer, seed=3)
    assert len({sample_identifier(tokenizer, seed=s) for s in range(20)}) > 5


def test_identifier_with_several_tokens(tokenizer):
    ident = sample_identifier(tokenizer, seed=1, num_tokens=2)
    assert token_count(tokenizer, ident) == 2


def test_rare_candidates_exclude_frequent_tokens(tokenizer):
    candidates = rare_token_candidates(tokenizer)
    assert len(candidates) >= 8
    assert "dog" not in candidates and "the" not in candidates


@pytest.mark.parametrize("token", ["sks", "fck", "sdk", "lsd", "ftp", "ssh", "bpm", "hdd", "wtf", "szn", "grl", "knw", "thn", "chk"])
def test_identifiers_are_never_words_acronyms_slang_or_profanity(tokenizer, token):
    """"sks" (a rifle), "fck", "sdk", "lsd", "chk" ... all sit in CLIP's rare-id range as whole
    consonant tokens; none may be drawn, for any seed."""
    from experts.identifier import denylist

    assert token in denylist()
    assert token not in rare_token_candidates(tokenizer)
    assert token not in {sample_identifier(tokenizer, seed=s) for s in range(200)}


def test_prompts():
    assert instance_prompt("xkh", "dog") == "a xkh dog"
    assert instance_prompt("xkh", "dog", use_class_noun=False) == "a xkh"
    assert fill_prompt("a {V} {class} on the beach", "xkh", "dog") == "a xkh dog on the beach"
