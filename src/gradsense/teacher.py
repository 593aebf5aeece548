"""Teachers turn an oracle shift record into a label: a parseable head, then one plain sentence.

Every label is `domain: <d> | from: <answer now> | to: <answer pushed to>` + newline + one sentence, e.g.
`domain: history | from: 1799 | to: 1789`. The oracle is the judge: `to` is the whole target text when the virtual
step raises its teacher-forced log-probability by at least `min_gain` nats, else `unclear`; `from` is what the
model says now (its greedy answer) or, when that is empty or already the target, the source. The head is written by
this module for every teacher, so it is always present; a language-model teacher only writes the sentence. Labels
are cached by a hash of (teacher identity, record) in a JSONL file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from gradsense.errors import GradsenseError
from gradsense.files import write_jsonl

NO_TOKEN = "<none>"  # the head's token when the oracle observed nothing
NO_DOMAIN = "none"  # the head's domain when no pressure is felt (no injection, noise)
UNCLEAR = "unclear"  # the head's `to` when the oracle's step does not raise the target
PROMPT_VERSION = "v2"  # bump when the language-model prompt changes: it is part of the cache key
OPTIONAL_FIELDS = ("dlogp_target_each",)  # kept in a record when the oracle measured them (`shifts.item_shifts`)
RECORD_FIELDS = (
    "id",
    "domain",
    "prompt",
    "target",
    "source",
    "belief",
    "logp_target_old",
    "logp_target_new",
    "to_token",
    "from_token",
    "up_tokens",
    "down_tokens",
    "dlogp_target",
    "dlogp_source",
    "kl",
)
TEACHER_SYSTEM = (
    "You explain, in one plain English sentence, how a small language model's prediction of the next word changed "
    "after a training nudge. No lists, no numbers, no preamble."
)


class Teacher(Protocol):
    """Anything with an `identity` (part of the cache key) and `label(record) -> str`."""

    identity: str

    def label(self, record: dict) -> str: ...


def clean_token(text: object) -> str:
    """A token as it appears in the head: stripped, one line, no '|', `<none>` when empty."""
    text = re.sub(r"\s+", " ", str(text if text is not None else "")).strip().replace("|", "¦")
    return text or NO_TOKEN


def label_head(domain: str, from_token: str, to_token: str) -> str:
    """The parseable head `domain: <d> | from: <tok> | to: <tok>`."""
    return f"domain: {clean_token(domain).lower()} | from: {clean_token(from_token)} | to: {clean_token(to_token)}"


_HEAD = re.compile(
    r"domain[ \t]*:[ \t]*(?P<domain>[^|\n]*?)[ \t]*(?:\|[ \t]*from[ \t]*:[ \t]*(?P<from>[^|\n]*?)[ \t]*)?"
    r"(?:\|[ \t]*to[ \t]*:[ \t]*(?P<to>[^\n]*))?$",
    re.IGNORECASE | re.MULTILINE,
)
_SENTENCE_END = re.compile(r"\s{2,}|(?<![\s.][A-Z])(?<!^[A-Z])\.\s+(?=[A-Z])|\s[-—–]\s")  # not after an initial


def parse_label(text: str) -> dict:
    """{'domain', 'from', 'to'} from a label's head (None for a missing field; tolerant of case and spacing)."""
    match = _HEAD.search(text or "")
    if not match:
        return {"domain": None, "from": None, "to": None}
    fields = {k: (v.strip() if v is not None else None) for k, v in match.groupdict().items()}
    if fields["to"]:  # a describer may run its sentence on the same line: cut at the first sentence boundary
        cut = _SENTENCE_END.split(fields["to"], maxsplit=1)[0].strip()
        fields["to"] = cut.rstrip(".,;") or cut or None  # a token that is itself punctuation stays
    fields["domain"] = fields["domain"].lower() or None if fields["domain"] is not None else None
    return {"domain": fields["domain"], "from": fields["from"] or None, "to": fields["to"]}


def as_record(row: dict) -> dict:
    """The teacher's view of one oracle row: the RECORD_FIELDS, floats rounded so the cache key is stable."""
    missing = [f for f in RECORD_FIELDS if f not in row]
    if missing:
        raise GradsenseError(f"item {row.get('id')}: shift record lacks {missing}")
    out = {}
    for field in RECORD_FIELDS:
        value = row[field]
        if isinstance(value, float):
            value = round(value, 3)
        elif hasattr(value, "tolist"):
            value = value.tolist()
        elif isinstance(value, tuple):
            value = list(value)
        out[field] = value if field != "id" else str(value)
    for field in OPTIONAL_FIELDS:
        if field in row and row[field] == row[field]:  # present and not NaN
            out[field] = round(float(row[field]), 3)
    return out


