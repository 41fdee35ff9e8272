"""The baseline the service must beat: a plain FastAPI server running one forward pass per request in a thread pool.

`python loadtest/plain_server.py MODEL_DIR PORT` serves POST /classify {"texts": "one text"} with no queue, no
batching and no padding (a single text needs none). The benchmark starts it beside the service.
"""

import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class Request(BaseModel):
    texts: str | list[str]


def create_app(model_dir: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    labels = model.config.id2label
    app = FastAPI()

    @app.post("/classify")
    def classify(request: Request) -> dict:  # a sync handler: FastAPI runs it in its thread pool
        texts = [request.texts] if isinstance(request.texts, str) else request.texts
        results = []
        for text in texts:
            inputs = tokenizer(text, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                scores = model(**inputs).logits.float().softmax(-1)[0]
            best = int(scores.argmax())
            results.append({"label": labels[best], "score": float(scores[best])})
        return {"results": results}

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
