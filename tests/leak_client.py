"""The client side of tests/test_leaks.py, run as a child process so that the process whose
memory is measured holds the server alone.

    python -m tests.leak_client TARGET CYCLES REQUESTS   prints {"outcome": count, ...} as JSON

Each of the CYCLES requests runs on a rotating adapter (a load into host RAM that evicts another,
and a slot write); then REQUESTS requests of every kind in turn. Imports only grpc and the stubs.
"""

from __future__ import annotations

import json
import sys

import grpc

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc

ROTATING = [f"rot-{i}" for i in range(6)]  # cycled through a cache that holds 2
PINNED = "pinned"  # the adapter of the kinds' requests: pinned, so they load nothing


def request_kinds(stub) -> list:
    """One call per kind of request; each returns its outcome's name."""
    def generate(adapter="", **params):
        def call():
            stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 5, 6, 7], adapter_id=adapter,
                                             params=pb.SamplingParams(**params)), timeout=60)
            return "ok"
        return call

    def cancelled_stream():
        stream = stub.GenerateStream(pb.GenerateRequest(
            prompt="Once upon a time", adapter_id=PINNED,
            params=pb.SamplingParams(max_new_tokens=50)), timeout=60)
        next(stream)
        stream.cancel()
        return "cancelled"

    def whole_stream():
        list(stub.GenerateStream(pb.GenerateRequest(prompt="Hi", params=pb.SamplingParams(
            max_new_tokens=3, temperature=0.9, seed=4)), timeout=60))
        return "ok"

    def tokenize():
        stub.Tokenize(pb.TokenizeRequest(text="a leak test \U0001F600"), timeout=60)
        return "ok"

    return [generate(max_new_tokens=2), generate(PINNED, max_new_tokens=3, stop=["a", "e"]),
            generate(PINNED, max_new_tokens=2, temperature=0.7, top_p=0.9, top_k=20, seed=1),
            generate(max_new_tokens=2, repetition_penalty=1.3), cancelled_stream, whole_stream,
            generate(max_new_tokens=0), generate("no-such-adapter", max_new_tokens=2), tokenize]


KINDS = len(request_kinds(stub=None))


def run(target: str, cycles: int, requests: int) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for i in range(cycles):
            stub.Generate(pb.GenerateRequest(  # a host load, an eviction and a slot write
                prompt_token_ids=[1, 2, 3], adapter_id=ROTATING[(i + 3) % len(ROTATING)],
                params=pb.SamplingParams(max_new_tokens=2)), timeout=60)
        kinds = request_kinds(stub)
        for i in range(requests):
            try:
                outcome = kinds[i % len(kinds)]()
            except grpc.RpcError as error:
                outcome = error.code().name
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
