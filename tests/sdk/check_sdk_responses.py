"""The official OpenAI Python SDK's Responses calls through Backstop: plain
and streamed, to an upstream that speaks the Responses API or (run with
BACKSTOP_CHAT_ONLY set) one that serves chat only."""
import os

import openai

client = openai.OpenAI(max_retries=0)
expected = "You said: Say this is a test"

whole = client.responses.create(model="gpt-4o-mini", input="Say this is a test")
assert whole.object == "response", whole
assert whole.status == "completed", whole
assert whole.output_text == expected, whole
assert whole.id.startswith("resp_"), whole
assert whole.usage.output_tokens > 0, whole

texts, kinds, final = [], [], None
for event in client.responses.create(
    model="gpt-4o-mini",
    instructions="Answer briefly.",
    input=[{"role": "user", "content": [{"type": "input_text", "text": "Say this is a test"}]}],
    stream=True,
):
    kinds.append(event.type)
    if event.type == "response.output_text.delta":
        texts.append(event.delta)
    if event.type == "response.completed":
        final = event.response
assert kinds[0] == "response.created", kinds
assert "".join(texts) == expected, texts
assert final is not None and final.output_text == expected, final
assert final.instructions == "Answer briefly.", final

with client.responses.stream(model="gpt-4o-mini", input="Say this is a test") as stream:
    done = stream.get_final_response()
assert done.output_text == expected, done

try:
    client.responses.create(model="gpt-4o-mini", input=[{"type": "telepathy"}])
    raise AssertionError("an unknown item type is refused")
except openai.BadRequestError as e:
    assert e.body["param"] == "input[0].type", e.body

if os.environ.get("BACKSTOP_CHAT_ONLY"):
    chat = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert chat.choices[0].message.content == "You said: hello", chat

print("sdk checks passed")
