"""The JSONL task format that calibration and ``qvl eval`` share: records read into
conversations, and answers scored against them (the format and the metrics are described in
``qvl.bench.eval``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

METRICS = ("exact", "anls", "mc")
MC_PROMPT = "Answer with the option's letter from the given choices directly."
_LETTER_RE = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")


# --- metrics ---------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """Lowercase, collapse whitespace, drop one trailing period (models add them, sets don't)."""
    text = " ".join(str(text).lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def exact_match(pred: str, answers) -> float:
    p = normalize(pred)
    return float(any(p == normalize(a) for a in answers))


def anls(pred: str, answers, threshold: float = 0.5) -> float:
    """DocVQA ANLS of one prediction: strings lowercased and whitespace-collapsed, not otherwise changed."""
    p = " ".join(str(pred).lower().split())
    best = 0.0
    for a in answers:
        a = " ".join(str(a).lower().split())
        if not a and not p:
            return 1.0
        nl = levenshtein(p, a) / max(len(p), len(a))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def options_dict(options) -> dict[str, str]:
    if options is None:
        return {}
    if isinstance(options, dict):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}


def mc_letter(pred: str, options=None) -> str | None:
    """The option a free-form answer picks: a leading letter, else an option's exact text."""
    text = str(pred).strip()
    opts = options_dict(options)
    m = _LETTER_RE.match(text)
    if m and (not opts or m.group(1) in opts):  # "I think..." is no answer "I" among A-D
        return m.group(1)
    for letter, option in opts.items():
        if normalize(text) == normalize(option):
            return letter
    return None


def multiple_choice(pred: str, answers, options=None) -> float:
    opts = options_dict(options)
    by_text = {normalize(v): k for k, v in opts.items()}
    gold = {by_text.get(normalize(a), str(a).strip().upper()) for a in answers}
    return float(mc_letter(pred, opts) in gold)


def score(metric: str, pred: str, answers, options=None) -> float:
    if metric == "exact":
        return exact_match(pred, answers)
    if metric == "anls":
        return anls(pred, answers)
    if metric == "mc":
        return multiple_choice(pred, answers, options)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


# --- datasets --------------------------------------------------------------------------------

def resolve(source, base: Path):
    if isinstance(source, list):
        return [resolve(s, base) for s in source]
    if not isinstance(source, str) or re.match(r"^(file|data|https?):", source) or Path(source).is_absolute():
        return source
    return str(base / source)


def record_messages(rec: dict, base: Path) -> list[dict]:
    if "messages" in rec:
        msgs = json.loads(json.dumps(rec["messages"]))  # a copy we may rewrite
        for m in msgs:
            if isinstance(m.get("content"), list):
                for item in m["content"]:
                    for key in ("image", "video"):
                        if key in item:
                            item[key] = resolve(item[key], base)
        return msgs
    content = []
    images = rec.get("images") or ([rec["image"]] if "image" in rec else [])
    content += [{"type": "image", "image": resolve(p, base)} for p in images]
    if "video" in rec:
        content.append({"type": "video", "video": resolve(rec["video"], base)})
    question = rec["question"]
    if rec.get("metric") == "mc" and rec.get("options") is not None:
        opts = options_dict(rec["options"])
        question = "\n".join([question, *(f"{k}. {v}" for k, v in opts.items()), MC_PROMPT])
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def jsonl_records(path: Path):
    """(line number, object) for every non-blank line of a JSONL task file; each object has
    ``messages`` or ``question`` (the two forms ``record_messages`` turns into a conversation)."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {line.strip()[:60]}")
        if "messages" not in rec and "question" not in rec:
            raise ValueError(f"{path}:{n}: needs 'messages' or 'question'")
        yield n, rec


def load_records(path, limit: int | None = None) -> list[dict]:
    """Read a JSONL set into records with ``id, task, metric, answers, options, messages``."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of records, got {limit!r}")
    path = Path(path)
    base = path.parent
    records = []
    for n, rec in jsonl_records(path):
        answers = rec.get("answers", [rec["answer"]] if "answer" in rec else None)
        if not answers:
            raise ValueError(f"{path}:{n}: needs 'answers' (a list) or 'answer'")
        metric = rec.get("metric", "exact")
        if metric not in METRICS:
            raise ValueError(f"{path}:{n}: unknown metric {metric!r}; expected one of {METRICS}")
        options = rec.get("options")
        # scoring reads a letter against the options and maps answers given as option text
        if metric == "mc" and not (isinstance(options, (list, dict)) and options):
            got = "it has none" if options is None else f"got {json.dumps(options)[:60]}"
            raise ValueError(f"{path}:{n}: metric 'mc' needs 'options', a non-empty list or "
                             f"{{letter: text}} object; {got}")
        records.append({"id": str(rec.get("id", n)), "task": str(rec.get("task", "default")), "metric": metric,
                        "answers": [str(a) for a in (answers if isinstance(answers, list) else [answers])],
                        "options": options, "messages": record_messages(rec, base)})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{path}: no records")
    return records
