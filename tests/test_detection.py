"""Labels a user can trust: concept masks from where objects are drawn, held-out detection figures, the
label rule (precise or unexplained), the seed-noise explanation, and chat detection / fuzzing scores
against a loopback server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random

import numpy as np
import pytest
import torch

from fluxsae import shapes
from fluxsae.autointerp import Example, HttpChat
from fluxsae.autointerp.concepts import Concept, candidate_concepts
from fluxsae.autointerp.detection import NOISE_KEY, Detector
from fluxsae.autointerp.loopback import LoopbackChat, Reply, answer
from fluxsae.autointerp.scoring import ChatDetector, Trial, balanced_scores, detection_trials, parse_yes_no


def _mask(key: str, scenes) -> np.ndarray:
    return Concept.from_key(key).masks(scenes)


# -- concepts --------------------------------------------------------------------------------------


def test_object_parts_halo_regions_and_backgrounds_are_the_tokens_they_name():
    scene = next(
        s for s in shapes.sample_scenes(40, seed=1, n_objects=2) if {o.size for o in s.objects} == {"large"}
    )
    whole, anypart = _mask("object", [scene])[0], _mask("object+part:any", [scene])[0]
    inside, edge = _mask("object+part:inside", [scene])[0], _mask("object+part:edge", [scene])[0]
    halo = _mask("object+part:halo", [scene])[0]
    assert inside.any() and edge.any() and halo.any()
    assert (inside <= whole).all() and (whole <= anypart).all()
    assert np.array_equal(inside | edge, anypart) and not (inside & edge).any()
    assert not (halo & anypart).any()  # background tokens only, each next to an object token
    grid = np.pad(anypart.reshape(8, 8), 1)
    near = np.zeros((8, 8), bool)
    for di in range(3):
        for dj in range(3):
            near |= grid[di : di + 8, dj : dj + 8]
    assert (halo <= near.reshape(-1)).all()
    sides = [_mask(f"object+part:edge:{d}", [scene])[0] for d in ("top", "right", "bottom", "left")]
    assert all(s.any() for s in sides) and all((s <= edge).all() for s in sides)
    assert np.array_equal(_mask(f"background:{scene.background}", [scene])[0], ~whole)
    assert not _mask(f"background:{'white' if scene.background != 'white' else 'black'}", [scene]).any()
    rows = _mask("part:everywhere+region:rows:6-7", [scene])[0].reshape(8, 8)
    assert rows[6:].all() and not rows[:6].any()
    assert _mask("part:everywhere+region:token:27", [scene])[0].nonzero()[0].tolist() == [27]
    red = dataclasses.replace(scene.objects[0], color="red")
    other = dataclasses.replace(scene.objects[1], color="blue")
    two = shapes.Scene((red, other), scene.background)
    assert np.array_equal(_mask("color:red|blue", [two]), _mask("object", [two]))
    red_edge = _mask("color:red+part:edge", [two])
    assert red_edge.any() and (red_edge <= _mask("color:red+part:any", [two])).all()
    assert not (red_edge & _mask("color:blue+part:inside", [two])).any()


def test_concept_keys_round_trip_read_plainly_and_count_their_parts():
    for key, text, complexity in [
        ("color:red", "red", 0),
        ("color:yellow+shape:square@early", "yellow square, early steps only", 2),
        ("background:gray", "gray background", 0),
        ("color:red+part:edge", "the edge of a red object", 1),
        ("object+part:halo", "background next to an object", 0),
        ("color:blue|purple+part:inside", "the inside of a blue or purple object", 2),
        ("part:everywhere+region:rows:6-7", "rows 6-7", 0),
        ("position:bottom left|bottom|bottom right", "object in the bottom third of the image", 0),
        (
            "background:gray+part:background+region:cols:0-1@late",
            "gray background in cols 0-1, late steps only",
            2,
        ),
    ]:
        concept = Concept.from_key(key)
        assert (concept.text, concept.complexity) == (text, complexity), key
        assert Concept.from_key(concept.key) == concept
    for bad in ("color:teal", "part:rim", "color:red+part:everywhere", "region:rows:x"):
        with pytest.raises(ValueError, match="not a Shapes concept"):
            Concept.from_key(bad)
    keys = [c.key for c in candidate_concepts()]
    assert len(keys) == len(set(keys)) and "color:red" in keys and "object+part:halo@late" in keys


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_as_drawn_places_each_object_where_the_image_shows_it():
    checked = []
    for scene in shapes.sample_scenes(40, seed=2, n_objects=1):
        obj = scene.objects[0]
        dx, dy = (
            (5 if obj.x < 32 else -5),
            (4 if obj.y < 32 else -4),
        )  # towards the middle: still in the image
        shifted = dataclasses.replace(obj, x=obj.x + dx, y=obj.y + dy)  # drawn elsewhere in its cell
        moved = shapes.Scene((shifted,), scene.background)
        if shapes.read_attributes(shapes.render(moved)).objects[0].position != obj.position:
            continue
        placed, found = shapes.as_drawn(scene, shapes.render(moved))
        assert found == 1 and placed == scene  # the caption's attributes are kept ...
        got = placed.objects[0]
        assert got.x == pytest.approx(shifted.x, abs=0.6) and got.y == pytest.approx(shifted.y, abs=0.6)
        drawn = _mask("object+part:any", [moved])
        near, sampled = (
            _iou(_mask("object+part:any", [placed]), drawn),
            _iou(_mask("object+part:any", [scene]), drawn),
        )
        assert near >= 0.85 and sampled <= near  # not the sampled one
        checked.append(sampled)
    assert len(checked) >= 10 and np.mean(checked) < 0.8
    two = shapes.sample_scenes(5, seed=3, n_objects=2)[0]
    assert shapes.as_drawn(two, shapes.render(shapes.Scene(two.objects[:1], two.background)))[1] == 1


# -- the label rule --------------------------------------------------------------------------------


def _units(scenes, noise, seed=0):
    """Planted unit activations [2, n, 64, U] and what each should be labelled."""
    g = np.random.default_rng(seed)
    red, blue = _mask("color:red", scenes).astype(np.float32), _mask("color:blue", scenes).astype(np.float32)
    n = len(scenes)
    units = {
        "red": np.stack([red, red]),
        "blue early": np.stack([blue, 0 * blue]),
        "graded red": np.stack([red + 0.15 * (1 - red)] * 2),  # weak everywhere, strong on red
        "vague": np.stack([np.maximum(red, (g.random((n, 64)) < 0.4).astype(np.float32))] * 2),
        "part of red": np.stack([red * (g.random((n, 64)) < 0.15)] * 2),
        "dead": np.zeros((2, n, 64), np.float32),
        "noise": np.stack([np.maximum(noise[..., 0] + 0.5 * noise[..., 3], 0)] * 2),
    }
    return list(units), torch.from_numpy(np.stack(list(units.values()), axis=-1))


@pytest.fixture(scope="module")
def planted():
    scenes = shapes.sample_scenes(160, seed=11)
    noise = torch.randn(len(scenes), 64, 16, generator=torch.Generator().manual_seed(5))
    names, half = _units(scenes, noise.numpy())
    return scenes, names, Detector(half, scenes, noise=noise)


def test_labels_are_precise_on_held_out_scenes_or_the_unit_is_unexplained(planted):
    scenes, names, det = planted
    got = {name: det.label(u) for u, name in enumerate(names)}
    assert (got["red"].text, got["red"].status) == ("red", "ok")
    assert got["red"].held_out.precision == got["red"].held_out.recall == 1.0
    held = np.arange(len(scenes)) % 2 == 1  # the odd scenes: never used to choose
    assert got["red"].held_out.n_concept == 2 * int(
        _mask("color:red", [s for s, h in zip(scenes, held, strict=True) if h]).sum()
    )
    assert got["blue early"].text == "blue, early steps only"
    assert (
        got["graded red"].text == "red" and got["graded red"].threshold >= 0.15
    )  # read above its weak floor
    assert got["graded red"].held_out.precision == 1.0
    assert got["vague"].status == "unexplained" and got["vague"].text is None
    assert got["vague"].best_guess and got["vague"].held_out.precision < 0.8
    part = got["part of red"]  # precise but partial: an honest label with its low recall
    assert part.text == "red" and part.held_out.precision == 1.0 and part.held_out.recall < 0.3
    assert got["dead"].status == "no_examples"
    assert got["noise"].concept == NOISE_KEY and got["noise"].held_out.precision >= 0.8
    assert len(got["noise"].noise_rule) == 17  # one weight per latent channel, then the offset
    assert det.top_units("color:red", 3)[0][0] == names.index("red")
    assert det.candidates(names.index("blue early"), 3)[0][0] == "color:blue@early"


def test_detector_refuses_what_does_not_fit():
    scenes = shapes.sample_scenes(6, seed=1)
    with pytest.raises(ValueError, match="half_acts must be"):
        Detector(torch.zeros(6, 64, 3), scenes)
    with pytest.raises(ValueError, match="holds 5 scenes"):
        Detector(torch.zeros(2, 5, 64, 3), scenes)
    with pytest.raises(ValueError, match="noise must be"):
        Detector(torch.zeros(2, 6, 64, 3), scenes, noise=torch.zeros(6, 63, 16))


# -- chat detection and fuzzing ---------------------------------------------------------------------


def _trials(n_units=4):
    """Units detecting "red" exactly, on rendered scenes: (label, trials) per unit."""
    scenes = shapes.sample_scenes(80, seed=21)
    images = {i: shapes.render(s) for i, s in enumerate(scenes)}
    maps = {i: _mask("color:red", [s])[0].reshape(8, 8).astype(np.float32) for i, s in enumerate(scenes)}
    fires = {i: bool(m.any()) for i, m in maps.items()}
    near = [i for i, s in enumerate(scenes) if not fires[i] and any(o.color == "orange" for o in s.objects)]
    return [detection_trials(u, fires, maps.get, images, dict(enumerate(scenes)), [], near, n=4, seed=u)
            for u in range(n_units)]  # fmt: skip


def _truth_of(trials) -> dict[str, bool]:
    """PNG-pixel digest -> truth, as a judge that knows the answer sees it."""
    from fluxsae.autointerp.render import paint

    out = {}
    for trial in [t for unit in trials for t in unit]:
        e = trial.example
        shown = (
            paint(e.image, e.acts, e.vmax, size=256)
            if trial.kind == "fuzzing"
            else e.image.resize((256, 256))
        )
        out[hashlib.sha1(np.asarray(shown.convert("RGB")).tobytes()).hexdigest()] = trial.truth
    return out


def _digest(body) -> str:
    import base64
    import io

    from PIL import Image

    url = next(p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


def test_a_truthful_judge_scores_near_one_a_random_one_near_a_half(tmp_path):
    units = _trials()
    assert all(
        sum(t.kind == "detection" for t in u) == 8 and sum(t.kind == "fuzzing" for t in u) == 8 for u in units
    )
    truth = _truth_of(units)
    rng = random.Random(0)
    with LoopbackChat(lambda body, n: answer(f"ANSWER: {'YES' if truth[_digest(body)] else 'NO'}")) as honest:
        detector = ChatDetector(HttpChat(url=honest.url, model="truth", backoff=0.001))
        scores = [detector.score(u, "red") for u in units]
    assert all(s["detection"] == 1.0 and s["fuzzing"] == 1.0 for s in scores)
    assert all(s["n_detection"] == 8 and s["requests"] == 16 for s in scores)
    with LoopbackChat(lambda body, n: answer(f"ANSWER: {rng.choice(['YES', 'NO'])}")) as coin:
        detector = ChatDetector(HttpChat(url=coin.url, model="coin", backoff=0.001))
        scores = [detector.score(u, "red") for u in _trials(30)]
    mean = np.mean([s["detection"] for s in scores if s["detection"] is not None])
    assert 0.35 < mean < 0.65


def test_rate_limits_timeouts_and_unreadable_answers_are_never_counted_as_no():
    units = _trials(1)
    truth = _truth_of(units)

    def script(body, n):
        if n % 5 == 1:
            return Reply(429, "slow down", {"Retry-After": "0"})
        if n % 5 == 2:
            return Reply(200, answer("ANSWER: YES").body, delay=0.6)  # longer than the client waits
        if n % 5 == 3:
            return answer("I think it might be red.")  # no ANSWER line: unreadable
        return answer(f"ANSWER: {'YES' if truth[_digest(body)] else 'NO'}")

    with LoopbackChat(script) as server:
        chat = HttpChat(url=server.url, model="flaky", backoff=0.001, timeout=0.3, max_retries=3)
        record = ChatDetector(chat).score(units[0], "red")
    answers = record["detection_answers"]
    unreadable = [a for a in answers if a[2] is None]
    assert unreadable and all(a[3] == "malformed" for a in unreadable)
    assert record["n_detection"] + record["n_fuzzing"] == len(answers) - len(unreadable)
    readable = [a for a in answers if a[2] is not None]
    assert all(a[2] == a[1] for a in readable)  # every readable answer is the truthful one
    assert record["requests"] > 16  # the retries are counted
    assert parse_yes_no("**Answer:** yes") == (True, "ok") and parse_yes_no("maybe") == (None, "malformed")
    assert balanced_scores([True, False], [None, None])["balanced_accuracy"] is None


def test_trials_leave_out_the_explainers_images_and_fuzz_with_a_region_of_the_same_size():
    scenes = shapes.sample_scenes(60, seed=4)
    images = {i: shapes.render(s) for i, s in enumerate(scenes)}
    maps = {i: _mask("color:red", [s])[0].reshape(8, 8).astype(np.float32) for i, s in enumerate(scenes)}
    fires = {i: bool(m.any()) for i, m in maps.items()}
    shown = [i for i in fires if fires[i]][:3]
    trials = detection_trials(0, fires, maps.get, images, dict(enumerate(scenes)), shown, [], n=4, seed=1)
    assert not {t.example.image_id for t in trials} & set(shown)
    again = detection_trials(0, fires, maps.get, images, dict(enumerate(scenes)), shown, [], n=4, seed=1)
    assert [(t.kind, t.example.image_id, t.truth, t.example.acts.tolist()) for t in trials] == [
        (t.kind, t.example.image_id, t.truth, t.example.acts.tolist()) for t in again
    ]  # a rerun asks the same questions
    decoys = [t for t in trials if t.kind == "fuzzing" and not t.truth]
    for decoy in decoys:
        true_map = maps[decoy.example.image_id]
        assert (decoy.example.acts > 0).sum() == (true_map > 0).sum()
        assert not np.array_equal(decoy.example.acts > 0, true_map > 0)
    assert isinstance(trials[0], Trial) and isinstance(trials[0].example, Example)
    json.dumps([[t.kind, t.truth] for t in trials])
