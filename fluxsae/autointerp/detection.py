"""How well each unit detects each Shapes concept: token-level precision, recall and F1, and the label
that follows from them.

What a person asks of a label is "when it fires, is it X?" (precision) and "when X is there, does it
fire?" (recall). Both need "fires": a unit fires on a sample when its activation there is above a
fraction of its peak, one of THRESHOLDS (0: any positive activation). Graded units (a strong response to
red, a weak one to everything else) detect a concept well only above some level, so each (unit, concept)
pair is read at the fraction that gives the best F1, and the label says which.

Samples are (step half, scene, token): a unit's activation averaged over the early and over the late
half of the denoising steps, so "red, early steps only" can be told from "red" (`concepts.SCOPES`).

Labels are chosen on one half of the scenes (even indices) and measured on the other (odd): the
figures a label carries are held out, so picking the best of thousands of candidates does not inflate
them. The rule (`Detector.label`): among the candidates with precision >= MIN_PRECISION on the first
half, the best F1 minus MARGIN per component beyond one (a more complex label must earn its parts); of
the TRIES best, the first whose held-out precision is >= MIN_PRECISION with 95% confidence (its Wilson
lower bound) is kept, else the unit is "unexplained" (never the nearest wrong label). "every token"
only counts for units that fire on nearly all of them (recall >= ALWAYS_ON).

Units whose firing follows the starting noise rather than the image (seed-noise units, measured on the
packaged SAEs: benchmarks/results/labels_trust.json) get the explanation "noise" when it beats every
concept by the same rule: a direction in the latent space of one token, fitted on the first half (mean
starting noise where the unit fires minus where it does not) with the offset that maximises F1 there,
measured on the second.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fluxsae.autointerp.concepts import N_TOKENS, SCOPES, Concept, candidate_concepts
from fluxsae.shapes.world import Scene

logger = logging.getLogger(__name__)

THRESHOLDS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8)
"""A unit fires where its activation is above this fraction of its peak (its largest activation on the
labelling scenes); each (unit, concept) pair is read at the fraction with the best F1."""
MIN_PRECISION = 0.8
"""A label is kept only if at least this share of where the unit fires shows the concept, on the scenes
it was chosen on and, with CONFIDENCE, on held-out ones."""
CONFIDENCE = 1.645
"""z of the one-sided 95% Wilson lower bound that a label's held-out precision must keep above
MIN_PRECISION. A point estimate alone passes rare units by luck: of the labels whose held-out precision
was >= 0.8, 78% kept it on fresh scenes, 57% of those from under 20 samples; with the bound, 91%
(benchmarks/results/labels_trust.json)."""
MARGIN = 0.02
"""F1 a label must gain per component beyond one (see `Concept.complexity`)."""
ALWAYS_ON = 0.95
"""Recall a unit needs on every token to be labelled "every token" (always on)."""
NOISE_QUANTILES = (0.3, 0.5, 0.7, 0.85, 0.95)
"""Offsets tried for the seed-noise explanation: these quantiles of the fitted score."""
TRIES = 5
"""Candidates (best first on the first split) tried against the held-out scenes before a unit is called
unexplained."""
NOISE_KEY = "noise"
NOISE_TEXT = "the starting noise (a seed pattern, not the image)"
EVERY_TOKEN = "part:everywhere"
_HALVES = {"all": (0, 1), "early": (0,), "late": (1,)}


class Figures:
    """Detection figures of one (unit, concept) pair on one set of scenes."""

    __slots__ = ("precision", "mass_precision", "recall", "f1", "n_fired", "n_concept")

    def __init__(self, precision, mass_precision, recall, f1, n_fired, n_concept):
        self.precision, self.mass_precision, self.recall, self.f1 = precision, mass_precision, recall, f1
        self.n_fired, self.n_concept = int(n_fired), int(n_concept)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass
class UnitLabel:
    """The label a unit gets from its detection figures (see the module docstring)."""

    unit: int
    status: str
    """"ok", "unexplained" (no candidate is precise enough) or "no_examples" (it never fires)."""
    concept: str | None
    """The label's concept key (`concepts.Concept`), NOISE_KEY, or None."""
    text: str | None
    threshold: float | None
    """The fraction of the unit's peak above which it counts as firing."""
    held_out: Figures | None
    """The figures on the held-out scenes (those of the best candidate when unexplained)."""
    chosen_on: Figures | None
    """The figures on the scenes the label was chosen on."""
    best_guess: str | None = None
    """For an unexplained unit: the candidate that came closest (text), so a reader sees what failed."""
    noise_rule: tuple[float, ...] | None = None
    """For a noise label: the direction (one per latent channel of a token) and the offset, last."""
    peak: float = 0.0
    """The unit's peak (its largest step-half activation on the scenes the label was chosen on)."""

    @property
    def level(self) -> float | None:
        """The activation above which the unit counts as firing: threshold x peak."""
        return None if self.threshold is None else self.threshold * self.peak


