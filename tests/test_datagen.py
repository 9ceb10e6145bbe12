"""LLM-Seg40K generation: sampling, prompt, parsing/filtering, HTTP client, journal, end to end.

The end-to-end tests talk real HTTP to an OpenAI-compatible chat server started here on
127.0.0.1 (``http.server`` in a thread) that serves scripted replies, errors and stalls.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from llmseg_ros.data.llmseg40k import LLMSeg40KDataset
from llmseg_ros.data.rle import decode_rle
from llmseg_ros.datagen.coco import InstanceIndex, annotation_mask, image_group, sample_images
from llmseg_ros.datagen.config import CaptionConfig, DatagenConfig, LLMConfig, SamplingConfig
from llmseg_ros.datagen.journal import Journal
from llmseg_ros.datagen.llm import (
    ChatResult,
    LLMRequestError,
    OpenAIChatClient,
    Prices,
    UsageMeter,
    parse_retry_after,
    resolve_http_settings,
)
from llmseg_ros.datagen.parse import CategoryMatcher, RawPair, filter_qa_pairs, parse_qa_pairs
from llmseg_ros.datagen.prompt import EXAMPLE_PAIRS, RULES, build_messages, build_prompt

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "generate_dataset.py"


def _load_cli() -> Any:
    """The CLI script as a module (``training/`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("llmseg_generate_dataset_cli", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()

H, W = 16, 24

# ----------------------------------------------------------------------------- fixture data
CATEGORIES: list[tuple[int, str, list[str]]] = [
    (1, "boot", []),
    (2, "helmet", []),
    (3, "stop_sign", []),
    (4, "ashcan", ["trash_can", "dustbin"]),
    (5, "backpack", []),
    (6, "motorcycle", []),
    (7, "bow_(weapon)", []),
    (8, "cup", []),
    (9, "knife", []),
    (10, "saddlebag", []),
    (11, "mailbox", []),
    (12, "person", []),
]
IMAGES: dict[str, list[str]] = {  # file name -> category names (simple: 2-5, complex: > 5)
    "a.jpg": ["boot", "helmet", "stop_sign"],
    "b.jpg": ["ashcan", "backpack", "cup", "knife"],
    "c.jpg": ["motorcycle", "helmet"],
    "d.jpg": ["motorcycle", "person", "boot", "helmet", "saddlebag"],
    "e.jpg": ["boot", "helmet", "stop_sign", "ashcan", "saddlebag", "mailbox", "motorcycle"],
    "f.jpg": ["cup", "knife", "backpack", "person", "bow_(weapon)", "mailbox"],
    "g.jpg": ["person"],
}


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Column-major run lengths starting with zeros (COCO's uncompressed RLE), written by hand."""
    counts, current, run = [], 0, 0
    for value in mask.flatten(order="F").astype(np.uint8):
        if value != current:
            counts.append(run)
            current, run = int(value), 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def _coco_dataset() -> tuple[dict[str, Any], dict[tuple[str, str], np.ndarray]]:
    """Instance JSON mixing polygons, compressed and uncompressed RLE, with the reference unions."""
    rng = np.random.default_rng(7)
    cat_id = {name: cid for cid, name, _ in CATEGORIES}
    images, annotations = [], []
    union: dict[tuple[str, str], np.ndarray] = {}
    ann_id = 0
    for image_id, (file_name, names) in enumerate(IMAGES.items(), start=1):
        entry: dict[str, Any] = {"id": image_id, "height": H, "width": W}
        if file_name == "f.jpg":  # LVIS style: no file_name, only the COCO URL
            entry["coco_url"] = f"http://images.cocodataset.org/val2017/{file_name}"
        else:
            entry["file_name"] = file_name
        images.append(entry)
        for k, name in enumerate(names):
            union[(file_name, name)] = np.zeros((H, W), dtype=bool)
            for instance in range(2 if name == "boot" else 1):  # boots come in pairs: union of two
                x0, y0 = int(rng.integers(0, W - 6)), int(rng.integers(0, H - 6))
                x1, y1 = x0 + int(rng.integers(2, 6)), y0 + int(rng.integers(2, 6))
                style = (k + instance) % 3
                seg: Any
                if (file_name, name) == ("b.jpg", "knife"):  # a degenerate polygon: the knife has no pixel
                    seg, ref = [[x0, y0, x1, y1]], np.zeros((H, W), dtype=bool)
                elif style == 0:
                    seg = [[x0, y0, x1, y0, x1, y1, x0, y1]]
                    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, H, W))).astype(bool)
                else:
                    ref = np.zeros((H, W), dtype=bool)
                    ref[y0:y1, x0:x1] = True
                    if style == 1:
                        rle = mask_utils.encode(np.asfortranarray(ref.astype(np.uint8)))
                        seg = {"size": [H, W], "counts": rle["counts"].decode()}
                    else:
                        seg = _uncompressed_rle(ref)
                ann_id += 1
                annotations.append(
                    {"id": ann_id, "image_id": image_id, "category_id": cat_id[name], "segmentation": seg}
                )
                union[(file_name, name)] |= ref
    categories = [{"id": cid, "name": name, "synonyms": syn} for cid, name, syn in CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": categories}, union


# ----------------------------------------------------------------------------- scripted replies
REPLY_A = """1. [Q]: What keeps the riders' feet dry on a rainy ride? [A]: boot
2. [Q]: What protects a rider's head in a crash? [A]: helmet
3. [Q]: Which traffic device tells drivers to halt at the corner? [A]: stop_sign
4. [Q]: What footwear would suit a muddy trail here? [A]: Boots."""
REPLY_B = """Sure! Here are the pairs you asked for:
```json
[
  {"question": "Where should the leftover wrappers go?", "answer": "Trash cans"},
  {"question": "What could carry books on someone's back?", "answer": "backpack"},
  {"question": "What would hold a hot drink?"},
  {"question": "Which animal is grazing?", "answer": "unicorn"},
  {"question": "What holds a laptop for the commute?", "answer": "backpack"},
  {"question": "What bag would a hiker choose?", "answer": "BACKPACK"},
  {"question": "What can slice the bread?", "answer": "knife"}
]
```
Let me know if you need more."""
REPLY_C = """Q1: What does the rider lean into the curve on?
A1: motorcycle
Q2: What shields the rider's head?
A2: helmet"""
REPLY_D = """Here you go.

Question 1: Which motorcycle part holds the luggage?
Answer: saddlebag
Question 2: Which vehicle could take this traveller across the country?
Answer: motorcycle
Question 3: Who is getting ready for the ride?
Answer: the person
Question 4: Which motorcycle is parked by the road?
Answer: motorcycle
Question 5: What would the rider pull on before walking through puddles?"""
REPLY_E = """1. What keeps feet warm on a cold ride? - boot
2. What protects a skull during a fall? - helmet
3. What tells traffic to halt at the junction? - stop_sign
4. Where does the street litter end up? - ashcan
5. What carries spare clothes on the bike's side? - saddlebag
6. Where would a neighbour's letters be dropped off? - mailbox
7. What two-wheeled vehicle are they riding? - motorcycle"""
REPLY_F = "I'm sorry, but I cannot write questions about an image I cannot see."

EXPECTED: dict[str, list[tuple[str, str]]] = {
    "a.jpg": [
        ("What keeps the riders' feet dry on a rainy ride?", "boot"),
        ("What protects a rider's head in a crash?", "helmet"),
        ("Which traffic device tells drivers to halt at the corner?", "stop_sign"),
        ("What footwear would suit a muddy trail here?", "boot"),
    ],
    "b.jpg": [
        ("Where should the leftover wrappers go?", "ashcan"),
        ("What could carry books on someone's back?", "backpack"),
        ("What holds a laptop for the commute?", "backpack"),
    ],  # "What can slice the bread?" -> knife is dropped: its mask is empty
    "c.jpg": [
        ("What does the rider lean into the curve on?", "motorcycle"),
        ("What shields the rider's head?", "helmet"),
    ],
    "d.jpg": [
        ("Which motorcycle part holds the luggage?", "saddlebag"),
        ("Which vehicle could take this traveller across the country?", "motorcycle"),
        ("Who is getting ready for the ride?", "person"),
    ],
    "e.jpg": [
        ("What keeps feet warm on a cold ride?", "boot"),
        ("What protects a skull during a fall?", "helmet"),
        ("What tells traffic to halt at the junction?", "stop_sign"),
        ("Where does the street litter end up?", "ashcan"),
        ("What carries spare clothes on the bike's side?", "saddlebag"),
    ],
}


def _auto_reply(objects: list[str], key: str) -> str:
    return "\n".join(
        f"{i}. [Q]: Which thing number {i} in {key} matters? [A]: {o}" for i, o in enumerate(objects[:2], 1)
    )


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # stalled handlers write to clients that were killed; that is expected here


class FakeChatServer:
    """OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 with scripted behaviour per image.

    ``plans[key]`` is a list of actions taken on successive requests for ``key`` (the last
    one repeats): ``("reply", text)``, ``("status", code, headers[, delay_s])``, ``("raw", code, body)``
    or ``("close",)``. Keys: the caption's file name prefix, else the message text. Unplanned
    keys get an automatic well-formed reply. ``block_after = n`` stalls every successful
    reply after the n-th until ``release`` is set (then answers 503); ``reply_delay_s``
    delays every successful reply.
    """

    def __init__(self) -> None:
        self.plans: dict[str, list[tuple[Any, ...]]] = {}
        self.requests: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self.served_prompt = 0
        self.served_completion = 0
        self.ok = 0
        self.blocked = 0
        self.block_after: int | None = None
        self.reply_delay_s = 0.0
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _key_and_objects(prompt: str) -> tuple[str, list[str]]:
        blocks = re.findall(r"\[Description\]:\n(.*?)\n\n\[Objects\]:\n(.*?)\n", prompt, re.S)
        if not blocks:
            return prompt, []
        description, objects = blocks[-1]
        return description.split(":", 1)[0], objects.split(" | ")

    def handle(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        prompt = body["messages"][-1]["content"]
        key, objects = self._key_and_objects(prompt)
        with self.lock:
            self.headers.append(dict(handler.headers))
            self.bodies.append(body)
            count = self.requests[key]
            self.requests[key] += 1
            plan = self.plans.get(key, [("auto",)])
            action = plan[min(count, len(plan) - 1)]
            stall = False
            if action[0] in ("reply", "auto"):
                stall = self.block_after is not None and self.ok >= self.block_after
                self.blocked += stall
                self.ok += not stall
        if stall:
            self.release.wait(60)
            self._send(handler, 503, b'{"error": "stalled"}', {})
            return
        if action[0] == "close":
            handler.close_connection = True
            return
        if action[0] == "status":
            time.sleep(action[3] if len(action) > 3 else 0.0)
            self._send(
                handler,
                action[1],
                b'{"error": {"message": "scripted"}}',
                action[2] if len(action) > 2 else {},
            )
            return
        if action[0] == "raw":
            self._send(handler, action[1], action[2], {})
            return
        time.sleep(self.reply_delay_s)
        text = action[1] if action[0] == "reply" else _auto_reply(objects, key)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
        with self.lock:
            self.served_prompt += usage["prompt_tokens"]
            self.served_completion += usage["completion_tokens"]
        reply = {
            "id": "x",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        }
        self._send(handler, 200, json.dumps(reply).encode(), {})

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, payload: bytes, headers: dict[str, str]) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[FakeChatServer]:
    with FakeChatServer() as srv:
        yield srv


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Any]:
    data, union = _coco_dataset()
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in IMAGES:
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / name)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({name: f"{name}: two riders stop by the road." for name in IMAGES}))
    return {"ann": ann, "images": images, "captions": captions, "union": union, "dir": tmp_path}


def _cli_args(
    ws: dict[str, Any], srv: FakeChatServer, out: Path, *extra: str, vlm: Path | None = None
) -> list[str]:
    source = ["--captions", str(ws["captions"])] if vlm is None else ["--captioner", str(vlm)]
    return [
        "--annotations", str(ws["ann"]),
        *source,
        "--images", str(ws["images"]),
        "--out", str(out),
        "--num-simple", "4", "--num-complex", "2",
        "--llm-base-url", srv.base_url, "--llm-model", "test-model",
        "--retry-base-delay", "0.01", "--retry-max-delay", "0.05",
        "--no-progress", *extra,
    ]  # fmt: skip


def _journal_images(path: Path) -> list[str]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["file_name"] for line in lines if line["kind"] == "image"]


# ----------------------------------------------------------------------------- COCO / sampling
def test_index_reads_polygons_rle_and_lvis_urls(workspace: dict[str, Any]) -> None:
    index = InstanceIndex.from_file(workspace["ann"])
    assert {im.file_name for im in index.images.values()} == set(IMAGES)
    for (file_name, name), ref in workspace["union"].items():
        image = index.image_by_file_name(file_name)
        cid = next(c.id for c in index.categories.values() if c.name == name)
        np.testing.assert_array_equal(index.category_mask(image, cid), ref)
    assert index.category_names(index.image_by_file_name("d.jpg")) == IMAGES["d.jpg"]
    assert index.categories[4].synonyms == ("trash_can", "dustbin")


def test_sampling_groups_seeded_and_capped(
    workspace: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    index = InstanceIndex.from_file(workspace["ann"])
    cfg = SamplingConfig(num_simple=2, num_complex=1, seed=3)
    groups = {im.file_name: image_group(im, cfg) for im in index.images.values()}
    assert groups == {"a.jpg": "simple", "b.jpg": "simple", "c.jpg": "simple", "d.jpg": "simple",
                      "e.jpg": "complex", "f.jpg": "complex", "g.jpg": None}  # fmt: skip
    first, again = sample_images(index, cfg), sample_images(index, cfg)
    assert [im.file_name for _, im in first.all()] == [im.file_name for _, im in again.all()]
    assert (len(first.simple), len(first.complex), first.available_simple, first.available_complex) == (
        2,
        1,
        4,
        2,
    )
    seeds = {
        tuple(im.file_name for _, im in sample_images(index, SamplingConfig(2, 1, seed=s)).all())
        for s in range(8)
    }
    assert len(seeds) > 1  # the seed changes the draw
    capped = sample_images(index, SamplingConfig(num_simple=10, num_complex=0))
    assert sorted(im.file_name for im in capped.simple) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert "only 4 exist" in caplog.text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"images": [], "annotations": []}, "need a list under 'categories'"),
        ({"images": [{"id": 1, "height": 4, "width": 4}], "annotations": [], "categories": []}, "neither 'file_name'"),
        (
            {"images": [{"id": 1, "file_name": "x.jpg", "height": 4, "width": 4}],
             "annotations": [{"id": 9, "image_id": 2, "category_id": 1}],
             "categories": [{"id": 1, "name": "cup"}]},
            "refers to unknown image_id 2",
        ),
    ],
)  # fmt: skip
def test_index_rejects_bad_annotations(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InstanceIndex.from_dict(data)


def test_annotation_mask_errors() -> None:
    with pytest.raises(ValueError, match="flat list of x, y pairs"):
        annotation_mask({"id": 1, "segmentation": [[1, 2, 3]]}, 4, 4)
    with pytest.raises(ValueError, match=r"RLE size \[2, 2\] differs"):
        annotation_mask({"id": 1, "segmentation": {"size": [2, 2], "counts": [4]}}, 4, 4)
    with pytest.raises(ValueError, match="no polygon or RLE"):
        annotation_mask({"id": 1, "bbox": [0, 0, 2, 2]}, 4, 4)


# ----------------------------------------------------------------------------- prompt
def test_prompt_carries_rules_example_and_query() -> None:
    prompt = build_prompt("A man rides a bike.", ["bicycle", "stop_sign"], num_questions=5)
    for i, rule in enumerate(RULES, start=1):
        assert f"{i}. {rule}" in prompt
    assert len(RULES) == 7
    assert prompt.count("[Q]:") == len(EXAMPLE_PAIRS) == 5
    assert prompt.endswith(
        "[Description]:\nA man rides a bike.\n\n[Objects]:\nbicycle | stop_sign\n\n[Questions]:\n"
    )
    assert "Write 5 question-and-answer pairs" in prompt
    # the worked example obeys its own rules: answers on the list, no name in its question, <= 2 per answer
    example = parse_qa_pairs(prompt.split("[Questions]:\n")[1])
    objects = re.findall(r"\[Objects\]:\n(.*)\n", prompt)[0].split(" | ")
    kept, report = filter_qa_pairs(example, CategoryMatcher({name: [] for name in objects}))
    assert report.kept == report.parsed == 5
    assert [(k.question, k.answer) for k in kept] == list(EXAMPLE_PAIRS)
    assert build_messages("x", ["cup"]) == [{"role": "user", "content": build_prompt("x", ["cup"])}]
    with pytest.raises(ValueError, match="description must be a non-empty string"):
        build_prompt("  ", ["cup"])
    with pytest.raises(ValueError, match="categories must be a non-empty list"):
        build_prompt("x", [])


# ----------------------------------------------------------------------------- parsing / filtering
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("1. [Q]: Which? [A]: boot\n2. [Q]: What? [A]: ashcan.", [("Which?", "boot"), ("What?", "ashcan.")]),
        ("Q: Which?\nA: boot\n\nQ: What?\n", [("Which?", "boot"), ("What?", None)]),
        ("**Question 1:**\nWhich?\n**Answer:** boot", [("Which?", "boot")]),
        ('```json\n{"questions": [{"Q": "Which?", "A": "boot"}]}\n```', [("Which?", "boot")]),
        ('Here: [["Which?", "boot"], ["What?", null]] done', [("Which?", "boot"), ("What?", None)]),
        ("Intro text.\n1) Which? helmet\n2) What is that?\n(3) Who? - person", [("Which?", "helmet"), ("What is that?", None), ("Who?", "person")]),
        ("No questions today.", []),
        ("- [Q]: Which?\n  - [A]: boot", [("Which?", "boot")]),
    ],
)  # fmt: skip
def test_parse_formats(reply: str, expected: list[tuple[str, str | None]]) -> None:
    assert [(p.question, p.answer) for p in parse_qa_pairs(reply)] == expected


def test_matcher_normalises_and_refuses_ambiguity() -> None:
    m = CategoryMatcher({"stop_sign": [], "ashcan": ["trash_can"], "bow_(weapon)": [], "bow_(ribbon)": [],
                         "knife": [], "glass": [], "glasses": [], "person": [], "berry": [], "bus": []})  # fmt: skip
    cases = {
        "Stop Sign": "stop_sign", "stop-signs": "stop_sign", "the stop_sign.": "stop_sign",
        "Trash cans": "ashcan", "ASHCAN": "ashcan", '"knives"': "knife", "glasses": "glasses", "glass": "glass",
        "people": "person", "berries": "berry", "buses": "bus", "bow_(weapon)": "bow_(weapon)",
        "bow": None, "unicorn": None, "": None, "boot, helmet": None,
        "It is the knife. It cuts things.": "knife",
    }  # fmt: skip
    assert {answer: m.match(answer) for answer in cases} == cases
    assert m.mentions("Where are the trash cans?", "ashcan")
    assert m.mentions("Which STOP-SIGN is red?", "stop_sign")
    assert not m.mentions("Which sign tells you to stop?", "stop_sign")


def test_filter_limits_and_report() -> None:
    m = CategoryMatcher({"boot": [], "helmet": [], "cup": []})
    pairs = [
        RawPair(f"Which item {i}?", a)
        for i, a in enumerate(["boot", "boots", "Boot", "helmet", None, "tree"])
    ]
    pairs += [
        RawPair("Which item 3?", "cup"),
        RawPair("Where is the cup?", "cup"),
        RawPair("What holds tea?", "cup"),
    ]
    kept, report = filter_qa_pairs(pairs, m, max_per_answer=2, max_questions=4)
    assert [(k.question, k.answer) for k in kept] == [
        ("Which item 0?", "boot"), ("Which item 1?", "boot"), ("Which item 3?", "helmet"), ("What holds tea?", "cup"),
    ]  # fmt: skip
    assert report.to_dict() == {
        "parsed": 9, "kept": 4, "missing_answer": 1, "unknown_answer": 1, "duplicate_question": 1,
        "name_in_question": 1, "over_answer_limit": 1, "over_question_limit": 0, "empty_mask": 0,
    }  # fmt: skip
    kept, report = filter_qa_pairs(pairs, m, max_per_answer=2, max_questions=2, drop_name_leaks=False)
    assert len(kept) == 2 and report.over_question_limit == 4


# ----------------------------------------------------------------------------- HTTP client
def test_client_retries_and_honours_retry_after(server: FakeChatServer) -> None:
    server.plans = {
        "ra": [("status", 429, {"Retry-After": "3"}), ("reply", "ok ra")],
        "e500": [("status", 500), ("status", 502), ("reply", "ok e500")],
        "conn": [("close",), ("reply", "ok conn")],
        "junk": [("raw", 200, b"<html>gateway</html>"), ("reply", "ok junk")],
        "bad": [("status", 400)],
        "down": [("status", 503)],
    }
    delays: list[float] = []
    client = OpenAIChatClient(server.base_url, "m", "sk-test", max_retries=2, backoff_base_s=0.1,
                              backoff_max_s=10.0, sleep=delays.append, seed=0)  # fmt: skip
    meter = UsageMeter(Prices(2.0, 4.0))
    result = client.complete([{"role": "user", "content": "ra"}])
    assert (result.text, result.attempts) == ("ok ra", 2) and delays == [3.0]  # Retry-After wins over backoff
    for key, attempts in (("e500", 3), ("conn", 2), ("junk", 2)):
        delays.clear()
        result = client.complete([{"role": "user", "content": key}])
        assert (result.text, result.attempts) == (f"ok {key}", attempts)
        assert [0.05 * 2**k <= d <= 0.1 * 2**k for k, d in enumerate(delays)] == [True] * (attempts - 1)
        meter.add(result)
    with pytest.raises(LLMRequestError, match="HTTP 400") as bad:
        client.complete([{"role": "user", "content": "bad"}])
    assert (bad.value.status, bad.value.attempts, server.requests["bad"]) == (400, 1, 1)
    with pytest.raises(LLMRequestError, match="after 3 attempts: HTTP 503") as down:
        client.complete([{"role": "user", "content": "down"}])
    assert (down.value.status, server.requests["down"]) == (503, 3)
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert server.bodies[0] == {
        "model": "m",
        "messages": [{"role": "user", "content": "ra"}],
        "max_tokens": 1024,
    }
    usage = (
        meter.snapshot()
    )  # usage as served: prompt = words of the message, completion = words of the reply
    assert (usage.requests, usage.attempts, usage.prompt_tokens, usage.completion_tokens) == (3, 7, 3, 6)
    assert usage.cost == pytest.approx(3 / 1000 * 2.0 + 6 / 1000 * 4.0)


def test_client_connection_refused_gives_up() -> None:
    client = OpenAIChatClient("http://127.0.0.1:9/v1", "m", max_retries=1, backoff_base_s=0.0, timeout_s=2)
    with pytest.raises(LLMRequestError, match="after 2 attempts") as err:
        client.complete([{"role": "user", "content": "x"}])
    assert err.value.status is None


def test_settings_from_config_and_environment() -> None:
    env = {"OPENAI_BASE_URL": "http://a/v1/", "LLMSEG_LLM_BASE_URL": "http://b/v1", "OPENAI_API_KEY": "k1",
           "OPENAI_MODEL": "m-env"}  # fmt: skip
    assert resolve_http_settings(LLMConfig(), env) == ("http://b/v1", "m-env", "k1")
    assert resolve_http_settings(LLMConfig(base_url="http://c/", model="m", api_key="k"), env) == (
        "http://c",
        "m",
        "k",
    )
    assert resolve_http_settings(LLMConfig(), {}) == ("https://api.openai.com/v1", "gpt-4", None)
    with pytest.raises(ValueError, match="must start with http"):
        resolve_http_settings(LLMConfig(base_url="ftp://x"), {})
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: SamplingConfig(num_simple=0, num_complex=0), "num_simple \\+ num_complex must be >= 1"),
        (
            lambda: SamplingConfig(complex_min_categories=5),
            "complex_min_categories must be > simple_max_categories",
        ),
        (lambda: CaptionConfig(), "exactly one of caption model and captions_path"),
        (lambda: LLMConfig(base_url="http://x", local_model="m"), "set either local_model"),
        (lambda: LLMConfig(backoff_base_s=5, backoff_max_s=1), "backoff must satisfy"),
        (lambda: DatagenConfig("a.json", "o.json", CaptionConfig(model="vlm")), "images_dir is required"),
        (
            lambda: DatagenConfig("a.json", "o.json", CaptionConfig(captions_path="c"), workers=0),
            "workers must be >= 1",
        ),
    ],
)
def test_config_validation(factory: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


# ----------------------------------------------------------------------------- journal
def test_journal_cuts_torn_tail_and_refuses_other_samples(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.open(path, "abc")
    journal.append({"file_name": "a.jpg", "record": {}})
    with pytest.raises(ValueError, match="already in the journal"):
        journal.append({"file_name": "a.jpg"})
    with path.open("ab") as fh:
        fh.write(b'{"kind": "image", "file_na')  # a write cut short by a kill
    again = Journal.open(path, "abc")
    assert list(again.entries) == ["a.jpg"] and path.read_bytes().endswith(b"\n")
    again.append({"file_name": "b.jpg", "record": {}})
    assert _journal_images(path) == ["a.jpg", "b.jpg"]
    with pytest.raises(ValueError, match="different sample"):
        Journal.open(path, "xyz")


# ----------------------------------------------------------------------------- end to end
def test_end_to_end_over_http(
    workspace: dict[str, Any], server: FakeChatServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.plans = {
        "a.jpg": [("reply", REPLY_A)],
        "b.jpg": [("reply", REPLY_B)],
        "c.jpg": [("status", 429, {"Retry-After": "0"}), ("reply", REPLY_C)],
        "d.jpg": [("status", 500), ("reply", REPLY_D)],
        "e.jpg": [("reply", REPLY_E)],
        "f.jpg": [("reply", REPLY_F)],
    }
    out = workspace["dir"] / "llmseg40k_train.json"
    rc = cli.main(_cli_args(workspace, server, out, "--workers", "3", "--prices", "0.5,1.5"))
    assert rc == 0
    assert "questions per image    3.40" in capsys.readouterr().out

    data = json.loads(out.read_text())
    assert set(data) == set(EXPECTED)  # f.jpg kept no question, g.jpg has one category
    for name, pairs in EXPECTED.items():
        record = data[name]
        assert record["from_dataset"] == "coco"
        assert record["caption"] == f"{name}: two riders stop by the road."
        assert [(qa["question"], qa["answer"]) for qa in record["qa_pairs"]] == pairs
        for qa in record["qa_pairs"]:
            np.testing.assert_array_equal(
                decode_rle(qa["rle_seg"]).astype(bool), workspace["union"][(name, qa["answer"])]
            )
    dataset = LLMSeg40KDataset(out, workspace["images"])  # the project's reader accepts the file
    assert len(dataset) == 17
    sample = dataset[next(i for i, e in enumerate(dataset.entries) if e.image_name == "a.jpg")]
    np.testing.assert_array_equal(sample.mask.astype(bool), workspace["union"][("a.jpg", "boot")])
    assert sample.instruction == EXPECTED["a.jpg"][0][0]

    stats = json.loads((workspace["dir"] / "llmseg40k_train.stats.json").read_text())
    questions = [q for pairs in EXPECTED.values() for q, _ in pairs]
    assert (stats["images"], stats["images_processed"], stats["images_without_questions"]) == (5, 6, 1)
    assert (stats["questions"], stats["questions_per_image"]) == (17, pytest.approx(17 / 5))
    assert stats["words_per_question"] == pytest.approx(sum(len(q.split()) for q in questions) / 17)
    assert stats["categories"] == 8
    assert stats["groups"] == {"simple": 4, "complex": 1}
    assert stats["sampled"] == {"simple": 4, "complex": 2, "available_simple": 4, "available_complex": 2}
    assert stats["filter"] == {
        "parsed": 25, "kept": 17, "missing_answer": 2, "unknown_answer": 1, "duplicate_question": 0,
        "name_in_question": 1, "over_answer_limit": 1, "over_question_limit": 2, "empty_mask": 1,
    }  # fmt: skip
    usage = stats["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        server.served_prompt,
        server.served_completion,
    )
    assert usage["cost"] == pytest.approx(
        server.served_prompt / 1000 * 0.5 + server.served_completion / 1000 * 1.5
    )
    assert (usage["requests"], usage["attempts"]) == (6, 8)  # one retry each for c.jpg (429) and d.jpg (500)
    assert stats["usage_this_run"] == usage
    assert server.requests == {"a.jpg": 1, "b.jpg": 1, "c.jpg": 2, "d.jpg": 2, "e.jpg": 1, "f.jpg": 1}

    # a second run finds everything done: no request, same output
    before = out.read_bytes()
    assert cli.main(_cli_args(workspace, server, out)) == 0
    assert sum(server.requests.values()) == 8 and out.read_bytes() == before


def test_cli_reports_bad_input(
    workspace: dict[str, Any], server: FakeChatServer, capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace["dir"] / "bad.json"
    workspace["captions"].write_text(json.dumps({"a.jpg": "a.jpg: a road."}))
    assert cli.main(_cli_args(workspace, server, out)) == 2
    assert "5 sampled images have no precomputed caption" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main([*_cli_args(workspace, server, out), "--llm-local", "some/model"])
    assert exc.value.code == 2
    assert "set either local_model ('some/model') or base_url" in capsys.readouterr().err
    assert sum(server.requests.values()) == 0 and not out.exists()


def test_failed_images_are_retried_on_the_next_run(workspace: dict[str, Any], server: FakeChatServer) -> None:
    server.plans = {"b.jpg": [("status", 400)]}
    out = workspace["dir"] / "out.json"
    assert cli.main(_cli_args(workspace, server, out)) == 1
    assert "b.jpg" not in json.loads(out.read_text())
    assert "b.jpg" not in _journal_images(Path(f"{out}.journal.jsonl"))
    server.plans = {}
    assert cli.main(_cli_args(workspace, server, out)) == 0
    assert set(json.loads(out.read_text())) == {"a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"}
    assert server.requests == {"a.jpg": 1, "b.jpg": 2, "c.jpg": 1, "d.jpg": 1, "e.jpg": 1, "f.jpg": 1}


def test_refused_credentials_stop_the_run(workspace: dict[str, Any], server: FakeChatServer) -> None:
    server.plans = {name: [("status", 401, {}, 0.3)] for name in IMAGES}  # slow refusals
    out = workspace["dir"] / "out.json"
    assert cli.main(_cli_args(workspace, server, out, "--workers", "1")) == 2
    assert sum(server.requests.values()) <= 2 and not out.exists()  # stopped at the first refusal


def test_killed_run_resumes_without_duplicates_or_losses(
    workspace: dict[str, Any], server: FakeChatServer
) -> None:
    out = workspace["dir"] / "killed.json"
    journal = Path(f"{out}.journal.jsonl")
    args = [sys.executable, str(SCRIPT), *_cli_args(workspace, server, out, "--workers", "2")]
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    server.block_after = 3  # three images get answers, then every request stalls
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if journal.exists() and len(_journal_images(journal)) >= 3 and server.blocked >= 2:
                break
            assert proc.poll() is None, "the generator exited before it was killed"
            time.sleep(0.05)
        else:
            pytest.fail("the generator did not reach three finished images")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = _journal_images(journal)
    assert len(first) == 3 and not out.exists()
    with journal.open("ab") as fh:
        fh.write(b'{"kind": "image", "file_name": "x')  # as if the kill had torn a line
    server.block_after = None
    server.release.set()

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = _journal_images(journal)
    assert sorted(names) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]  # each exactly once
    assert names[:3] == first
    assert set(json.loads(out.read_text())) == set(names)
    for name in first:  # finished before the kill: never asked again
        assert server.requests[name] == 1
    stats = json.loads((workspace["dir"] / "killed.stats.json").read_text())
    assert stats["images_processed"] == 6 and stats["usage"]["requests"] == 6


# ----------------------------------------------------------------------------- local models
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmseg_ros.tiny.vlm import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "model", seed=0)


def test_vlm_captioner_feeds_the_pipeline(
    tiny_llava: Path, workspace: dict[str, Any], server: FakeChatServer
) -> None:
    from llmseg_ros.datagen.caption import VLMCaptioner

    captioner = VLMCaptioner(str(tiny_llava), max_new_tokens=6, device="cpu")
    image = np.asarray(Image.open(workspace["images"] / "a.jpg").convert("RGB"))
    text = captioner.describe(image)
    assert isinstance(text, str) and text == captioner.describe(image)  # greedy: deterministic
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        captioner.describe(image[..., 0])

    out = workspace["dir"] / "vlm.json"
    extra = ("--device", "cpu", "--caption-max-new-tokens", "6", "--num-simple", "1", "--num-complex", "0")
    assert cli.main(_cli_args(workspace, server, out, *extra, vlm=tiny_llava)) == 0
    data = json.loads(out.read_text())
    assert len(data) == 1
    name, record = next(iter(data.items()))
    assert record["caption"] == captioner.describe(
        np.asarray(Image.open(workspace["images"] / name).convert("RGB"))
    )


def test_local_transformers_llm(tiny_llava: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmseg_ros.datagen.clients import build_client
    from llmseg_ros.datagen.local_llm import TransformersChatClient

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")

    client = build_client(LLMConfig(local_model=str(tmp_path / "lm"), max_tokens=5, device="cpu"))
    assert isinstance(client, TransformersChatClient)
    messages = [{"role": "user", "content": build_prompt("A kitchen.", ["cup", "knife"])}]
    result = client.complete(messages)
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert result.prompt_tokens == len(tokenizer(expected_prompt, add_special_tokens=False)["input_ids"])
    assert result.completion_tokens in range(1, 6)
    assert client.complete(messages) == result  # greedy decoding repeats
    client.tokenizer.chat_template = None  # no template: "role: content" lines, then "assistant:"
    plain = f"user: {messages[0]['content']}\nassistant:"
    assert client.complete(messages).prompt_tokens == len(tokenizer(plain)["input_ids"])
    meter = UsageMeter(Prices(1.0, 1.0))
    meter.add(result)
    assert meter.snapshot().cost == pytest.approx((result.prompt_tokens + result.completion_tokens) / 1000)
    assert isinstance(result, ChatResult)


def test_vlm_captioner_loads_other_chat_vlms(tmp_path: Path) -> None:
    from llmseg_ros.datagen.caption import VLMCaptioner, build_caption_source
    from llmseg_ros.tiny.qwen import save_tiny_qwen2_5_vl

    directory = save_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0)
    captioner = build_caption_source(CaptionConfig(model=str(directory), max_new_tokens=4, device="cpu"))
    assert isinstance(captioner, VLMCaptioner)
    assert type(captioner.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert "Describe what this image shows" in captioner._prompt_text()  # through the model's own template
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    image.save(tmp_path / "x.png")
    assert captioner.caption("x.png", tmp_path / "x.png") == captioner.describe(image)
    with pytest.raises(ValueError, match="cannot read image"):
        captioner.caption("y.png", tmp_path / "y.png")
