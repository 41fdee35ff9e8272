"""The baseline the service must beat: a plain FastAPI server running one forward pass per text in a thread pool.

`python -m loadtest.plain_server MODEL_DIR PORT` serves `POST /classify` with the service's request and answer shape
(`{"texts": str | [str], "top_k": int | null, "truncate": bool}` -> `{"model", "results": [{"label", "score",
"labels", "tokens", "truncated"}]}`) and `GET /ready`, with no queue, no batching and no padding (a single text needs
none), in fp32, as a first server for a classifier is usually written. The benchmark and the report start it beside
the service; set `TORCH_THREADS` to give it the same torch threads as the service, and `DEVICE` (default `cpu`) to
run it where the service runs (`cuda` on a GPU host: loadtest/gpu_check.py).
"""

import os
import sys

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class Request(BaseModel):
    """The service's request body: one text or a list, how many labels to list per text, whether to truncate."""

    model_config = ConfigDict(extra="forbid")
    texts: str | list[str]
    top_k: int | None = None
    truncate: bool = True


def create_app(model_dir: str, device: str = "cpu") -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    labels = model.config.id2label
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    app = FastAPI()

    def classify_one(text: str, top_k: int | None, truncate: bool) -> dict | None:
        ids = tokenizer(text, truncation=False)["input_ids"]
        if len(ids) > max_length and not truncate:
            return None
        kept = ids[: max_length - 1] + ids[-1:] if len(ids) > max_length else ids  # keep the closing special token
        with torch.inference_mode():
            scores = model(input_ids=torch.tensor([kept], device=device)).logits.float().softmax(-1)[0].tolist()
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
        return {
            "label": labels[ranked[0]],
            "score": scores[ranked[0]],
            "labels": [{"label": labels[i], "score": scores[i]} for i in ranked],
            "tokens": len(kept),
            "truncated": len(kept) < len(ids),
        }

    @app.post("/classify")
    def classify(request: Request):  # a sync handler: FastAPI runs it in its thread pool
        texts = [request.texts] if isinstance(request.texts, str) else request.texts
        results = [classify_one(text, request.top_k, request.truncate) for text in texts]
        if None in results:
            return JSONResponse({"error": f"a text is longer than {max_length} tokens; send it shorter"}, 413)
        return {"model": model_dir, "results": results}

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    if os.environ.get("TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["TORCH_THREADS"]))
    uvicorn.run(create_app(sys.argv[1], os.environ.get("DEVICE", "cpu")), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
