use super::*;

fn env(name: &str) -> Option<String> {
    (name == "OPENAI_API_KEY").then(|| "sk-from-env".to_string())
}

fn parse_err(text: &str) -> String {
    Config::parse(text, env).unwrap_err().to_string()
}

/// Each route's pattern and target names.
fn chains(config: &Config) -> Vec<(ModelMatch, Vec<&str>)> {
    config
        .routes
        .iter()
        .map(|r| {
            let names = r.hops.iter().map(|(name, _)| name.as_str()).collect();
            (r.models.clone(), names)
        })
        .collect()
}

#[test]
fn the_documented_default_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/backstop.toml");
    let config = Config::load(&path, env).unwrap();
    assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(config.targets[0].api_keys, ["sk-from-env"]);
    assert_eq!(config.targets[0].base_url, OPENAI_BASE_URL);
    assert_eq!(chains(&config), vec![(ModelMatch::Any, vec!["openai"])]);
    // The bounds it spells out are the defaults.
    assert_eq!(config.limits, Limits::default());
    assert_eq!(config.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
    let target = &config.targets[0];
    assert_eq!(target.max_body_bytes, 16 << 20);
    assert_eq!(target.max_event_bytes, 1 << 20);
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
        (local.batch, local.queue, local.context),
        (4, 16, Some(4096))
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
    assert_eq!(config.targets[0].api_keys, ["sk-1"]);
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
        chains(&config),
        vec![(ModelMatch::Any, vec!["openai", "local"])]
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
    assert_eq!(config.breakers["a"].consecutive_failures, 2);
    assert_eq!(config.breakers["a"].open_for, Duration::from_millis(100));
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
    let local = config.local.clone().unwrap();
    assert_eq!(local.model, Path::new("/models/x.gguf"));
    // Called after its file, as it was not named.
    assert_eq!(local.name, "x");
    assert_eq!(chains(&config), vec![(ModelMatch::Any, vec!["local"])]);
    let default = Config::from_env(|_| None).unwrap().local.unwrap();
    assert_eq!(default.model, Path::new(DEFAULT_MODEL));
    assert_eq!(default.name, DEFAULT_MODEL_NAME);
}

#[test]
fn a_local_section_joins_the_chain_last_and_is_checked() {
    let text = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n\
                [local]\nmodel = \"m.gguf\"\nname = \"tiny\"\nbatch = 2\nqueue = 4\ncontext = 512\n";
    let config = Config::parse(text, env).unwrap();
    let local = config.local.as_ref().unwrap();
    assert_eq!((local.batch, local.queue, local.context), (2, 4, Some(512)));
    assert_eq!(local.kv_cache, backstop_local::KvCache::F16);
    assert_eq!(chains(&config)[0].1, vec!["a", "local"]);
    let f32 = Config::parse("[local]\nkv_cache = \"f32\"\n", env).unwrap();
    assert_eq!(f32.local.unwrap().kv_cache, backstop_local::KvCache::F32);
    let e = parse_err("[local]\nkv_cache = \"q8\"\n");
    assert!(e.starts_with("local.kv_cache:"), "{e}");
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
    assert_eq!(config.routes[0].models, ModelMatch::Prefix("gpt-4".into()));
    assert_eq!(config.routes[1].models, ModelMatch::Exact("o1".into()));
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
    let (name, health) = &config.health[0];
    assert_eq!(name, "a");
    assert_eq!(health.probe, Some(Probe::Completion("m".into())));
    assert_eq!(health.interval, Duration::from_millis(500));
    let off = Config::parse(&format!("[health]\nprobe = \"off\"\n{target}"), env).unwrap();
    assert_eq!(off.health[0].1.probe, None);
    let e = parse_err(&format!("[health]\nprobe = \"ping\"\n{target}"));
    assert!(e.starts_with("health.probe:"), "{e}");
    let e = parse_err(&format!("[health]\nunhealthy_threshold = 0\n{target}"));
    assert!(e.starts_with("health.unhealthy_threshold:"), "{e}");
}

