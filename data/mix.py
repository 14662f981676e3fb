"""The `--dataset` mix syntax: which sources to read, how to weight them, and curriculum stages.

Grammar (spaces around separators are ignored)::

    SPEC   := STAGE [";" STAGE ...]            stages run in order (a curriculum); the last one never ends
    STAGE  := ITEM ["," ITEM ...] ["@" BUDGET]  the sources of one stage, interleaved
    ITEM   := SOURCE [":" WEIGHT]              weights are relative; give all items of a stage a weight or none
    BUDGET := N[k|M|B][docs] ["~" N[k|M|B]]     length of the stage in tokens (default) or documents, then the
                                               soft-switch window: the next stage is blended in linearly over the
                                               last WINDOW of the budget
    SOURCE := builtin | smollm | smollm=PATH | PATH | OWNER/NAME[/SUBSET]

Sources:
- `builtin`: documentation text shipped with the Python installation and the installed packages (offline, no
  download; extracted once and cached, see data/builtin.py).
- `smollm`: the default mix, HuggingFaceTB/smollm-corpus subsets cosmopedia-v2 and fineweb-edu-dedup streamed
  from the Hub; or from a local copy of the corpus when $SMOLLM_CORPUS_DIR names one.
- `smollm=PATH`: the same mix read from a local copy (PATH/cosmopedia-v2/ and PATH/fineweb-edu-dedup/, parquet
  files, as `huggingface-cli download` lays them out), streamed with the parquet builder; balanced by the row
  counts in the parquet footers, as the Hub form is balanced by the subsets' sizes.
- PATH: a `.txt` file (documents separated by blank lines), a `.jsonl`/`.json` or `.parquet` file with a `text`
  field, a folder (every such file inside it, recursively, in sorted order), or a token cache written by
  `python -m data.prepare` (a folder holding its manifest.json; it stands for the mix it was prepared from).
- OWNER/NAME[/SUBSET]: a Hub dataset streamed with `datasets.load_dataset(..., streaming=True)`, SUBSET being the
  config name; the documents are its `text` column.

The documents are the `text` field of every file and Hub source unless `parse_mix(..., text_column=NAME)` (train.py
`--text-column`) names another one.

Weighting: without weights a stage is "balanced": each document comes from a source drawn with probability
proportional to that source's remaining documents in the current pass, so every source runs out at the same
time and the next pass starts for all of them together. With weights, sources are drawn with fixed
probabilities and each one restarts (reshuffled) on its own when it runs out.
"""

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .cache import CACHE_FORMAT, read_manifest

