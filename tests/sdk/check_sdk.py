"""Drives Backstop with the official OpenAI Python SDK, unchanged.

OPENAI_BASE_URL points at Backstop (in front of the test mock upstream).
Exits non-zero with a message on the first check that fails.
"""

import openai
from openai import OpenAI

client = OpenAI(max_retries=0, timeout=20)
messages = [{"role": "user", "content": "hello from the sdk"}]
expected = "You said: hello from the sdk"

# Chat, non-streaming, with the raw response to see Backstop's headers.
raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
assert raw.headers["x-backstop-backend"] == "up0", raw.headers
assert raw.headers["x-backstop-attempts"] == "1", raw.headers
chat = raw.parse()
assert chat.choices[0].message.content == expected, chat
assert chat.choices[0].finish_reason == "stop", chat
assert chat.usage.total_tokens > 0, chat.usage

# Chat, streaming, with usage.
stream = client.chat.completions.create(
    model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}
)
text, usage = "", None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert text == expected, text
assert usage is not None and usage.completion_tokens > 0, usage

# Legacy completions, both ways.
prompt_expected = "You said: Say this is a test"
done = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test")
assert done.object == "text_completion", done
assert done.choices[0].text == prompt_expected, done
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say this is a test", stream=True
    )
    if c.choices
)
assert streamed == prompt_expected, streamed

# Models.
ids = [m.id for m in client.models.list()]
assert "mock-model" in ids, ids

# A bad request surfaces as the SDK's own exception type.
try:
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "robot", "content": "x"}])
    raise AssertionError("a bad role was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400, e
    assert e.body["param"] == "messages[0].role", e.body

print("sdk checks passed")
