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
fn no_config_file_means_one_upstream_from_the_environment() {
    let config = Config::from_env(|name| match name {
        "OPENAI_BASE_URL" => Some("http://127.0.0.1:9/v1".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(config.targets.len(), 1);
    assert_eq!(config.targets[0].base_url, "http://127.0.0.1:9/v1");
    assert_eq!(config.targets[0].api_key, None);
    assert_eq!(config.targets[0].model, None);
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
