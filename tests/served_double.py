"""A small OpenAI-compatible completions server backed by a local transformers model, for the
default suite (no vLLM needed): ``/v1/models`` and ``/v1/completions`` with vLLM's extensions that
``minidistill.teacher.served`` uses (``prompt_logprobs``, ``return_token_ids``). Its answers are
computed by an HF forward, so a served teacher's numbers can be compared with the local teacher's.
``fail_next`` makes the next requests answer 500, ``delay_s`` delays every answer (timeouts).
The real server is tested in tests/vllm_tests/."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class Double:
    def __init__(self, model, tokenizer, name: str = "tiny", max_logprobs: int = 20):
        self.model, self.tokenizer, self.name, self.max_logprobs = model.eval(), tokenizer, name, max_logprobs
        self.fail_next, self.delay_s, self.requests = 0, 0.0, 0
        self.fail_from: int | None = None  # every POST after this many answers 500 (a server gone away)
        self.lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._send(200, {"data": [{"id": double.name, "max_model_len": 512}]})
                self._send(404, {"error": {"message": "no such path"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, answer = double.answer(body)
                self._send(code, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # close() waits for answers still being computed: a daemon thread inside a torch forward
        # when the interpreter exits aborts it ("terminate called without an active exception")
        self.server.daemon_threads = False
        self.server.block_on_close = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, body: dict) -> tuple[int, dict]:
        import time

        with self.lock:
            self.requests += 1
            if self.fail_next > 0 or (self.fail_from is not None and self.requests > self.fail_from):
                self.fail_next = max(0, self.fail_next - 1)
                return 500, {"error": {"message": "injected failure"}}
        if self.delay_s:
            time.sleep(self.delay_s)
        if body.get("model") != self.name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            return 400, {
                "error": {
                    "message": f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"
                }
            }
        prompts = body["prompt"]
        if isinstance(prompts, str):
            prompts = [self.tokenizer(prompts)["input_ids"]]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        choices = []
        for i, ids in enumerate(prompts):
            choice = {"index": i, "text": "", "finish_reason": "length", "prompt_token_ids": list(ids)}
            if k is not None:
                with torch.no_grad():
                    lp = self.model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
                entries = [None]
                for t in range(1, len(ids)):
                    top = lp[t - 1].topk(k) if k else None
                    d = {str(ids[t]): {"logprob": float(lp[t - 1, ids[t]])}}
                    if top is not None:
                        for v, j in zip(top.values.tolist(), top.indices.tolist()):
                            d[str(j)] = {"logprob": v}
                    entries.append(d)
                choice["prompt_logprobs"] = entries
            n = body.get("max_tokens", 16)
            g = torch.Generator().manual_seed(int(body.get("seed") or 0))
            new, seq = [], list(ids)
            for _ in range(n):
                with torch.no_grad():
                    z = self.model(torch.tensor([seq])).logits[0, -1].float()
                temp = body.get("temperature", 1.0)
                tok = int(z.argmax()) if not temp else int(torch.multinomial((z / temp).softmax(-1), 1, generator=g))
                new.append(tok)
                seq.append(tok)
                if tok == self.tokenizer.eos_token_id:
                    choice["finish_reason"] = "stop"
                    break
            choice["token_ids"] = new
            choice["text"] = self.tokenizer.decode(new)
            choices.append(choice)
        return 200, {"choices": choices}
