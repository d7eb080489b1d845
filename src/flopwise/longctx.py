"""Long local text for KV-dropping quality: English prose from the Python standard library's docstrings
(what ``help()`` shows, the same on every machine with this Python), and a needle-retrieval task on it.

The retrieval task (the one SmolLM2-135M can do with its full cache, see shared REFERENCE §3): a few
"The secret code for item N is M." lines sit between paragraphs of prose; the prompt ends by asking for
one of them, with the answer's first words already written, so the next tokens are the code.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache

# Pure-Python standard-library modules whose docstrings are mostly prose.
_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "json",
    "logging",
    "multiprocessing",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "zipfile",
)


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Docstring paragraphs of at least 200 characters, in a fixed order."""
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            objects = [module] + [
                obj
                for _, obj in sorted(vars(module).items())
                if (inspect.isclass(obj) or inspect.isfunction(obj))
                and (getattr(obj, "__module__", None) or "").startswith(name)  # (None on some objects)
            ]
            for obj in objects:
                doc = inspect.getdoc(obj) or ""
                for para in re.split(r"\n\s*\n", doc):
                    para = " ".join(para.split())
                    if len(para) >= 200 and not para.startswith((">>>", "-", "*", "+")):
                        out.append(para)
    return tuple(dict.fromkeys(out))  # drop repeats (inherited docstrings)


def prose(tokenizer, tokens: int, seed: int) -> list[str]:
    """Shuffled paragraphs (seeded) adding up to about ``tokens`` tokens."""
    paras = list(paragraphs())
    random.Random(seed).shuffle(paras)
    out, n = [], 0
    for p in paras:
        if n >= tokens:
            break
        out.append(p)
        n += len(tokenizer.encode(p, add_special_tokens=False)) + 1
    if n < tokens:
        raise ValueError(f"only {n} tokens of docstring prose on this Python; asked for {tokens}")
    return out


@dataclass(frozen=True)
class Needle:
    prompt: str
    item: int
    code: int


def needle_prompt(tokenizer, tokens: int, seed: int, needles: int = 4) -> Needle:
    """About ``tokens`` tokens of prose with ``needles`` code lines between paragraphs; asks one back."""
    rng = random.Random(seed)
    paras = prose(tokenizer, tokens, seed)
    items = rng.sample(range(10, 99), needles)
    codes = [rng.randrange(1000, 9999) for _ in items]
    for item, code in zip(items, codes):
        paras.insert(rng.randrange(1, len(paras)), f"The secret code for item {item} is {code}.")
    ask = rng.randrange(needles)
    question = (
        f"\n\nQuestion: what is the secret code for item {items[ask]}?\n"
        f"Answer: The secret code for item {items[ask]} is"
    )
    return Needle("\n\n".join(paras) + question, items[ask], codes[ask])


def answered(text: str, needle: Needle) -> bool:
    found = re.findall(r"\d+", text)
    return bool(found) and int(found[0]) == needle.code


if __name__ == "__main__" and len(sys.argv) > 1:  # a quick look: python -m flopwise.longctx TOKENIZER_DIR
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    print(len(paragraphs()), "paragraphs,", sum(len(tok.encode(p)) for p in paragraphs()), "tokens")
    print(needle_prompt(tok, 300, 0).prompt[-400:])
