use super::*;

fn turns() -> Vec<Turn> {
    vec![
        Turn {
            role: "system",
            content: "Be brief.".into(),
        },
        Turn {
            role: "user",
            content: "Hi".into(),
        },
        Turn {
            role: "assistant",
            content: "Hello!".into(),
        },
        Turn {
            role: "user",
            content: "What is 2+2?".into(),
        },
    ]
}

#[test]
fn chatml_golden() {
    let out = Template::ChatMl.render(&turns(), "", "").unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn llama2_golden() {
    let out = Template::Llama2.render(&turns(), "<s>", "</s>").unwrap();
    assert_eq!(
        out,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] What is 2+2? [/INST]"
    );
    let no_system = Template::Llama2
        .render(&turns()[1..2], "<s>", "</s>")
        .unwrap();
    assert_eq!(no_system, "<s>[INST] Hi [/INST]");
}

#[test]
fn jinja_templates_render_with_generation_prompt_and_special_tokens() {
    let source = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
                  {% if add_generation_prompt %}<assistant>{% endif %}";
    let out = Template::Jinja(source.into())
        .render(&turns()[1..2], "<s>", "</s>")
        .unwrap();
    assert_eq!(out, "<s><user>Hi<assistant>");
    let raising = "{{ raise_exception('roles must alternate') }}";
    let err = Template::Jinja(raising.into())
        .render(&turns(), "", "")
        .unwrap_err();
    assert!(err.to_string().contains("roles must alternate"), "{err}");
}

#[test]
fn developer_messages_read_as_system_and_tool_calls_are_shown() {
    let m: backstop_adapter::Message = serde_json::from_value(serde_json::json!({
        "role": "assistant", "content": null,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    }))
    .unwrap();
    assert_eq!(Turn::from_message(&m).content, "\n[tool call c1: f({})]");
    let d = backstop_adapter::Message::text(Role::Developer, "x");
    assert_eq!(Turn::from_message(&d).role, "system");
}
