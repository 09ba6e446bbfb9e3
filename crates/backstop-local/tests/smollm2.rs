//! The local backend with the real SmolLM2-135M-Instruct file (`models/fetch`
//! downloads it; `scripts/test` does so before the tests).

// Test helpers panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use backstop_adapter::{Backend, BackendError, ChatChunk, FailureKind, Request};
use backstop_local::tokenizer::TextTokenizer;
use backstop_local::{LoadedModel, LocalBackend, LocalConfig, DROPPED_TURNS_HEADER};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn model_path() -> PathBuf {
    let path = std::env::var_os("BACKSTOP_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.exists(),
        "{} is missing: run models/fetch",
        path.display()
    );
    path
}

fn config() -> LocalConfig {
    LocalConfig::new("smollm2-135m-instruct", model_path())
}

/// One loaded model for the tokenizer and template tests.
fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::load(&config()).unwrap())
}

fn tokenizer() -> &'static TextTokenizer {
    &model().tokenizer
}

async fn wait_ready(backend: &LocalBackend) {
    for _ in 0..1200 {
        if backend.ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the model did not load");
}

/// A backend of its own, for tests that need a special configuration.
async fn ready(config: LocalConfig) -> LocalBackend {
    let backend = LocalBackend::start(config);
    wait_ready(&backend).await;
    backend
}

/// The default backend, shared by the tests that need nothing special. Its
/// engine runs on threads of its own, so every test's runtime can use it.
async fn shared() -> &'static LocalBackend {
    static BACKEND: OnceLock<LocalBackend> = OnceLock::new();
    let backend = BACKEND.get_or_init(|| LocalBackend::start(config()));
    wait_ready(backend).await;
    backend
}

fn chat(body: Value) -> Request {
    Request::parse_chat(body.to_string().as_bytes()).unwrap()
}

