"""Automated interpretation: the Shapes oracle, the painting, the streaming pass, and both model backends
end to end (a tiny random vision-language model built from a config; an HTTP server on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxsae import shapes
from fluxsae.autointerp import (
    ChatExplainer,
    ChatJudge,
    Concept,
    Example,
    HttpChat,
    ShapesOracle,
    UnitExamples,
    label_units,
    paint,
    parse_pattern,
    parse_score,
    reference_score,
)
from fluxsae.autointerp import examples as ex
from fluxsae.autointerp.loopback import LoopbackChat, Reply, answer
from fluxsae.autointerp.oracle import SINGLE_CONCEPTS, candidate_concepts, concept_coverage
from fluxsae.autointerp.run import read_cache

REPO = Path(__file__).resolve().parents[1]

# The synthetic units of the HTTP tests, built the same way in this process and in the child that is
# killed: 12 units with 5 random images and maps each.
UNITS_SRC = textwrap.dedent("""
    import numpy as np
    from PIL import Image
    from fluxsae.autointerp import Example, UnitExamples

    def synthetic_units(n=12, k=5):
        rng = np.random.default_rng(0)
        units = []
        for u in range(n):
            examples = tuple(
                Example(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                        rng.random((8, 8)).astype(np.float32), 1.0, u * k + j)
                for j in range(k))
            units.append(UnitExamples("transformer_blocks.3.image", "sae", u, examples))
        return units
