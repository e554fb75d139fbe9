"""Label many units with one explainer and one judge, caching every result so a killed run continues.

    records = label_units(units, explainer, judge, cache="work/sae/labels.jsonl", max_workers=8)
    records = label_units(units, explainer, judge, cache, detector=ChatDetector(backend))  # + detection

Per unit (the reference work's protocol): the explainer sees the unit's top `n_positives` images;
the judge scores, one image at a time, those images (positives) and the top image of
`n_negatives` other units drawn at random, each painted with *that* unit's activations
(negatives); the score is the mean of s over positives and 1 - s over negatives
(`reference_score`). A unit whose explanation failed gets no score; its status says why. A unit
with fewer than `n_positives` qualifying top images keeps its label but is not judged (score None).
With a `detector` (`fluxsae.autointerp.scoring.ChatDetector`), every labelled unit with held-out
trials (`UnitExamples.trials`) also gets detection and fuzzing scores.

The cache is a JSON-lines file, one complete record per line, appended and fsynced as each unit
finishes: a kill loses at most the units in flight, and a torn last line is ignored on resume. A
cache written by another explainer, judge or detector is refused, since mixing them would mix two runs;
records of the same run that lack the detection scores now asked for keep their label and score and
get only those.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fluxsae.autointerp.base import Explainer, Explanation, Judge, UnitExamples, reference_score

logger = logging.getLogger(__name__)


def unit_key(site: str, method: str, feature: int) -> str:
    return f"{site}|{method}|{int(feature)}"


def read_cache(path: str | os.PathLike) -> dict[str, dict]:
    """The records of a cache file by unit key; lines that do not parse (a torn last line) are skipped."""
    path = Path(path)
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                records[unit_key(record["site"], record["method"], record["feature"])] = record
            except (ValueError, KeyError, TypeError):
                logger.info("%s line %d is incomplete (a killed run); it is redone", path, n)
    return records


class _Appender:
    """Appends JSON lines to the cache, one whole line per write, fsynced."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(path, "a+b")  # noqa: SIM115 (closed in close())
        self._file.seek(0, os.SEEK_END)
        if self._file.tell():
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":  # a torn line: end it so the next record starts clean
                self._file.write(b"\n")

    def write(self, record: dict) -> None:
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def negatives_for(feature: int, pool: Sequence[int], n: int, seed: int) -> list[int]:
    """`n` other units of `pool` drawn for `feature`, the same ones on every run with this seed."""
    others = [u for u in pool if u != feature]
    return random.Random(seed * 1_000_003 + int(feature)).sample(others, min(n, len(others)))


def label_unit(
    unit: UnitExamples, explainer: Explainer, judge: Judge, negatives: Sequence[UnitExamples],
    n_positives: int = 5,
) -> dict:  # fmt: skip
    """One unit's record: label, concept, status, score, the judge's scores and the requests made."""
    positives = unit.examples[:n_positives]
    shown = UnitExamples(unit.site, unit.method, unit.feature, tuple(positives))
    # A unit that never qualified on any image has nothing to show: no explainer is asked.
    explanation = explainer.explain(shown) if positives else Explanation(None, "no_examples")
    record = {
        "site": unit.site, "method": unit.method, "feature": int(unit.feature),
        "label": explanation.label, "concept": explanation.concept, "status": explanation.status,
        "explanation": explanation.raw, "explainer": explainer.name, "judge": judge.name,
        "score": None, "judge_scores": [], "judge_status": [],
        "negatives": [int(u.feature) for u in negatives],
        "requests": explanation.requests,
    }  # fmt: skip
    if explanation.status != "ok":
        return record
    if len(positives) < n_positives:
        # Scored on fewer images, a unit that fired on one image would score as well as one that is
        # consistent over five: it keeps its label, unjudged.
        record["explanation"] += f" [not judged: {len(positives)} of {n_positives} top images]"
        return record
    judged = [judge.judge(e, explanation) for e in positives]
    judged_neg = [judge.judge(u.examples[0], explanation) for u in negatives]
    record["score"] = reference_score([j.score for j in judged], [j.score for j in judged_neg])
    record["judge_scores"] = [j.score for j in judged + judged_neg]
    record["judge_status"] = [j.status for j in judged + judged_neg]
    record["requests"] += sum(j.requests for j in judged + judged_neg)
    return record


def add_detection(record: dict, unit: UnitExamples, detector) -> dict:
    """The record with the detector's scores of the unit's held-out trials (a labelled unit with trials)."""
    if detector is None or record.get("status") != "ok" or not unit.trials:
        return record
    scores = detector.score(unit.trials, record["label"])
    return {**record, **scores, "requests": record["requests"] + scores["requests"]}


def label_units(
    units: Sequence[UnitExamples], explainer: Explainer, judge: Judge, cache: str | os.PathLike, *,
    n_positives: int = 5, n_negatives: int = 5, max_workers: int = 1, seed: int = 0,
    progress: Callable[[dict], None] | None = None, detector=None,
) -> list[dict]:  # fmt: skip
    """Records for every unit of `units` (in their order), from the cache where present (see the module
    docstring). `max_workers` units are labelled at once (threads; an HTTP backend also caps its own
    requests in flight); `progress` is called with each new record."""
    cache = Path(cache)
    done = read_cache(cache)
    detector_name = None if detector is None else detector.name
    for record in done.values():
        if (record.get("explainer"), record.get("judge")) != (explainer.name, judge.name) or (
            record.get("detector") not in (None, detector_name)
        ):
            raise ValueError(
                f"{cache} holds labels by explainer {record.get('explainer')!r}, judge "
                f"{record.get('judge')!r} and detector {record.get('detector')!r}, not {explainer.name!r} / "
                f"{judge.name!r} / {detector_name!r}: resuming would mix two runs. Use another work folder, "
                "or delete the file to start over."
            )
    by_feature = {(u.site, u.method, u.feature): u for u in units}
    pool: dict[tuple[str, str], list[int]] = {}
    for u in units:
        if u.examples:
            pool.setdefault((u.site, u.method), []).append(u.feature)
    def complete(u: UnitExamples) -> bool:
        record = done.get(unit_key(u.site, u.method, u.feature))
        if record is None:
            return False
        wants = detector is not None and record.get("status") == "ok" and bool(u.trials)
        return not wants or record.get("detector") == detector_name

    todo = [u for u in units if not complete(u)]
    logger.info("%d units to label, %d already in %s", len(todo), len(units) - len(todo), cache)
    appender = _Appender(cache)

    def work(unit: UnitExamples) -> dict:
        record = done.get(unit_key(unit.site, unit.method, unit.feature))
        if record is None:  # else labelled already, without the detection scores now asked for
            chosen = negatives_for(unit.feature, pool.get((unit.site, unit.method), []), n_negatives, seed)
            others = [by_feature[(unit.site, unit.method, f)] for f in chosen]
            record = label_unit(unit, explainer, judge, others, n_positives)
        record = add_detection(record, unit, detector)
        appender.write(record)
        if progress is not None:
            progress(record)
        return record

    try:
        if max_workers <= 1:
            new = [work(u) for u in todo]
        else:
            with ThreadPoolExecutor(max_workers) as executor:
                new = list(executor.map(work, todo))
    finally:
        appender.close()
    for record in new:
        done[unit_key(record["site"], record["method"], record["feature"])] = record
    return [done[unit_key(u.site, u.method, u.feature)] for u in units]