def clarity_gain(record: dict) -> float:
    """The gain a shift's clarity is judged by: Δ log p(whole target) of the step at every target-predicting position
    (`dlogp_target_each`) when the oracle took it, else of the step at the last prompt position (`dlogp_target`)."""
    each = record.get("dlogp_target_each")
    return float(record["dlogp_target"] if each is None or each != each else each)


def is_clear(record: dict, min_gain: float) -> bool:
    """A shift is clear when the step raised the whole target's teacher-forced log-prob by ≥ min_gain nats."""
    return clarity_gain(record) >= min_gain


def normalize_answer(text: str | None) -> str:
    """Casefolded, punctuation dropped (keeps letters, digits and spaces of any script), whitespace collapsed."""
    if not isinstance(text, str):
        return ""
    kept = "".join(c if c.isalnum() or c.isspace() else "" for c in text.casefold())
    return " ".join(kept.split())


def _same_answer(a: object, b: object) -> bool:
    """Equal up to case, punctuation and spacing."""
    return normalize_answer(str(a or "")) == normalize_answer(str(b or ""))


def head_values(record: dict, min_gain: float) -> tuple[str, str]:
    """(from, to) of a record's head: the model's answer now (or the source), and the target (or `unclear`)."""
    belief = clean_token(record.get("belief"))
    usable = belief != NO_TOKEN and not _same_answer(belief, record["target"])
    frm = belief if usable else clean_token(record["source"])
    return frm, clean_token(record["target"]) if is_clear(record, min_gain) else UNCLEAR


def record_head(record: dict, min_gain: float) -> str:
    """The head of a record's label (`label_head` of its domain and `head_values`)."""
    return label_head(record["domain"], *head_values(record, min_gain))


class TemplateTeacher:
    """Offline, deterministic labels from the observed shift: head + a fixed sentence; says when it is unclear."""

    def __init__(self, min_gain: float = 0.5):
        self.min_gain = float(min_gain)
        self.identity = f"template:{PROMPT_VERSION}:min_gain={self.min_gain}"

    def sentence(self, record: dict) -> str:
        """The plain sentence for a record."""
        domain = clean_token(record["domain"]).lower()
        frm, to = head_values(record, self.min_gain)
        if to == UNCLEAR:
            return f"The shift is unclear: this {domain} answer barely moves, so no correction can be read from it."
        return f"The update pushes this {domain} answer away from {frm} and towards {to}."

    def label(self, record: dict) -> str:
        """Head + newline + sentence."""
        return record_head(record, self.min_gain) + "\n" + self.sentence(record)


def prompt_messages(record: dict) -> list[dict]:
    """The fixed chat prompt a language-model teacher sees: the same facts the template teacher reads (the
    answers, the model's own answer, the log-probabilities before and after the step, the observed tokens)."""
    user = (
        f"Domain: {record['domain']}\n"
        f"Prompt: {record['prompt']}\n"
        f"The model answers now: {clean_token(record.get('belief'))}\n"
        f"Answer pushed towards: {clean_token(record['target'])}; answer pushed away from: "
        f"{clean_token(record['source'])}\n"
        f"log p(pushed-towards answer): {float(record['logp_target_old']):.2f} before, "
        f"{float(record['logp_target_new']):.2f} after the nudge\n"
        f"Words pushed up: {', '.join(map(clean_token, record['up_tokens'])) or NO_TOKEN}\n"
        f"Words pushed down: {', '.join(map(clean_token, record['down_tokens'])) or NO_TOKEN}\n"
        f"Most promoted: {clean_token(record['to_token'])}; most demoted: {clean_token(record['from_token'])}\n"
        f"Change of the promoted answer's log-probability: {float(record['dlogp_target']):+.2f} nats\n"
        "Describe this change in one sentence."
    )
    return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": user}]


