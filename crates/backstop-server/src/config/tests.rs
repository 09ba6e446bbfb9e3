use super::*;

fn env(name: &str) -> Option<String> {
    (name == "OPENAI_API_KEY").then(|| "sk-from-env".to_string())
}

fn parse_err(text: &str) -> String {
    Config::parse(text, env).unwrap_err().to_string()
}

#[test]
fn the_documented_default_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/backstop.toml");
    let config = Config::load(&path, env).unwrap();
    assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(config.targets[0].api_key.as_deref(), Some("sk-from-env"));
    assert_eq!(config.targets[0].base_url, OPENAI_BASE_URL);
    assert_eq!(
        config.routes,
        vec![(ModelMatch::Any, vec!["openai".to_string()])]
    );
}

#[test]
fn the_documented_local_section_is_valid_once_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/backstop.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let (head, tail) = text.split_once("# [local]").unwrap();
    let uncommented: Vec<&str> = tail
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting) if setting.contains(" = ") => setting,
            _ => l,
        })
        .collect();
    let config = Config::parse(&format!("{head}[local]{}", uncommented.join("\n")), env).unwrap();
    let local = config.local.unwrap();
    assert_eq!(local.model, Path::new(DEFAULT_MODEL));
    assert_eq!(
        (local.workers, local.queue, local.context),
        (1, 16, Some(4096))
    );
}

