"""GenEval-style composition reward server.

Checks per prompt, as GenEval does (Ghosh et al. 2023, `evaluation/evaluate_images.py`):
objects present with the right counts (top detections per class above a confidence
threshold; 0.3, or 0.9 for counting prompts), colours (CLIP zero-shot on the object's crop
over GenEval's ten colours) and relative positions (box centres, offsets reduced by 0.1 x the
box sizes, direction within 45 degrees). `metric` is GenEval's strict 0/1; `value` is partial
credit: the fraction of individual checks passed (each include's count, its colour, its
position; each exclude).

The checks come from the request's `metadata` when it carries GenEval's `include` / `exclude`
(see docs/reward_protocol.md); otherwise the prompt is parsed with GenEval's six templates.

Models (transformers, downloaded from the HuggingFace Hub on first use):
detector `facebook/detr-resnet-101` (COCO's 80 classes, as GenEval's Mask2Former), colour
classifier `openai/clip-vit-large-patch14` (GenEval uses CLIP ViT-L/14 too). GenEval's
Mask2Former masks the background before colour classification; this server classifies the
box crop, which differs slightly on cluttered images.

    python geneval_server.py --port 8102 --device cuda
"""

from __future__ import annotations

import logging
import re

import numpy as np

from protocol import ProtocolError, Score, common_args, serve

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ["left of", "right of", "above", "below"]
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
POSITION_THRESHOLD = 0.1
MAX_OBJECTS = 16

COCO = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
# GenEval's prompt names for some COCO classes.
ALIASES = {
    "computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard", "television": "tv",
    "hair dryer": "hair drier", "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
    "doughnut": "donut", "cellphone": "cell phone", "baseball": "sports ball",
}  # fmt: skip
IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis", "scissors": "scissors"}


def plural(name: str) -> str:
    head, _, last = name.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    else:
        last += "s"
    return f"{head} {last}".strip()


def _names() -> dict[str, str]:
    """Every spelling (singular, plural, alias) -> COCO class."""
    names = {}
    for cls in COCO:
        names[cls] = cls
        names[plural(cls)] = cls
    for alias, cls in ALIASES.items():
        names[alias] = cls
        names[plural(alias)] = cls
    return names


NAMES = _names()
_NAME_RE = "|".join(sorted((re.escape(n) for n in NAMES), key=len, reverse=True))
_COLOR_RE = "|".join(COLORS)
_ARTICLE = r"(?:a|an)"
_REL_RE = "|".join(RELATIONS)


def parse_prompt(prompt: str) -> dict:
    """GenEval metadata (`tag`, `include`, `exclude`) from a prompt in one of GenEval's
    templates. Raises ValueError for anything else."""
    text = prompt.strip().lower().rstrip(".")
    text = re.sub(r"^(a photo of|an image of|a picture of)\s+", "", text)
    obj = rf"(?:({_COLOR_RE})\s+)?({_NAME_RE})"
    m = re.fullmatch(rf"{_ARTICLE}\s+{obj}\s+({_REL_RE})\s+{_ARTICLE}\s+{obj}", text)
    if m:
        c1, a, rel, c2, b = m.groups()
        first = {"class": NAMES[b], "count": 1}
        second = {"class": NAMES[a], "count": 1, "position": [rel, 0]}
        if c2:
            first["color"] = c2
        if c1:
            second["color"] = c1
        return {"tag": "position", "include": [first, second]}
    m = re.fullmatch(rf"{_ARTICLE}\s+{obj}\s+and\s+{_ARTICLE}\s+{obj}", text)
    if m:
        c1, a, c2, b = m.groups()
        include = [{"class": NAMES[a], "count": 1}, {"class": NAMES[b], "count": 1}]
        if c1:
            include[0]["color"] = c1
        if c2:
            include[1]["color"] = c2
        return {"tag": "color_attr" if (c1 or c2) else "two_object", "include": include}
    m = re.fullmatch(rf"({'|'.join(NUMBERS)})\s+{obj}", text)
    if m:
        number, color, name = m.groups()
        n = NUMBERS[number]
        req = {"class": NAMES[name], "count": n}
        if color:
            req["color"] = color
        return {"tag": "counting", "include": [req], "exclude": [{"class": NAMES[name], "count": n + 1}]}
    m = re.fullmatch(rf"{_ARTICLE}\s+{obj}", text)
    if m:
        color, name = m.groups()
        req = {"class": NAMES[name], "count": 1}
        if color:
            req["color"] = color
            return {"tag": "colors", "include": [req]}
        return {"tag": "single_object", "include": [req]}
    raise ValueError(f"prompt {prompt!r} is not in one of GenEval's templates and the request has no `include` metadata")


