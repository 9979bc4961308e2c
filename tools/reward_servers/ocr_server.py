"""OCR reward server (docs/reference.md section 6, Flow-GRPO's OCR reward).

target = the prompt's text between its first pair of double quotes, lower-cased, spaces
removed; the recognised text gets the same normalisation; d = 0 if the target is a substring
of the recognised text, else the Levenshtein distance capped at len(target);
value = metric = 1 - d / len(target).

OCR engine: RapidOCR (`rapidocr-onnxruntime`, PP-OCR models converted to ONNX; the wheel
ships the weights, so nothing is downloaded at run time). Flow-GRPO used PaddleOCR with the
same PP-OCR model family; text lines are joined in reading order as it does.

    python ocr_server.py --port 8101
"""

from __future__ import annotations

import logging

import numpy as np

from protocol import ProtocolError, Score, common_args, serve


def quoted_target(prompt: str) -> str | None:
    """The text between the first pair of double quotes, or None when there is none."""
    start = prompt.find('"')
    if start < 0:
        return None
    end = prompt.find('"', start + 1)
    if end < 0:
        return None
    return prompt[start + 1 : end]


def normalise(text: str) -> str:
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character, cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_reward(prompt: str, recognised: str) -> float:
    """1 - d / len(target) (see the module doc). Raises ValueError when the prompt has no
    non-empty quoted text."""
    target = quoted_target(prompt)
    if target is None or not normalise(target):
        raise ValueError(f"prompt {prompt!r} has no text between double quotes")
    target, recognised = normalise(target), normalise(recognised)
    d = 0 if target in recognised else min(levenshtein(target, recognised), len(target))
    return 1.0 - d / len(target)


class RapidOcrEngine:
    def __init__(self, min_confidence: float = 0.0):
        from rapidocr_onnxruntime import RapidOCR  # imported here so the helpers above need no OCR

        self.engine = RapidOCR()
        self.min_confidence = min_confidence

    def read(self, image) -> str:
        result, _ = self.engine(np.asarray(image.convert("RGB")))
        if not result:
            return ""
        # [box, text, confidence] per line, in the detector's reading order.
        return "".join(text for _, text, confidence in result if float(confidence) > self.min_confidence)


def make_scorer(engine):
    def score(images, prompts, metadata):
        scores = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            if quoted_target(prompt) is None:
                raise ProtocolError(422, f"prompt {prompt!r} has no text between double quotes", i)
            try:
                value = ocr_reward(prompt, engine.read(image))
            except ValueError as e:
                raise ProtocolError(422, str(e), i) from e
            scores.append(Score(value, value))
        return scores

    return score


def main():
    parser = common_args("OCR reward server (flow-opd remote reward protocol)", 8101)
    parser.add_argument("--min-confidence", type=float, default=0.0, help="drop recognised lines below this confidence")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve({"ocr": make_scorer(RapidOcrEngine(args.min_confidence))}, args.host, args.port, args.max_batch_size)


if __name__ == "__main__":
    main()
