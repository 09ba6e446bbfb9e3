use serde_json::json;

use super::*;

#[test]
fn text_completion_maps_to_chat_and_back_unchanged() {
    let body = json!({
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": "\n\nThis is a test", "index": 0, "logprobs": {"tokens": ["x"]},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        "system_fingerprint": null
    });
    let text: TextCompletion = serde_json::from_value(body.clone()).unwrap();
    let chat = ChatCompletion::from(text);
    assert_eq!(chat.object, "chat.completion");
    assert_eq!(
        chat.choices[0].message.content.as_ref().unwrap().to_text(),
        "\n\nThis is a test"
    );
    let back = serde_json::to_value(TextCompletion::from(chat)).unwrap();
    let mut expected = body;
    expected
        .as_object_mut()
        .unwrap()
        .remove("system_fingerprint");
    assert_eq!(back, expected);
}

#[test]
fn text_completion_chunks_map_to_chat_chunks_and_back() {
    let body = json!({
        "id": "cmpl-2", "object": "text_completion", "created": 2, "model": "m",
        "choices": [{"text": "Hel", "index": 0, "logprobs": null, "finish_reason": null}]
    });
    let text: TextCompletion = serde_json::from_value(body.clone()).unwrap();
    let chunk = ChatChunk::from(text);
    assert_eq!(chunk.object, "chat.completion.chunk");
    assert_eq!(chunk.choices[0].delta.content.as_deref(), Some("Hel"));
    assert_eq!(
        serde_json::to_value(TextCompletion::from(chunk)).unwrap(),
        body
    );
}