""")
_ns: dict = {}
exec(UNITS_SRC, _ns)
synthetic_units = _ns["synthetic_units"]


# -- parsing, score, painting ----------------------------------------------------------------------


def test_answers_that_do_not_follow_the_format_are_never_labels():
    assert parse_pattern("1. a red ball\n2. a red cube\nPATTERN: red objects") == ("red objects", "ok")
    assert parse_pattern("**Pattern:** the yellow square.\n") == ("the yellow square.", "ok")
    assert parse_pattern("The blue regions show red objects.") == (None, "malformed")
    assert parse_pattern("PATTERN:   ") == (None, "malformed")
    assert parse_pattern("  \n") == (None, "empty")
    assert parse_score("It matches well.\nSCORE: 0.85") == (0.85, "ok")
    assert parse_score("SCORE: 7") == (None, "malformed")  # out of [0, 1]
    assert parse_score("about 0.8") == (None, "malformed")
    assert reference_score([1.0, 0.5], [0.0, None]) == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert reference_score([None], [None]) is None


def test_paint_is_blue_with_alpha_growing_as_the_square_root_of_activation():
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    acts = np.zeros((8, 8), dtype=np.float32)
    acts[0, 0], acts[0, 1], acts[0, 2] = 4.0, 1.0, -3.0
    out = np.asarray(paint(image, acts, vmax=4.0, size=256)).astype(float)
    assert out.shape == (256, 256, 3)
    full, quarter, negative = out[16, 16], out[16, 48], out[16, 80]  # tokens are 32 px squares
    assert full == pytest.approx([200 * 0.25, 200 * 0.25, 200 * 0.25 + 255 * 0.75], abs=1)
    assert quarter == pytest.approx([200 * 0.625, 200 * 0.625, 200 * 0.625 + 255 * 0.375], abs=1)  # sqrt(1/4)
    assert negative == pytest.approx([200, 200, 200])
    assert np.asarray(paint(image, acts, vmax=0.0, size=None)).tolist() == np.asarray(image).tolist()


# -- the Shapes oracle ---------------------------------------------------------------------------


def _planted(scenes, concepts_early_late):
    """Unit activations [2, n, 64, U] that follow given concept masks (early half, late half)."""
    units = []
    for early, late in concepts_early_late:
        e = Concept.from_key(early).masks(scenes) if early else np.zeros((len(scenes), 64), bool)
        lt = Concept.from_key(late).masks(scenes) if late else np.zeros((len(scenes), 64), bool)
        units.append(np.stack([e, lt]).astype(np.float32))
    return torch.from_numpy(np.stack(units, axis=-1))


def test_oracle_names_the_concept_a_unit_detects_and_judges_from_token_masks():
    scenes = shapes.sample_scenes(150, seed=3)
    half = _planted(scenes, [
        ("color:red", "color:red"),
        ("color:yellow+shape:square", "color:yellow+shape:square"),
        ("color:blue", None),
        ("background:gray", "background:gray"),
        ("color:green+background:white", "color:green+background:white"),
    ])  # fmt: skip
    oracle = ShapesOracle.fit(half, scenes)
    got = [oracle.explain(UnitExamples("s", "sae", u, ())) for u in range(5)]
    assert [g.label for g in got] == [
        "red", "yellow square", "blue, early steps only", "gray background", "green on a white background",
    ]  # fmt: skip
    assert all(oracle.auroc_of(u, g.concept) == pytest.approx(1.0) for u, g in enumerate(got))
    # The judge: paint exactly on the red object scores 1; the same paint judged as "yellow square" 0.
    scene = next(s for s in scenes if any(o.color == "red" for o in s.objects)
                 and not any(o.color == "yellow" for o in s.objects))  # fmt: skip
    mask = Concept(("color:red",)).masks([scene])[0].reshape(8, 8).astype(np.float32)
    example = Example(shapes.render(scene), mask, 1.0, 0, scene)
    assert oracle.judge(example, got[0]).score == pytest.approx(1.0)
    assert oracle.judge(example, got[1]).score == pytest.approx(0.0)
    assert oracle.judge(example, got[0]._replace(label="a cat", concept=None)).status == "malformed"
    assert len({c.key for c in candidate_concepts()}) == len(candidate_concepts())


def test_concept_coverage_counts_concepts_whose_best_unit_reaches_the_threshold():
    scenes = shapes.sample_scenes(100, seed=4)
    half = _planted(scenes, [("color:red", "color:red"), ("shape:circle", None)])
    cov = concept_coverage(half.mean(0), scenes)
    assert cov["best"]["color:red"] == (0, pytest.approx(1.0))
    assert cov["best"]["shape:circle"] == (1, pytest.approx(1.0))  # early steps only still ranks perfectly
    assert cov["best"]["object"][1] < 0.9  # each unit sees a third of the objects or fewer
    assert cov["coverage"] == pytest.approx(2 / 15)
    assert sorted(cov["best"]) == sorted(SINGLE_CONCEPTS)


# -- the streaming pass ----------------------------------------------------------------------------


def test_top_examples_stream_like_a_global_ranking_and_need_enough_active_tokens():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(30, 16, 3, generator=g) - 0.5  # [images, tokens, units]
    maps[4, :, 2] = -1.0
    maps[4, 0, 2] = 9.0  # the highest value of unit 2, but on one active token only
    top = ex.TopExamples(3, k=4, min_active_tokens=2)
    for start in range(0, 30, 7):
        top.update(maps[start : start + 7], torch.arange(start, min(start + 7, 30)))
    for u in range(3):
        score = maps[..., u].max(1).values
        score[(maps[..., u] > 0).sum(1) < 2] = -float("inf")
        want = score.topk(4).indices
        assert top.ids[u].tolist() == want.tolist()
        assert torch.equal(top.maps[u], maps[want, :, u])
    assert 4 not in top.ids[2].tolist()


def test_mlp_neurons_are_captured_on_image_tokens_on_the_prompt_pass_and_hooks_leave(shared_tiny_pipe):
    tiny_pipe = shared_tiny_pipe
    from fluxsae.tiny import TINY_GENERATION

    sites = ["transformer_blocks.0.image", "single_transformer_blocks.0.image"]
    n_img = 16
    with pytest.raises(RuntimeError, match="boom"), ex.capture_mlp(tiny_pipe, sites, n_img) as mlp:
        raise RuntimeError("boom")
    assert all(not ex.mlp_module(tiny_pipe, s)._forward_hooks for s in sites)
    with torch.no_grad(), ex.capture_mlp(tiny_pipe, sites, n_img) as mlp:
        generator = torch.Generator().manual_seed(0)
        tiny_pipe(["a red circle", "a blue square"], generator=generator, true_cfg_scale=2.0,
                  negative_prompt="", output_type="latent", **TINY_GENERATION)  # fmt: skip
    steps = TINY_GENERATION["num_inference_steps"]
    for site in sites:
        hidden = ex.stack_steps(mlp[site], steps)  # one call per step: the uncond pass is not kept
        block = tiny_pipe.transformer.get_submodule(site.rsplit(".", 1)[0])
        mlp_in = block.ff.net[0].proj if site.startswith("transformer") else block.proj_mlp
        width = mlp_in.out_features
        assert hidden.shape == (steps, 2, n_img, width)
        assert torch.isfinite(hidden).all()


# -- the HTTP backend --------------------------------------------------------------------------------


def _text(request: dict) -> str:
    return next(p["text"] for p in request["messages"][0]["content"] if p["type"] == "text")


def test_http_retries_rate_limits_timeouts_and_5xx_and_records_malformed_answers():
    replies = {
        1: Reply(429, "slow down", {"Retry-After": "0"}),
        2: Reply(200, "", delay=1.5),  # longer than the client's timeout
        3: Reply(503, "overloaded"),
        4: answer("1. a red ball\nPATTERN: red objects"),
        5: Reply(200, "<html>not json</html>"),
        6: answer(""),
        7: answer("I think it is red."),
        8: Reply(400, '{"error": "bad request"}'),
    }
    with LoopbackChat(lambda body, n: replies[n]) as server:
        chat = HttpChat(url=server.url, model="scripted", api_key="k", timeout=0.5, backoff=0.01,
                        max_retries=4)  # fmt: skip
        explainer = ChatExplainer(chat)
        unit = synthetic_units(1, 2)[0]
        first = explainer.explain(unit)
        assert (first.label, first.status, first.requests) == ("red objects", "ok", 4)
        # The request: the model, images as PNG data URLs (before the text), and the key.
        request = server.requests[0]
        assert request["model"] == "scripted"
        parts = request["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
        assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert chat.complete("x", []).status == "malformed"
        assert chat.complete("x", []).status == "empty"
        unreadable = explainer.explain(unit)
        assert (unreadable.label, unreadable.status) == (None, "malformed")
        assert "I think it is red." in unreadable.raw
        refused = chat.complete("x", [])
        assert (refused.status, refused.requests) == ("error", 1)  # a 400 is not retried
        assert len(server.requests) == 8


def test_http_concurrency_is_capped(tmp_path):
    in_flight, peak = [0], [0]

    def script(body, n):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        in_flight[0] -= 1
        return answer("PATTERN: red" if "PATTERN" in _text(body) else "SCORE: 0.5")

    with LoopbackChat(script) as server:
        chat = HttpChat(url=server.url, model="m", max_concurrency=2, backoff=0.01)
        units = synthetic_units(6, 5)
        cache = tmp_path / "c.jsonl"
        records = label_units(units, ChatExplainer(chat), ChatJudge(chat), cache, max_workers=4)
    assert peak[0] <= 2
    assert [r["score"] for r in records] == [pytest.approx(0.5)] * 6
    assert [r["requests"] for r in records] == [11] * 6  # 1 explanation + 5 positives + 5 negatives


CHILD = UNITS_SRC + textwrap.dedent("""
    import os, sys
    from fluxsae.autointerp import ChatExplainer, ChatJudge, HttpChat, label_units
    chat = HttpChat(url=os.environ["URL"], model="scripted", backoff=0.01)
    label_units(synthetic_units(), ChatExplainer(chat), ChatJudge(chat), sys.argv[1])