def relative_position(box_a, box_b) -> set[str]:
    """Relations of box A to box B (`[x0, y0, x1, y1]`, y down), GenEval's rule."""
    boxes = np.array([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(metadata: dict, detections: dict, classify_colors) -> tuple[float, float]:
    """(partial credit, strict 0/1) of one image.

    `detections`: class -> list of `[x0, y0, x1, y1]` boxes, most confident first, already
    thresholded. `classify_colors(class, boxes)` -> one colour name per box.
    """
    passed = total = 0
    strict = True
    groups: list = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        found = detections.get(cls, [])[:count]
        matched = len(found) >= count
        total += 1
        passed += matched
        if "color" in req:
            total += 1
            ok = matched and classify_colors(cls, found).count(req["color"]) == count
            passed += ok
            matched = matched and ok
        if "position" in req:
            relation, target = req["position"]
            total += 1
            target_boxes = groups[int(target)] if int(target) < len(groups) else None
            ok = (
                matched
                and target_boxes is not None
                and all(relation in relative_position(a, b) for a in found for b in target_boxes)
            )
            passed += ok
            matched = matched and ok
        strict = strict and matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        total += 1
        ok = len(detections.get(req["class"], [])) < int(req["count"])
        passed += ok
        strict = strict and ok
    if total == 0:
        raise ValueError("no checks: `include` and `exclude` are both empty")
    return passed / total, float(strict)


def checks_for(prompt: str, metadata: dict) -> dict:
    if metadata.get("include") or metadata.get("exclude"):
        checks = dict(metadata)
        for req in checks.get("include", []) + checks.get("exclude", []):
            req["class"] = NAMES.get(req["class"], req["class"])
            if req["class"] not in COCO:
                raise ValueError(f"unknown object class {req['class']!r} (not one of COCO's 80)")
        return checks
    return parse_prompt(prompt)


class Models:
    def __init__(self, device: str, detector: str, clip: str):
        import torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, CLIPModel, CLIPProcessor

        self.torch, self.device = torch, device
        self.det_processor = AutoImageProcessor.from_pretrained(detector)
        self.detector = AutoModelForObjectDetection.from_pretrained(detector).eval().to(device)
        self.id2label = {int(k): v for k, v in self.detector.config.id2label.items()}
        self.clip_processor = CLIPProcessor.from_pretrained(clip)
        self.clip = CLIPModel.from_pretrained(clip).eval().to(device)

    def detect(self, image, threshold: float) -> dict:
        torch = self.torch
        with torch.no_grad():
            inputs = self.det_processor(images=image, return_tensors="pt").to(self.device)
            outputs = self.detector(**inputs)
            size = torch.tensor([[image.height, image.width]], device=self.device)
            result = self.det_processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=size)[0]
        order = result["scores"].argsort(descending=True)[:MAX_OBJECTS]
        detections: dict = {}
        for i in order.tolist():
            label = self.id2label[int(result["labels"][i])]
            cls = NAMES.get(label, label)
            detections.setdefault(cls, []).append([float(v) for v in result["boxes"][i].tolist()])
        return detections

    def colors(self, image, cls: str, boxes) -> list[str]:
        torch = self.torch
        crops = [image.crop(tuple(int(round(v)) for v in box)) for box in boxes]
        texts = [f"a photo of a {c} {cls}" for c in COLORS]
        with torch.no_grad():
            inputs = self.clip_processor(text=texts, images=crops, return_tensors="pt", padding=True).to(self.device)
            logits = self.clip(**inputs).logits_per_image
        return [COLORS[i] for i in logits.argmax(dim=-1).tolist()]


def make_scorer(models: Models):
    def score(images, prompts, metadata):
        scores = []
        for i, (image, prompt, meta) in enumerate(zip(images, prompts, metadata)):
            try:
                checks = checks_for(prompt, meta)
            except ValueError as e:
                raise ProtocolError(422, str(e), i) from e
            threshold = COUNTING_THRESHOLD if checks.get("tag") == "counting" else THRESHOLD
            detections = models.detect(image, threshold)
            value, metric = evaluate(checks, detections, lambda cls, boxes: models.colors(image, cls, boxes))
            scores.append(Score(value, metric))
        return scores

    return score


def main():
    parser = common_args("GenEval-style composition reward server (flow-opd remote reward protocol)", 8102)
    parser.add_argument("--detector", default="facebook/detr-resnet-101")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    models = Models(args.device, args.detector, args.clip)
    serve({"geneval": make_scorer(models)}, args.host, args.port, args.max_batch_size)


if __name__ == "__main__":
    main()
