"""What `make demo` prints after scoring and while serving.

python jobs/demo_check.py accuracy out/scores data/digits/test   # accuracy from scored Parquet
python jobs/demo_check.py requests 8000 data/digits/test         # a few requests, both routes
python jobs/demo_check.py generations out/gen 3                  # batch completions, first few
python jobs/demo_check.py completions 8000 tiny-gpt              # the OpenAI client, 3 routes
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq


def accuracy(scores: str, data: str) -> int:
    """Join the scored rows to the labels by their `file:row` key and print the accuracy."""
    scored = pq.read_table(sorted(Path(scores).glob("*.parquet"))).to_pylist()
    labels = {}
    for part in sorted(Path(data).glob("*.parquet")):
        for row, label in enumerate(pq.read_table(part, columns=["label"]).column(0).to_pylist()):
            labels[f"{part.name}:{row}"] = label
    hits = sum(labels[row["key"]] == row["prediction"] for row in scored)
    print(f"scored {len(scored)} rows with {scored[0]['model']}: accuracy {hits / len(scored):.4f}")
    return 0 if len(scored) == len(labels) else 1


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_ready(base: str) -> bool:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/v2/health/ready", timeout=5)
            return True
        except OSError:
            if time.monotonic() > deadline:
                print("endpoint did not become ready in 120 s", file=sys.stderr)
                return False
            time.sleep(1)


def requests(port: str, data: str) -> int:
    """Wait for the endpoint, send three test rows through the OIP and :predict routes, then
    the whole test split through :predict."""
    base = f"http://127.0.0.1:{port}"
    if not _wait_ready(base):
        return 1
    table = pq.read_table(sorted(Path(data).glob("*.parquet"))[0]).slice(0, 3)
    labels = table.column("label").to_pylist()
    rows = table.drop(["label"]).to_pylist()
    friendly = _post(f"{base}/v1/models/digits-mlp:predict", {"instances": rows})
    print("POST /v1/models/digits-mlp:predict ->", json.dumps(friendly)[:300], "...")
    features = list(rows[0])
    infer = {
        "inputs": [
            {
                "name": "input-0",
                "shape": [len(rows), len(features)],
                "datatype": "FP32",
                "data": [[row[f] for f in features] for row in rows],
            }
        ]
    }
    oip = _post(f"{base}/v2/models/digits-mlp/infer", infer)
    prediction = next(out for out in oip["outputs"] if out["name"] == "prediction")
    print("POST /v2/models/digits-mlp/infer -> prediction", prediction["data"], "labels", labels)
    # The whole test split, 60 rows a request: live traffic for `kiln monitor` to compare with
    # the training profile.
    test = pq.read_table(sorted(Path(data).glob("*.parquet"))).drop(["label"]).to_pylist()
    for start in range(0, len(test), 60):
        _post(f"{base}/v1/models/digits-mlp:predict", {"instances": test[start : start + 60]})
    print(f"POST /v1/models/digits-mlp:predict x{-(-len(test) // 60)}: {len(test)} test rows")
    return 0


def generations(out: str, count: str) -> int:
    """Print the first `count` rows of a `kiln score --task generate` output."""
    rows = pq.read_table(sorted(Path(out).glob("*.parquet"))).to_pylist()
    for row in rows[: int(count)]:
        print(f"{row['key']}: {row['prompt']!r} -> {row['completion']!r} ({row['finish_reason']})")
    print(f"{len(rows)} completions by {rows[0]['model']}")
    return 0


def completions(port: str, model: str) -> int:
    """The official OpenAI client against kiln: /v1/models, a completion (whole and streamed,
    which must agree) and a chat completion."""
    from openai import OpenAI

    base = f"http://127.0.0.1:{port}"
    if not _wait_ready(base):
        return 1
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    print("GET /v1/models ->", [m.id for m in client.models.list().data])
    prompt = "def read_file(path):"
    done = client.completions.create(model=model, prompt=prompt, max_tokens=48, temperature=0)
    print(f"POST /v1/completions {prompt!r} -> {done.choices[0].text!r} {done.usage}")
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=48, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    print("streamed (SSE) text is the same:", streamed == done.choices[0].text)
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "import os"}],
        max_tokens=32,
        temperature=0,
    )
    print("POST /v1/chat/completions ->", repr(chat.choices[0].message.content))
    return 0 if streamed == done.choices[0].text else 1


if __name__ == "__main__":
    commands = {
        "accuracy": accuracy,
        "requests": requests,
        "generations": generations,
        "completions": completions,
    }
    if len(sys.argv) != 4 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]](sys.argv[2], sys.argv[3]))