""")


def test_http_labelling_killed_midway_resumes_without_asking_again(tmp_path):
    def script(body, n):
        time.sleep(0.01)
        if "PATTERN" in _text(body):
            return answer(f"PATTERN: pattern {n}")
        return answer("SCORE: 1.0")

    cache = tmp_path / "labels.jsonl"
    with LoopbackChat(script) as server:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(cache)], cwd=REPO,
                                 env={**os.environ, "URL": server.url})  # fmt: skip
        try:
            deadline = time.time() + 60
            while time.time() < deadline and (not cache.exists() or cache.read_text().count("\n") < 3):
                assert child.poll() is None, "the labelling child exited before it was killed"
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait()
        with open(cache, "a") as f:
            f.write('{"site": "transformer_blocks.3.image", "method": "sae", "feat')  # a torn line
        done = read_cache(cache)
        assert 3 <= len(done) < 12
        before = len(server.requests)
        chat = HttpChat(url=server.url, model="scripted", backoff=0.01)
        records = label_units(synthetic_units(), ChatExplainer(chat), ChatJudge(chat), cache)
        asked = server.requests[before:]
    explained = [r for r in asked if "PATTERN" in _text(r)]
    assert len(explained) == 12 - len(done)  # units labelled before the kill are not asked again
    assert [r["feature"] for r in records] == list(range(12))
    for r in records:
        assert r["status"] == "ok" and r["label"].startswith("pattern")
        assert r["score"] == pytest.approx(0.5)  # 5 positives at 1, 5 negatives at 1 - 1
    assert len(read_cache(cache)) == 12
    # A cache made by another explainer is refused rather than mixed.
    with pytest.raises(ValueError, match="mix two runs"):
        label_units(synthetic_units(), _Named("other"), _Named("other"), cache)


class _Named:
    def __init__(self, name):
        self.name = name


# -- the local VLM backend -------------------------------------------------------------------------


WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "PATTERN:", "SCORE:", "0.7",
         "red", "circle"]  # fmt: skip


def tiny_vlm():
    """A random LLaVA (CLIP vision tower + Llama) with a word-level tokenizer, built from configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=16, projection_dim=16)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=vocab["<image>"]))  # fmt: skip
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")  # fmt: skip
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default", chat_template=template,
        num_additional_image_tokens=1,
    )
    return model, processor, vocab


