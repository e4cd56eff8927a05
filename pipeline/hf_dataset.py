"""Prompts and answers through the Hugging Face ``datasets`` library: a hub id or local files.

``path`` is a hub id (``openai/gsm8k``), one Parquet / JSON / JSONL / CSV / Arrow file (its rows are
the ``train`` split), a folder of such files (splits from the file names: ``train.*``, ``test.*``,
``validation.*``) or a ``save_to_disk`` folder. Every argument, split and field is checked in the
constructor, so a bad data set fails before the recipe loads a model; the config schema only types
the fields. A hub id is probed once with a short timeout before the download, so a machine without
network fails in seconds instead of retrying; with ``HF_HUB_OFFLINE=1`` only the local cache is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from pipeline.tasks import Example, Message, Task, check_fraction, check_int, checked_text, hold_out

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
_EXTRACTORS = ("none", "gsm8k", "regex")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "gsm8k", "openai/gsm8k"
_PROBE_TIMEOUT_S = 10.0


class HFDatasetTask(Task):
    """A :class:`Task` whose examples come from ``datasets`` (see the module docstring for ``path``).

    The prompt is the text column ``prompt_field``, or, with ``messages_field``, a column of
    ``[{"role", "content"}, ...]`` lists cut after the last user turn (``Example.messages``; the
    last user turn is also ``Example.prompt``). The answer is ``answer_field`` (numbers become
    strings) passed through ``answer_extractor``: ``none``, ``gsm8k`` (the text after ``#### ``,
    commas removed) or ``regex`` (``answer_regex``'s first group, or its whole match).

    Held-out examples are ``eval_split``, or else a seeded ``eval_fraction`` of ``split`` (as
    :class:`~pipeline.tasks.JsonlTask`). ``max_examples`` keeps the first rows of each split read.
    ``streaming=True`` reads rows lazily and needs ``max_examples``: only those rows are fetched, not
    the whole data set; the sampler still shuffles them in memory. ``cache_dir`` overrides the
    ``datasets`` cache; ``name`` and ``revision`` pick a hub data set's configuration and commit.
    """

    def __init__(
        self,
        *,
        path: str | Path,
        name: str | None = None,
        revision: str | None = None,
        split: str = "train",
        eval_split: str | None = None,
        eval_fraction: float = 0.1,
        prompt_field: str | None = "prompt",
        messages_field: str | None = None,
        answer_field: str = "answer",
        answer_extractor: str = "none",
        answer_regex: str | None = None,
        max_examples: int | None = None,
        streaming: bool = False,
        cache_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        # 1. arguments: cheap checks before any file or network access
        extractor = getattr(answer_extractor, "value", answer_extractor)  # the schema passes an Enum
        _check_str("task.path", path)
        _check_str("task.split", split)
        _check_str("task.answer_field", answer_field)
        for key, value in (("task.eval_split", eval_split), ("task.name", name), ("task.revision", revision)):
            if value is not None:
                _check_str(key, value)
        if eval_split == split:
            raise ValueError(f"task.eval_split must differ from task.split, both are {split!r}.")
        if (prompt_field is None) == (messages_field is None):
            raise ValueError(
                "set exactly one of task.prompt_field and task.messages_field, got "
                f"prompt_field={prompt_field!r}, messages_field={messages_field!r} "
                "(a messages column needs task.prompt_field=null)."
            )
        if messages_field is None:
            _check_str("task.prompt_field", prompt_field)
        else:
            _check_str("task.messages_field", messages_field)
        if extractor not in _EXTRACTORS:
            raise ValueError(f"task.answer_extractor must be one of {list(_EXTRACTORS)}, got {extractor!r}.")
        if (extractor == "regex") != (answer_regex is not None):
            raise ValueError("task.answer_regex is needed with, and only with, task.answer_extractor=regex.")
        pattern = None
        if answer_regex is not None:
            try:
                pattern = re.compile(answer_regex)
            except re.error as err:
                raise ValueError(
                    f"task.answer_regex={answer_regex!r} is not a regular expression: {err}."
                ) from err
        check_fraction("task.eval_fraction", eval_fraction)
        if max_examples is not None:
            check_int("task.max_examples", max_examples, minimum=1)
        if not isinstance(streaming, bool):
            raise ValueError(f"task.streaming must be true or false, got {streaming!r}.")
        if streaming and max_examples is None:
            raise ValueError("task.streaming=true needs task.max_examples: the rows to keep from each split.")
        check_int("task.seed", seed, minimum=0)

        # 2. the data: splits, then fields, then rows
        splits = open_splits(path, name=name, revision=revision, streaming=streaming, cache_dir=cache_dir)
        for key, wanted in (("task.split", split), ("task.eval_split", eval_split)):
            if wanted is not None and wanted not in splits:
                raise ValueError(f"{key}={wanted!r} is not a split of {path}; available: {sorted(splits)}.")

        def read(name: str) -> list[Example]:
            return read_examples(
                splits[name],
                where=f"{path} [{name}]",
                prompt_field=prompt_field,
                messages_field=messages_field,
                answer_field=answer_field,
                extractor=extractor,
                pattern=pattern,
                max_examples=max_examples,
            )

        train = read(split)
        if eval_split is not None:
            held_out = read(eval_split)
        else:
            where = f"{path} [{split}]"
            train, held_out = hold_out(train, eval_fraction, seed, where=where, instead="task.eval_split")
        super().__init__(train, held_out, seed=seed)


def open_splits(
    path: str | Path,
    *,
    name: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
) -> Mapping[str, Any]:
    """The data set's splits (``Dataset``, or ``IterableDataset`` when streaming) by split name."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    cache = None if cache_dir is None else str(cache_dir)
    kwargs = {"name": name, "revision": revision, "streaming": streaming, "cache_dir": cache}
    local = Path(path).expanduser()
    if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
        if name is not None:
            raise ValueError(
                f"task.name={name!r}: {path} is a save_to_disk folder, it has no configurations."
            )
        # memory-mapped: streaming=true keeps the same first rows
        saved = _load(str(path), "a save_to_disk folder", load_from_disk, str(local))
        return saved if isinstance(saved, DatasetDict) else {"train": saved}
    if local.is_dir():
        return _load(str(path), "a folder of data files", load_dataset, str(local), **kwargs)
    if local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(
                f"task.path={str(path)!r}: cannot read {local.suffix or 'extension-less'} files; use "
                f"{sorted(_FILE_BUILDERS)} files, a folder of them, a save_to_disk folder or a hub id."
            )
        files = {"train": str(local)}
        return _load(str(path), f"a {builder} file", load_dataset, builder, data_files=files, **kwargs)
    if local.suffix.lower() in _FILE_BUILDERS or not _HUB_ID.fullmatch(str(path)):
        raise FileNotFoundError(f"task.path={str(path)!r}: no such file or folder.")
    _probe_hub(str(path), revision)
    return _load(str(path), "a hub data set", load_dataset, str(path), **kwargs)


def read_examples(
    dataset: Any,
    *,
    where: str,
    prompt_field: str | None,
    messages_field: str | None,
    answer_field: str,
    extractor: str = "none",
    pattern: re.Pattern | None = None,
    max_examples: int | None = None,
) -> list[Example]:
    """Examples from one split (``Dataset`` or ``IterableDataset``); errors name the field or the row."""
    from datasets import Dataset

    fields = [f for f in (prompt_field, messages_field, answer_field) if f is not None]
    if max_examples is None:
        rows = None
    elif isinstance(dataset, Dataset):  # the first rows, without copying the rest
        rows = dataset.select(range(min(max_examples, len(dataset))))
    else:
        rows = list(islice(dataset, max_examples))
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # a stream of untyped rows: the first row's keys
        columns = list(rows[0]) if rows else []
    named = {"prompt_field": prompt_field, "messages_field": messages_field, "answer_field": answer_field}
    for key, field in named.items():
        if field is not None and field not in columns:
            raise ValueError(f"task.{key}={field!r} is not a column of {where}; columns: {sorted(columns)}.")
    if rows is None:
        rows = dataset
    if isinstance(rows, Dataset):
        rows = rows.select_columns(fields).to_list()
    out = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        answer = checked_text(row[answer_field], at, answer_field, numbers=True)
        answer = _extract(answer, extractor, pattern, f"{at}: {answer_field!r}")
        if not answer.strip():
            raise ValueError(f"{at}: {answer_field!r} is empty.")
        if messages_field is not None:
            messages = _messages(row[messages_field], f"{at}: {messages_field!r}")
            out.append(Example(messages[-1].content, answer, messages))
            continue
        out.append(Example(checked_text(row[prompt_field], at, prompt_field), answer))
    if not out:
        raise ValueError(f"{where}: no examples (the split is empty).")
    return out


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    """The turns up to and including the last user turn, as hashable ``Message`` tuples."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of {{role, content}} turns, got {value!r:.80}.")
    turns = []
    for turn in value:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not isinstance(turn.get("content"), str)
        ):
            raise ValueError(f"{where}: each turn must be {{'role': str, 'content': str}}, got {turn!r:.80}.")
        turns.append(Message(turn["role"], turn["content"]))
    last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=None)
    if last_user is None:
        raise ValueError(f"{where} has no user turn (roles: {[t.role for t in turns]}).")
    if not turns[last_user].content.strip():
        raise ValueError(f"{where}: the last user turn is empty.")
    return tuple(turns[: last_user + 1])


def _extract(text: str, extractor: str, pattern: re.Pattern | None, where: str) -> str:
    if extractor == "gsm8k":
        _, marker, tail = text.rpartition("#### ")
        if not marker:
            raise ValueError(
                f"{where} has no '#### ' answer marker (task.answer_extractor=gsm8k): {text!r:.80}."
            )
        return tail.strip().replace(",", "")
    if extractor == "regex":
        found = pattern.search(text)
        if found is None:
            raise ValueError(f"{where} does not match task.answer_regex={pattern.pattern!r}: {text!r:.80}.")
        return (found.group(1) if pattern.groups else found.group(0)).strip()
    return text


def _load(source: str, what: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)`` with errors that name ``task.path`` (and ``task.name`` if set)."""
    try:
        return load(*args, **kwargs)
    except ConnectionError as err:
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if _offline() else "a download failed"
        raise ValueError(
            f"task.path={source!r}: cannot load {what}: {why} ({err}). Load it once with network access, "
            "or point task.path at local files or a save_to_disk folder."
        ) from err
    except Exception as err:
        name = f" (task.name={kwargs['name']!r})" if kwargs.get("name") else ""
        cause = f": {err.__cause__}" if err.__cause__ else ""  # e.g. the parser's message and row
        raise ValueError(
            f"task.path={source!r}{name}: cannot load {what}: {type(err).__name__}: {err}{cause}"
        ) from err


def _probe_hub(repo_id: str, revision: str | None) -> None:
    """One short request before ``load_dataset``, whose retries take minutes without network."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if _offline():
        return  # load_dataset reads the cache only, and fails fast
    try:
        HfApi().dataset_info(repo_id, revision=revision, timeout=_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError as err:
        raise ValueError(
            f"task.path={repo_id!r} is neither a local file or folder nor a data set on the Hub "
            "(a private or gated one needs `hf auth login`)."
        ) from err
    except HfHubHTTPError as err:
        raise ValueError(
            f"task.path={repo_id!r} (task.revision={revision!r}): the Hub answered: {err}"
        ) from err
    except Exception as err:
        raise ValueError(
            f"task.path={repo_id!r} is not a local file or folder and the Hub cannot be reached "
            f"({type(err).__name__}: {err}). Without network: set HF_HUB_OFFLINE=1 to read a data set "
            "downloaded before, or point task.path at local files or a save_to_disk folder."
        ) from err


def _offline() -> bool:
    from datasets import config
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or getattr(config, "HF_HUB_OFFLINE", False))


def _check_str(key: str, value: object) -> None:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"{key} must be a non-empty string, got {value!r}.")