#[test]
fn no_config_file_means_one_upstream_from_the_environment() {
    let config = Config::from_env(|name| match name {
        "OPENAI_BASE_URL" => Some("http://127.0.0.1:9/v1".into()),
        "OPENAI_API_KEY" => Some("sk-1".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(config.targets.len(), 1);
    assert_eq!(config.targets[0].base_url, "http://127.0.0.1:9/v1");
    assert_eq!(config.targets[0].api_key.as_deref(), Some("sk-1"));
    assert_eq!(config.targets[0].model, None);
    assert!(!config.is_offline());
}

#[test]
fn with_a_key_the_chain_is_the_upstream_then_the_local_model() {
    let config = Config::from_env(|name| match name {
        "OPENAI_API_KEY" => Some("sk-1".into()),
        "BACKSTOP_MODEL" => Some("/models/x.gguf".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(
        config.routes,
        vec![(
            ModelMatch::Any,
            vec!["openai".to_string(), "local".to_string()]
        )]
    );
}

#[test]
fn breaker_settings_are_checked() {
    let target = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n";
    let config = Config::parse(
        &format!(
            "[breaker]\nconsecutive_failures = 2\nopen_ms = 100\nmax_open_ms = 1000\n{target}"
        ),
        env,
    )
    .unwrap();
    assert_eq!(config.breaker.consecutive_failures, 2);
    assert_eq!(config.breaker.open_for, Duration::from_millis(100));
    let e = parse_err(&format!("[breaker]\nfailure_rate = 1.5\n{target}"));
    assert!(e.starts_with("breaker.failure_rate:"), "{e}");
    let e = parse_err(&format!(
        "[breaker]\nopen_ms = 5000\nmax_open_ms = 10\n{target}"
    ));
    assert!(e.starts_with("breaker.max_open_ms:"), "{e}");
}

#[test]
fn no_key_means_offline_with_the_local_model() {
    let config = Config::from_env(|name| match name {
        "BACKSTOP_MODEL" => Some("/models/x.gguf".into()),
        _ => None,
    })
    .unwrap();
    assert!(config.is_offline());
    let local = config.local.unwrap();
    assert_eq!(local.model, Path::new("/models/x.gguf"));
    assert_eq!(local.name, DEFAULT_MODEL_NAME);
    assert_eq!(
        config.routes,
        vec![(ModelMatch::Any, vec!["local".to_string()])]
    );
    let default = Config::from_env(|_| None).unwrap();
    assert_eq!(default.local.unwrap().model, Path::new(DEFAULT_MODEL));
}

#[test]
fn a_local_section_joins_the_chain_last_and_is_checked() {
    let text = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n\
                [local]\nmodel = \"m.gguf\"\nname = \"tiny\"\nworkers = 2\nqueue = 4\ncontext = 512\n";
    let config = Config::parse(text, env).unwrap();
    let local = config.local.as_ref().unwrap();
    assert_eq!(
        (local.workers, local.queue, local.context),
        (2, 4, Some(512))
    );
    assert_eq!(
        config.routes[0].1,
        vec!["a".to_string(), "local".to_string()]
    );
    let e = parse_err("[local]\nqueue = 0\n");
    assert!(e.starts_with("local.queue:"), "{e}");
    let e = parse_err("[local]\nmodell = \"x\"\n");
    assert!(e.contains("modell"), "{e}");
    let e = parse_err("[[targets]]\nname = \"local\"\nbase_url = \"http://x/v1\"\n[local]\n");
    assert!(e.starts_with("targets[0].name:"), "{e}");
}

#[test]
fn errors_name_the_bad_field() {
    let target = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n";
    let e = parse_err(&format!("{target}http2 = \"yes\"\n"));
    assert!(e.starts_with("targets[0].http2:"), "{e}");
    let e = parse_err(&format!("{target}colour = 1\n"));
    assert!(e.contains("colour"), "{e}");
    let e = parse_err(&format!("[server]\nlisten = \"nowhere\"\n{target}"));
    assert!(e.starts_with("server.listen:"), "{e}");
    let e = parse_err(&format!(
        "{target}[[routes]]\nmodels = \"*\"\ntargets = [\"a\", \"b\"]\n"
    ));
    assert!(e.starts_with("routes[0].targets[1]:"), "{e}");
    let e = parse_err(&format!("{target}{target}"));
    assert!(e.starts_with("targets[1].name:"), "{e}");
    let e = parse_err("[[targets]]\nname = \"a\"\nbase_url = \"ftp://x\"\n");
    assert!(e.starts_with("targets[0].base_url:"), "{e}");
    let e = parse_err(&format!("{target}idle_timeout_ms = 0\n"));
    assert!(e.starts_with("targets[0].idle_timeout_ms:"), "{e}");
    let e = parse_err("");
    assert!(e.starts_with("targets:"), "{e}");
    let e = parse_err("[server\n");
    assert!(!e.is_empty());
}

#[test]
fn route_patterns() {
    let text = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n\
                [[routes]]\nmodels = \"gpt-4*\"\ntargets = [\"a\"]\n\
                [[routes]]\nmodels = \"o1\"\ntargets = [\"a\"]\n";
    let config = Config::parse(text, env).unwrap();
    assert_eq!(config.routes[0].0, ModelMatch::Prefix("gpt-4".into()));
    assert_eq!(config.routes[1].0, ModelMatch::Exact("o1".into()));
    assert_eq!(config.routes.len(), 2);
}

#[test]
fn health_settings_are_checked() {
    let target = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n";
    let config = Config::parse(
        &format!(
            "[health]\nprobe = \"completion\"\nprobe_model = \"m\"\ninterval_ms = 500\n{target}"
        ),
        env,
    )
    .unwrap();
    assert_eq!(config.health.probe, Some(Probe::Completion("m".into())));
    assert_eq!(config.health.interval, Duration::from_millis(500));
    let off = Config::parse(&format!("[health]\nprobe = \"off\"\n{target}"), env).unwrap();
    assert_eq!(off.health.probe, None);
    let e = parse_err(&format!("[health]\nprobe = \"ping\"\n{target}"));
    assert!(e.starts_with("health.probe:"), "{e}");
    let e = parse_err(&format!("[health]\nunhealthy_threshold = 0\n{target}"));
    assert!(e.starts_with("health.unhealthy_threshold:"), "{e}");
}
