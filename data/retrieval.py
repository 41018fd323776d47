"""Synthetic key-value retrieval in real code: a task that training mixes in and eval/retrieval.py scores by distance.

Vocabulary:
- word: a lowercase token of the vocabulary, up to 8 letters (`name`, `self`, `ative`, ...);
- needle: a line `KEY_<key><value>` inserted before a line break of real code (the filler), so it sits on a line
  of its own; as tokens it starts with the line break;
- key: `key_words` words (default one; more where a small vocabulary needs them to make 1024 keys), value:
  VALUE_TOKENS words. The keys and values of a document or probe are words that its filler does not hold, each
  used once, so the token after the key is unique in the context and so is each value token: copying what
  followed the last occurrence of the current token (an induction head) answers every step. Longer keys make the
  lookup one that a match on several recent tokens also answers. With a small vocabulary, keys are still
  distinct, but they and the values may occur in the filler;
- cue: the needle up to its value, line break included; the value's tokens should follow it;
- query: a needle's line again, later in the same training document.

The value follows the key with no separator: after `KEY_<key> = `, the first step would need a match on the three
tokens before it, which models of the study's size did not learn from 15M tokens of such documents (every probe
scored 0, at chance on every digit).

Needles, cues and values are built in token space, from the token ids of their pieces, never by encoding a joined
text: the tokenizer cannot merge them with their neighbours differently in the needle and in the cue, so copying
the needle's tokens is always exactly right.

A training document (`document`) is filler with one needle per PAIR_SPACING tokens at random line breaks, each
queried once at a later line break, a log-uniform distance of filler after it (from MIN_DISTANCE to the whole
document, at the end where that runs past it). Short distances are what a model learns the task on first; long
ones are what the study asks about. A probe (`probe`) is filler with one needle about `distance` tokens before the
end of the prompt, `num_pairs - 1` distractor needles with other keys at random line breaks, and the needle's cue
last. `probe_batch` packs probes, answers teacher-forced, as a training micro-batch whose only targets are the
values: train.py's retrieval loss.
"""
import re
from dataclasses import dataclass

import numpy as np
import torch

VALUE_TOKENS = 4
PAIR_SPACING = 64   # tokens of training document per needle: dense enough that every document teaches the task
MIN_DISTANCE = 16   # filler tokens from a needle to its query, at least


@dataclass
class Probe:
    prompt: np.ndarray   # int64 tokens (no leading EOT), ending with the cue
    answer: list         # the value's tokens
    distance: int        # tokens from the needle's first value token to the first answer position