class ForceAnswer:
    """A logits processor (constrained decoding): the explainer prompt gets "PATTERN: red circle", the
    judge prompt "SCORE: 0.7", whatever the random weights say."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, input_ids, scores):
        ids = input_ids[0].tolist()
        start = len(ids) - ids[::-1].index(self.vocab["ASSISTANT:"])
        judge = self.vocab["SCORE:"] in ids[:start]
        script = ["SCORE:", "0.7"] if judge else ["PATTERN:", "red", "circle"]
        done = len(ids) - start
        forced = self.vocab[script[done]] if done < len(script) else self.vocab["</s>"]
        out = torch.full_like(scores, -float("inf"))
        out[:, forced] = 0.0
        return out


def test_local_vlm_explains_and_judges_end_to_end(tmp_path):
    from transformers import LogitsProcessorList

    from fluxsae.autointerp import TransformersVLM

    model, processor, vocab = tiny_vlm()
    force = {"logits_processor": LogitsProcessorList([ForceAnswer(vocab)])}
    forced = TransformersVLM(model=model, processor=processor, device="cpu", max_new_tokens=6,
                             generation_kwargs=force)  # fmt: skip
    units = synthetic_units(2, 3)
    records = label_units(units, ChatExplainer(forced, display_size=32), ChatJudge(forced, display_size=32),
                          tmp_path / "vlm.jsonl", n_positives=3, n_negatives=1)  # fmt: skip
    for r in records:
        assert (r["label"], r["status"], r["requests"]) == ("red circle", "ok", 1 + 3 + 1)
        assert r["judge_scores"] == [pytest.approx(0.7)] * 4
        assert r["score"] == pytest.approx((3 * 0.7 + 0.3) / 4)
    # Unconstrained, the random model cannot write a PATTERN line: recorded as malformed, no label.
    free = TransformersVLM(model=model, processor=processor, device="cpu", max_new_tokens=6,
                           generation_kwargs={"bad_words_ids": [[vocab["PATTERN:"]]]})  # fmt: skip
    got = ChatExplainer(free, display_size=32).explain(units[0])
    assert got.label is None and got.status in ("malformed", "empty")


class _Refuses:
    name = "refuses"

    def explain(self, unit):
        raise AssertionError("a unit with no examples must not be explained")

    def judge(self, example, explanation):
        raise AssertionError("nothing to judge")


def test_units_without_examples_get_no_label_and_units_with_few_are_not_judged(tmp_path):
    dead = UnitExamples("s", "sae", 0, ())
    records = label_units([dead], _Refuses(), _Refuses(), tmp_path / "c.jsonl")
    assert (records[0]["label"], records[0]["status"], records[0]["score"]) == (None, "no_examples", None)
    scenes = shapes.sample_scenes(40, seed=5)
    oracle = ShapesOracle.fit(_planted(scenes, [("color:red", "color:red")] * 2), scenes)
    red = [s for s in scenes if any(o.color == "red" for o in s.objects)]
    mask = [Concept(("color:red",)).masks([s])[0].reshape(8, 8).astype(np.float32) for s in red]
    shown = [Example(shapes.render(s), m, 1.0, i, s) for i, (s, m) in enumerate(zip(red, mask, strict=True))]
    units = [UnitExamples("s", "sae", 0, tuple(shown[:5])), UnitExamples("s", "sae", 1, tuple(shown[:2]))]
    full, few = label_units(units, oracle, oracle, tmp_path / "d.jsonl", n_negatives=1)
    assert full["label"] == few["label"] == "red"
    assert full["score"] == pytest.approx((5 * 1.0 + 0.0) / 6)  # the negative is red too: 1 - 1
    assert few["score"] is None and "not judged" in few["explanation"]