MAX_BUDGET = 2**62  # tokens or documents of one curriculum stage
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SMOLLM_REPO = "HuggingFaceTB/smollm-corpus"
# NOTE: approximate document counts from the dataset card. They only steer the balanced interleaving of the two
# streamed subsets (their exact sizes are not known before reading them); any error just makes one subset run out
# earlier and restart on its own.
SMOLLM_SUBSETS = {"cosmopedia-v2": 39_134_000, "fineweb-edu-dedup": 190_168_005}
SMOLLM_ENV = "SMOLLM_CORPUS_DIR"  # a local copy of the corpus that plain `smollm` reads instead of the Hub
DEFAULT_EVAL_FRACTION = 0.005

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(/[\w.-]+)?$")
_NUMBER = r"(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)"
_BUDGET = re.compile(rf"^{_NUMBER}\s*(tokens|tok|t|docs|doc|d)?\s*(?:~\s*{_NUMBER}\s*(?:tokens|tok|t|docs|doc|d)?)?$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


@dataclass(frozen=True)
class SourceSpec:
    """One source of documents, as written in the mix (nothing is opened here)."""

    kind: str  # "files" | "hub" | "mirror" | "builtin" | "cache"
    location: str  # absolute path (files, cache, mirror root) or Hub repo id (hub); empty for builtin
    label: str  # short human name used in logs and error messages
    subset: str | None = None  # Hub config name or mirror subfolder, or the source index inside a cache
    weight: float | None = None  # relative weight, None = balanced
    size_hint: int | None = None  # approximate number of documents when it cannot be known up front
    text_column: str = "text"  # the field holding each document (files, hub and mirror sources)


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: interleaved sources and how long the stage lasts."""

    sources: tuple[SourceSpec, ...]
    budget: int | None = None  # None: the stage never ends (always the case for the last stage)
    unit: str = "tokens"  # "tokens" or "docs"
    window: int = 0  # soft switch: the next stage is blended in over the last `window` units of the budget

    @property
    def balanced(self) -> bool:
        return self.sources[0].weight is None


@dataclass(frozen=True)
class Mix:
    """A parsed `--dataset` value: one or more stages, plus the held-out fraction of documents."""

    stages: tuple[Stage, ...]
    spec: str
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    cache_dir: str | None = None  # set when the spec named a token cache

    @property
    def sources(self) -> list[SourceSpec]:
        """Every source of every stage, in order."""
        return [s for stage in self.stages for s in stage.sources]


def parse_mix(spec: str, eval_fraction: float = DEFAULT_EVAL_FRACTION, text_column: str = "text") -> Mix:
    """Parse a `--dataset` value (see the module docstring). Raises ValueError with a hint on bad input.

    `text_column` names the field that holds the documents in every file, mirror and Hub source.
    """
    if not text_column:
        raise ValueError("--text-column is empty; name the field that holds each document, e.g. text or content")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval fraction {eval_fraction} is outside [0, 1); use e.g. 0.005 for 0.5% held out")
    spec = spec.strip()
    if not spec:
        raise ValueError("--dataset is empty; pass smollm, builtin, a path, or a mix such as 'a.txt:1,b.jsonl:2'")
    stage_texts = [s.strip() for s in spec.split(";")]
    if any(not s for s in stage_texts):
        raise ValueError(f"--dataset {spec!r} has an empty stage; separate stages with a single ';'")
    stages = []
    cache_dir = None
    for i, text in enumerate(stage_texts):
        items_text, budget, unit, window = _split_budget(text)
        last = i == len(stage_texts) - 1
        if budget is None and not last:
            raise ValueError(
                f"stage {i + 1} ({text!r}) needs a budget such as '@50M' (tokens) or '@20kdocs' because "
                "another stage follows it"
            )
        if budget is not None and last:
            raise ValueError(f"the last stage ({text!r}) runs until training ends; remove its '@' budget")
        sources, cached = _parse_items(items_text, text_column)
        if cached is not None:
            if len(stage_texts) > 1 or len(sources) != 1 or sources[0].weight is not None:
                raise ValueError(f"the token cache {cached} stands for a whole mix; pass it alone as --dataset")
            return _cache_mix(cached, eval_fraction)
        stages.append(Stage(tuple(sources), budget, unit, window))
    return Mix(tuple(stages), spec, eval_fraction, cache_dir)


def describe_mix(mix: Mix | None = None) -> str:
    """Without a mix: the `--dataset` syntax as Markdown for the README. With a mix: a one-line summary for logs."""
    if mix is None:
        return _SYNTAX_HELP
    parts = []
    for i, stage in enumerate(mix.stages):
        names = ", ".join(s.label + ("" if s.weight is None else f" (weight {s.weight:g})") for s in stage.sources)
        text = f"{names} [{'balanced' if stage.balanced else 'weighted'}]"
        if stage.budget is not None:
            text += f" for {_human(stage.budget)} {stage.unit}"
            if stage.window:
                text += f", blending into the next stage over the last {_human(stage.window)}"
        parts.append(f"stage {i + 1}: {text}" if len(mix.stages) > 1 else text)
    cache = f" from the token cache {mix.cache_dir}" if mix.cache_dir else ""
    return "; ".join(parts) + cache + f"; {mix.eval_fraction:.2%} of documents held out for evaluation"


# -----------------------------------------------------------------------------
# Helpers


def _split_budget(text: str) -> tuple[str, int | None, str, int]:
    """Split 'items@50M~5M' into ('items', 50_000_000, 'tokens', 5_000_000)."""
    if "@" not in text:
        return text, None, "tokens", 0
    items, _, budget_text = text.rpartition("@")
    m = _BUDGET.match(budget_text.strip())
    if not m:
        raise ValueError(
            f"cannot read the stage budget {budget_text!r}; write e.g. '@50M' (tokens), '@20kdocs', or "
            "'@50M~5M' for a soft switch over the last 5M tokens"
        )
    budget = _scaled(m.group(1), m.group(2))
    unit = "docs" if (m.group(3) or "t").startswith("d") else "tokens"
    window = _scaled(m.group(4), m.group(5)) if m.group(4) else 0
    if budget <= 0 or window > budget or budget > MAX_BUDGET:
        raise ValueError(
            f"stage budget {budget_text!r} must be positive, at most 2^62, and its '~' window no longer than itself"
        )
    return items.strip(), budget, unit, window


def _scaled(number: str, suffix: str) -> int:
    value = float(number) * _SCALE[suffix.lower()]
    return int(round(value)) if math.isfinite(value) else MAX_BUDGET + 1


def _parse_items(text: str, text_column: str = "text") -> tuple[list[SourceSpec], str | None]:
    """Parse 'a:1,b:2' into source specs; also return the cache folder when an item is a token cache."""
    sources: list[SourceSpec] = []
    cached = None
    for item in (t.strip() for t in text.split(",")):
        if not item:
            raise ValueError(f"empty source in {text!r}; separate sources with a single ','")
        name, weight = _split_weight(item)
        expanded = [replace(s, text_column=text_column) for s in _resolve_source(name)]
        if expanded[0].kind == "cache":
            cached = expanded[0].location
        if weight is not None:
            if len(expanded) > 1:
                raise ValueError(
                    f"{name!r} is a named mix of {len(expanded)} sources and cannot take a weight; "
                    "list its sources with their own weights instead"
                )
            expanded = [_with_weight(expanded[0], weight)]
        sources.extend(expanded)
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(
            f"in {text!r} some sources have a weight and others do not; weight all of them or none "
            "(no weights = balanced by size)"
        )
    return sources, cached


def _split_weight(item: str) -> tuple[str, float | None]:
    name, sep, tail = item.rpartition(":")
    if not sep or Path(item).expanduser().exists():
        return item, None
    if not tail.strip() and name.strip():  # "a.txt:" -- say what is wrong with the name, then with the weight
        if name.strip().lower().endswith(TEXT_SUFFIXES) and not Path(name.strip()).expanduser().exists():
            raise ValueError(f"{name.strip()} does not exist (and the weight after ':' is empty); check the path")
        raise ValueError(f"the weight after {name.strip()!r}: is empty; write e.g. {name.strip()}:1, or drop the ':'")
    try:
        weight = float(tail)
    except ValueError:
        return item, None  # a ':' that is part of the name
    if not 0 < weight < math.inf:
        raise ValueError(f"weight {tail!r} of {name!r} must be a finite positive number")
    return name.strip(), weight


def _with_weight(source: SourceSpec, weight: float) -> SourceSpec:
    return replace(source, weight=weight)


def _resolve_source(name: str) -> list[SourceSpec]:
    """Turn one written source name into one or more specs (a named mix gives several)."""
    if name == "builtin":
        return [SourceSpec("builtin", "", "builtin")]
    if name == "smollm" and os.environ.get(SMOLLM_ENV):
        return _smollm_mirror(os.environ[SMOLLM_ENV], f"${SMOLLM_ENV}")
    if name == "smollm":
        return [
            SourceSpec("hub", SMOLLM_REPO, f"smollm/{subset}", subset, None, size)
            for subset, size in SMOLLM_SUBSETS.items()
        ]
    if name.startswith("smollm="):
        return _smollm_mirror(name.removeprefix("smollm="), "smollm=PATH")
    path = Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir() and _is_token_cache(path):
            return [SourceSpec("cache", str(path), path.name)]
        if not path.is_file() and not path.is_dir():
            raise ValueError(f"{name} is neither a file nor a folder")
        if path.is_file() and not name.lower().endswith(TEXT_SUFFIXES):
            raise ValueError(f"{name} is not a .txt, .jsonl, .json or .parquet file; convert it or point at a folder")
        return [SourceSpec("files", str(path), path.name)]
    if name.startswith(("/", ".", "~")) or name.lower().endswith(TEXT_SUFFIXES):
        raise ValueError(f"{name} does not exist; check the path (or use --dataset builtin for the offline corpus)")
    if _HUB_ID.match(name):
        parts = name.split("/")
        repo, subset = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
        return [SourceSpec("hub", repo, name, subset)]
    raise ValueError(
        f"unknown dataset {name!r}: not an existing path, not 'smollm' or 'builtin', and not a Hub id "
        "like OWNER/NAME[/SUBSET]"
    )


def _smollm_mirror(location: str, given: str) -> list[SourceSpec]:
    """The default mix read from a local copy of the corpus: one streamed source per subset folder."""
    root = Path(location).expanduser()
    if not location or not root.is_dir():
        raise ValueError(f"{given}: {location or '(empty)'} is not a folder; point it at a local copy of {SMOLLM_REPO}")
    root = root.resolve()
    for subset in SMOLLM_SUBSETS:
        if not (root / subset).is_dir() or not any((root / subset).rglob("*.parquet")):
            raise ValueError(
                f"{given}: {root} has no {subset}/ folder of parquet files; a local copy of {SMOLLM_REPO} holds "
                f"{' and '.join(s + '/' for s in SMOLLM_SUBSETS)} (huggingface-cli download {SMOLLM_REPO} "
                "--repo-type dataset --include 'cosmopedia-v2/*' 'fineweb-edu-dedup/*' --local-dir PATH)"
            )
    return [SourceSpec("mirror", str(root), f"smollm/{subset}", subset) for subset in SMOLLM_SUBSETS]


def _is_token_cache(folder: Path) -> bool:
    """A folder written by `python -m data.prepare` (a manifest.json of another tool does not count)."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _cache_mix(cache_dir: str, eval_fraction: float) -> Mix:
    """The mix a token cache was prepared from, with every source replaced by its cached tokens."""
    manifest = read_manifest(Path(cache_dir))
    stages = []
    for stage in manifest["stages"]:
        sources = []
        for ref in stage["sources"]:
            entry = manifest["sources"][ref["source"]]
            sources.append(
                SourceSpec("cache", cache_dir, entry["label"], str(ref["source"]), ref["weight"], entry["num_docs"])
            )
        stages.append(Stage(tuple(sources), stage["budget"], stage["unit"], stage["window"]))
    return Mix(tuple(stages), manifest["mix"], eval_fraction, cache_dir)


def _human(n: int) -> str:
    for div, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= div:
            return f"{n / div:g}{suffix}"
    return str(n)


_SYNTAX_HELP = """\
`--dataset` takes one source, a weighted mix, or a curriculum of mixes:

| Form | Meaning |
|------|---------|
| `smollm` (default) | HuggingFaceTB/smollm-corpus, subsets cosmopedia-v2 + fineweb-edu-dedup, streamed from the Hub |
| `smollm=PATH` | the same mix from a local copy: parquet files in PATH/cosmopedia-v2/ and PATH/fineweb-edu-dedup/ |
| `builtin` | offline: documentation text of the installed Python and packages, extracted once and cached |
| `path/to/file.txt` | documents separated by blank lines |
| `path/to/file.jsonl`, `.json`, `.parquet` | one document per record, `text` field |
| `path/to/folder` | every .txt/.jsonl/.json/.parquet file inside (recursively, sorted) as one source |
| `path/to/cache` | a token cache from `python -m data.prepare` (replays the mix it was prepared from) |
| `OWNER/NAME[/SUBSET]` | any Hub dataset with a `text` column, streamed |
| `a.txt,b.jsonl` | balanced mix: sources drawn in proportion to their remaining documents, so all end together |
| `a.txt:1,b.jsonl:3` | weighted mix: b drawn three times as often as a; each restarts on its own when exhausted |
| `stories.txt@50M;smollm` | curriculum: 50M tokens of stories, then the SmolLM mix (`@20kdocs` counts documents) |
| `stories.txt@50M~10M;smollm` | soft switch: the SmolLM mix is blended in linearly over the last 10M stage tokens |

Plain `smollm` reads the local copy named by `$SMOLLM_CORPUS_DIR` when that is set. The documents are the `text`
field of each record; `--text-column NAME` reads another one. Quote mixes in the shell (`;` ends a command).
Stage budgets count training tokens (with BOS/EOS) or documents; the switch and the blend are decided once per
chunk of 1024 documents. Local files are read through `datasets`
(Arrow, memory-mapped), shuffled per pass with a seeded permutation and resumed exactly in O(1); Hub sources are
streamed in order and resumed from the stream's own state. A fixed fraction of documents (0.5% by default, chosen
by a hash of the text, so the same for every seed and world size) is held out for evaluation and never trained on.
"""
