"""PickScore reward server (Kirstain et al. 2023), as Flow-GRPO computes it.

Model `yuvalkirstain/PickScore_v1` (a CLIP-H fine-tuned on Pick-a-Pic) with the processor of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, both from the HuggingFace Hub via transformers.
score = logit_scale.exp() * cos(text embedding, image embedding); value = score / 26 (the
training reward), metric = score (the paper's table, ~21-23 for SD3.5-M).

    python pickscore_server.py --port 8103 --device cuda --dtype float16
"""

from __future__ import annotations

import logging

from protocol import Score, common_args, serve

MODEL = "yuvalkirstain/PickScore_v1"
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
SCALE = 26.0


def _embedding(output):
    """transformers 4 returns the projected embedding; 5 returns an output whose
    `pooler_output` holds it."""
    return output if hasattr(output, "norm") else output.pooler_output


class PickScore:
    def __init__(self, device: str, dtype: str, model: str = MODEL, processor: str = PROCESSOR):
        import torch
        from transformers import AutoModel, AutoProcessor

        self.torch, self.device = torch, device
        self.dtype = getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = AutoModel.from_pretrained(model, torch_dtype=self.dtype).eval().to(device)

    def __call__(self, images, prompts) -> list[float]:
        torch = self.torch
        with torch.no_grad():
            image_inputs = self.processor(images=images, return_tensors="pt").to(self.device)
            image_inputs["pixel_values"] = image_inputs["pixel_values"].to(self.dtype)
            text_inputs = self.processor(
                text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
            ).to(self.device)
            image_embs = _embedding(self.model.get_image_features(**image_inputs)).float()
            text_embs = _embedding(self.model.get_text_features(**text_inputs)).float()
            image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            scores = self.model.logit_scale.exp().float() * (text_embs * image_embs).sum(dim=-1)
        return scores.cpu().tolist()


def make_scorer(model: PickScore):
    def score(images, prompts, metadata):
        return [Score(raw / SCALE, raw) for raw in model(images, prompts)]

    return score


def main():
    parser = common_args("PickScore reward server (flow-opd remote reward protocol)", 8103)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve({"pickscore": make_scorer(PickScore(args.device, args.dtype))}, args.host, args.port, args.max_batch_size)


if __name__ == "__main__":
    main()