def one_sentence(text: str) -> str:
    """The first plain sentence of a model's reply (any head it wrote itself dropped), at most 240 characters."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not _HEAD.search(ln)]
    if not lines:
        return ""
    first = re.split(r"(?<=[.!?])\s", lines[0], maxsplit=1)[0].strip().strip('"')
    return first[:240]


def _with_head(record: dict, sentence: str, fallback: TemplateTeacher) -> str:
    """Enforce the head; an empty reply falls back to the template sentence."""
    return record_head(record, fallback.min_gain) + "\n" + (sentence or fallback.sentence(record))


class HFTeacher:
    """A local instruct model through transformers (greedy, fixed prompt); the head is enforced."""

    def __init__(
        self,
        model_name: str | None = None,
        model=None,
        tokenizer=None,
        max_new_tokens: int = 48,
        min_gain: float = 0.5,
    ):
        if model is None:
            from gradsense.models import load_model

            model, tokenizer = load_model(model_name, device="cpu")
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise GradsenseError(f"teacher model {model_name!r} needs a tokenizer with a chat template")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, int(max_new_tokens)
        self.fallback = TemplateTeacher(min_gain)
        self.identity = f"hf:{model_name or 'default'}:{PROMPT_VERSION}:max_new_tokens={self.max_new_tokens}"
        self.identity += f":min_gain={self.fallback.min_gain}"

    def reply(self, record: dict) -> str:
        """The model's raw greedy reply to the fixed prompt."""
        import torch

        ids = self.tokenizer.apply_chat_template(
            prompt_messages(record), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {k: v.to(self.model.device) for k, v in ids.items()}
        with torch.no_grad():
            out = self.model.generate(
                **ids, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def label(self, record: dict) -> str:
        """Head + the first sentence of the model's reply."""
        return _with_head(record, one_sentence(self.reply(record)), self.fallback)


class OpenAICompatibleTeacher:
    """An HTTP chat-completions endpoint (`<url>/chat/completions`); URL, model and key from arguments or the env.

    Env: GRADSENSE_TEACHER_URL, GRADSENSE_TEACHER_MODEL, and the key in `key_env` (default OPENAI_API_KEY; optional
    for local servers). Never called in CI.
    """

    def __init__(
        self,
        url: str | None = None,
        model: str | None = None,
        key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_tokens: int = 80,
        min_gain: float = 0.5,
    ):
        self.url = (url or os.environ.get("GRADSENSE_TEACHER_URL") or "").rstrip("/")
        self.model = model or os.environ.get("GRADSENSE_TEACHER_MODEL") or ""
        if not self.url or not self.model:
            raise GradsenseError("OpenAICompatibleTeacher needs a URL and a model (or GRADSENSE_TEACHER_URL / _MODEL)")
        self.key_env, self.timeout, self.max_tokens = key_env, float(timeout), int(max_tokens)
        self.fallback = TemplateTeacher(min_gain)
        self.identity = f"openai:{self.url}:{self.model}:{PROMPT_VERSION}:min_gain={self.fallback.min_gain}"

    def reply(self, record: dict) -> str:
        """The endpoint's reply text; any transport or format failure is a GradsenseError naming the endpoint."""
        body = json.dumps(
            {"model": self.model, "messages": prompt_messages(record), "temperature": 0, "max_tokens": self.max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.key_env]}"
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode())
            return str(payload["choices"][0]["message"]["content"])
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise GradsenseError(
                f"teacher endpoint {self.url} failed: {type(exc).__name__}: {exc}".splitlines()[0]
            ) from None

    def label(self, record: dict) -> str:
        """Head + the first sentence of the endpoint's reply."""
        return _with_head(record, one_sentence(self.reply(record)), self.fallback)


def make_teacher(kind: str = "template", model: str | None = None, url: str | None = None, min_gain: float = 0.5):
    """A teacher by name: template (default), hf (a local instruct model) or openai (an HTTP endpoint)."""
    if kind == "template":
        return TemplateTeacher(min_gain)
    if kind == "hf":
        return HFTeacher(model, min_gain=min_gain)
    if kind == "openai":
        return OpenAICompatibleTeacher(url, model, min_gain=min_gain)
    raise GradsenseError(f"unknown teacher {kind!r}: choose template, hf or openai")


def record_key(identity: str, record: dict) -> str:
    """sha256 of (teacher identity, record) as canonical JSON."""
    blob = json.dumps({"teacher": identity, "record": record}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_cache(path: Path) -> dict[str, dict]:
    """key → entry from a JSONL cache; unreadable lines (e.g. a torn write) are skipped."""
    entries: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                entries[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return entries


def _write_cache(path: Path, entries: dict[str, dict]) -> None:
    """Rewrite the cache atomically, in insertion order."""
    write_jsonl(entries.values(), path, sort_keys=True)


def label_records(
    teacher: Teacher, records: Sequence[dict], cache: str | Path | None = None, progress: bool = True
) -> list[str]:
    """Labels for records, reusing and extending a JSONL cache; a failing teacher raises and keeps what is cached."""
    path = Path(cache) if cache is not None else None
    entries = load_cache(path) if path is not None else {}
    before = len(entries)
    labels = []
    try:
        for record in tqdm(records, desc="labels", disable=not progress):
            key = record_key(teacher.identity, record)
            if key not in entries:
                try:
                    text = teacher.label(record)
                except GradsenseError as exc:
                    raise GradsenseError(
                        f"item {record.get('id')}: {exc} ({len(entries)} cached labels kept)"
                    ) from None
                if parse_label(text)["domain"] is None:
                    raise GradsenseError(
                        f"item {record.get('id')}: teacher {teacher.identity} gave a label without head"
                    )
                entries[key] = {"key": key, "teacher": teacher.identity, "id": record.get("id"), "label": text}
            labels.append(entries[key]["label"])
    finally:
        if path is not None and len(entries) > before:
            _write_cache(path, entries)
    return labels