fn ask(question: &str, extra: Value) -> Request {
    let mut body = json!({"model": "local", "temperature": 0,
                          "messages": [{"role": "user", "content": question}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    chat(body)
}

async fn answer(backend: &LocalBackend, req: &Request) -> (String, String, u64) {
    let reply = backend.complete(req).await.unwrap();
    let choice = &reply.body.choices[0];
    (
        choice.message.content.as_ref().unwrap().to_text(),
        choice.finish_reason.clone().unwrap(),
        reply.body.usage.as_ref().unwrap().completion_tokens,
    )
}

async fn stream_all(
    backend: &LocalBackend,
    req: &Request,
) -> (Vec<ChatChunk>, Option<BackendError>) {
    let mut body = backend.stream(req).await.unwrap().body;
    let mut chunks = Vec::new();
    while let Some(item) = body.next().await {
        match item {
            Ok(c) => chunks.push(c),
            Err(e) => return (chunks, Some(e)),
        }
    }
    (chunks, None)
}

#[test]
fn tokenizer_round_trips_varied_text() {
    let tok = tokenizer();
    for text in [
        "Hello, world!",
        "  leading spaces and trailing  ",
        "emoji 🦀🚀 and accents: café, naïve",
        "中文字符和日本語のテキスト",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
        "numbers 1234567890 and 3.14159",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
    }
}

/// Ids llama.cpp gives for the same file (llama-cpp-python 0.3.36,
/// `Llama(vocab_only=True).tokenize(text, add_bos=False, special=True)`).
#[test]
fn ids_equal_llama_cpp() {
    let expected: [(&str, &[u32]); 9] = [
        ("Hello world", &[19556, 905]),
        (" Hello world", &[38699, 905]),
        ("What is 2+2?", &[1780, 314, 216, 34, 27, 34, 47]),
        (
            "The year 2024 had 366 days.",
            &[
                504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
            ],
        ),
        ("café 🦀", &[83, 1939, 2756, 15107, 116, 218]),
        ("<|im_start|>assistant\n", &[1, 520, 9531, 198]),
        (
            "中文字符和日本語のテキスト",
            &[
                28589, 29184, 36518, 40562, 116, 42179, 23274, 115, 40993, 179, 120, 248, 26453,
                11100, 224, 10391, 251, 10391, 134, 11100, 226,
            ],
        ),
        (
            "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
            &[
                7853, 1085, 1000, 1662, 472, 1628, 34115, 17, 43331, 1002, 216, 33, 1232, 216, 34,
                4258, 198, 109, 198,
            ],
        ),
        (
            "  leading spaces and trailing  ",
            &[216, 2899, 5600, 284, 35079, 256],
        ),
    ];
    for (text, ids) in expected {
        assert_eq!(tokenizer().encode(text).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn control_tokens_are_single_ids_and_no_bos_is_added() {
    let tok = tokenizer();
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert!(tok.is_stop(2), "<|im_end|> ends a turn");
    assert_eq!(tok.encode("Hi").unwrap().len(), 1);
}

#[test]
fn the_gguf_chat_template_renders_chatml_with_smollm_default_system_prompt() {
    use backstop_local::template::Turn;
    let turn = |role, content: &str| Turn {
        role,
        content: content.into(),
    };
    let out = model()
        .template
        .render(&[turn("user", "What is 2+2?")], "", "")
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let out = model()
        .template
        .render(
            &[
                turn("system", "Be terse."),
                turn("user", "Hi"),
                turn("assistant", "Hello."),
                turn("user", "Bye"),
            ],
            "",
            "",
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answers_and_honest_finish_reasons() {
    let backend = shared().await;
    let (text, finish, _) = answer(backend, &ask("What is 2+2?", json!({"max_tokens": 40}))).await;
    assert!(text.contains('4'), "{text:?}");
    assert_eq!(finish, "stop");

    let (text, finish, n) = answer(
        backend,
        &ask(
            "Write a long story about a dragon.",
            json!({"max_tokens": 7}),
        ),
    )
    .await;
    assert_eq!((finish.as_str(), n), ("length", 7), "{text:?}");
    assert!(!text.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible() {
    let backend = shared().await;
    let req = |seed: i64| {
        ask(
            "Name a colour.",
            json!({"temperature": 1.0, "top_p": 0.95, "seed": seed, "max_tokens": 16}),
        )
    };
    let a = answer(backend, &req(7)).await;
    let b = answer(backend, &req(7)).await;
    assert_eq!(a, b);
    let others: Vec<_> = futures_util::future::join_all((8..12).map(|s| {
        let r = req(s);
        async move { answer(backend, &r).await.0 }
    }))
    .await;
    assert!(
        others.iter().any(|o| *o != a.0),
        "five seeds, one answer: {others:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repetition_penalty_and_top_k_change_what_is_sampled() {
    let backend = shared().await;
    let q = "List the word cat many times.";
    let plain = answer(backend, &ask(q, json!({"max_tokens": 24}))).await.0;
    let penalised = answer(
        backend,
        &ask(q, json!({"max_tokens": 24, "repetition_penalty": 3.0})),
    )
    .await
    .0;
    assert_ne!(plain, penalised);
    // top_k = 1 is greedy whatever the temperature.
    let top1 = answer(
        backend,
        &ask(
            q,
            json!({"max_tokens": 24, "temperature": 1.5, "top_k": 1, "seed": 3}),
        ),
    )
    .await
    .0;
    assert_eq!(top1, plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_answer_before_them_even_across_tokens() {
    let backend = shared().await;
    let question = "What is 2+2?";
    let (full, _, _) = answer(backend, &ask(question, json!({"max_tokens": 40}))).await;
    // A stop string spanning a word boundary: several tokens long.
    let words: Vec<&str> = full.split(' ').collect();
    assert!(words.len() >= 4, "{full:?}");
    let stop = format!("{} {}", words[2], words[3]);
    let (text, finish, _) = answer(
        backend,
        &ask(question, json!({"max_tokens": 40, "stop": [stop.clone()]})),
    )
    .await;
    assert_eq!(finish, "stop");
    assert_eq!(text, full[..full.find(&stop).unwrap()], "stop {stop:?}");

    // Streaming gives the same text, never a piece of the stop string.
    let mut req = ask(
        question,
        json!({"max_tokens": 40, "stop": stop, "stream": true}),
    );
    req.chat.stream = Some(true);
    let (chunks, err) = stream_all(backend, &req).await;
    assert!(err.is_none(), "{err:?}");
    let streamed: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.content.clone())
        .collect();
    assert_eq!(streamed, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_have_the_upstream_shape_and_whole_characters() {
    let backend = shared().await;
    let req = chat(
        json!({"model": "local", "stream": true, "stream_options": {"include_usage": true},
                          "temperature": 0, "max_tokens": 30,
                          "messages": [{"role": "user", "content": "Say hello in Chinese and add an emoji."}]}),
    );
    let (chunks, err) = stream_all(backend, &req).await;
    assert!(err.is_none(), "{err:?}");
    let first = &chunks[0];
    assert_eq!(first.object, "chat.completion.chunk");
    assert_eq!(first.model, "smollm2-135m-instruct");
    assert_eq!(
        first.choices[0].delta.role,
        Some(backstop_adapter::Role::Assistant)
    );
    assert!(chunks
        .iter()
        .all(|c| c.id == first.id && c.created == first.created));
    let finish = &chunks[chunks.len() - 2];
    assert!(finish.choices[0].finish_reason.is_some());
    let usage = chunks.last().unwrap().usage.as_ref().unwrap();
    assert!(usage.prompt_tokens > 10 && usage.completion_tokens > 0);
    for c in &chunks {
        for choice in &c.choices {
            assert!(!choice
                .delta
                .content
                .as_deref()
                .unwrap_or("")
                .contains('\u{FFFD}'));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_conversation_drops_its_oldest_turns_and_says_so() {
    let mut cfg = config();
    cfg.context = Some(160);
    let backend = ready(cfg).await;
    let mut messages = vec![json!({"role": "system", "content": "You answer briefly."})];
    for i in 0..12 {
        messages.push(
            json!({"role": "user", "content": format!("Remember the number {i} for me, please.")}),
        );
        messages.push(json!({"role": "assistant", "content": format!("I will remember {i}.")}));
    }
    messages.push(json!({"role": "user", "content": "What is 2+2?"}));
    let req =
        chat(json!({"model": "local", "temperature": 0, "max_tokens": 200, "messages": messages}));
    let reply = backend.complete(&req).await.unwrap();
    let dropped: usize = reply
        .headers
        .iter()
        .find(|(k, _)| k == DROPPED_TURNS_HEADER)
        .map(|(_, v)| v.parse().unwrap())
        .expect("the dropped turns are named");
    assert!(dropped > 0);
    let usage = reply.body.usage.unwrap();
    // max_tokens is clamped to what fits.
    assert!(usage.total_tokens <= 160, "{usage:?}");

    let huge = "word ".repeat(400);
    let err = backend.complete(&ask(&huge, json!({}))).await.unwrap_err();
    assert_eq!(err.kind, FailureKind::ClientError);
    assert_eq!(err.http_status(), 400);
    assert_eq!(err.to_body()["error"]["code"], "context_length_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_at_once_and_a_gone_client_frees_its_slot() {
    let mut cfg = config();
    cfg.batch = 1;
    cfg.queue = 1;
    let backend = ready(cfg).await;
    let long = || {
        let mut r = ask(
            "Write a very long essay about the history of bridges.",
            json!({"max_tokens": 4000}),
        );
        r.chat.stream = Some(true);
        r
    };
    // The first takes the batch's one place; the second waits in the queue.
    let first = backend.stream(&long()).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let waiting = {
        let req = long();
        let backend = &backend;
        async move {
            let _ = tx.send(());
            backend.stream(&req).await.map(|r| r.body)
        }
    };
    let third = async {
        let _ = rx.await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let e = backend
            .stream(&long())
            .await
            .err()
            .expect("the queue is full");
        assert_eq!(e.kind, FailureKind::Overloaded);
        assert_eq!(e.http_status(), 429);
        assert!(e.headers.iter().any(|(k, _)| k == "retry-after"));
        // The first client leaves: its slot frees and the waiting one starts.
        drop(first);
    };
    let (second, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(60), waiting),
        third
    );
    let mut second = second.expect("the waiting request started").unwrap();
    assert!(second.next().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_prompts_are_continued_as_raw_text() {
    let backend = shared().await;
    let req = Request::parse_legacy(
        br#"{"model":"local","prompt":"The capital of Germany is","max_tokens":5,"temperature":0}"#,
    )
    .unwrap();
    let (text, finish, n) = answer(backend, &req).await;
    assert_eq!((finish.as_str(), n), ("length", 5));
    assert!(!text.is_empty());
    // Nothing to continue is the client's mistake, and the engine goes on.
    let empty = Request::parse_legacy(br#"{"model":"local","prompt":"","max_tokens":5}"#).unwrap();
    let e = backend.complete(&empty).await.unwrap_err();
    assert_eq!((e.kind, e.http_status()), (FailureKind::ClientError, 400));
    assert_eq!(answer(backend, &req).await.2, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_is_continued_counted_as_answer_and_taken_from_max_tokens() {
    let backend = shared().await;
    let prefill = "Once upon a time, a dragon";
    let prefill_tokens = tokenizer().encode(prefill).unwrap().len() as u64;
    let plain = ask(
        "Write a long story about a dragon.",
        json!({"max_tokens": 12}),
    );
    let mut continued = plain.clone();
    continued.prefill = Some(prefill.into());
    let with = backend.complete(&continued).await.unwrap().body;
    let without = backend.complete(&plain).await.unwrap().body;
    let (u, p) = (with.usage.unwrap(), without.usage.unwrap());
    // The answer holds 12 tokens in all, the prefill's included; the prompt
    // is the client's alone.
    assert_eq!(u.completion_tokens, 12);
    assert_eq!(with.choices[0].finish_reason.as_deref(), Some("length"));
    assert_eq!(u.prompt_tokens, p.prompt_tokens);
    assert!(prefill_tokens > 3);
    // The continuation does not repeat the prefill.
    let text = with.choices[0].message.content.as_ref().unwrap().to_text();
    assert!(!text.starts_with(prefill), "{text:?}");
}

/// Our quantized forward pass (with its f16 keys and values) and
/// candle-transformers' quantized llama, each against a plain f32
/// reference (the same weights dequantized, no activation quantization, an
/// f32 cache), on a prompt and then greedy decode steps.
#[test]
fn our_forward_pass_stays_as_close_to_f32_as_candles() {
    use backstop_local::llama::{Llama, Precision};
    use candle_core::quantized::gguf_file;
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;

    let dev = Device::Cpu;
    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    // As served: quantized weights, keys and values kept in f16.
    let mut ours = Llama::from_gguf(&content, &mut file, &dev, Precision::Quantized).unwrap();
    ours.keep_kv(backstop_local::KvCache::F16);
    let exact = Llama::from_gguf(&content, &mut file, &dev, Precision::F32).unwrap();
    let mut candle = ModelWeights::from_gguf(content, &mut file, &dev).unwrap();
    let (mut ours_cache, mut exact_cache) = (ours.cache(256).unwrap(), exact.cache(256).unwrap());
    let mut fed = tokenizer()
        .encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let mut at = 0;
    let steps = 8;
    let (mut ours_worst, mut candle_worst) = (0f32, 0f32);
    let (mut ours_sum, mut candle_sum) = (0f32, 0f32);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |b, (i, x)| if *x > b.1 { (i, *x) } else { b },
            )
            .0 as u32
    };
    for _ in 0..steps {
        let reference = exact
            .forward(&fed, &mut exact_cache)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = ours
            .forward(&fed, &mut ours_cache)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let input = Tensor::new(fed.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let theirs = candle
            .forward(&input, at)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        let off = |v: &[f32]| {
            v.iter()
                .zip(&reference)
                .fold(0f32, |a, (g, w)| a.max((g - w).abs()))
                / scale
        };
        ours_worst = ours_worst.max(off(&got));
        candle_worst = candle_worst.max(off(&theirs));
        ours_sum += off(&got);
        candle_sum += off(&theirs);
        // Greedy decoding picks what candle's model picks.
        assert_eq!(argmax(&got), argmax(&theirs));
        at += fed.len();
        fed = vec![argmax(&reference)];
    }
    // The stated tolerance: within 10% of the largest f32 logit at every
    // step, and on average over the steps no further from f32 than
    // candle's own quantized model (plus 20%). (The average, not the worst
    // step: which step's rounding of the 8-bit activations lands worst
    // shifts with any change in the order of float sums, so one step's
    // error is a sample, not a property of the kernel.)
    assert!(ours_worst < 0.10, "{ours_worst}");
    assert!(
        ours_sum <= candle_sum * 1.2,
        "ours {ours_sum}, candle's {candle_sum} (summed over the steps)"
    );
    eprintln!(
        "logit error against f32, largest and mean: ours {ours_worst}, {}; candle's {candle_worst}, {}",
        ours_sum / steps as f32,
        candle_sum / steps as f32
    );
}

/// The largest difference between two logit vectors, as a fraction of the
/// largest logit of the second.
fn logit_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

/// A batched step gives each sequence the logits it gets alone, whatever the
/// mix: a prompt next to another prompt's first piece, then a decode token
/// next to the rest of that prompt, at different positions.
#[test]
fn batched_steps_give_each_sequence_the_logits_it_gets_alone() {
    use backstop_local::llama::Segment;

    let llama = &model().llama;
    let a = tokenizer().encode("The capital of France is").unwrap();
    let b = tokenizer()
        .encode("Write a long story about a dragon who learns to sail.")
        .unwrap();
    let vec = |t: candle_core::Tensor| t.to_vec1::<f32>().unwrap();
    let (mut a_alone, mut b_alone) = (llama.cache(64).unwrap(), llama.cache(64).unwrap());
    let a_prompt = vec(llama.forward(&a, &mut a_alone).unwrap());
    llama.forward(&b[..5], &mut b_alone).unwrap();
    let b_prompt = vec(llama.forward(&b[5..], &mut b_alone).unwrap());
    let a_next = vec(llama.forward(&[42], &mut a_alone).unwrap());

    let (mut a_cache, mut b_cache) = (llama.cache(64).unwrap(), llama.cache(64).unwrap());
    let first = llama
        .forward_batch(&mut [
            Segment {
                tokens: &a,
                cache: &mut a_cache,
            },
            Segment {
                tokens: &b[..5],
                cache: &mut b_cache,
            },
        ])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let second = llama
        .forward_batch(&mut [
            Segment {
                tokens: &[42],
                cache: &mut a_cache,
            },
            Segment {
                tokens: &b[5..],
                cache: &mut b_cache,
            },
        ])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (got, want) in [
        (&first[0], &a_prompt),
        (&second[0], &a_next),
        (&second[1], &b_prompt),
    ] {
        let off = logit_error(got, want);
        assert!(off <= 1e-5, "off by {off}");
    }
}

/// A prompt run in pieces, as the engine runs a long one beside other
/// sequences, gives the logits of the whole prompt run at once: within f32
/// rounding on the f32 reference, and within the quantized model's stated
/// tolerance (its activations are rounded to 8 bits, so a last-bit
/// difference can move a value by a step).
#[test]
fn a_prompt_run_in_pieces_gives_the_logits_of_the_whole() {
    use backstop_local::llama::{Llama, Precision};
    use candle_core::quantized::gguf_file;

    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let exact = Llama::from_gguf(
        &content,
        &mut file,
        &candle_core::Device::Cpu,
        Precision::F32,
    )
    .unwrap();
    let prompt = tokenizer()
        .encode("Write a long story about a dragon who learns to sail.")
        .unwrap();
    for (llama, tolerance) in [(&exact, 1e-5), (&model().llama, 0.1)] {
        let mut whole = llama.cache(64).unwrap();
        let want = llama
            .forward(&prompt, &mut whole)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for split in 1..prompt.len() {
            let mut pieces = llama.cache(64).unwrap();
            llama.forward(&prompt[..split], &mut pieces).unwrap();
            let got = llama
                .forward(&prompt[split..], &mut pieces)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let off = logit_error(&got, &want);
            assert!(off <= tolerance, "split at {split}: off by {off}");
        }
    }
}

/// Sequences answered together in one batch answer exactly what each
/// answers alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_answers_are_the_ones_each_gets_alone() {
    let backend = shared().await;
    let questions = [
        "What is 2+2?",
        "Name three colours.",
        "Write a long story about a dragon who learns to sail.",
        "What is the capital of France?",
    ];
    let reqs: Vec<Request> = questions
        .iter()
        .map(|q| ask(q, json!({"max_tokens": 24})))
        .collect();
    let mut alone = Vec::new();
    for req in &reqs {
        alone.push(answer(backend, req).await);
    }
    let together = futures_util::future::join_all(reqs.iter().map(|r| answer(backend, r))).await;
    assert_eq!(together, alone);
}

/// A client that stops reading holds nobody up: the engine steps every
/// sequence together, so it never waits for one client's reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_nobody_up() {
    let backend = shared().await;
    let mut long = ask(
        "Write a very long essay about the history of bridges.",
        json!({"max_tokens": 400}),
    );
    long.chat.stream = Some(true);
    let mut stalled = backend.stream(&long).await.unwrap().body; // not read yet
    let other = ask("Name three colours.", json!({"max_tokens": 200}));
    let (_, _, n) = tokio::time::timeout(Duration::from_secs(120), answer(backend, &other))
        .await
        .expect("answered while the other client reads nothing");
    assert!(n > 0);
    // The premise: the unread answer is long (it ran beside the other one
    // all along), far more than a small buffer of pieces would have held.
    let mut pieces = 0;
    while let Some(chunk) = stalled.next().await {
        pieces += usize::from(chunk.unwrap().usage.is_none());
    }
    assert!(pieces > 100, "{pieces} pieces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_max_tokens_the_local_caps_bound_the_answer_and_its_sampling() {
    let mut cfg = config();
    cfg.max_tokens = 20;
    cfg.continuation_tokens = 6;
    let backend = ready(cfg).await;
    // A hot, uncapped request for a long answer: the local cap holds.
    let hot = ask(
        "Write a very long story about a dragon.",
        json!({"temperature": 2.0}),
    );
    let (_, finish, tokens) = answer(&backend, &hot).await;
    assert!(tokens <= 20, "{tokens} tokens");
    assert!(finish == "length" || finish == "stop");
    // A continuation gets its own, smaller cap, on top of the prefill.
    let mut continued = hot.clone();
    continued.prefill = Some("Once upon a time, a dragon".into());
    let prefill = tokenizer()
        .encode("Once upon a time, a dragon")
        .unwrap()
        .len() as u64;
    let (_, _, tokens) = answer(&backend, &continued).await;
    assert!(tokens <= prefill + 6, "{tokens} tokens");
    // The client's own, smaller cap still wins.
    let small = ask("Write a long story.", json!({"max_tokens": 3}));
    assert_eq!(answer(&backend, &small).await.2, 3);
    // The temperature is capped: at 0 it is greedy, whatever the client asked.
    let mut cfg = config();
    cfg.max_temperature = 0.0;
    let cold = ready(cfg).await;
    let greedy = ask("Name a colour.", json!({"max_tokens": 12}));
    let hot = ask(
        "Name a colour.",
        json!({"max_tokens": 12, "temperature": 2.0}),
    );
    assert_eq!(
        answer(&cold, &hot).await.0,
        answer(shared().await, &greedy).await.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_stops_at_the_request_deadline() {
    let mut cfg = config();
    cfg.max_tokens = 100_000; // the deadline alone stops it
    let backend = ready(cfg).await;
    let mut req = ask(
        "Write a very long story about a dragon.",
        json!({"temperature": 1.0}),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    req.deadline = Some(deadline.into_std());
    let (chunks, err) = stream_all(&backend, &req).await;
    assert!(err.is_none(), "{err:?}");
    let finish = chunks
        .iter()
        .find_map(|c| c.choices.first()?.finish_reason.clone());
    assert_eq!(finish.as_deref(), Some("length"), "cut short, and says so");
    let pieces = chunks
        .iter()
        .filter(|c| c.choices.first().is_some_and(|c| c.delta.content.is_some()))
        .count();
    assert!(pieces < 2_000, "{pieces} pieces");
    // A request whose deadline has passed is refused, not started.
    req.deadline = Some(tokio::time::Instant::now().into_std());
    let e = backend.complete(&req).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::FirstByteTimeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_mid_sentence_adds_words_before_it_ends() {
    let backend = shared().await;
    // Greedy, the model ends its turn right after each of these prefills
    // (measured: an empty continuation with `stop`); held back, it must
    // finish the sentence first.
    for (question, prefill) in [
        ("Reply with exactly one word: yes.", "yes"),
        ("Answer with one word: what colour is the sky?", "Blue"),
    ] {
        let mut req = ask(question, json!({"max_tokens": 40}));
        req.prefill = Some(prefill.into());
        let (text, finish, _) = answer(backend, &req).await;
        assert!(
            !text.trim().is_empty(),
            "{prefill:?} ended at once ({finish})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_pieces_add_up_to_the_answer_in_whole_characters() {
    let backend = shared().await;
    let body = json!({"temperature": 0, "max_tokens": 60});
    let req = ask(
        "Write three words in Japanese, then three emoji.",
        body.clone(),
    );
    let whole = answer(backend, &req).await.0;
    let mut streamed = req.clone();
    streamed.chat = serde_json::from_value(json!({"model": "local", "stream": true,
        "temperature": 0, "max_tokens": 60,
        "messages": [{"role": "user", "content": "Write three words in Japanese, then three emoji."}]}))
    .unwrap();
    let (chunks, _) = stream_all(backend, &streamed).await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c.choices.first()?.delta.content.clone())
        .collect();
    assert_eq!(text, whole);
    assert!(!text.contains('\u{FFFD}'), "{text:?}");
}