#[test]
fn targets_and_routes_override_the_global_settings() {
    let text = "[retry]\nmax_retries = 2\nfirst_token_timeout_ms = 30000\ndeadline_ms = 90000\n\
                [breaker]\nconsecutive_failures = 4\n[health]\ninterval_ms = 5000\n\
                [[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n\
                retry = { max_retries = 0 }\nbreaker = { consecutive_failures = 1 }\n\
                health = { probe = \"completion\", probe_model = \"m\" }\n\
                [[targets]]\nname = \"b\"\nbase_url = \"http://y/v1\"\n\
                [local]\nmodel = \"m.gguf\"\nretry = { first_token_timeout_ms = 5000 }\n\
                [[routes]]\nmodels = \"o1*\"\ntargets = [\"a\", \"b\", \"local\"]\n\
                retry = { first_token_timeout_ms = 120000, deadline_ms = 300000 }\n\
                [[routes]]\nmodels = \"*\"\ntargets = [\"a\", \"b\", \"local\"]\n";
    let config = Config::parse(text, env).unwrap();
    let (long, plain) = (&config.routes[0], &config.routes[1]);
    assert_eq!(long.deadline, Duration::from_secs(300));
    assert_eq!(plain.deadline, Duration::from_secs(90));
    // Route over target over global, field by field.
    let retries = |r: &RouteConfig| -> Vec<(u32, u64)> {
        r.hops
            .iter()
            .map(|(_, p)| (p.max_retries, p.first_token_timeout.as_millis() as u64))
            .collect()
    };
    assert_eq!(retries(long), [(0, 120_000), (2, 120_000), (2, 120_000)]);
    assert_eq!(retries(plain), [(0, 30_000), (2, 30_000), (2, 5_000)]);
    assert_eq!(config.breakers["a"].consecutive_failures, 1);
    assert_eq!(config.breakers["b"].consecutive_failures, 4);
    assert_eq!(config.breakers["local"].consecutive_failures, 4);
    let (a, b) = (&config.health[0].1, &config.health[1].1);
    assert_eq!(a.probe, Some(Probe::Completion("m".into())));
    assert_eq!(b.probe, Some(Probe::Models));
    assert_eq!(
        (a.interval, b.interval),
        (Duration::from_secs(5), Duration::from_secs(5))
    );

    let target = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n";
    let e = parse_err(&format!("{target}retry = {{ deadline_ms = 1000 }}\n"));
    assert!(e.starts_with("targets[0].retry.deadline_ms:"), "{e}");
    let e = parse_err(&format!("{target}breaker = {{ jitter = 2.0 }}\n"));
    assert!(e.starts_with("targets[0].breaker.jitter:"), "{e}");
    let e = parse_err(&format!(
        "{target}[[routes]]\nmodels = \"*\"\ntargets = [\"a\"]\nretry = {{ first_token_timeout_ms = 0 }}\n"
    ));
    assert!(
        e.starts_with("routes[0].retry.first_token_timeout_ms:"),
        "{e}"
    );
}

