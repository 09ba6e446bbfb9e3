"""The official OpenAI Python SDK's legacy completions, through Backstop, to
an upstream that serves chat only (it answers /v1/completions 404)."""
import openai

client = openai.OpenAI()
expected = "You said: Say this is a test"

done = client.completions.create(model="gpt-4o-mini", prompt="Say this is a test")
assert done.object == "text_completion", done
assert done.choices[0].text == expected, done
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model="gpt-4o-mini", prompt="Say this is a test", stream=True)
    if c.choices
)
assert streamed == expected, streamed
echoed = client.completions.create(model="gpt-4o-mini", prompt="Hi. ", echo=True)
assert echoed.choices[0].text == "Hi. You said: Hi. ", echoed
chat = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
)
assert chat.choices[0].message.content == "You said: hello", chat

print("sdk checks passed")