def lower_bound(share: float, n: int, z: float = CONFIDENCE) -> float:
    """The Wilson score lower bound of a proportion `share` measured on `n` samples (0 without samples)."""
    if n <= 0:
        return 0.0
    centre = share + z * z / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def _halves(half_acts: torch.Tensor) -> torch.Tensor:
    half_acts = torch.as_tensor(half_acts)
    if half_acts.ndim != 4 or half_acts.shape[0] != 2 or half_acts.shape[2] != N_TOKENS:
        raise ValueError(
            f"half_acts must be [2 step halves, n_scenes, {N_TOKENS} tokens, units], "
            f"got {tuple(half_acts.shape)}"
        )
    return half_acts


class Detector:
    """Detection figures of every unit for every candidate concept, on two halves of the scenes.

        det = Detector(half_acts, drawn_scenes, noise=starting_noise)   # half_acts [2, n, 64, U]
        det.label(unit)                     # UnitLabel
        det.figures(unit, "color:red")      # (threshold, chosen-on Figures, held-out Figures)
        det.top_units("color:red", n=20)    # the units that detect it best, by held-out F1

    `noise`: the starting noise of each image's tokens [n, 64, channels] (the transformer's input at
    the first step), for the seed-noise explanation; None leaves it out.
    """

    def __init__(
        self, half_acts: torch.Tensor, scenes: Sequence[Scene], *, noise: torch.Tensor | None = None,
        concepts: Sequence[Concept] | None = None, block: int = 1024,
    ):  # fmt: skip
        half_acts = _halves(half_acts)
        n = len(scenes)
        if half_acts.shape[1] != n:
            raise ValueError(f"half_acts holds {half_acts.shape[1]} scenes, {n} scenes were given")
        if n < 4:
            raise ValueError(f"detection figures need at least 4 scenes (two halves), got {n}")
        concepts = list(candidate_concepts() if concepts is None else concepts)
        bodies = list(dict.fromkeys(Concept(c.parts) for c in concepts))
        self.bodies = bodies
        self.concepts = concepts
        self.n_units = half_acts.shape[-1]
        self.split = (np.arange(n) % 2 == 0, np.arange(n) % 2 == 1)
        acts = [half_acts[:, torch.from_numpy(s)].float() for s in self.split]  # [2, n_s, 64, U] each
        self.peak = acts[0].amax(dim=(0, 1, 2)).clamp(min=0)  # [U]
        self.live = (acts[0] > 0).flatten(0, 2).any(0) | (acts[1] > 0).flatten(0, 2).any(0)
        masks = [
            torch.from_numpy(
                np.stack([b.masks([scenes[i] for i in np.nonzero(s)[0]]).reshape(-1) for b in bodies], 1)
            )
            for s in self.split
        ]  # [n_s * 64, bodies] bool
        self.positives = [m.sum(0).double() for m in masks]  # [bodies] per split
        self._counts = [self._count(a, m, block) for a, m in zip(acts, masks, strict=True)]
        self._body_index = {b.key: i for i, b in enumerate(bodies)}
        self._penalty = {
            s: torch.tensor([Concept(b.parts, s).complexity for b in bodies]) * MARGIN for s in SCOPES
        }
        self._noise = None
        if noise is not None:
            noise = torch.as_tensor(noise).float()
            if noise.ndim != 3 or noise.shape[:2] != (n, N_TOKENS):
                raise ValueError(
                    f"noise must be [n_scenes={n}, {N_TOKENS}, channels], got {tuple(noise.shape)}"
                )
            self._noise = self._fit_noise(acts, [noise[torch.from_numpy(s)] for s in self.split])
        self._labels: dict[int, UnitLabel] = {}

    # -- counting -------------------------------------------------------------------------------------

    def _count(self, acts: torch.Tensor, masks: torch.Tensor, block: int) -> dict:
        """tp [T, 2 halves, U, bodies], fired [T, 2, U], mass_on [2, U, bodies], mass [2, U] on one split."""
        x = acts.flatten(1, 2)  # [2, n * 64, U]
        labels = masks.float()
        fractions = torch.tensor(THRESHOLDS)
        tp = torch.zeros(len(THRESHOLDS), 2, self.n_units, labels.shape[1])
        fired = torch.zeros(len(THRESHOLDS), 2, self.n_units)
        positive = x.clamp(min=0)
        mass_on = torch.stack([positive[h].T @ labels for h in range(2)])  # [2, U, bodies]
        for start in range(0, self.n_units, block):
            units = slice(start, start + block)
            for t, fraction in enumerate(fractions):
                for h in range(2):
                    fires = (x[h, :, units] > fraction * self.peak[units]) & (x[h, :, units] > 0)
                    tp[t, h, units] = fires.T.float() @ labels
                    fired[t, h, units] = fires.sum(0).float()
        return {"tp": tp, "fired": fired, "mass_on": mass_on, "mass": positive.sum(1)}

    def _scoped(self, split: int, scope: str, units=slice(None), bodies=slice(None)):
        """(tp [T, units, bodies], fired [T, units, 1], positives [bodies]) of a scope on one split; an
        int `units` or `bodies` drops that axis. Indexed before the halves are summed, so a lookup of
        one unit or concept stays cheap."""
        c = self._counts[split]
        halves = _HALVES[scope]
        tp = sum(c["tp"][:, h][:, units][..., bodies] for h in halves)
        return tp, c["fired"].sum(1)[:, units][..., None], self.positives[split][bodies] * len(halves)

    def _figures(self, split, scope, t, unit, body) -> Figures:
        c = self._counts[split]
        halves = _HALVES[scope]
        tp = sum(float(c["tp"][t, h, unit, body]) for h in halves)
        on = sum(float(c["mass_on"][h, unit, body]) for h in halves)
        n_fired, mass = float(c["fired"][t, :, unit].sum()), float(c["mass"][:, unit].sum())
        n_pos = float(self.positives[split][body]) * len(halves)
        return Figures(
            tp / n_fired if n_fired else 0.0,
            on / mass if mass > 0 else 0.0,
            tp / n_pos if n_pos else 0.0,
            2 * tp / (n_fired + n_pos) if n_fired + n_pos else 0.0,
            n_fired,
            n_pos,
        )

    # -- the noise explanation ------------------------------------------------------------------------

    def _fit_noise(self, acts, noise) -> dict:
        """{(scope, threshold index): {"score" [U] (F1 on the first split, -1 where no offset is precise
        enough), "w" [U, D], "b" [U], "figures": per split (tp, fired, positives, mass share) [U] each}}."""
        x = [n.flatten(0, 1) for n in noise]  # [n_s * 64, D] per split
        out = {}
        for t, fraction in enumerate(THRESHOLDS):
            fires = [((a > fraction * self.peak) & (a > 0)).flatten(1, 2).float() for a in acts]  # [2, N, U]
            for scope, halves in _HALVES.items():
                target = fires[0][list(halves)].amax(0)  # [N, U]: fires in the scope's halves
                n1, n0 = target.sum(0).clamp(min=1), (1 - target).sum(0).clamp(min=1)
                w = (target.T @ x[0]) / n1[:, None] - ((1 - target).T @ x[0]) / n0[:, None]  # [U, D]
                scores = [xi @ w.T for xi in x]  # [N_s, U]
                # Offsets at quantiles of an even subsample: the sort of every row would dominate the fit.
                ordered = scores[0][:: max(1, len(scores[0]) // 4096)].T.contiguous().sort(1).values.T
                best_f1, best_b = torch.full((self.n_units,), -1.0), torch.zeros(self.n_units)
                for q in NOISE_QUANTILES:
                    offset = ordered[int(q * (len(ordered) - 1))]
                    tp, n_fired, n_pos = self._noise_counts(fires[0], scores[0] > offset, halves)
                    f1 = 2 * tp / (n_fired + n_pos).clamp(min=1)
                    better = (tp / n_fired.clamp(min=1) >= MIN_PRECISION) & (f1 > best_f1)
                    best_f1, best_b = torch.where(better, f1, best_f1), torch.where(better, offset, best_b)
                figures = []
                for split in range(2):
                    pred = scores[split] > best_b
                    positive = acts[split].flatten(1, 2).clamp(min=0)[list(halves)]
                    share = (positive * pred).sum((0, 1)) / acts[split].clamp(min=0).sum((0, 1, 2)).clamp(
                        min=1e-12
                    )
                    figures.append((*self._noise_counts(fires[split], pred, halves), share))
                out[(scope, t)] = {"score": best_f1, "w": w, "b": best_b, "figures": figures}
        return out

    @staticmethod
    def _noise_counts(fires: torch.Tensor, pred: torch.Tensor, halves) -> tuple:
        """(tp, fired, positives) [U] of a noise rule `pred` [N, U] holding in `halves`; fires 0/1
        [2, N, U]."""
        pred = pred.float()
        tp = sum((fires[h] * pred).sum(0) for h in halves)
        return tp, fires.sum((0, 1)), len(halves) * pred.sum(0)

    def _noise_figures(self, split: int, scope: str, t: int, unit: int) -> Figures:
        tp, n_fired, n_pos, mass = (float(v[unit]) for v in self._noise[(scope, t)]["figures"][split])
        return Figures(tp / n_fired if n_fired else 0.0, mass, tp / n_pos if n_pos else 0.0,
                       2 * tp / (n_fired + n_pos) if n_fired + n_pos else 0.0, n_fired, n_pos)  # fmt: skip

    # -- labels ---------------------------------------------------------------------------------------

    def _candidates(self, scope: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(score [T, U, bodies] on the first split, -inf where not eligible; F1 [T, U, bodies])."""
        tp, fired, positives = self._scoped(0, scope)
        precision = tp / fired.clamp(min=1)
        recall = tp / positives.clamp(min=1)
        f1 = 2 * tp / (fired + positives).clamp(min=1)
        eligible = precision >= MIN_PRECISION
        every = self._body_index.get(EVERY_TOKEN)
        if every is not None:
            eligible[..., every] &= recall[..., every] >= ALWAYS_ON
        return torch.where(eligible, f1 - self._penalty[scope], torch.tensor(-math.inf)), f1

    def label(self, unit: int) -> UnitLabel:
        """The unit's label by the module's rule (computed for every unit at the first call)."""
        if not self._labels:
            self._label_all()
        return self._labels[int(unit)]

    def _label_all(self) -> None:
        """Each unit's TRIES best eligible candidates on the first split, best first, and its best guess
        (the best F1 whatever its precision); `_decide` keeps the first that holds on the second."""
        ranked: list[list[tuple]] = [[] for _ in range(self.n_units)]
        guess: list[tuple] = [(-math.inf, None)] * self.n_units
        for scope in SCOPES:
            score, f1 = self._candidates(scope)
            flat = score.permute(1, 0, 2).flatten(1)  # [U, T * bodies]
            values, indices = flat.topk(TRIES, dim=1)
            raw_value, raw_index = f1.permute(1, 0, 2).flatten(1).max(1)
            for u in range(self.n_units):
                for v, i in zip(values[u].tolist(), indices[u].tolist(), strict=True):
                    if v > -math.inf:
                        ranked[u].append((v, scope, *divmod(i, len(self.bodies))))
                if raw_value[u] > guess[u][0]:
                    guess[u] = (float(raw_value[u]), (scope, *divmod(int(raw_index[u]), len(self.bodies))))
        if self._noise is not None:
            for (scope, t), fit in self._noise.items():
                value = fit["score"] - MARGIN * (1 + (scope != "all"))
                for u in torch.nonzero(fit["score"] > -1).flatten().tolist():
                    ranked[u].append((float(value[u]), NOISE_KEY, scope, t))
        for u in range(self.n_units):
            self._labels[u] = self._decide(u, sorted(ranked[u], key=lambda r: -r[0])[:TRIES], guess[u][1])
            self._labels[u].peak = float(self.peak[u])

    def _candidate(self, u: int, pick: tuple) -> tuple[str, str, float, Figures, Figures, tuple | None]:
        """(key, text, threshold, figures on the first split, held-out figures, noise rule) of a candidate."""
        if pick[1] == NOISE_KEY:
            _, _, scope, t = pick
            fit = self._noise[(scope, t)]
            key = NOISE_KEY + ("" if scope == "all" else f"@{scope}")
            rule = (*fit["w"][u].tolist(), float(fit["b"][u]))
            text = NOISE_TEXT + {"all": "", "early": ", early steps only", "late": ", late steps only"}[scope]
            return (
                key,
                text,
                THRESHOLDS[t],
                self._noise_figures(0, scope, t, u),
                self._noise_figures(1, scope, t, u),
                rule,
            )
        _, scope, t, body = pick
        concept = Concept(self.bodies[body].parts, scope)
        return (concept.key, concept.text, THRESHOLDS[t], self._figures(0, scope, t, u, body),
                self._figures(1, scope, t, u, body), None)  # fmt: skip

    def _decide(self, u: int, ranked: list[tuple], guess: tuple | None) -> UnitLabel:
        if not bool(self.live[u]) or float(self.peak[u]) <= 0:
            return UnitLabel(u, "no_examples", None, None, None, None, None)
        first = None
        for pick in ranked:
            key, text, threshold, chosen, held, rule = self._candidate(u, pick)
            first = first or (text, threshold, held, chosen)
            if lower_bound(held.precision, held.n_fired) >= MIN_PRECISION:
                return UnitLabel(u, "ok", key, text, threshold, held, chosen, noise_rule=rule)
        if first is None:
            _, text, threshold, chosen, held, _ = self._candidate(u, (0.0, *guess))
            first = (text, threshold, held, chosen)
        text, threshold, held, chosen = first
        return UnitLabel(u, "unexplained", None, None, threshold, held, chosen, best_guess=text)

    # -- lookups --------------------------------------------------------------------------------------

    def _body(self, key: str) -> tuple[Concept, int]:
        concept = Concept.from_key(key)
        body = self._body_index.get(Concept(concept.parts).key)
        if body is None:
            raise ValueError(f"{key!r} is not among this detector's candidate concepts")
        return concept, body

    def figures(self, unit: int, key: str) -> tuple[float, Figures, Figures]:
        """(threshold, figures on the first split, held-out figures) of `unit` for concept `key`, at the
        threshold with the best F1 on the first split."""
        concept, body = self._body(key)
        tp, fired, positives = self._scoped(0, concept.scope, unit, body)  # [T], [T, 1], scalar
        t = int((2 * tp / (fired[:, 0] + positives).clamp(min=1)).argmax())
        return (
            THRESHOLDS[t],
            self._figures(0, concept.scope, t, unit, body),
            self._figures(1, concept.scope, t, unit, body),
        )

    def top_units(self, key: str, n: int = 20) -> list[tuple[int, float, Figures]]:
        """The `n` units with the best held-out F1 for concept `key`, each read at its best threshold on
        the first split: (unit, threshold, held-out Figures)."""
        concept, body = self._body(key)
        tp0, fired0, pos0 = self._scoped(0, concept.scope, bodies=body)  # [T, U], [T, U, 1]
        t = (2 * tp0 / (fired0[..., 0] + pos0).clamp(min=1)).argmax(0)  # [U]
        tp1, fired1, pos1 = self._scoped(1, concept.scope, bodies=body)
        units = torch.arange(self.n_units)
        f1_held = 2 * tp1[t, units] / (fired1[t, units, 0] + pos1).clamp(min=1)
        order = f1_held.argsort(descending=True)[:n].tolist()
        return [
            (u, THRESHOLDS[int(t[u])], self._figures(1, concept.scope, int(t[u]), u, body)) for u in order
        ]

    def candidates(self, unit: int, n: int = 5) -> list[tuple[str, float, Figures]]:
        """The unit's `n` best concepts by held-out F1, each read at its best threshold on the first split,
        among the `n` best per scope on the first split: (key, threshold, held-out Figures), whatever
        their precision."""
        out = []
        for scope in SCOPES:
            tp, fired, positives = self._scoped(0, scope, unit)  # [T, bodies], [T, 1], [bodies]
            value, t = (2 * tp / (fired + positives[None]).clamp(min=1)).max(0)
            for body in value.topk(min(n, len(self.bodies))).indices.tolist():
                figures = self._figures(1, scope, int(t[body]), unit, body)
                out.append((Concept(self.bodies[body].parts, scope).key, THRESHOLDS[int(t[body])], figures))
        return sorted(out, key=lambda r: -r[2].f1)[:n]