#[test]
fn shadow_settings_are_checked() {
    let target = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n";
    let config = Config::parse(target, env).unwrap();
    assert_eq!(config.shadow, Some(ShadowConfig::default()));
    let off = Config::parse(&format!("[shadow]\nenabled = false\n{target}"), env).unwrap();
    assert_eq!(off.shadow, None);
    let custom = Config::parse(
        &format!("[shadow]\nramp = [0.25, 1.0]\nwindow = 4\nlast_k = 2\nallowlist = [\"ping\"]\n{target}"),
        env,
    )
    .unwrap()
    .shadow
    .unwrap();
    assert_eq!(
        (custom.ramp, custom.window, custom.last_k, custom.allowlist),
        (vec![0.25, 1.0], 4, 2, vec!["ping".to_string()])
    );
    for (bad, field) in [
        ("ramp = [0.5, 0.9]", "shadow.ramp"),
        ("ramp = [0.5, 0.2, 1.0]", "shadow.ramp"),
        ("window = 3\nlast_k = 4", "shadow.last_k"),
        ("sample_rate = 2.0", "shadow.sample_rate"),
        (
            "min_interval_ms = 5000\nmax_interval_ms = 10",
            "shadow.max_interval_ms",
        ),
        ("max_tokens = 0", "shadow.max_tokens"),
    ] {
        let e = parse_err(&format!("[shadow]\n{bad}\n{target}"));
        assert!(e.starts_with(&format!("{field}:")), "{bad}: {e}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    /// Any text, and any value in any known field, is a config or an error
    /// naming what is wrong: never a panic.
    #[test]
    fn config_parsing_never_panics(
        junk in ".{0,200}",
        section in proptest::sample::select(vec!["server", "retry", "breaker", "health", "shadow", "local"]),
        field in proptest::sample::select(vec![
            "listen", "admin_listen", "max_body_bytes", "max_connections", "max_in_flight",
            "header_read_timeout_ms", "idle_timeout_ms", "deadline_ms", "max_retries",
            "consecutive_failures", "probe", "enabled", "sample", "model", "batch", "max_tokens",
            "max_json_values", "max_messages", "min_body_rate", "send_timeout_ms",
        ]),
        value in proptest::sample::select(vec![
            "0", "-1", "18446744073709551615", "1e308", "\"\"", "\"x\"", "true", "[]", "{}",
            "\"127.0.0.1:0\"", "\"0.0.0.0:1\"", "nan", "inf",
        ]),
    ) {
        let _ = Config::parse(&junk, |_| None);
        let text = format!("[{section}]\n{field} = {value}\n");
        let _ = Config::parse(&text, |_| Some("sk-0123456789abcdef".into()));
        let target = format!(
            "[[targets]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n{field} = {value}\n"
        );
        let _ = Config::parse(&target, |_| None);
    }
}

#[test]
fn every_bound_has_a_default_and_can_be_set() {
    let target = "\n[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n";
    let config = Config::parse(target, |_| None).unwrap();
    assert_eq!(config.limits, Limits::default());
    assert_eq!(config.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
    assert!(config.admin_token.is_none());
    let text = "[server]\nheader_read_timeout_ms = 2000\nmax_connections = 10\nmax_in_flight = 3\n\
                max_messages = 7\nmax_json_values = 100\nmin_body_rate = 1\n";
    let limits = Config::parse(&format!("{text}{target}"), |_| None)
        .unwrap()
        .limits;
    assert_eq!(limits.header_read_timeout, Duration::from_secs(2));
    assert_eq!((limits.max_connections, limits.max_in_flight), (10, 3));
    assert!(limits.max_connections_set);
    assert_eq!((limits.max_messages, limits.max_json_values), (7, 100));
    assert!(parse_err("[server]\nmax_in_flight = 0\n").contains("server.max_in_flight"));
    assert!(parse_err("[server]\nidle_timeout_ms = 0\n").contains("server.idle_timeout_ms"));
}

#[test]
fn an_admin_listener_off_loopback_needs_a_token() {
    let open = "[server]\nadmin_listen = \"0.0.0.0:9091\"\n";
    assert!(parse_err(open).contains("server.admin_listen"));
    let with = format!(
        "{open}admin_token_env = \"ADMIN\"\n[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n"
    );
    let admin = |token: &'static str| move |name: &str| (name == "ADMIN").then(|| token.into());
    let short = Config::parse(&with, admin("short")).unwrap_err();
    assert!(short.to_string().contains("at least 16"), "{short}");
    let config = Config::parse(&with, admin("0123456789abcdef")).unwrap();
    assert_eq!(config.admin_token.as_deref(), Some("0123456789abcdef"));
}

#[test]
fn authentication_is_off_unless_turned_on_and_is_checked() {
    let base = "[[targets]]\nname = \"a\"\nbase_url = \"http://x\"\n";
    assert!(Config::parse(base, env).unwrap().auth.is_none());
    let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let on = Config::parse(
        &format!(
            "{base}[auth]\nenabled = true\n[[auth.identities]]\nname = \"billing\"\n\
             models = [\"gpt-4o*\"]\nkey_sha256 = [\"{hash}\"]\n\
             [[auth.identities]]\nname = \"ops\"\nscopes = [\"admin\"]\n"
        ),
        env,
    )
    .unwrap()
    .auth
    .unwrap();
    let billing = &on.identities[0];
    assert_eq!(
        billing.scopes,
        Scopes {
            inference: true,
            admin: false
        }
    );
    assert_eq!(billing.models, vec![ModelMatch::Prefix("gpt-4o".into())]);
    assert_eq!(billing.key_hashes[0][0], 0x9f);
    assert!(on.identities[1].scopes.admin && !on.identities[1].scopes.inference);
    assert!(on.jwt.is_none());

    let identity = "[[auth.identities]]\nname = \"billing\"\n";
    for (text, field) in [
        // Identities with no word on `enabled` would be silently ignored.
        (format!("[auth]\n{identity}"), "auth.enabled"),
        ("[auth]\nenabled = true\n".to_string(), "auth.identities"),
        (
            format!("[auth]\nenabled = true\n{identity}{identity}"),
            "auth.identities[1].name",
        ),
        (
            format!("[auth]\nenabled = true\n{identity}scopes = [\"root\"]\n"),
            "auth.identities[0].scopes",
        ),
        (
            format!("[auth]\nenabled = true\n{identity}key_sha256 = [\"abc\"]\n"),
            "auth.identities[0].key_sha256[0]",
        ),
        (
            "[auth]\nenabled = true\n[[auth.identities]]\nname = \"a b\"\n".to_string(),
            "auth.identities[0].name",
        ),
        (
            format!("[auth]\nenabled = true\n{identity}requests_per_minute = 0\n"),
            "auth.identities[0].requests_per_minute",
        ),
        (
            format!("[auth]\nenabled = true\n{identity}[auth.jwt]\nissuer = \"x\"\n"),
            "auth.jwt",
        ),
        (
            format!(
                "[auth]\nenabled = true\n{identity}[auth.jwt]\n\
                 secrets = [{{ kid = \"k\", secret_env = \"OPENAI_API_KEY\" }}]\n"
            ),
            "auth.jwt.secrets[0].secret_env",
        ),
    ] {
        let err = parse_err(&format!("{base}{text}"));
        assert!(err.starts_with(field), "{field}: {err}");
    }
}

#[test]
fn a_group_is_a_hop_of_its_members_and_is_checked() {
    let targets: String = ["a", "b", "c"]
        .iter()
        .map(|n| {
            format!(
                "[[targets]]\nname = \"{n}\"\nregion = \"r-{n}\"\nbase_url = \"http://{n}/v1\"\n"
            )
        })
        .collect();
    let group = "[[groups]]\nname = \"g\"\nmembers = [\"a\", \"b\"]\npolicy = \"weighted\"\n\
                 weights = { a = 3 }\n";
    let route = "[[routes]]\nmodels = \"*\"\ntargets = [\"c\", \"g\"]\n";
    let config = Config::parse(
        &format!("[server]\nregion = \"r-b\"\n{targets}{group}{route}"),
        env,
    )
    .unwrap();
    assert_eq!(chains(&config)[0].1, ["c", "a", "b"]);
    let g = &config.routes[0].groups[0];
    assert_eq!(
        (g.name.as_str(), g.start, g.policy),
        ("g", 1, Policy::Weighted)
    );
    let members: Vec<(u32, Option<&str>)> = g
        .members
        .iter()
        .map(|m| (m.weight, m.region.as_deref()))
        .collect();
    assert_eq!(members, [(3, Some("r-a")), (1, Some("r-b"))]);
    assert_eq!(config.region.as_deref(), Some("r-b"));
    // Least latency unless said otherwise.
    let plain = "[[groups]]\nname = \"g\"\nmembers = [\"a\", \"b\"]\n";
    let config = Config::parse(&format!("{targets}{plain}{route}"), env).unwrap();
    assert_eq!(config.routes[0].groups[0].policy, Policy::LeastLatency);

    for (bad, field) in [
        ("[[groups]]\nname = \"a\"\nmembers = [\"b\"]\n", "groups[0].name:"),
        ("[[groups]]\nname = \"g\"\nmembers = []\n", "groups[0].members:"),
        ("[[groups]]\nname = \"g\"\nmembers = [\"a\", \"x\"]\n", "groups[0].members[1]:"),
        ("[[groups]]\nname = \"g\"\nmembers = [\"a\", \"a\"]\n", "groups[0].members[1]:"),
        (
            "[[groups]]\nname = \"g\"\nmembers = [\"a\"]\n[[groups]]\nname = \"h\"\nmembers = [\"a\"]\n",
            "groups[1].members[0]:",
        ),
        ("[[groups]]\nname = \"g\"\nmembers = [\"a\"]\npolicy = \"random\"\n", "groups[0].policy:"),
        ("[[groups]]\nname = \"g\"\nmembers = [\"a\"]\nweights = { a = 0 }\n", "groups[0].weights.a:"),
        ("[[groups]]\nname = \"g\"\nmembers = [\"a\"]\nweights = { b = 2 }\n", "groups[0].weights.b:"),
        ("[[groups]]\nname = \"g\"\nmembers = [\"a\", \"b\"]\n[[routes]]\nmodels = \"*\"\ntargets = [\"g\", \"a\"]\n", "routes[0].targets[1]:"),
    ] {
        let e = parse_err(&format!("{targets}{bad}"));
        assert!(e.starts_with(field), "{e}");
    }
}

#[test]
fn keys_may_come_from_a_file_one_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "sk-file-1\n\n  sk-file-2  \nsk-file-1\n").unwrap();
    let target = |path: &std::path::Path| {
        format!(
            "[[targets]]\nname = \"a\"\nbase_url = \"http://a/v1\"\napi_key_env = \"OPENAI_API_KEY\"\n\
             api_key_file = {:?}\n",
            path
        )
    };
    let config = Config::parse(&target(&file), env).unwrap();
    assert_eq!(config.targets[0].api_keys[1..], ["sk-file-1", "sk-file-2"]);
    let e = parse_err(&target(&dir.path().join("missing")));
    assert!(e.starts_with("targets[0].api_key_file:"), "{e}");
    std::fs::write(&file, "\n \n").unwrap();
    let e = parse_err(&target(&file));
    assert!(e.starts_with("targets[0].api_key_file:"), "{e}");
}

#[test]
fn the_store_is_sqlite_unless_a_postgres_url_is_given() {
    let target = "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n";
    let store = |toml: &str, env: &dyn Fn(&str) -> Option<String>| {
        Config::parse(&format!("{target}{toml}"), env).map(|c| c.store.map(|s| s.database))
    };
    let none = env;
    assert_eq!(
        store("", &none).unwrap(),
        Some(Database::Sqlite("data".into()))
    );
    let url = "postgres://backstop@db.internal:5432/backstop";
    assert_eq!(
        store(&format!("[store]\nurl = {url:?}"), &none).unwrap(),
        Some(Database::Postgres(url.into()))
    );
    let from_env = |name: &str| match name {
        "BACKSTOP_STORE_URL" => Some(url.to_string()),
        _ => env(name),
    };
    assert_eq!(
        store("", &from_env).unwrap(),
        Some(Database::Postgres(url.into()))
    );
    let err = store("[store]\nurl = \"mysql://x/y\"", &none).unwrap_err();
    assert!(err.to_string().contains("store.url"), "{err}");
    let err = store(
        &format!("[store]\nurl = {url:?}\npath = \"/var/lib/backstop\""),
        &none,
    )
    .unwrap_err();
    assert!(err.to_string().contains("give one"), "{err}");
    assert_eq!(store("[store]\nenabled = false", &from_env).unwrap(), None);
}
