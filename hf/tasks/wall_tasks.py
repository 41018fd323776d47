"""Datasets and scoring of the wall_* lm-eval tasks. The data are JSON lines that `python -m hf.tasks.make` writes;
they are read from --metadata's "wall_tasks" folder, else $WALL_TASKS, else data/ beside this file."""
import json
import os

import datasets


def folder(kwargs):
    return kwargs.get('wall_tasks') or os.environ.get('WALL_TASKS') or os.path.join(os.path.dirname(__file__), 'data')


def load(name, keep, **kwargs):
    path = os.path.join(folder(kwargs), f'{name}.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no task data; write it with `python -m hf.tasks.make --out DIR` and pass '
                                f'--metadata \'{{"wall_tasks": "DIR"}}\'')
    with open(path, encoding='utf-8') as f:
        docs = [json.loads(line) for line in f]
    docs = [doc for doc in docs if keep(doc)]
    return {'test': datasets.Dataset.from_list(docs)}


def niah(**kwargs):
    length = kwargs.get('niah_length')
    return load('niah', lambda doc: length is None or doc['length'] == int(length), **kwargs)


def retrieval(**kwargs):
    distance = kwargs.get('retrieval_distance')
    return load('retrieval', lambda doc: distance is None or doc['distance'] == int(distance), **kwargs)


def loglikelihood_results(doc, results):
    logprob, is_greedy = results[0]
    return {'acc': float(is_greedy), 'logprob': float(logprob)}


def generation_results(doc, results):
    return {'exact_match': float(results[0].strip().startswith(doc['answer'].strip()))}
