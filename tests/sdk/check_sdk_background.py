"""The official OpenAI Python SDK's background responses through Backstop,
against a slow upstream: polled with responses.retrieve, their stream
resumed with stream=True and starting_after, and cancelled."""
import time

import openai

client = openai.OpenAI(max_retries=0)
words = "one two three four five six seven eight"
expected = f"You said: {words}"


def settle(response):
    for _ in range(1500):
        if response.status not in ("queued", "in_progress"):
            return response
        time.sleep(0.02)
        response = client.responses.retrieve(response.id)
    raise AssertionError(f"still {response.status}")


job = client.responses.create(model="gpt-4o-mini", input=words, background=True)
assert job.status == "queued", job
assert job.background is True, job

# Follow it live from its fourth event, as a client that reconnects would.
events = list(client.responses.retrieve(job.id, stream=True, starting_after=3))
assert events[0].sequence_number == 4, events[0]
assert [e.sequence_number for e in events] == list(range(4, 4 + len(events))), events
assert events[-1].type == "response.completed", events[-1]

done = settle(client.responses.retrieve(job.id))
assert done.status == "completed", done
assert done.output_text == expected, done
texts = [e.delta for e in client.responses.retrieve(job.id, stream=True) if e.type == "response.output_text.delta"]
assert "".join(texts) == expected, texts

# A finished response cannot be cancelled; a running one can.
try:
    client.responses.cancel(job.id)
    raise AssertionError("a completed response was cancelled")
except openai.BadRequestError:
    pass
running = client.responses.create(model="gpt-4o-mini", input=words * 20, background=True)
cancelled = client.responses.cancel(running.id)
assert cancelled.status == "cancelled", cancelled
assert client.responses.retrieve(running.id).status == "cancelled"

try:
    client.responses.retrieve("resp_does_not_exist")
    raise AssertionError("an unknown id was found")
except openai.NotFoundError:
    pass

print("sdk checks passed")
