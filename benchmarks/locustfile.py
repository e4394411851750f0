"""Load test of the OpenAI-compatible API with locust: /v1/completions and streamed /v1/chat/completions.

    python serve.py ckpt=<chat-tuned checkpoint> port=8000          # in one shell
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 20s

Environment: GPT_API_KEY (the server's key, if it has one), GPT_MAX_TOKENS (default 32). The model id is read
from /v1/models. Against a base model (no chat template) the chat task streams /v1/completions instead.
Besides locust's own request rows, "TTFT" rows report each stream's time to its first text chunk (ms).
"""

import json
import os
import time

from locust import HttpUser, between, task

MAX_TOKENS = int(os.environ.get("GPT_MAX_TOKENS", "32"))
PROMPTS = ["ROMEO:", "To be, or not to be", "Friends, Romans, countrymen", "What light through yonder window"]


class OpenAIUser(HttpUser):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        key = os.environ.get("GPT_API_KEY")
        self.client.headers.update({"authorization": f"Bearer {key}"} if key else {})
        self.model = self.client.get("/v1/models", name="/v1/models").json()["data"][0]["id"]
        probe = self.client.post("/v1/chat/completions", name="/v1/chat/completions (probe)",
                                 json={"model": self.model, "max_tokens": 1,
                                       "messages": [{"role": "user", "content": "Hi"}]})
        self.chat = probe.status_code == 200
        self.turn = 0

    def _prompt(self) -> str:
        self.turn += 1
        return PROMPTS[self.turn % len(PROMPTS)]

    @task(3)
    def completion(self) -> None:
        with self.client.post("/v1/completions", catch_response=True,
                              json={"model": self.model, "prompt": self._prompt(), "max_tokens": MAX_TOKENS,
                                    "temperature": 0.8}) as r:
            if r.status_code != 200 or not r.json().get("choices"):
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def streamed_chat(self) -> None:
        if self.chat:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": self._prompt()}]}
        else:
            path, body = "/v1/completions", {"prompt": self._prompt()}
        body.update(model=self.model, max_tokens=MAX_TOKENS, temperature=0.8, stream=True)
        t0 = time.perf_counter()
        first = None
        with self.client.post(path, json=body, stream=True, catch_response=True, name=path + " (stream)") as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            done = False
            for line in r.iter_lines():
                if not line:
                    continue
                data = line.decode() if isinstance(line, bytes) else line
                if data == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(data.removeprefix("data: "))
                if "error" in chunk:
                    r.failure(chunk["error"]["message"])
                    return
                if first is None:
                    first = time.perf_counter() - t0
            if not done:
                r.failure("stream ended without data: [DONE]")
        if first is not None:
            self.environment.events.request.fire(request_type="TTFT", name=path + " (stream)",
                                                 response_time=first * 1000, response_length=0, exception=None,
                                                 context={})
