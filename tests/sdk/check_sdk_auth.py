"""The official OpenAI Python SDK through Backstop with authentication on:
its OPENAI_API_KEY (an API key or a JWT, as the test sets it) is a caller
allowed gpt-4o-mini only."""
import openai

client = openai.OpenAI(max_retries=0)
expected = "You said: hello"

chat = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
)
assert chat.choices[0].message.content == expected, chat
streamed = "".join(
    c.choices[0].delta.content or ""
    for c in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    if c.choices
)
assert streamed == expected, streamed
response = client.responses.create(model="gpt-4o-mini", input="hello")
assert response.output_text == expected, response
assert client.responses.retrieve(response.id).id == response.id

try:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("a model the caller may not use was served")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403, e
    assert e.body["code"] == "model_not_allowed", e.body

stranger = openai.OpenAI(api_key="sk-not-a-key-of-anyone", max_retries=0)
try:
    stranger.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown key was served")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e
    assert e.body["code"] == "invalid_api_key", e.body
    assert "sk-not-a-key" not in str(e.body), e.body

print("sdk checks passed")
