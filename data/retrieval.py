"""Synthetic key-value retrieval in real code: a task that training mixes in and eval/retrieval.py scores by distance.

Vocabulary:
- needle: a line `KEY_<key> = <value>` inserted at a line end of real code (the filler);
- key: 4 lowercase letters, value: 6 digits, each letter and digit one single-character token;
- cue: `KEY_<key> = `, the needle's line up to its value; the value's tokens should follow it;
- query: cue, value and newline, as a training document asks for a needle seen earlier.

Needles, cues and values are built in token space, from the token ids of their pieces, never by encoding a joined
text: the tokenizer cannot merge them with their neighbours differently in the needle and in the cue, so copying
the needle's tokens is always exactly right.

A training document (`document`) is filler with `num_pairs` needles at random line ends and the queries for all of
them, in random order, at its end: the distances from needle to query spread over the whole document. A probe
(`probe`) is filler with one needle `distance` tokens before the end of the prompt, `num_pairs - 1` distractor
needles with other keys at random line ends, and the needle's cue last.
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

    def __init__(self, tokenizer, num_pairs=4):
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

        self.head, self.equals, self.newline = piece('KEY_'), piece(' = '), piece('\n')
        self.letters, self.digits = single(string.ascii_lowercase), single(string.digits)
        vocab = tokenizer.get_vocab_size()
        # insertion points: right after a token whose text ends a line
        self.ends_line = np.array([tokenizer.decode([i]).endswith('\n') for i in range(vocab)], dtype=bool)
        self.needle_len = len(self.head) + KEY_CHARS + len(self.equals) + VALUE_CHARS + len(self.newline)

    def _pairs(self, rng, n):
        """n distinct keys and their values, as token arrays."""
        keys = set()
        while len(keys) < n:
            keys.add(tuple(rng.integers(0, len(self.letters), KEY_CHARS)))
        return [(self.letters[list(key)], self.digits[rng.integers(0, 10, VALUE_CHARS)]) for key in sorted(keys)]

    def _cue(self, key):
        return np.concatenate([self.head, key, self.equals])

    def _line_ends(self, filler):
        ends = np.flatnonzero(self.ends_line[filler]) + 1
        return ends if len(ends) else np.arange(1, len(filler) + 1)

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
        text_len = length - 2 * self.num_pairs * self.needle_len - len(self.newline)
        if text_len < 1:
            raise ValueError(f'length={length}: a retrieval document needs more than '
                             f'{length - text_len} tokens')
        if len(filler) < text_len:
            raise ValueError(f'{len(filler)} tokens of filler, {text_len} needed')
        filler = np.asarray(filler[:text_len], dtype=np.int64)
        pairs = self._pairs(rng, self.num_pairs)
        ends = self._line_ends(filler)
        at = np.sort(rng.choice(ends, size=self.num_pairs, replace=len(ends) < self.num_pairs))
        needles = [np.concatenate([self._cue(key), value, self.newline]) for key, value in pairs]
        queries = [needles[i] for i in rng.permutation(self.num_pairs)]  # a query is its needle's line again
        # the filler may end inside a line: the queries start on a line of their own
        return np.concatenate([self._insert(filler, at, [needles[i] for i in rng.permutation(self.num_pairs)]),
                               self.newline] + queries)

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
        ends = self._line_ends(filler)
        where = ends[np.abs(ends - (n - distance)).argmin()]
        at = [where] + list(rng.choice(ends, size=len(distractors), replace=len(ends) <= len(distractors)))
        lines = [np.concatenate([self._cue(k), v, self.newline]) for k, v in [(key, value)] + distractors]
        order = np.argsort(at, kind='stable')  # the needle first among lines at the same place
        prompt = np.concatenate([self._insert(filler, [at[i] for i in order], [lines[i] for i in order]),
                                 self.newline, self._cue(key)])
        value_at = where + sum(len(lines[i]) for i in order[:list(order).index(0)]) + len(self._cue(key))
        return Probe(prompt=prompt, answer=value.tolist(), distance=int(len(prompt) - value_at))
