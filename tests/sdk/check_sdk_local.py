"""The official OpenAI Python SDK against Backstop serving its local model."""

from openai import OpenAI

client = OpenAI(max_retries=0, timeout=120)
messages = [{"role": "user", "content": "What is 2+2?"}]

whole = client.chat.completions.create(
    model="anything", messages=messages, temperature=0, max_tokens=40
)
assert whole.model == "smollm2-135m-instruct", whole
answer = whole.choices[0].message.content
assert "4" in answer, answer

text, usage, finish = "", None, None
for chunk in client.chat.completions.create(
    model="anything",
    messages=messages,
    temperature=0,
    max_tokens=40,
    stream=True,
    stream_options={"include_usage": True},
):
    assert chunk.model == "smollm2-135m-instruct", chunk
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert text == answer, (text, answer)
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens > 0, usage

legacy = client.completions.create(model="anything", prompt="1, 2, 3,", max_tokens=4, temperature=0)
assert legacy.choices[0].finish_reason == "length", legacy

response = client.responses.create(
    model="anything", input="What is 2+2?", temperature=0, max_output_tokens=40
)
assert response.status == "completed", response
assert response.output_text == answer, (response.output_text, answer)
streamed, final = "", None
for event in client.responses.create(
    model="anything", input="What is 2+2?", temperature=0, max_output_tokens=40, stream=True
):
    if event.type == "response.output_text.delta":
        streamed += event.delta
    if event.type == "response.completed":
        final = event.response
assert streamed == answer, (streamed, answer)
assert final.output_text == answer and final.usage.output_tokens > 0, final

print("local sdk checks passed")
