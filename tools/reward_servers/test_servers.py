"""Checks of the parts of the reward servers that need no model weights: the protocol helper
(over real HTTP on loopback), the OCR reward formula and GenEval's prompt parsing and checks.

    python -m unittest tools/reward_servers/test_servers.py      (from the repository root)
    # or: cd tools/reward_servers && python -m unittest test_servers
"""

import base64
import io
import json
import os
import sys
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from PIL import Image  # noqa: E402

import geneval_server as geneval  # noqa: E402
import ocr_server as ocr  # noqa: E402
import protocol  # noqa: E402


def png_b64(color, size=(8, 6)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mean_red(images, prompts, metadata):
    return [protocol.Score(sum(im.tobytes()[0::3]) / (255 * im.width * im.height), im.width) for im in images]


class ProtocolTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        def broken(images, prompts, metadata):
            return []

        cls.server = protocol.start({"red": mean_red, "broken": broken}, port=0, max_batch_size=3)
        cls.url = f"http://127.0.0.1:{cls.server.server_address[1]}"

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()

    def post(self, body, path="/score"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as e:
            with e:
                return e.code, json.loads(e.read())

    def test_health(self):
        with urllib.request.urlopen(self.url + "/health", timeout=10) as reply:
            body = json.loads(reply.read())
        self.assertEqual(body, {"status": "ok", "rewards": ["broken", "red"], "max_batch_size": 3, "protocol": 1})

    def test_scores_in_order(self):
        body = {"reward": "red", "images": [png_b64((255, 0, 0)), png_b64((51, 9, 9), (5, 5))], "prompts": ["a", "b"]}
        status, reply = self.post(body)
        self.assertEqual(status, 200)
        self.assertEqual(reply, {"scores": [{"value": 1.0, "metric": 8.0}, {"value": 0.2, "metric": 5.0}]})

    def test_errors(self):
        ok = png_b64((0, 0, 0))
        cases = [
            (b"not json", 400, "not JSON"),
            ({"images": [], "prompts": []}, 400, "missing field `reward`"),
            ({"reward": "blue", "images": [], "prompts": []}, 404, "unknown reward `blue`"),
            ({"reward": "red", "images": [ok], "prompts": []}, 400, "differ in length"),
            ({"reward": "red", "images": [ok] * 4, "prompts": ["p"] * 4}, 413, "at most 3"),
            ({"reward": "red", "images": [ok, "@@@"], "prompts": ["p", "q"]}, 400, "images[1] is not valid base64"),
            ({"reward": "red", "images": [base64.b64encode(b"GIF89a").decode()], "prompts": ["p"]}, 400, "not a PNG"),
            ({"reward": "broken", "images": [ok], "prompts": ["p"]}, 500, "returned 0 scores for 1 images"),
        ]
        for body, status, message in cases:
            got_status, reply = self.post(body)
            self.assertEqual(got_status, status, (body, reply))
            self.assertIn(message, reply["error"])
        self.assertEqual(self.post({"reward": "red", "images": [ok, "@@@"], "prompts": ["p", "q"]})[1]["index"], 1)
        self.assertEqual(self.post({}, path="/other")[0], 404)


class OcrTest(unittest.TestCase):
    def test_reward_formula(self):
        self.assertEqual(ocr.quoted_target('a sign that says "Hello World" and "x"'), "Hello World")
        self.assertIsNone(ocr.quoted_target("no quotes"))
        self.assertEqual(ocr.levenshtein("kitten", "sitting"), 3)
        self.assertEqual(ocr.ocr_reward('a sign "Hello World"', "HELLO WORLD!!"), 1.0)  # substring
        self.assertAlmostEqual(ocr.ocr_reward('"hello"', "hallo"), 0.8)
        self.assertEqual(ocr.ocr_reward('"hello"', ""), 0.0)
        self.assertEqual(ocr.ocr_reward('"hi"', "xyz long"), 0.0)  # capped at len
        with self.assertRaises(ValueError):
            ocr.ocr_reward("no quotes", "x")

    def test_scorer_names_unscorable_inputs(self):
        class Engine:
            def read(self, image):
                return "flow opd"

        score = ocr.make_scorer(Engine())
        image = Image.new("RGB", (4, 4))
        self.assertEqual(score([image], ['"Flow OPD"'], [{}])[0].value, 1.0)
        with self.assertRaises(protocol.ProtocolError) as e:
            score([image, image], ['"a"', "none"], [{}, {}])
        self.assertEqual((e.exception.status, e.exception.index), (422, 1))


class GenevalTest(unittest.TestCase):
    def test_templates(self):
        p = geneval.parse_prompt
        self.assertEqual(p("a photo of a bench"), {"tag": "single_object", "include": [{"class": "bench", "count": 1}]})
        self.assertEqual(
            p("a photo of three computer mice"),
            {"tag": "counting", "include": [{"class": "mouse", "count": 3}], "exclude": [{"class": "mouse", "count": 4}]},
        )
        self.assertEqual(p("a photo of a purple wine glass")["include"], [{"class": "wine glass", "count": 1, "color": "purple"}])
        self.assertEqual(
            p("a photo of a red car and a blue bench"),
            {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}]},
        )
        self.assertEqual(
            p("a photo of a dog right of a teddy bear"),
            {"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]},
        )
        with self.assertRaises(ValueError):
            p("an oil painting of a unicorn")

    def test_relative_position(self):
        left, right = [0, 0, 10, 10], [20, 0, 30, 10]
        self.assertEqual(geneval.relative_position(left, right), {"left of"})
        self.assertEqual(geneval.relative_position(right, left), {"right of"})
        self.assertEqual(geneval.relative_position([0, 0, 10, 10], [0, 20, 10, 30]), {"above"})
        self.assertEqual(geneval.relative_position(left, [1, 1, 11, 11]), set())  # overlapping: no relation

    def test_partial_and_strict_credit(self):
        checks = geneval.parse_prompt("a photo of a red dog left of a cat")
        colors = lambda cls, boxes: ["red"] * len(boxes)  # noqa: E731
        dets = {"cat": [[20, 0, 30, 10]], "dog": [[0, 0, 10, 10]]}
        self.assertEqual(geneval.evaluate(checks, dets, colors), (1.0, 1.0))
        swapped = {"cat": [[0, 0, 10, 10]], "dog": [[20, 0, 30, 10]]}
        # cat count ok; dog count ok, colour ok, position wrong: 3 of 4 checks.
        self.assertEqual(geneval.evaluate(checks, swapped, colors), (0.75, 0.0))
        counting = geneval.parse_prompt("a photo of two cats")
        self.assertEqual(geneval.evaluate(counting, {"cat": [[0, 0, 1, 1]] * 3}, colors), (0.5, 0.0))
        self.assertEqual(geneval.evaluate(counting, {"cat": [[0, 0, 1, 1]] * 2}, colors), (1.0, 1.0))
        self.assertEqual(geneval.evaluate(counting, {}, colors), (0.5, 0.0))


if __name__ == "__main__":
    unittest.main()