class RetrievalTask:

    def __init__(self, tokenizer, num_pairs=16, key_words=1):
        if num_pairs < 1:
            raise ValueError(f'num_pairs={num_pairs}, expected at least 1')
        if not isinstance(key_words, int) or isinstance(key_words, bool) or key_words < 1:
            raise ValueError(f'key_words={key_words!r}, expected a positive int')
        self.num_pairs = num_pairs

        def piece(text):
            ids = tokenizer.encode(text).ids
            if not ids:
                raise ValueError(f'the tokenizer encodes {text!r} as no tokens')
            return np.array(ids, dtype=np.int64)

        vocab = [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())]
        self.head = np.concatenate([piece('\n'), piece('KEY_')])
        self.words = np.array([i for i, text in enumerate(vocab) if re.fullmatch('[a-z]{1,8}', text)], dtype=np.int64)
        if len(self.words) < 2:  # a byte-level BPE has every letter as a token
            raise ValueError('the tokenizer lacks lowercase word tokens for the keys')
        self.small_vocabulary = len(self.words) < 1024
        self.key_len = max(key_words, int(np.ceil(np.log(1024) / np.log(len(self.words)) - 1e-9)))
        self.max_pairs = len(self.words) ** self.key_len // 4  # distinct keys stay quick to draw
        if num_pairs > self.max_pairs:
            raise ValueError(f'num_pairs={num_pairs}, expected at most {self.max_pairs} for this tokenizer')
        # insertion points: before a token that starts a new line (BPE joins a line break to the indent after it)
        self.starts_line = np.array([text.startswith('\n') for text in vocab], dtype=bool)
        self.needle_len = len(self.head) + self.key_len + VALUE_TOKENS
        self.min_document_len = max(PAIR_SPACING, 2 * self.needle_len + 1)  # one needle, its query and filler

    def _pairs(self, rng, n, filler):
        """n (key, value) token arrays for a context of filler: words it does not hold, each used once."""
        if not self.small_vocabulary:
            absent = np.setdiff1d(self.words, filler)
            words = n * (self.key_len + VALUE_TOKENS)
            if len(absent) < words:
                raise ValueError(f'{len(filler)} tokens of filler leave {len(absent)} words unused, fewer than the '
                                 f'{words} that {n} needles take')
            picks = rng.choice(absent, size=(n, self.key_len + VALUE_TOKENS), replace=False)
            return [(pick[:self.key_len], pick[self.key_len:]) for pick in picks]
        keys = {}  # a small vocabulary: distinct keys, in the order drawn
        while len(keys) < n:
            keys[tuple(rng.choice(self.words, self.key_len))] = None
        return [(np.array(key), rng.choice(self.words, VALUE_TOKENS)) for key in keys]

    def _cue(self, key):
        return np.concatenate([self.head, key])

    def _line(self, key, value):
        return np.concatenate([self.head, key, value])

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
        pairs = min(length // PAIR_SPACING, self.max_pairs)
        text_len = length - 2 * pairs * self.needle_len
        if len(filler) < text_len:
            raise ValueError(f'{len(filler)} tokens of filler, {text_len} needed')
        filler = np.asarray(filler[:text_len], dtype=np.int64)
        starts = self._line_starts(filler)
        needle_at = rng.choice(starts, size=pairs, replace=len(starts) < pairs)
        distance = np.exp(rng.uniform(np.log(MIN_DISTANCE), np.log(text_len), pairs))
        # a query goes before the first line start at its distance, or at the end
        later = np.searchsorted(starts, needle_at + distance)
        query_at = np.where(later < len(starts), starts[np.minimum(later, len(starts) - 1)], text_len)
        lines = [self._line(key, value) for key, value in self._pairs(rng, pairs, filler)]
        at = np.concatenate([needle_at, query_at])
        order = np.argsort(at, kind='stable')  # at one line start, needles before queries
        return self._insert(filler, at[order], [lines[i % pairs] for i in order])

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
        (key, value), *distractors = self._pairs(rng, self.num_pairs, filler)
        starts = self._line_starts(filler)
        # the needle's value, the distractor lines expected after it and the cue count towards the distance too
        expected = VALUE_TOKENS + len(distractors) * self.needle_len * distance / n + len(self._cue(key))
        where = starts[np.abs(starts - (n - distance + expected)).argmin()]
        at = [where] + list(rng.choice(starts, size=len(distractors), replace=len(starts) <= len(distractors)))
        lines = [self._line(k, v) for k, v in [(key, value)] + distractors]
        order = np.argsort(at, kind='stable')  # the needle first among lines at the same place
        prompt = np.concatenate([self._insert(filler, [at[i] for i in order], [lines[i] for i in order]),
                                 self._cue(key)])
        value_at = where + sum(len(lines[i]) for i in order[:list(order).index(0)]) + len(self._cue(key))
        return Probe(prompt=prompt, answer=value.tolist(), distance=int(len(prompt) - value_at))

    def probe_batch(self, rng, filler, eot, distance, length):
        """Probes at `distance`, their fillers random windows of `filler`, packed as one training micro-batch of
        exactly `length` tokens: (x [1, length], y [1, length], cu_seqlens) as data.loader.PackedBatches yields.
        Each probe is a document (EOT, prompt, answer) whose only targets are the answer's tokens, so the model's
        training loss on the batch is the mean loss per value token; the room left is one document of EOTs with
        no targets. None when not even one probe fits."""
        docs, room, n = [], length, self.min_filler(distance)
        if len(filler) < n:
            raise ValueError(f'{len(filler)} tokens of filler, {n} needed for probes at distance {distance}')
        while True:
            start = rng.integers(0, len(filler) - n + 1)
            probe = self.probe(rng, filler[start:start + n], distance)
            doc = np.concatenate([[eot], probe.prompt, probe.answer[:-1]])
            if len(doc) > room:
                break
            targets = np.full(len(doc), -1, dtype=np.int64)
            targets[-len(probe.answer):] = probe.answer
            docs.append((doc, targets))
            room -= len(doc)
        if not docs:
            return None
        if room:
            docs.append((np.full(room, eot, dtype=np.int64), np.full(room, -1, dtype=np.int64)))
        x, y = (torch.from_numpy(np.concatenate(part))[None] for part in zip(*docs))
        cu_seqlens = torch.from_numpy(np.cumsum([0] + [len(doc) for doc, _ in docs]).astype(np.int32))
        return x, y, cu_seqlens
