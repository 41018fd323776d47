"""Synthetic key-value retrieval in real code: a task that training mixes in and eval/retrieval.py scores by distance.

Vocabulary:
- needle: a line `KEY_<key> = <value>` inserted before a line break of real code (the filler), so it sits on a
  line of its own; as tokens it starts with the line break;
- key: 4 lowercase letters, value: 6 digits, each letter and digit one single-character token;
- cue: the needle up to its value, line break included; the value's tokens should follow it;
- query: a needle's line again, at the end of a training document.

Needles, cues and values are built in token space, from the token ids of their pieces, never by encoding a joined
text: the tokenizer cannot merge them with their neighbours differently in the needle and in the cue, so copying
the needle's tokens is always exactly right.

A training document (`document`) is filler with `num_pairs` needles at random line breaks and the queries for all
of them, in random order, at its end: the distances from needle to query spread over the whole document. A probe
(`probe`) is filler with one needle about `distance` tokens before the end of the prompt, `num_pairs - 1`
distractor needles with other keys at random line breaks, and the needle's cue last.
"""
import string
from dataclasses import dataclass

import numpy as np

KEY_CHARS, VALUE_CHARS = 4, 6


@dataclass
class Probe:
    prompt: np.ndarray   # int64 tokens (no leading EOT), ending with the cue
    answer: list         # the value's tokens
    distance: int        # tokens from the needle's first value token to the first answer position


class RetrievalTask:

    def __init__(self, tokenizer, num_pairs=16):
        if num_pairs < 1:
            raise ValueError(f'num_pairs={num_pairs}, expected at least 1')
        self.num_pairs = num_pairs

        def piece(text):
            ids = tokenizer.encode(text).ids
            if not ids:
                raise ValueError(f'the tokenizer encodes {text!r} as no tokens')
            return np.array(ids, dtype=np.int64)

        def single(chars):
            ids = [tokenizer.token_to_id(c) for c in chars]
            if None in ids:  # a byte-level BPE has every printable ASCII character as a token
                raise ValueError(f'the tokenizer lacks single-character tokens for {chars!r}')
            return np.array(ids, dtype=np.int64)

        self.head = np.concatenate([piece('\n'), piece('KEY_')])
        self.equals = piece(' = ')
        self.letters, self.digits = single(string.ascii_lowercase), single(string.digits)
        # insertion points: before a token that starts a new line (BPE joins a line break to the indent after it)
        self.starts_line = np.array([tokenizer.decode([i]).startswith('\n')
                                     for i in range(tokenizer.get_vocab_size())], dtype=bool)
        self.needle_len = len(self.head) + KEY_CHARS + len(self.equals) + VALUE_CHARS
        self.min_document_len = 2 * num_pairs * self.needle_len + 1  # needles, queries and one filler token

    def _pairs(self, rng, n):
        """n distinct keys and their values, as token arrays."""
        keys = set()
        while len(keys) < n:
            keys.add(tuple(rng.integers(0, len(self.letters), KEY_CHARS)))
        return [(self.letters[list(key)], self.digits[rng.integers(0, 10, VALUE_CHARS)]) for key in sorted(keys)]

    def _cue(self, key):
        return np.concatenate([self.head, key, self.equals])

    def _line(self, key, value):
        return np.concatenate([self.head, key, self.equals, value])

    def _line_starts(self, filler):
        starts = np.flatnonzero(self.starts_line[filler])
        return starts if len(starts) else np.arange(len(filler))

    @staticmethod
    def _insert(filler, at, lines):
        """filler with lines[i] inserted before filler[at[i]] (at sorted)."""
        parts, last = [], 0
        for where, line in zip(at, lines):
            parts += [filler[last:where], line]
            last = where
        return np.concatenate(parts + [filler[last:]])

    def document(self, rng, filler, length):
        """A training document of exactly `length` tokens (no leading EOT), taking the first tokens of filler."""
        if length < self.min_document_len:
            raise ValueError(f'length={length}: a retrieval document needs at least {self.min_document_len} tokens')
        text_len = length - 2 * self.num_pairs * self.needle_len
        if len(filler) < text_len:
            raise ValueError(f'{len(filler)} tokens of filler, {text_len} needed')
        filler = np.asarray(filler[:text_len], dtype=np.int64)
        needles = [self._line(key, value) for key, value in self._pairs(rng, self.num_pairs)]
        starts = self._line_starts(filler)
        at = np.sort(rng.choice(starts, size=self.num_pairs, replace=len(starts) < self.num_pairs))
        placed = self._insert(filler, at, [needles[i] for i in rng.permutation(self.num_pairs)])
        return np.concatenate([placed] + [needles[i] for i in rng.permutation(self.num_pairs)])  # the queries

    def min_filler(self, distance):
        return distance + 256

    def probe(self, rng, filler, distance):
        """One probe whose needle sits about `distance` tokens before the answer (measured exactly in .distance)."""
        if distance < 1:
            raise ValueError(f'distance={distance}, expected at least 1')
        n = self.min_filler(distance)
        if len(filler) < n:
            raise ValueError(f'{len(filler)} tokens of filler, {n} needed for distance {distance}')
        filler = np.asarray(filler[:n], dtype=np.int64)
        (key, value), *distractors = self._pairs(rng, self.num_pairs)
        starts = self._line_starts(filler)
        # the needle's value, the distractor lines expected after it and the cue count towards the distance too
        expected = VALUE_CHARS + len(distractors) * self.needle_len * distance / n + len(self._cue(key))
        where = starts[np.abs(starts - (n - distance + expected)).argmin()]
        at = [where] + list(rng.choice(starts, size=len(distractors), replace=len(starts) <= len(distractors)))
        lines = [self._line(k, v) for k, v in [(key, value)] + distractors]
        order = np.argsort(at, kind='stable')  # the needle first among lines at the same place
        prompt = np.concatenate([self._insert(filler, [at[i] for i in order], [lines[i] for i in order]),
                                 self._cue(key)])
        value_at = where + sum(len(lines[i]) for i in order[:list(order).index(0)]) + len(self._cue(key))
        return Probe(prompt=prompt, answer=value.tolist(), distance=int(len(prompt) - value_at))
