"""Decode speed of Backstop's local model as an OpenAI SDK client sees it.

    python3 benches/server_local.py BASE_URL ROUNDS

Streams 128-token answers from a running Backstop (offline: the local model
answers) with the official SDK, greedy (temperature 0) and sampled
(temperature 0.8), ROUNDS of each after one warm-up. A stream's decode speed
is its tokens after the first over the time from the first text to the last,
as llama-bench's tg counts tokens after the prompt. Prints a line a mode:
its name, median tok/s, the answers' median length in tokens, and the
share of one core the client itself used while streaming (on two cores it
takes that from the model's threads). benches/server-local.sh reads them.
"""

import statistics
import sys
import time

from openai import OpenAI

base, rounds = sys.argv[1], int(sys.argv[2])
client = OpenAI(base_url=base, api_key="unused", timeout=300, max_retries=0)
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def stream(temperature):
    chunks = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=128,
        temperature=temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = None
    tokens = 0
    cpu = time.process_time()
    for chunk in chunks:
        now = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
    if tokens < 2 or last == first:
        raise SystemExit(f"an answer of {tokens} tokens cannot be timed")
    cpu = (time.process_time() - cpu) / (last - first)
    return (tokens - 1) / (last - first), tokens, cpu


for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
    stream(temperature)
    runs = [stream(temperature) for _ in range(rounds)]
    speed = statistics.median(r[0] for r in runs)
    length = statistics.median(r[1] for r in runs)
    cpu = statistics.median(r[2] for r in runs)
    print(f"{name} {speed:.2f} {length:.0f} {cpu:.3f}")
